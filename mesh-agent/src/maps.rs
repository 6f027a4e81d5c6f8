//! The kernel seam: every map write the agent makes goes through [`KernelMaps`]. [`Datapath`]
//! implements it on the real maps; [`FakeMaps`] keeps the same entries in memory, so the code that
//! turns the model ([`crate::map_model`]) into map entries is unit-tested without root.
//!
//! [`Datapath`]: crate::datapath::Datapath

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::{net::IpAddr, time::Duration};

use mesh_common::{
    EnrolledPod, GuardPortKey, LpmAddr, LpmPortAddr, MESH_DST_MEMBER, MESH_DST_OUTSIDE, PolicyKey,
    TunnelConfig,
};

use crate::map_model::{self, Cidr, Exclusion, ModelError, PodSpec, PolicyRule};

/// The contents of the maps the agent programs (not the kernel-written ones).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    pub tunnel: Option<TunnelConfig>,
    pub enrolled: BTreeMap<u64, EnrolledPod>,
    pub exclusions: BTreeSet<(u32, LpmPortAddr)>,
    pub identities: BTreeMap<(u32, LpmAddr), u32>,
    pub policy: BTreeMap<PolicyKey, u32>,
    pub guard_ports: BTreeSet<GuardPortKey>,
    /// [`mesh_common::maps::MESH_DESTINATIONS`]: members and the catch-all.
    pub mesh_destinations: BTreeMap<(u32, LpmAddr), u32>,
}

/// Where redirected connections go and how the tunnel's liveness is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSettings {
    /// IPv4 tunnel address (also the target of IPv4-mapped IPv6 connects).
    pub ip4: std::net::Ipv4Addr,
    /// IPv6 tunnel address; without one, native IPv6 connects follow the pod's fail mode.
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Outbound listener port.
    pub port: u16,
    /// The tunnel is down when its heartbeat is older than this; `None` = not checked.
    pub stale_after: Option<Duration>,
}

