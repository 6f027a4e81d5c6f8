//! Types and constants shared by the nodemesh eBPF programs (`mesh-ebpf`) and userspace
//! (`mesh-agent`). Everything here is `no_std`, `#[repr(C)]` and `Copy`, with explicit padding so
//! both sides agree on every byte. Map names, ports and the map layout version live here so that a
//! change on one side cannot silently drift from the other.
//!
//! Byte-order conventions (the kernel's, kept as-is to avoid conversions on the hot path):
//! - IPv4 addresses are stored as the `u32` the kernel shows in `bpf_sock_addr.user_ip4`, i.e. the
//!   four address bytes in network order in memory. Userspace converts with `u32::from_ne_bytes`.
//! - IPv6 addresses are four such `u32` words.
//! - Ports are host order `u16` everywhere in these types.
#![cfg_attr(not(test), no_std)]

/// Version of the map layout. Any change to a map's key or value type, size or kind bumps it, so
/// pinned maps of an older layout are never reused by a program that reads them differently.
/// Adding a map does not: an agent adopting pins of the same version creates the new map empty
/// next to them, so a new map must be safe when empty (as [`maps::MESH_DESTINATIONS`] is: empty
/// means "capture everything", the behaviour before it existed).
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// Map names, as they appear in the eBPF object and under the pin directory.
pub mod maps {
    /// `HashMap<u64 netns cookie, EnrolledPod>`: pods whose traffic the mesh captures.
    pub const ENROLLED: &str = "NM_ENROLLED";
    /// `Array<TunnelConfig>` with one entry: where redirected connections go.
    pub const TUNNEL_CONFIG: &str = "NM_TUNNEL_CFG";
    /// `SkStorage<OrigDst>`: original destination stored on the client socket at connect().
    pub const SOCK_ORIG_DST: &str = "NM_SOCK_ODST";
    /// `LruHashMap<SockTuple, OrigDst>`: original destination keyed by the 4-tuple the tunnel sees.
    pub const ORIG_DST_BY_TUPLE: &str = "NM_ODST_TUPLE";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "NM_COUNTERS";
    /// `Array<u64>` with one entry: the tunnel's last heartbeat, `CLOCK_MONOTONIC` nanoseconds
    /// (what `bpf_ktime_get_ns` returns). 0 = never.
    pub const TUNNEL_HEARTBEAT: &str = "NM_TUNNEL_HB";
    /// `LpmTrie<LpmPortAddr, u32>`: destinations enrolled pods reach directly (not redirected).
    pub const EXCLUSIONS: &str = "NM_EXCLUDE";
    /// `LpmTrie<LpmAddr, u32>`: destination address → identity id (the "ipcache").
    pub const IDENTITIES: &str = "NM_IDENTITY";
    /// `HashMap<PolicyKey, u32>`: connect-time verdicts ([`crate::POLICY_ALLOW`]/[`crate::POLICY_DENY`]).
    pub const POLICY: &str = "NM_POLICY";
    /// `HashMap<GuardPortKey, u32>`: per-pod listener ports the plaintext guard leaves open
    /// (kubelet probes).
    pub const GUARD_PORTS: &str = "NM_GUARD_PORTS";
    /// `Array<u64>` indexed by [`crate::Meta`]: facts about the installation, kept with the pins.
    pub const META: &str = "NM_META";
    /// `LpmTrie<LpmAddr, u32>`: the destinations that are in the mesh (every workload address as
    /// a host prefix, every service VIP) with [`crate::MESH_DST_MEMBER`], plus one catch-all
    /// entry (prefix length 0) with [`crate::MESH_DST_OUTSIDE`]. A TCP connect of an enrolled pod
    /// whose longest match is the catch-all goes out untouched; no match at all (the map is
    /// empty: not programmed yet) captures, as before the map existed.
    pub const MESH_DESTINATIONS: &str = "NM_MESH_DST";

    /// `SockHash<u64 socket cookie>`: the tunnel's two sockets of each spliced same-node
    /// connection (the accepted app socket and the socket to the destination pod). The stream
    /// verdict program is attached to it. Not pinned: it holds the agent's own sockets and lives
    /// and dies with the agent (a restarted agent's connections are new ones).
    pub const SPLICE_SOCKS: &str = "NM_SPLICE_SOCK";
    /// `HashMap<u64 socket cookie, SpliceLink>`: which socket each spliced socket's received
    /// bytes go to, and how many went. Not pinned, as [`SPLICE_SOCKS`].
    pub const SPLICE_LINKS: &str = "NM_SPLICE_LINK";
    /// `HashMap<u64 socket cookie, SpliceCtl>`: the tunnel's flow control of each spliced
    /// socket (written by userspace only). Not pinned, as [`SPLICE_SOCKS`].
    pub const SPLICE_CTL: &str = "NM_SPLICE_CTL";

