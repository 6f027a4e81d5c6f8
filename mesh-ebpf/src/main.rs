//! nodemesh kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build-ebpf` and
//! embedded in `mesh-agent`, which loads and attaches them.
//!
//! - `mesh_connect4` / `mesh_connect6` (cgroup/connect4, cgroup/connect6): a TCP connect from an
//!   enrolled pod (its network-namespace cookie is in `NM_ENROLLED`) is checked against the
//!   policy map (denied: `ECONNREFUSED`), the exclusions, the mesh's destinations (one outside
//!   the mesh passes untouched) and the tunnel's liveness, then gets its original destination
//!   stored on the socket and its destination rewritten to the node's tunnel address. IPv4-mapped IPv6 destinations (dual-stack sockets) are handled as IPv4 and
//!   redirected to the mapped IPv4 tunnel address. Everything else passes untouched.
//! - `mesh_sendmsg4` / `mesh_sendmsg6`: unconnected UDP from enrolled pods is checked against
//!   the UDP policy entries (connected UDP is checked at connect).
//! - `mesh_sockops` (sock_ops): at `TCP_CONNECT_CB` (source port chosen, SYN not yet sent) the
//!   original destination is copied into `NM_ODST_TUPLE`, keyed by the 4-tuple the tunnel will see
//!   on the accepted socket, so the tunnel can read it back with `getpeername`/`getsockname`. At
//!   `PASSIVE_ESTABLISHED` (when also attached to the tunnel's cgroup) the entry is moved into the
//!   accepted socket's storage and deleted from the tuple map.
//!
//! - `mesh_splice_verdict` (sk_skb stream verdict on `NM_SPLICE_SOCK`): the same-node splice.
//!   The tunnel puts its two sockets of an authorized same-node connection (the accepted app
//!   socket and the socket to the destination pod) into the sockhash and links them in
//!   `NM_SPLICE_LINK`; every segment either socket receives is handed to the other socket's
//!   send side in the kernel and counted, so the payload never reaches user space.
//!
//! - `mesh_guard_ingress` (cgroup_skb/ingress): the plaintext guard. A TCP packet to a
//!   *listening* socket of an enrolled STRICT pod is dropped unless it comes from the tunnel
//!   address or the listener's port is on the pod's allow-list (`NM_GUARD_PORTS`, kubelet probes).
//!   Packets to connected sockets pass: connect-time policy already chose their peer.
//!
//! Programs are thin wrappers over `try_*` functions; they never panic and read context fields one
//! at a time (the verifier rejects merged or narrow context reads; see docs/architecture.md).
#![no_std]
#![no_main]

use core::ptr;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_ANY, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr, bpf_sock_ops,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
        bpf_sk_fullsock, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock_addr, map, sock_ops, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    AF_INET, AF_INET6, Counter, EnrolledPod, FailMode, GuardPortKey, IDENTITY_ANY, IDENTITY_WORLD,
    LpmAddr, LpmPortAddr, MAX_ENROLLED, MAX_EXCLUSIONS, MAX_GUARD_PORTS, MAX_IDENTITY_PREFIXES,
    MAX_MESH_DESTINATIONS, MAX_PENDING_CONNECTIONS, MAX_POLICY_ENTRIES, MAX_SPLICED_SOCKETS,
    MESH_DST_OUTSIDE, Meta, MtlsMode, OrigDst, POLICY_DENY, PORT_ANY, PROTO_TCP, PROTO_UDP,
    PolicyKey, SockTuple, SpliceCtl, SpliceLink, TunnelConfig, V4_MAPPED_WORD,
};

/// Allow the operation (cgroup sock_addr and sock_ops return convention).
const ALLOW: i32 = 1;
/// Reject; the errno comes from `bpf_set_retval` (plain 0 alone gives EPERM).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_UDP: u32 = 17;
/// `::1` as the last address word (network order in memory).
const V6_LOOPBACK_WORD: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

#[map]
static NM_ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(MAX_ENROLLED, 0);

#[map]
static NM_TUNNEL_CFG: Array<TunnelConfig> = Array::with_max_entries(1, 0);

#[map]
static NM_TUNNEL_HB: Array<u64> = Array::with_max_entries(1, 0);

#[btf_map]
static NM_SOCK_ODST: SkStorage<OrigDst> = SkStorage::new();

#[map]
static NM_ODST_TUPLE: LruHashMap<SockTuple, OrigDst> =
    LruHashMap::with_max_entries(MAX_PENDING_CONNECTIONS, 0);