impl TunnelSettings {
    /// The map value.
    pub fn config(&self) -> TunnelConfig {
        TunnelConfig {
            ip4: map_model::v4_word(self.ip4),
            port: self.port,
            _pad: 0,
            ip6: self.ip6.map(map_model::v6_words).unwrap_or_default(),
            stale_after_ns: self.stale_after.map_or(0, |d| {
                u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Raw map writes (one method per map operation) plus the model-level operations built on them.
/// Removing an absent entry is not an error.
pub trait KernelMaps {
    fn put_enrolled(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), MapsError>;
    fn del_enrolled(&mut self, netns_cookie: u64) -> Result<(), MapsError>;
    fn put_tunnel_config(&mut self, cfg: TunnelConfig) -> Result<(), MapsError>;
    fn put_exclusion(&mut self, prefix_len: u32, key: LpmPortAddr) -> Result<(), MapsError>;
    fn del_exclusion(&mut self, prefix_len: u32, key: LpmPortAddr) -> Result<(), MapsError>;
    fn put_identity(&mut self, prefix_len: u32, key: LpmAddr, id: u32) -> Result<(), MapsError>;
    fn del_identity(&mut self, prefix_len: u32, key: LpmAddr) -> Result<(), MapsError>;
    fn put_policy(&mut self, key: PolicyKey, verdict: u32) -> Result<(), MapsError>;
    fn del_policy(&mut self, key: PolicyKey) -> Result<(), MapsError>;
    fn put_guard_port(&mut self, key: GuardPortKey) -> Result<(), MapsError>;
    fn del_guard_port(&mut self, key: GuardPortKey) -> Result<(), MapsError>;
    fn put_mesh_destination(
        &mut self,
        prefix_len: u32,
        key: LpmAddr,
        value: u32,
    ) -> Result<(), MapsError>;
    fn del_mesh_destination(&mut self, prefix_len: u32, key: LpmAddr) -> Result<(), MapsError>;
    /// Everything the agent-programmed maps hold now.
    fn read_entries(&self) -> Result<MapEntries, MapsError>;

    /// Lets plaintext reach the listener on `port` of the STRICT pod `netns_cookie` from any
    /// source (kubelet probes); other listeners of the pod accept only the tunnel address.
    fn allow_plaintext_port(&mut self, netns_cookie: u64, port: u16) -> Result<(), MapsError> {
        self.put_guard_port(map_model::guard_port_key(netns_cookie, port))
    }

    fn disallow_plaintext_port(&mut self, netns_cookie: u64, port: u16) -> Result<(), MapsError> {
        self.del_guard_port(map_model::guard_port_key(netns_cookie, port))
    }

    /// Declares `cidr` (a workload address or a service VIP) a destination in the mesh: enrolled
    /// pods' connects to it are captured once [`Self::pass_outside_mesh`] is set.
    fn add_mesh_destination(&mut self, cidr: &Cidr) -> Result<(), MapsError> {
        let (len, key) = map_model::mesh_destination_key(cidr);
        self.put_mesh_destination(len, key, MESH_DST_MEMBER)
    }

    fn remove_mesh_destination(&mut self, cidr: &Cidr) -> Result<(), MapsError> {
        let (len, key) = map_model::mesh_destination_key(cidr);
        self.del_mesh_destination(len, key)
    }

    /// Writes the mesh-destination catch-all: from now on enrolled pods' TCP connects to
    /// destinations that are not mesh destinations go out untouched. Until then (an empty
    /// trie) every destination is captured. Write the members first.
    fn pass_outside_mesh(&mut self) -> Result<(), MapsError> {
        let (len, key) = map_model::outside_mesh_key();
        self.put_mesh_destination(len, key, MESH_DST_OUTSIDE)
    }

    /// Enrolls the pod whose network namespace has cookie `netns_cookie`: its record, its
    /// addresses in the identity map (so policy can name it as a destination) and in the mesh
    /// destinations, and its plaintext ports. Idempotent; re-enrolling updates.
    fn enroll_pod(&mut self, netns_cookie: u64, pod: &PodSpec) -> Result<(), MapsError> {
        map_model::workload_identity(pod.identity_id)?;
        for cidr in pod.host_prefixes() {
            self.set_identity(&cidr, pod.identity_id)?;
            self.add_mesh_destination(&cidr)?;
        }
        for &port in &pod.plaintext_ports {
            self.allow_plaintext_port(netns_cookie, port)?;
        }
        // The record last: the pod is captured only once its identity and ports are in place.
        self.put_enrolled(netns_cookie, pod.record())
    }

    /// Reverses [`Self::enroll_pod`].
    fn unenroll_pod(&mut self, netns_cookie: u64, pod: &PodSpec) -> Result<(), MapsError> {
        // The record first: the pod stops being captured before its entries go.
        self.del_enrolled(netns_cookie)?;
        for &port in &pod.plaintext_ports {
            self.disallow_plaintext_port(netns_cookie, port)?;
        }
        for cidr in pod.host_prefixes() {
            self.remove_identity(&cidr)?;
            self.remove_mesh_destination(&cidr)?;
        }
        Ok(())
    }

    /// Sets where enrolled pods' connects are redirected. Until this is set, enrolled pods'
    /// connects are refused (fail-closed) or passed untouched (fail-open pods).
    fn set_tunnel(&mut self, settings: &TunnelSettings) -> Result<(), MapsError> {
        self.put_tunnel_config(settings.config())
    }

    fn add_exclusion(&mut self, exclusion: &Exclusion) -> Result<(), MapsError> {
        let (len, key) = exclusion.lpm_key();
        self.put_exclusion(len, key)
    }

    fn remove_exclusion(&mut self, exclusion: &Exclusion) -> Result<(), MapsError> {
        let (len, key) = exclusion.lpm_key();
        self.del_exclusion(len, key)
    }

    /// Declares that destinations in `cidr` have identity `id` (a workload identity, not 0 or 1).
    fn set_identity(&mut self, cidr: &Cidr, id: u32) -> Result<(), MapsError> {
        let id = map_model::workload_identity(id)?;
        let (len, key) = map_model::identity_key(cidr);
        self.put_identity(len, key, id)
    }

    fn remove_identity(&mut self, cidr: &Cidr) -> Result<(), MapsError> {
        let (len, key) = map_model::identity_key(cidr);
        self.del_identity(len, key)
    }

    fn set_policy(&mut self, rule: &PolicyRule) -> Result<(), MapsError> {
        map_model::workload_identity(rule.src_identity)?;
        let (key, verdict) = rule.entry();
        self.put_policy(key, verdict)
    }

    fn remove_policy(&mut self, rule: &PolicyRule) -> Result<(), MapsError> {
        self.del_policy(rule.entry().0)
    }
}

/// In-memory [`KernelMaps`] for unit tests, with a reference implementation of the programs'
/// lookups so tests can ask what the kernel would decide.
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub enrolled: BTreeMap<u64, EnrolledPod>,
    pub tunnel: Option<TunnelConfig>,
    pub exclusions: HashMap<(u32, LpmPortAddr), u32>,
    pub identities: HashMap<(u32, LpmAddr), u32>,
    pub policy: BTreeMap<PolicyKey, u32>,
    pub guard_ports: BTreeSet<GuardPortKey>,
    pub mesh_destinations: HashMap<(u32, LpmAddr), u32>,
}

impl KernelMaps for FakeMaps {
    fn put_enrolled(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), MapsError> {
        self.enrolled.insert(netns_cookie, pod);
        Ok(())
    }
    fn del_enrolled(&mut self, netns_cookie: u64) -> Result<(), MapsError> {
        self.enrolled.remove(&netns_cookie);
        Ok(())
    }
    fn put_tunnel_config(&mut self, cfg: TunnelConfig) -> Result<(), MapsError> {
        self.tunnel = Some(cfg);
        Ok(())
    }
    fn put_exclusion(&mut self, prefix_len: u32, key: LpmPortAddr) -> Result<(), MapsError> {
        self.exclusions.insert((prefix_len, key), 1);
        Ok(())
    }
    fn del_exclusion(&mut self, prefix_len: u32, key: LpmPortAddr) -> Result<(), MapsError> {
        self.exclusions.remove(&(prefix_len, key));
        Ok(())
    }
    fn put_identity(&mut self, prefix_len: u32, key: LpmAddr, id: u32) -> Result<(), MapsError> {
        self.identities.insert((prefix_len, key), id);
        Ok(())
    }
    fn del_identity(&mut self, prefix_len: u32, key: LpmAddr) -> Result<(), MapsError> {
        self.identities.remove(&(prefix_len, key));
        Ok(())
    }
    fn put_policy(&mut self, key: PolicyKey, verdict: u32) -> Result<(), MapsError> {
        self.policy.insert(key, verdict);
        Ok(())
    }
    fn del_policy(&mut self, key: PolicyKey) -> Result<(), MapsError> {
        self.policy.remove(&key);
        Ok(())
    }
    fn put_guard_port(&mut self, key: GuardPortKey) -> Result<(), MapsError> {
        self.guard_ports.insert(key);
        Ok(())
    }
    fn del_guard_port(&mut self, key: GuardPortKey) -> Result<(), MapsError> {
        self.guard_ports.remove(&key);
        Ok(())
    }
    fn put_mesh_destination(
        &mut self,
        prefix_len: u32,
        key: LpmAddr,
        value: u32,
    ) -> Result<(), MapsError> {
        self.mesh_destinations.insert((prefix_len, key), value);
        Ok(())
    }
    fn del_mesh_destination(&mut self, prefix_len: u32, key: LpmAddr) -> Result<(), MapsError> {
        self.mesh_destinations.remove(&(prefix_len, key));
        Ok(())
    }
    fn read_entries(&self) -> Result<MapEntries, MapsError> {
        Ok(self.entries())
    }
}

/// Whether the first `bits` bits of `a` and `b` (bytes in memory order) are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let bits = bits as usize;
    let (full, rest) = (bits / 8, bits % 8);
    if a.len() < full || b.len() < full || a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    matches!((a.get(full), b.get(full)), (Some(x), Some(y)) if x & mask == y & mask)
}

fn lpm_bytes(port_be: u16, words: [u32; 4]) -> Vec<u8> {
    let mut v = port_be.to_ne_bytes().to_vec();
    v.extend_from_slice(&[0, 0]);
    v.extend(words.iter().flat_map(|w| w.to_ne_bytes()));
    v
}

fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => map_model::v4_words(v4),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| map_model::v6_words(v6), map_model::v4_words),
    }
}