    /// Every map, for pinning.
    pub const ALL: [&str; 12] = [
        ENROLLED,
        TUNNEL_CONFIG,
        SOCK_ORIG_DST,
        ORIG_DST_BY_TUPLE,
        COUNTERS,
        TUNNEL_HEARTBEAT,
        EXCLUSIONS,
        IDENTITIES,
        POLICY,
        GUARD_PORTS,
        META,
        MESH_DESTINATIONS,
    ];
}

/// Program names (the Rust function names in `mesh-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    pub const GUARD_INGRESS: &str = "mesh_guard_ingress";
    pub const SOCKOPS: &str = "mesh_sockops";
    /// sk_skb stream verdict on [`crate::maps::SPLICE_SOCKS`]: same-node splice.
    pub const SPLICE_VERDICT: &str = "mesh_splice_verdict";
}

/// Default port of the outbound (redirect target) listener on the tunnel address.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound HBONE (mTLS) listener.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// Capacity of [`maps::ENROLLED`]: pods per node.
pub const MAX_ENROLLED: u32 = 4096;
/// Capacity of [`maps::ORIG_DST_BY_TUPLE`]: connections between `connect()` and `accept()`.
pub const MAX_PENDING_CONNECTIONS: u32 = 65536;
/// Capacity of [`maps::EXCLUSIONS`].
pub const MAX_EXCLUSIONS: u32 = 1024;
/// Capacity of [`maps::IDENTITIES`]: pod IPs and CIDRs with a known identity.
pub const MAX_IDENTITY_PREFIXES: u32 = 65536;
/// Capacity of [`maps::GUARD_PORTS`].
pub const MAX_GUARD_PORTS: u32 = 4096;
/// Capacity of [`maps::POLICY`].
pub const MAX_POLICY_ENTRIES: u32 = 65536;
/// Capacity of [`maps::MESH_DESTINATIONS`]: workload addresses and service VIPs, plus one.
pub const MAX_MESH_DESTINATIONS: u32 = 65536;
/// [`maps::MESH_DESTINATIONS`] value of a destination in the mesh (captured).
pub const MESH_DST_MEMBER: u32 = 1;
/// [`maps::MESH_DESTINATIONS`] value of the catch-all entry (prefix length 0): a destination
/// whose longest match is this one is outside the mesh and is not captured. Any other value
/// captures.
pub const MESH_DST_OUTSIDE: u32 = 2;

/// Capacity of [`maps::SPLICE_SOCKS`] and [`maps::SPLICE_LINKS`]: two sockets per spliced
/// connection, so as many connections as the outbound listener serves at most by default.
pub const MAX_SPLICED_SOCKETS: u32 = 65536;

/// Value of [`maps::SPLICE_LINKS`]: where a spliced socket's received bytes go. Written by
/// userspace once (at splice time), then only by the verdict program, one socket at a time (the
/// kernel runs a socket's verdict under that socket's lock), so plain adds are exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceLink {
    /// Socket cookie of the peer socket (the key of its entry in [`maps::SPLICE_SOCKS`]).
    pub peer_cookie: u64,
    /// Bytes received on this socket and handed to the peer's send side by the program.
    pub bytes: u64,
    /// Bytes received on this socket and left to the tunnel (flow control: see [`SpliceCtl`]).
    pub passed: u64,
}

/// Value of [`maps::SPLICE_CTL`], written by userspace only: the kernel's splice queue has no
/// backpressure of its own (a peer that does not read would let the sender queue without
/// bound), so the program redirects a segment only while `bytes + len <= allowed` and every
/// byte it left to the tunnel has been forwarded by it (`passed == consumed`, which keeps the
/// byte order); otherwise it leaves the segment on the socket (charged to its receive buffer,
/// so TCP's window pushes back on the sender) and the tunnel forwards it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceCtl {
    /// Redirect credit: the program redirects while its `bytes` stay at or below this.
    pub allowed: u64,
    /// Bytes of this socket the tunnel has read (what the program passed) and forwarded.
    pub consumed: u64,
}

