//! The pure half of map programming: the agent's view of exclusions, identities and policy, and
//! the functions turning it into the exact keys and values the kernel programs read. No I/O and
//! no aya here, so all of it is unit-tested without root.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use mesh_common::{
    EnrolledPod, FailMode, GuardPortKey, IDENTITY_ANY, IDENTITY_WORLD, LpmAddr, LpmPortAddr,
    MtlsMode, OrigDst, POLICY_ALLOW, POLICY_DENY, PORT_ANY, PROTO_TCP, PolicyKey, SockTuple,
    V4_MAPPED_WORD,
};

/// An IP prefix such as `10.96.0.0/12` or `fd00::/8`. A bare address is a host prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("`{0}` is not an IP prefix (expected e.g. 10.96.0.0/12, fd00::/8 or 10.0.0.1)")]
    BadCidr(String),
    #[error(
        "`{0}` is not an exclusion (expected a prefix `10.96.0.0/12`, a prefix and port \
         `10.96.0.1@443`, or a port on every address `@53`; ports 1-65535)"
    )]
    BadExclusion(String),
    #[error("prefix length {len} is too long for {addr} (at most {max})")]
    PrefixTooLong { addr: IpAddr, len: u8, max: u8 },
    #[error("identity id {0} is reserved (0 = any, 1 = world); workload identities start at 2")]
    ReservedIdentity(u32),
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, ModelError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(ModelError::PrefixTooLong {
                addr,
                len: prefix_len,
                max,
            });
        }
        Ok(Self { addr, prefix_len })
    }

    /// A single address.
    pub fn host(addr: IpAddr) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix_len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Address words and prefix length as the tries store them (IPv4 mapped into IPv6).
    fn lpm(&self) -> ([u32; 4], u32) {
        match self.addr {
            IpAddr::V4(v4) => (v4_words(v4), 96 + u32::from(self.prefix_len)),
            IpAddr::V6(v6) => (v6_words(v6), u32::from(self.prefix_len)),
        }
    }
}

impl FromStr for Cidr {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::BadCidr(s.to_owned());
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
                let len: u8 = len.trim().parse().map_err(|_| bad())?;
                Self::new(addr, len)
            }
            None => Ok(Self::host(s.trim().parse().map_err(|_| bad())?)),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// IPv4 address as the programs see it: network-order bytes in memory.
pub fn v4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// IPv4 address as mapped IPv6 words (`::ffff:a.b.c.d`).
pub fn v4_words(ip: Ipv4Addr) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, v4_word(ip)]
}

/// IPv6 address as four words with network-order bytes in memory (as `user_ip6`).
pub fn v6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Inverse of [`v6_words`].
pub fn words_v6(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// Destinations enrolled pods reach directly, without the tunnel (e.g. the kube API, DNS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exclusion {
    /// Every port of a prefix.
    Cidr(Cidr),
    /// One port of a prefix.
    CidrPort(Cidr, u16),
    /// One port on every address.
    Port(u16),
}

impl FromStr for Exclusion {
    type Err = ModelError;

    /// `10.96.0.0/12` (every port), `10.96.0.1@443` or `fd00::/8@53` (one port of a prefix),
    /// `@53` (one port on every address). `@` keeps IPv6 addresses unambiguous.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::BadExclusion(s.to_owned());
        match s.trim().split_once('@') {
            None => Ok(Exclusion::Cidr(s.parse()?)),
            Some((cidr, port)) => {
                let port: u16 = port.trim().parse().map_err(|_| bad())?;
                if port == 0 {
                    return Err(bad());
                }
                if cidr.trim().is_empty() {
                    Ok(Exclusion::Port(port))
                } else {
                    Ok(Exclusion::CidrPort(cidr.parse()?, port))
                }
            }
        }
    }
}

impl Exclusion {
    /// The trie key: `(prefix length, data)`.
    pub fn lpm_key(&self) -> (u32, LpmPortAddr) {
        match *self {
            Exclusion::Cidr(c) => {
                let (addr, len) = c.lpm();
                (32 + len, port_addr(PORT_ANY, addr))
            }
            Exclusion::CidrPort(c, port) => {
                let (addr, len) = c.lpm();
                (32 + len, port_addr(port, addr))
            }
            Exclusion::Port(port) => (16, port_addr(port, [0; 4])),
        }
    }
}