impl FakeMaps {
    /// The entries, in the form [`crate::reconcile`] compares.
    pub fn entries(&self) -> MapEntries {
        MapEntries {
            tunnel: self.tunnel,
            enrolled: self.enrolled.clone(),
            exclusions: self.exclusions.keys().copied().collect(),
            identities: self.identities.iter().map(|(k, v)| (*k, *v)).collect(),
            policy: self.policy.clone(),
            guard_ports: self.guard_ports.clone(),
            mesh_destinations: self
                .mesh_destinations
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
        }
    }

    /// What the programs' mesh-destination lookup answers for `ip`: `true` when a TCP connect
    /// of an enrolled pod to it passes untouched as outside the mesh (longest match is the
    /// catch-all), `false` when it is captured (a member, or no match in an empty trie).
    pub fn is_outside_mesh(&self, ip: IpAddr) -> bool {
        let probe: Vec<u8> = ip_words(ip).iter().flat_map(|w| w.to_ne_bytes()).collect();
        self.mesh_destinations
            .iter()
            .filter(|((len, k), _)| {
                let kb: Vec<u8> = k.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
                prefix_eq(&kb, &probe, *len)
            })
            .max_by_key(|((len, _), _)| *len)
            .is_some_and(|(_, v)| *v == MESH_DST_OUTSIDE)
    }