/// Identity id meaning "any identity" in a [`PolicyKey`] (wildcard); never assigned to a workload.
pub const IDENTITY_ANY: u32 = 0;
/// Identity id of destinations not in [`maps::IDENTITIES`]; never assigned to a workload.
pub const IDENTITY_WORLD: u32 = 1;
/// Port meaning "any port" in a [`PolicyKey`].
pub const PORT_ANY: u16 = 0;
/// [`maps::POLICY`] values.
pub const POLICY_ALLOW: u32 = 0;
pub const POLICY_DENY: u32 = 1;
/// IP protocol numbers used in [`PolicyKey::proto`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The third address word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), network order in
/// memory. LPM keys store IPv4 addresses in this form so one trie serves both families.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Per-pod record in [`maps::ENROLLED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Agent-assigned id of the workload (pod), for logs and counters.
    pub workload_id: u32,
    /// Agent-assigned id of the workload's identity (service account), for policy.
    pub identity_id: u32,
    /// [`MtlsMode`] as `u8`.
    pub mtls_mode: u8,
    /// [`FailMode`] as `u8`.
    pub fail_mode: u8,
    /// Bit set of `POD_FLAG_*` (none defined yet; 0).
    pub flags: u16,
    /// The pod's IPv4 address (as `user_ip4`), 0 = none.
    pub ip4: u32,
    /// The pod's IPv6 address (as `user_ip6`), all zero = none.
    pub ip6: [u32; 4],
}

/// mTLS mode of an enrolled pod's inbound side.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    Strict = 0,
    Permissive = 1,
}

/// What enrolled pods' connects do when the tunnel is not alive.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse the connect (`ECONNREFUSED`). Default: never a silent plaintext bypass.
    Closed = 0,
    /// Let the connect through untouched.
    Open = 1,
}

/// Single entry of [`maps::TUNNEL_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// IPv4 tunnel address, network-order bytes in memory (as `user_ip4`). 0 = not configured.
    pub ip4: u32,
    /// Outbound listener port, host order.
    pub port: u16,
    pub _pad: u16,
    /// IPv6 tunnel address (as `user_ip6`). All zero = no IPv6 tunnel: native IPv6 connects of
    /// enrolled pods then follow the pod's fail mode.
    pub ip6: [u32; 4],
    /// The tunnel counts as down when its last heartbeat ([`maps::TUNNEL_HEARTBEAT`]) is older
    /// than this. 0 = liveness not checked.
    pub stale_after_ns: u64,
}

/// LPM-trie key data: an address as IPv6 words, IPv4 as mapped (`::ffff:a.b.c.d`, prefix
/// length + 96). Network-order bytes in memory, as the trie compares bytes in memory order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmAddr {
    pub addr: [u32; 4],
}

/// LPM-trie key data for exclusions: destination port first, then the address. An entry for
/// one port of a prefix has prefix length `32 + address bits`; an entry for every port of a
/// prefix has `port_be == 0` (programs look up twice: with the port, then with 0); an entry for
/// one port on every address has prefix length 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmPortAddr {
    /// Port with network-order bytes in memory (`port.to_be()`).
    pub port_be: u16,
    pub _pad: u16,
    pub addr: [u32; 4],
}

/// Key of [`maps::POLICY`]. Programs look up (dst, port), (dst, any port), (any dst, port),
/// (any, any) in that order; the first hit decides, no hit allows (the tunnel enforces again
/// after mTLS; this map only refuses early).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub src_identity: u32,
    /// Identity id, [`IDENTITY_WORLD`] or [`IDENTITY_ANY`].
    pub dst_identity: u32,
    /// Host order; [`PORT_ANY`] = every port.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}

/// Key of [`maps::GUARD_PORTS`]: a pod (netns cookie) and one of its listening ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuardPortKey {
    pub netns_cookie: u64,
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Address family values used in [`OrigDst::family`] and [`SockTuple::family`].
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Original destination of a redirected connection, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address words; IPv4 uses `ip[0]` only (network-order bytes in memory).
    pub ip: [u32; 4],
    /// Host order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Identity id of the source pod (from [`EnrolledPod`]).
    pub identity_id: u32,
    /// Workload id of the source pod.
    pub workload_id: u32,
    pub _pad: u32,
    /// Network-namespace cookie of the source pod.
    pub netns_cookie: u64,
}

/// A TCP connection's 4-tuple as the *tunnel* sees it on the accepted socket: `src` is the pod's
/// address and ephemeral port, `dst` is the tunnel address and outbound port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Host order.
    pub src_port: u16,
    /// Host order.
    pub dst_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub _pad: u16,
}