#[map]
static NM_EXCLUDE: LpmTrie<LpmPortAddr, u32> = LpmTrie::with_max_entries(MAX_EXCLUSIONS, 0);

#[map]
static NM_IDENTITY: LpmTrie<LpmAddr, u32> = LpmTrie::with_max_entries(MAX_IDENTITY_PREFIXES, 0);

#[map]
static NM_MESH_DST: LpmTrie<LpmAddr, u32> = LpmTrie::with_max_entries(MAX_MESH_DESTINATIONS, 0);

#[map]
static NM_POLICY: HashMap<PolicyKey, u32> = HashMap::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map]
static NM_GUARD_PORTS: HashMap<GuardPortKey, u32> = HashMap::with_max_entries(MAX_GUARD_PORTS, 0);

/// Written and read by the agent only (installation facts kept with the pins).
#[map]
static NM_META: Array<u64> = Array::with_max_entries(Meta::SLOTS, 0);

#[map]
static NM_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::SLOTS, 0);

#[map]
static NM_SPLICE_SOCK: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map]
static NM_SPLICE_LINK: HashMap<u64, SpliceLink> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map]
static NM_SPLICE_CTL: HashMap<u64, SpliceCtl> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = NM_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of a map value; programs on one CPU do not run concurrently
        // with themselves on the same slot (no preemption of BPF programs within a CPU here).
        unsafe { *slot += 1 };
    }
}

/// Reads one `u32` context field with a volatile load, so the compiler cannot merge it with a
/// neighbouring field into a 64-bit load (the verifier rejects such context accesses).
macro_rules! ctx_read {
    ($ptr:expr, $field:ident) => {
        // SAFETY: `$ptr` is the context pointer the kernel passed to the program; the field is
        // inside the context struct and readable for this program type.
        unsafe { ptr::read_volatile(ptr::addr_of!((*$ptr).$field)) }
    };
    ($ptr:expr, $field:ident[$i:expr]) => {
        // SAFETY: as above; `$i` is a constant index inside the array field.
        unsafe { ptr::read_volatile(ptr::addr_of!((*$ptr).$field[$i])) }
    };
}

/// Writes one whole `u32` context field with a volatile store (narrow or merged stores are
/// rejected by the verifier).
macro_rules! ctx_write {
    ($ptr:expr, $field:ident, $value:expr) => {
        // SAFETY: `$ptr` is the context pointer; the field is writable for this program type.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*$ptr).$field), $value) }
    };
    ($ptr:expr, $field:ident[$i:expr], $value:expr) => {
        // SAFETY: as above; `$i` is a constant index inside the array field.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*$ptr).$field[$i]), $value) }
    };
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper without pointer arguments; valid in cgroup sock_addr programs (5.18+).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// What a connect from an enrolled pod turns into. Fieldless on purpose: enums with payloads
/// let LLVM copy uninitialised bytes of the other variant, which the verifier rejects
/// (`R3 !read_ok`); the redirect target travels in a fully initialised [`Target`] instead.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Refuse,
    Redirect,
}

/// The tunnel address (IPv4 as mapped words, like the destination) and port (host order).
struct Target {
    words: [u32; 4],
    port: u16,
}

#[inline(always)]
fn is_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD
}

#[inline(always)]
fn fail_mode_verdict(
    ctx: &SockAddrContext,
    pod: &EnrolledPod,
    passed: Counter,
    refused: Counter,
) -> Verdict {
    if pod.fail_mode == FailMode::Open as u8 {
        count(passed);
        Verdict::Pass
    } else {
        count(refused);
        debug!(
            ctx,
            "connect refused: tunnel unavailable (workload {})", pod.workload_id
        );
        Verdict::Refuse
    }
}

#[inline(always)]
fn is_excluded(words: [u32; 4], port: u16) -> bool {
    let mut key = Key::new(
        160,
        LpmPortAddr {
            port_be: port.to_be(),
            _pad: 0,
            addr: words,
        },
    );
    if NM_EXCLUDE.get(&key).is_some() {
        return true;
    }
    key.data.port_be = 0;
    NM_EXCLUDE.get(&key).is_some()
}

/// Whether `words` is outside the mesh: its longest match in `NM_MESH_DST` is the catch-all.
/// No match (an empty map, not programmed yet) is inside: captured, as before the map existed.
#[inline(always)]
fn is_outside_mesh(words: [u32; 4]) -> bool {
    let key = Key::new(128, LpmAddr { addr: words });
    NM_MESH_DST
        .get(&key)
        .is_some_and(|v| *v == MESH_DST_OUTSIDE)
}