    /// What the exclusion lookups of the programs answer for `ip`:`port`.
    pub fn is_excluded(&self, ip: IpAddr, port: u16) -> bool {
        let words = ip_words(ip);
        [port.to_be(), 0].iter().any(|&p| {
            let probe = lpm_bytes(p, words);
            self.exclusions
                .keys()
                .any(|(len, k)| prefix_eq(&lpm_bytes(k.port_be, k.addr), &probe, *len))
        })
    }

    /// The identity the programs find for `ip` (longest prefix), or world.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        let probe: Vec<u8> = ip_words(ip).iter().flat_map(|w| w.to_ne_bytes()).collect();
        self.identities
            .iter()
            .filter(|((len, k), _)| {
                let kb: Vec<u8> = k.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
                prefix_eq(&kb, &probe, *len)
            })
            .max_by_key(|((len, _), _)| *len)
            .map_or(mesh_common::IDENTITY_WORLD, |(_, id)| *id)
    }

    /// Whether the programs' policy lookup denies a connect from `src_identity` to
    /// `ip`:`port` over `proto`.
    pub fn denies(
        &self,
        src_identity: u32,
        ip: IpAddr,
        port: u16,
        proto: map_model::Proto,
    ) -> bool {
        let dst = self.identity_of(ip);
        [
            (dst, port),
            (dst, mesh_common::PORT_ANY),
            (mesh_common::IDENTITY_ANY, port),
            (mesh_common::IDENTITY_ANY, mesh_common::PORT_ANY),
        ]
        .into_iter()
        .find_map(|(dst_identity, port)| {
            self.policy
                .get(&PolicyKey {
                    src_identity,
                    dst_identity,
                    port,
                    proto: proto.number(),
                    _pad: 0,
                })
                .copied()
        })
        .is_some_and(|v| v == mesh_common::POLICY_DENY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map_model::{Action, PeerIdentity, Proto};

    fn denies(m: &FakeMaps, src: u32, ip: IpAddr, port: u16) -> bool {
        m.denies(src, ip, port, Proto::Tcp)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid address")
    }

    #[test]
    fn exclusions_match_by_prefix_and_port() {
        let mut m = FakeMaps::default();
        m.add_exclusion(&Exclusion::Cidr("10.96.0.0/12".parse().expect("valid")))
            .expect("fake");
        m.add_exclusion(&Exclusion::CidrPort(
            "192.168.1.10".parse().expect("valid"),
            6443,
        ))
        .expect("fake");
        m.add_exclusion(&Exclusion::Port(53)).expect("fake");
        assert!(m.is_excluded(ip("10.100.3.4"), 80));
        assert!(!m.is_excluded(ip("10.112.0.1"), 80));
        assert!(m.is_excluded(ip("192.168.1.10"), 6443));
        assert!(!m.is_excluded(ip("192.168.1.10"), 443));
        assert!(m.is_excluded(ip("8.8.8.8"), 53));
        assert!(m.is_excluded(ip("fd00::53"), 53));
        // A dual-stack socket's view of an IPv4 address is the same destination.
        assert!(m.is_excluded(ip("::ffff:10.96.0.1"), 443));
        m.remove_exclusion(&Exclusion::Port(53)).expect("fake");
        assert!(!m.is_excluded(ip("8.8.8.8"), 53));
    }

    #[test]
    fn policy_most_specific_entry_wins_and_default_allows() {
        let mut m = FakeMaps::default();
        m.set_identity(&"10.1.0.0/16".parse().expect("valid"), 20)
            .expect("fake");
        m.set_identity(&"10.1.2.3".parse().expect("valid"), 30)
            .expect("fake");
        assert_eq!(m.identity_of(ip("10.1.9.9")), 20);
        assert_eq!(m.identity_of(ip("10.1.2.3")), 30);
        assert_eq!(m.identity_of(ip("1.1.1.1")), mesh_common::IDENTITY_WORLD);
        let deny_all = PolicyRule {
            src_identity: 10,
            dst: PeerIdentity::Id(20),
            port: None,
            proto: Proto::Tcp,
            action: Action::Deny,
        };
        m.set_policy(&deny_all).expect("fake");
        m.set_policy(&PolicyRule {
            port: Some(8080),
            action: Action::Allow,
            ..deny_all
        })
        .expect("fake");
        assert!(denies(&m, 10, ip("10.1.9.9"), 80));
        assert!(!denies(&m, 10, ip("10.1.9.9"), 8080));
        assert!(
            !denies(&m, 10, ip("10.1.2.3"), 80),
            "other identity: allowed"
        );
        assert!(!denies(&m, 11, ip("10.1.9.9"), 80), "other source: allowed");
        m.set_policy(&PolicyRule {
            dst: PeerIdentity::World,
            ..deny_all
        })
        .expect("fake");
        assert!(denies(&m, 10, ip("1.1.1.1"), 443));
        assert!(
            !m.denies(10, ip("1.1.1.1"), 443, Proto::Udp),
            "UDP has its own entries"
        );
        m.remove_policy(&deny_all).expect("fake");
        assert!(!denies(&m, 10, ip("10.1.9.9"), 80));
    }

    #[test]
    fn enrolling_a_pod_registers_its_addresses_and_ports_and_unenrolling_removes_them() {
        let mut m = FakeMaps::default();
        let spec = PodSpec {
            workload_id: 1,
            identity_id: 20,
            ip4: Some("10.1.0.5".parse().expect("valid")),
            ip6: Some("fd00::5".parse().expect("valid")),
            mtls: mesh_common::MtlsMode::Strict,
            fail: mesh_common::FailMode::Closed,
            plaintext_ports: vec![8081],
        };
        m.enroll_pod(77, &spec).expect("fake");
        assert_eq!(m.enrolled[&77].identity_id, 20);
        assert_eq!(m.identity_of(ip("10.1.0.5")), 20);
        assert_eq!(m.identity_of(ip("fd00::5")), 20);
        assert_eq!(m.guard_ports.len(), 1);
        assert_eq!(
            m.mesh_destinations.len(),
            2,
            "both addresses are mesh destinations"
        );
        m.pass_outside_mesh().expect("fake");
        assert!(!m.is_outside_mesh(ip("10.1.0.5")) && !m.is_outside_mesh(ip("fd00::5")));
        assert!(m.is_outside_mesh(ip("10.1.0.6")));
        m.unenroll_pod(77, &spec).expect("fake");
        assert!(m.enrolled.is_empty() && m.identities.is_empty() && m.guard_ports.is_empty());
        assert!(
            m.is_outside_mesh(ip("10.1.0.5")),
            "an unenrolled pod's address left the mesh"
        );
        let bad = PodSpec {
            identity_id: 0,
            ..spec
        };
        assert!(m.enroll_pod(78, &bad).is_err());
        assert!(m.enrolled.is_empty(), "nothing written for a rejected pod");
    }

    #[test]
    fn plaintext_ports_are_per_pod() {
        let mut m = FakeMaps::default();
        m.allow_plaintext_port(7, 8081).expect("fake");
        m.allow_plaintext_port(8, 8081).expect("fake");
        m.disallow_plaintext_port(8, 8081).expect("fake");
        let keys: Vec<_> = m
            .guard_ports
            .iter()
            .map(|k| (k.netns_cookie, k.port))
            .collect();
        assert_eq!(keys, [(7, 8081)]);
    }

    #[test]
    fn reserved_identities_are_rejected_before_any_write() {
        let mut m = FakeMaps::default();
        let err = m
            .set_identity(&"10.0.0.0/8".parse().expect("valid"), 1)
            .unwrap_err();
        assert!(matches!(
            err,
            MapsError::Model(ModelError::ReservedIdentity(1))
        ));
        assert!(m.identities.is_empty());
    }

    #[test]
    fn tunnel_settings_encode_addresses_and_staleness() {
        let mut m = FakeMaps::default();
        m.set_tunnel(&TunnelSettings {
            ip4: "169.254.7.1".parse().expect("valid"),
            ip6: Some("fd00::7".parse().expect("valid")),
            port: 15001,
            stale_after: Some(Duration::from_millis(1500)),
        })
        .expect("fake");
        let cfg = m.tunnel.expect("written");
        assert_eq!(cfg.ip4.to_ne_bytes(), [169, 254, 7, 1]);
        assert_eq!(
            map_model::words_v6(cfg.ip6),
            "fd00::7".parse::<std::net::Ipv6Addr>().expect("valid")
        );
        assert_eq!((cfg.port, cfg.stale_after_ns), (15001, 1_500_000_000));
    }
}