fn port_addr(port: u16, addr: [u32; 4]) -> LpmPortAddr {
    LpmPortAddr {
        port_be: port.to_be(),
        _pad: 0,
        addr,
    }
}

/// The identity trie key for a prefix: `(prefix length, data)`.
pub fn identity_key(cidr: &Cidr) -> (u32, LpmAddr) {
    let (addr, len) = cidr.lpm();
    (len, LpmAddr { addr })
}

/// The mesh-destination trie key for a prefix (a workload address or a service VIP):
/// `(prefix length, data)`, value [`mesh_common::MESH_DST_MEMBER`].
pub fn mesh_destination_key(cidr: &Cidr) -> (u32, LpmAddr) {
    identity_key(cidr)
}

/// The mesh-destination trie's catch-all key (prefix length 0, every address), value
/// [`mesh_common::MESH_DST_OUTSIDE`]: with it, a destination matching no member is outside the
/// mesh; without it (an empty trie) every destination is captured.
pub fn outside_mesh_key() -> (u32, LpmAddr) {
    (0, LpmAddr::default())
}

/// Checks that `id` may be given to a workload (0 and 1 are reserved).
pub fn workload_identity(id: u32) -> Result<u32, ModelError> {
    if id == IDENTITY_ANY || id == IDENTITY_WORLD {
        return Err(ModelError::ReservedIdentity(id));
    }
    Ok(id)
}

/// An enrolled pod as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub workload_id: u32,
    /// The pod's identity (service account); a workload identity, not 0 or 1.
    pub identity_id: u32,
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub mtls: MtlsMode,
    pub fail: FailMode,
    /// Listener ports reachable in plaintext from anywhere (kubelet probes), STRICT pods only.
    pub plaintext_ports: Vec<u16>,
}

impl PodSpec {
    /// The [`mesh_common::maps::ENROLLED`] value.
    pub fn record(&self) -> EnrolledPod {
        EnrolledPod {
            workload_id: self.workload_id,
            identity_id: self.identity_id,
            mtls_mode: self.mtls as u8,
            fail_mode: self.fail as u8,
            flags: 0,
            ip4: self.ip4.map_or(0, v4_word),
            ip6: self.ip6.map(v6_words).unwrap_or_default(),
        }
    }

    /// The pod's addresses, as host prefixes for the identity map.
    pub fn host_prefixes(&self) -> Vec<Cidr> {
        let v4 = self.ip4.map(|ip| Cidr::host(IpAddr::V4(ip)));
        let v6 = self.ip6.map(|ip| Cidr::host(IpAddr::V6(ip)));
        v4.into_iter().chain(v6).collect()
    }
}

/// The plaintext-guard allow-list key for listener `port` of the pod `netns_cookie`.
pub fn guard_port_key(netns_cookie: u64, port: u16) -> GuardPortKey {
    GuardPortKey {
        netns_cookie,
        port,
        _pad: [0; 6],
    }
}

/// Destination side of a policy rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerIdentity {
    Any,
    /// Destinations with no known identity.
    World,
    Id(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    /// Checked on connected UDP sockets (`connect()`); not tunnelled.
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => mesh_common::PROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
}

/// One connect-time policy entry. The most specific entry wins: (dst, port), (dst, any port),
/// (any dst, port), (any, any); with no entry the connect is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    pub src_identity: u32,
    pub dst: PeerIdentity,
    /// `None` = every port.
    pub port: Option<u16>,
    pub proto: Proto,
    pub action: Action,
}