#[inline(always)]
fn policy_denies(src_identity: u32, words: [u32; 4], port: u16, proto: u8) -> bool {
    let key = Key::new(128, LpmAddr { addr: words });
    let dst_identity = NM_IDENTITY.get(&key).copied().unwrap_or(IDENTITY_WORLD);
    let mut pk = PolicyKey {
        src_identity,
        dst_identity,
        port,
        proto,
        _pad: 0,
    };
    // Most specific first; the first entry found decides. Unrolled: the verifier needs bounds.
    for (dst, port) in [
        (dst_identity, port),
        (dst_identity, PORT_ANY),
        (IDENTITY_ANY, port),
        (IDENTITY_ANY, PORT_ANY),
    ] {
        pk.dst_identity = dst;
        pk.port = port;
        // SAFETY: the value is copied out immediately.
        if let Some(v) = unsafe { NM_POLICY.get(pk) } {
            return *v == POLICY_DENY;
        }
    }
    false
}

/// The decision for a TCP connect from the calling pod to `words`:`port` (host order). `words`
/// is the destination in LPM form (IPv4 as mapped). On redirect, the original destination is
/// already stored on the socket and `target` holds where to send it.
#[inline(always)]
fn decide(ctx: &SockAddrContext, words: [u32; 4], port: u16, target: &mut Target) -> Verdict {
    // SAFETY: the context pointer is valid for the helper in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately; entries are written whole by userspace.
    let Some(pod) = (unsafe { NM_ENROLLED.get(netns_cookie) }).copied() else {
        return Verdict::Pass;
    };
    let v4 = is_mapped(&words);
    // Loopback stays inside the pod: never captured.
    if (v4 && words[3].to_ne_bytes()[0] == 127)
        || (!v4 && words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == V6_LOOPBACK_WORD)
    {
        return Verdict::Pass;
    }
    let cfg = NM_TUNNEL_CFG.get(0).copied().unwrap_or_default();
    // Never capture connections to the tunnel itself.
    let is_tunnel = if v4 {
        words[3] == cfg.ip4 && cfg.ip4 != 0
    } else {
        words == cfg.ip6 && cfg.ip6 != [0; 4]
    };
    if is_tunnel {
        return Verdict::Pass;
    }
    if policy_denies(pod.identity_id, words, port, PROTO_TCP) {
        count(Counter::DeniedPolicy);
        debug!(
            ctx,
            "connect refused by policy: identity {} to port {}", pod.identity_id, port
        );
        return Verdict::Refuse;
    }
    if is_excluded(words, port) {
        count(Counter::Excluded);
        return Verdict::Pass;
    }
    // Neither a workload nor a service: nothing to mTLS, so out untouched, keeping the pod's
    // own source address (the kube API, an external database, the internet).
    if is_outside_mesh(words) {
        count(Counter::PassedOutsideMesh);
        return Verdict::Pass;
    }
    let configured = cfg.port != 0 && if v4 { cfg.ip4 != 0 } else { cfg.ip6 != [0; 4] };
    if !configured {
        // The agent has not (yet) told us where the tunnel is (for this family).
        return fail_mode_verdict(
            ctx,
            &pod,
            Counter::PassedUnconfigured,
            Counter::RefusedUnconfigured,
        );
    }
    if cfg.stale_after_ns != 0 {
        let last = NM_TUNNEL_HB.get(0).copied().unwrap_or(0);
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if last == 0 || now.saturating_sub(last) > cfg.stale_after_ns {
            return fail_mode_verdict(
                ctx,
                &pod,
                Counter::PassedTunnelStale,
                Counter::RefusedTunnelStale,
            );
        }
    }
    let mut orig = OrigDst {
        ip: if v4 { [words[3], 0, 0, 0] } else { words },
        port,
        family: if v4 { AF_INET } else { AF_INET6 },
        identity_id: pod.identity_id,
        workload_id: pod.workload_id,
        _pad: 0,
        netns_cookie,
    };
    // SAFETY: `ctx` is a connect context whose `sk` is a full socket; the helper checks it.
    let stored = unsafe { NM_SOCK_ODST.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
    if stored.is_null() {
        // Without a recorded original destination the tunnel could only guess: refuse instead.
        count(Counter::OrigDstStoreFailed);
        return Verdict::Refuse;
    }
    // SAFETY: non-null pointer to this socket's storage, valid for the program's duration.
    unsafe { *stored = orig };
    target.words = if v4 {
        [0, 0, V4_MAPPED_WORD, cfg.ip4]
    } else {
        cfg.ip6
    };
    target.port = cfg.port;
    count(Counter::Redirected);
    Verdict::Redirect
}

#[inline(always)]
fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    ctx_read!(sa, type_) == SOCK_STREAM && ctx_read!(sa, protocol) == IPPROTO_TCP
}