/// Indexes into [`maps::META`] (userspace only; the programs do not read it).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meta {
    /// Inode number (cgroup id) of the cgroup the pinned links are attached to; 0 = none yet.
    AttachedCgroup = 0,
}

impl Meta {
    pub const SLOTS: u32 = 8;
}

/// Indexes into [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Connects from enrolled pods rewritten to the tunnel.
    Redirected = 0,
    /// Connects from enrolled pods left alone because the tunnel is not configured (fail-open pods).
    PassedUnconfigured = 1,
    /// Connects from enrolled pods refused because the tunnel is not configured (fail-closed pods).
    RefusedUnconfigured = 2,
    /// The socket storage for the original destination could not be created.
    OrigDstStoreFailed = 3,
    /// Writing the tuple-keyed original destination failed (map full or other error).
    TupleMapUpdateFailed = 4,
    /// Connects refused by the policy map.
    DeniedPolicy = 5,
    /// Connects from fail-closed pods refused because the tunnel's heartbeat is stale.
    RefusedTunnelStale = 6,
    /// Connects from fail-open pods passed untouched because the tunnel's heartbeat is stale.
    PassedTunnelStale = 7,
    /// Connects from enrolled pods left alone because the destination is excluded.
    Excluded = 8,
    /// Packets to a listener of a STRICT pod dropped by the plaintext guard (not from the tunnel).
    GuardDropped = 9,
    /// Original destinations moved from the tuple map into an accepted tunnel socket's storage.
    OrigDstHandedOver = 10,
    /// Connects from enrolled pods left alone because the destination is not in the mesh
    /// ([`maps::MESH_DESTINATIONS`]): neither a workload nor a service VIP.
    PassedOutsideMesh = 11,
}

impl Counter {
    pub const ALL: [Counter; 12] = [
        Counter::Redirected,
        Counter::PassedUnconfigured,
        Counter::RefusedUnconfigured,
        Counter::OrigDstStoreFailed,
        Counter::TupleMapUpdateFailed,
        Counter::DeniedPolicy,
        Counter::RefusedTunnelStale,
        Counter::PassedTunnelStale,
        Counter::Excluded,
        Counter::GuardDropped,
        Counter::OrigDstHandedOver,
        Counter::PassedOutsideMesh,
    ];
    /// Size of [`maps::COUNTERS`]; spare slots leave room for new counters without a layout bump.
    pub const SLOTS: u32 = 32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::PassedUnconfigured => "passed_unconfigured",
            Counter::RefusedUnconfigured => "refused_unconfigured",
            Counter::OrigDstStoreFailed => "orig_dst_store_failed",
            Counter::TupleMapUpdateFailed => "tuple_map_update_failed",
            Counter::DeniedPolicy => "denied_policy",
            Counter::RefusedTunnelStale => "refused_tunnel_stale",
            Counter::PassedTunnelStale => "passed_tunnel_stale",
            Counter::Excluded => "excluded",
            Counter::GuardDropped => "guard_dropped",
            Counter::OrigDstHandedOver => "orig_dst_handed_over",
            Counter::PassedOutsideMesh => "passed_outside_mesh",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and have explicit
    // padding fields, so every byte pattern is a valid value and there are no implicit holes.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TunnelConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LpmAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LpmPortAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceLink {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceCtl {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// The eBPF side and userspace must agree on sizes; padding must be explicit (no holes).
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EnrolledPod>(), 32);
        assert_eq!(size_of::<TunnelConfig>(), 32);
        assert_eq!(size_of::<LpmAddr>(), 16);
        assert_eq!(size_of::<LpmPortAddr>(), 20);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<GuardPortKey>(), 16);
        assert_eq!(size_of::<OrigDst>(), 40);
        assert_eq!(size_of::<SockTuple>(), 40);
        assert_eq!(size_of::<SpliceLink>(), 24);
        assert_eq!(size_of::<SpliceCtl>(), 16);
    }

    #[test]
    fn mapped_word_is_ffff_in_network_order() {
        assert_eq!(V4_MAPPED_WORD.to_ne_bytes(), [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn map_names_are_unique_and_fit_the_kernel_limit() {
        let mut names = maps::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), maps::ALL.len());
        // BPF_OBJ_NAME_LEN is 16 including the NUL.
        assert!(names.iter().all(|n| n.len() < 16), "{names:?}");
    }

    #[test]
    fn counter_indexes_are_dense_and_fit() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{}", c.name());
        }
        assert!((Counter::ALL.len() as u32) <= Counter::SLOTS);
    }
}