impl PolicyRule {
    /// The policy map entry.
    pub fn entry(&self) -> (PolicyKey, u32) {
        let dst_identity = match self.dst {
            PeerIdentity::Any => IDENTITY_ANY,
            PeerIdentity::World => IDENTITY_WORLD,
            PeerIdentity::Id(id) => id,
        };
        let key = PolicyKey {
            src_identity: self.src_identity,
            dst_identity,
            port: self.port.unwrap_or(PORT_ANY),
            proto: self.proto.number(),
            _pad: 0,
        };
        let value = match self.action {
            Action::Allow => POLICY_ALLOW,
            Action::Deny => POLICY_DENY,
        };
        (key, value)
    }
}

/// The tuple-map key for a connection the tunnel accepted, from its peer (the pod) and local
/// (the tunnel) addresses. IPv4-mapped IPv6 addresses (a dual-stack listener's view) are keyed as
/// IPv4, as the programs do. `None` when the two sides are of different families.
pub fn tuple_key(peer: SocketAddr, local: SocketAddr) -> Option<SockTuple> {
    match (canonical(peer.ip()), canonical(local.ip())) {
        (IpAddr::V4(p), IpAddr::V4(l)) => Some(SockTuple {
            src_ip: [v4_word(p), 0, 0, 0],
            dst_ip: [v4_word(l), 0, 0, 0],
            src_port: peer.port(),
            dst_port: local.port(),
            family: mesh_common::AF_INET,
            _pad: 0,
        }),
        (IpAddr::V6(p), IpAddr::V6(l)) => Some(SockTuple {
            src_ip: v6_words(p),
            dst_ip: v6_words(l),
            src_port: peer.port(),
            dst_port: local.port(),
            family: mesh_common::AF_INET6,
            _pad: 0,
        }),
        _ => None,
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The destination a record describes, or `None` for an unknown family.
pub fn orig_dst_addr(rec: &OrigDst) -> Option<SocketAddr> {
    match rec.family {
        mesh_common::AF_INET => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(rec.ip[0].to_ne_bytes())),
            rec.port,
        )),
        mesh_common::AF_INET6 => Some(SocketAddr::new(IpAddr::V6(words_v6(rec.ip)), rec.port)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_records_carry_addresses_and_modes() {
        let spec = PodSpec {
            workload_id: 3,
            identity_id: 9,
            ip4: Some(Ipv4Addr::new(10, 0, 0, 7)),
            ip6: None,
            mtls: MtlsMode::Permissive,
            fail: FailMode::Open,
            plaintext_ports: vec![8081],
        };
        let r = spec.record();
        assert_eq!(r.ip4.to_ne_bytes(), [10, 0, 0, 7]);
        assert_eq!(r.ip6, [0; 4]);
        assert_eq!((r.mtls_mode, r.fail_mode), (1, 1));
        assert_eq!(
            spec.host_prefixes(),
            vec![Cidr::host("10.0.0.7".parse().expect("valid"))]
        );
    }

    #[test]
    fn cidrs_parse_and_reject_nonsense() {
        let c: Cidr = "10.96.0.0/12".parse().expect("valid");
        assert_eq!(c.prefix_len(), 12);
        assert_eq!("fd00::1".parse::<Cidr>().expect("host").prefix_len(), 128);
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(ModelError::PrefixTooLong { max: 32, .. })
        ));
        assert!(matches!(
            "kube-api".parse::<Cidr>(),
            Err(ModelError::BadCidr(_))
        ));
    }

    #[test]
    fn ipv4_prefixes_are_mapped_into_ipv6_in_network_order() {
        let (len, key) = identity_key(&"10.1.2.0/24".parse().expect("valid"));
        assert_eq!(len, 96 + 24);
        let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 0]
        );
        let v6: Ipv6Addr = "fd00::abcd".parse().expect("valid");
        assert_eq!(words_v6(v6_words(v6)), v6);
        assert_eq!(v6_words(v6)[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
    }

    #[test]
    fn exclusions_parse_from_config_strings() {
        let c = |s: &str| s.parse::<Cidr>().expect("valid");
        assert_eq!(
            "10.96.0.0/12".parse(),
            Ok(Exclusion::Cidr(c("10.96.0.0/12")))
        );
        assert_eq!(
            "10.96.0.1@443".parse(),
            Ok(Exclusion::CidrPort(c("10.96.0.1"), 443))
        );
        assert_eq!(
            "fd00::/8@53".parse(),
            Ok(Exclusion::CidrPort(c("fd00::/8"), 53))
        );
        assert_eq!("@53".parse(), Ok(Exclusion::Port(53)));
        for bad in ["@0", "@dns", "10.0.0.1@", "nope"] {
            assert!(bad.parse::<Exclusion>().is_err(), "{bad}");
        }
    }

    #[test]
    fn exclusion_keys_put_the_port_first() {
        let c: Cidr = "10.96.0.1".parse().expect("valid");
        let (len, k) = Exclusion::CidrPort(c, 443).lpm_key();
        assert_eq!(len, 32 + 128);
        assert_eq!(k.port_be.to_ne_bytes(), [0x01, 0xbb]);
        let (len, k) = Exclusion::Cidr(c).lpm_key();
        assert_eq!((len, k.port_be), (160, 0));
        let (len, k) = Exclusion::Port(53).lpm_key();
        assert_eq!((len, k.port_be.to_ne_bytes()), (16, [0, 53]));
        let (len, _) = Exclusion::Cidr("fd00::/8".parse().expect("valid")).lpm_key();
        assert_eq!(len, 40);
    }

    #[test]
    fn policy_entries_use_reserved_wildcards() {
        let rule = PolicyRule {
            src_identity: 5,
            dst: PeerIdentity::Any,
            port: None,
            proto: Proto::Tcp,
            action: Action::Deny,
        };
        let (k, v) = rule.entry();
        assert_eq!(
            (k.src_identity, k.dst_identity, k.port, k.proto),
            (5, 0, 0, 6)
        );
        assert_eq!(v, POLICY_DENY);
        let (k, v) = PolicyRule {
            dst: PeerIdentity::World,
            port: Some(80),
            action: Action::Allow,
            ..rule
        }
        .entry();
        assert_eq!(
            (k.dst_identity, k.port, v),
            (IDENTITY_WORLD, 80, POLICY_ALLOW)
        );
        assert_eq!(workload_identity(1), Err(ModelError::ReservedIdentity(1)));
        assert_eq!(workload_identity(2), Ok(2));
    }

    #[test]
    fn tuple_keys_treat_mapped_as_ipv4_and_refuse_mixed_families() {
        let v4 = tuple_key(
            "10.0.0.2:40000".parse().expect("valid"),
            "169.254.7.1:15001".parse().expect("valid"),
        )
        .expect("same family");
        let mapped = tuple_key(
            "[::ffff:10.0.0.2]:40000".parse().expect("valid"),
            "[::ffff:169.254.7.1]:15001".parse().expect("valid"),
        )
        .expect("same family");
        assert_eq!(v4, mapped);
        assert_eq!(v4.family, mesh_common::AF_INET);
        let v6 = tuple_key(
            "[fd00::2]:40000".parse().expect("valid"),
            "[fd00::1]:15001".parse().expect("valid"),
        )
        .expect("same family");
        assert_eq!(v6.family, mesh_common::AF_INET6);
        assert!(
            tuple_key(
                "10.0.0.2:1".parse().expect("valid"),
                "[fd00::1]:2".parse().expect("valid")
            )
            .is_none()
        );
    }

    #[test]
    fn orig_dst_records_decode_both_families() {
        let rec = OrigDst {
            ip: v6_words("fd00::5".parse().expect("valid")),
            port: 8080,
            family: mesh_common::AF_INET6,
            ..Default::default()
        };
        assert_eq!(
            orig_dst_addr(&rec),
            Some("[fd00::5]:8080".parse().expect("valid"))
        );
        let rec = OrigDst {
            ip: [v4_word(Ipv4Addr::new(10, 1, 1, 1)), 0, 0, 0],
            port: 80,
            family: mesh_common::AF_INET,
            ..Default::default()
        };
        assert_eq!(
            orig_dst_addr(&rec),
            Some("10.1.1.1:80".parse().expect("valid"))
        );
        assert_eq!(orig_dst_addr(&OrigDst { family: 99, ..rec }), None);
    }
}