#[inline(always)]
fn is_udp(sa: *mut bpf_sock_addr) -> bool {
    ctx_read!(sa, type_) == SOCK_DGRAM && ctx_read!(sa, protocol) == IPPROTO_UDP
}

/// UDP from an enrolled pod (connect, or sendmsg with an address): policy only (UDP is not
/// tunnelled). Loopback is never checked.
#[inline(always)]
fn udp_verdict(ctx: &SockAddrContext, words: [u32; 4], port: u16) -> i32 {
    // SAFETY: the context pointer is valid for the helper in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    let Some(pod) = (unsafe { NM_ENROLLED.get(netns_cookie) }).copied() else {
        return ALLOW;
    };
    let v4 = is_mapped(&words);
    if (v4 && words[3].to_ne_bytes()[0] == 127)
        || (!v4 && words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == V6_LOOPBACK_WORD)
    {
        return ALLOW;
    }
    if policy_denies(pod.identity_id, words, port, PROTO_UDP) {
        count(Counter::DeniedPolicy);
        debug!(
            ctx,
            "udp connect refused by policy: identity {} to port {}", pod.identity_id, port
        );
        return refuse();
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let tcp = is_tcp(sa);
    if !tcp && !is_udp(sa) {
        return ALLOW;
    }
    let dst_ip = ctx_read!(sa, user_ip4);
    // `user_port` holds the port in network order in its low 16 bits.
    let port = u16::from_be(ctx_read!(sa, user_port) as u16);
    if !tcp {
        return udp_verdict(ctx, [0, 0, V4_MAPPED_WORD, dst_ip], port);
    }
    let mut target = Target {
        words: [0; 4],
        port: 0,
    };
    match decide(ctx, [0, 0, V4_MAPPED_WORD, dst_ip], port, &mut target) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Redirect => {
            ctx_write!(sa, user_ip4, target.words[3]);
            ctx_write!(sa, user_port, u32::from(target.port.to_be()));
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let tcp = is_tcp(sa);
    if !tcp && !is_udp(sa) {
        return ALLOW;
    }
    let w = [
        ctx_read!(sa, user_ip6[0]),
        ctx_read!(sa, user_ip6[1]),
        ctx_read!(sa, user_ip6[2]),
        ctx_read!(sa, user_ip6[3]),
    ];
    let port = u16::from_be(ctx_read!(sa, user_port) as u16);
    if !tcp {
        return udp_verdict(ctx, w, port);
    }
    // A dual-stack socket connecting to `::ffff:a.b.c.d` (the Java case) is an IPv4 connection:
    // `decide` sees the mapped form either way and redirects it to the mapped IPv4 tunnel.
    let mut target = Target {
        words: [0; 4],
        port: 0,
    };
    match decide(ctx, w, port, &mut target) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Redirect => {
            ctx_write!(sa, user_ip6[0], target.words[0]);
            ctx_write!(sa, user_ip6[1], target.words[1]);
            ctx_write!(sa, user_ip6[2], target.words[2]);
            ctx_write!(sa, user_ip6[3], target.words[3]);
            ctx_write!(sa, user_port, u32::from(target.port.to_be()));
            ALLOW
        }
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg4(&ctx)
}

/// Unconnected UDP (`sendto`/`sendmsg` with an address): policy only, like connected UDP.
#[inline(always)]
fn try_sendmsg4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if !is_udp(sa) {
        return ALLOW;
    }
    let dst_ip = ctx_read!(sa, user_ip4);
    let port = u16::from_be(ctx_read!(sa, user_port) as u16);
    udp_verdict(ctx, [0, 0, V4_MAPPED_WORD, dst_ip], port)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg6(&ctx)
}

#[inline(always)]
fn try_sendmsg6(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if !is_udp(sa) {
        return ALLOW;
    }
    let w = [
        ctx_read!(sa, user_ip6[0]),
        ctx_read!(sa, user_ip6[1]),
        ctx_read!(sa, user_ip6[2]),
        ctx_read!(sa, user_ip6[3]),
    ];
    let port = u16::from_be(ctx_read!(sa, user_port) as u16);
    udp_verdict(ctx, w, port)
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    ALLOW as u32
}

/// A socket's addresses as sock_ops sees them: (local, remote, family), IPv4-mapped IPv6
/// reduced to IPv4 (the tunnel sees an IPv4 tuple for a dual-stack socket on an IPv4 path).
#[inline(always)]
fn sockops_addrs(ops: *mut bpf_sock_ops, family: u32) -> ([u32; 4], [u32; 4], u16) {
    if family == u32::from(AF_INET) {
        return (
            [ctx_read!(ops, local_ip4), 0, 0, 0],
            [ctx_read!(ops, remote_ip4), 0, 0, 0],
            AF_INET,
        );
    }
    let remote = [
        ctx_read!(ops, remote_ip6[0]),
        ctx_read!(ops, remote_ip6[1]),
        ctx_read!(ops, remote_ip6[2]),
        ctx_read!(ops, remote_ip6[3]),
    ];
    if is_mapped(&remote) {
        (
            [ctx_read!(ops, local_ip6[3]), 0, 0, 0],
            [remote[3], 0, 0, 0],
            AF_INET,
        )
    } else {
        (
            [
                ctx_read!(ops, local_ip6[0]),
                ctx_read!(ops, local_ip6[1]),
                ctx_read!(ops, local_ip6[2]),
                ctx_read!(ops, local_ip6[3]),
            ],
            remote,
            AF_INET6,
        )
    }
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let op = ctx_read!(ops, op);
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return;
    }
    let family = ctx_read!(ops, family);
    if family != u32::from(AF_INET) && family != u32::from(AF_INET6) {
        return;
    }
    // SAFETY: reading the `sk` pointer field of the context; null-checked below.
    let sk = unsafe { ptr::read_volatile(ptr::addr_of!((*ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return;
    }
    let (local, remote, family) = sockops_addrs(ops, family);
    // sock_ops: `local_port` is host order; `remote_port` is network order in the upper 16 bits.
    let local_port = ctx_read!(ops, local_port) as u16;
    let remote_port = u32::from_be(ctx_read!(ops, remote_port)) as u16;
    let map = ptr::from_ref(&NM_SOCK_ODST).cast_mut().cast();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Client side (pod): source port chosen, SYN not sent yet.
        // SAFETY: `sk` is a non-null socket pointer from the context; no value, no create flag.
        let stored =
            unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast::<OrigDst>();
        if stored.is_null() {
            return; // not a redirected socket
        }
        // SAFETY: non-null pointer to the socket's storage.
        let orig = unsafe { *stored };
        let key = SockTuple {
            src_ip: local,
            dst_ip: remote,
            src_port: local_port,
            dst_port: remote_port,
            family,
            _pad: 0,
        };
        if NM_ODST_TUPLE.insert(key, orig, u64::from(BPF_ANY)).is_err() {
            count(Counter::TupleMapUpdateFailed);
        }
        return;
    }
    // Tunnel side (sock_ops on the tunnel's cgroup): the accepted socket; the pod is remote.
    let key = SockTuple {
        src_ip: remote,
        dst_ip: local,
        src_port: remote_port,
        dst_port: local_port,
        family,
        _pad: 0,
    };
    // SAFETY: the value is copied out immediately.
    let Some(mut orig) = (unsafe { NM_ODST_TUPLE.get(key) }).copied() else {
        return; // not a redirected connection (or a tunnel-side socket of another kind)
    };
    // SAFETY: `sk` is a non-null full socket (PASSIVE_ESTABLISHED); `orig` initialises the
    // storage it creates.
    let stored = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            ptr::from_mut(&mut orig).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<OrigDst>();
    if stored.is_null() {
        return; // the tuple entry stays as the fallback
    }
    // SAFETY: non-null pointer to the accepted socket's storage.
    unsafe { *stored = orig };
    // Handed over: the tuple entry is no longer needed (and must not serve a later reuse).
    let _ = NM_ODST_TUPLE.remove(key);
    count(Counter::OrigDstHandedOver);
}

/// sk_skb verdicts.
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[stream_verdict]
pub fn mesh_splice_verdict(ctx: SkBuffContext) -> u32 {
    try_splice_verdict(&ctx)
}

/// A segment received on a spliced socket goes to its peer's send side (flags 0: egress) while
/// the tunnel's credit allows it and the tunnel has forwarded every byte left to it before (so
/// the byte order holds); otherwise it stays on this socket for the tunnel to read (see
/// `SpliceCtl`). A socket without a link (not spliced yet, or being torn down) keeps its data,
/// as without the program. A redirect to a peer that has left the sockhash (closed) drops the
/// segment, as a write to a closed socket would fail. An empty segment is a FIN that arrived on
/// its own after its bytes: it is dropped, not redirected (see below).
#[inline(always)]
fn try_splice_verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the context pointer is valid for the helper in sk_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(link) = NM_SPLICE_LINK.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A FIN the kernel queued alone (the bytes before it were already handed on). The
        // socket has seen it (its read side is shut: the tunnel reads 0 and half-closes the
        // peer). Redirected, the peer's redirect worker would send nothing, which the kernel
        // takes as a broken pipe: EPIPE on the peer socket and its redirects stopped (a request
        // whose FIN came alone lost its answer). Dropped, it consumes nothing.
        return SK_DROP;
    }
    // SAFETY: the value is copied out immediately; userspace writes it whole.
    let ctl = unsafe { NM_SPLICE_CTL.get(cookie) }
        .copied()
        .unwrap_or_default();
    // SAFETY: non-null pointer to the map value, valid for the program's run; only this
    // socket's verdict writes its entry (under its lock).
    let (bytes, passed, mut peer) = unsafe { ((*link).bytes, (*link).passed, (*link).peer_cookie) };
    if passed != ctl.consumed || bytes + len > ctl.allowed {
        // SAFETY: as above.
        unsafe { (*link).passed = passed + len };
        return SK_PASS;
    }
    let verdict = NM_SPLICE_SOCK.redirect_skb(ctx, &mut peer, 0) as u32;
    if verdict == SK_PASS {
        // SAFETY: as above.
        unsafe { (*link).bytes = bytes + len };
    }
    verdict
}

/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;
const TCP_LISTEN: u32 = 10;

#[cgroup_skb(ingress)]
pub fn mesh_guard_ingress(ctx: SkBuffContext) -> i32 {
    try_guard_ingress(&ctx)
}

#[inline(always)]
fn try_guard_ingress(ctx: &SkBuffContext) -> i32 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: reading the `sk` pointer field of the context; null-checked below.
    let sk = unsafe { ptr::read_volatile(ptr::addr_of!((*skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return SKB_PASS;
    }
    // SAFETY: `sk` is a non-null socket pointer from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return SKB_PASS;
    }
    if ctx_read!(full, protocol) != IPPROTO_TCP || ctx_read!(full, state) != TCP_LISTEN {
        return SKB_PASS; // connected sockets: their peer was chosen at connect()
    }
    // SAFETY: the context pointer is valid for the helper in cgroup_skb programs (6.15+).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    let Some(pod) = (unsafe { NM_ENROLLED.get(netns_cookie) }).copied() else {
        return SKB_PASS;
    };
    if pod.mtls_mode != MtlsMode::Strict as u8 {
        return SKB_PASS;
    }
    let key = GuardPortKey {
        netns_cookie,
        port: ctx_read!(full, src_port) as u16, // host order
        _pad: [0; 6],
    };
    // SAFETY: the value is not dereferenced.
    if unsafe { NM_GUARD_PORTS.get(key) }.is_some() {
        return SKB_PASS;
    }
    let cfg = NM_TUNNEL_CFG.get(0).copied().unwrap_or_default();
    // `skb->data` is the network header here.
    let Ok(first) = ctx.load::<u8>(0) else {
        return SKB_DROP;
    };
    let from_tunnel = match first >> 4 {
        4 => ctx
            .load::<u32>(12)
            .is_ok_and(|src| src == cfg.ip4 && cfg.ip4 != 0),
        6 => {
            let src = [
                ctx.load::<u32>(8).unwrap_or(0),
                ctx.load::<u32>(12).unwrap_or(0),
                ctx.load::<u32>(16).unwrap_or(0),
                ctx.load::<u32>(20).unwrap_or(0),
            ];
            src == cfg.ip6 && cfg.ip6 != [0; 4]
        }
        _ => false,
    };
    if from_tunnel {
        return SKB_PASS;
    }
    count(Counter::GuardDropped);
    debug!(
        ctx,
        "plaintext guard: dropped a packet to listener port {}", key.port
    );
    SKB_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
