//! nodemesh kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build-ebpf` and
//! embedded in `mesh-agent`, which loads and attaches them.
//!
//! - `mesh_connect4` (cgroup/connect4): a TCP connect from an enrolled pod (its network-namespace
//!   cookie is in `NM_ENROLLED`) gets its original destination stored on the socket and its
//!   destination rewritten to the node's tunnel address. Everything else passes untouched.
//! - `mesh_sockops` (sock_ops): at `TCP_CONNECT_CB` (source port chosen, SYN not yet sent) the
//!   original destination is copied into `NM_ODST_TUPLE`, keyed by the 4-tuple the tunnel will see
//!   on the accepted socket, so the tunnel can read it back with `getpeername`/`getsockname`.
//!
//! Programs are thin wrappers over `try_*` functions; they never panic and read context fields one
//! at a time (the verifier rejects merged or narrow context reads; see docs/architecture.md).
#![no_std]
#![no_main]

use core::ptr;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr, bpf_sock_ops},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_set_retval, bpf_sk_storage_get},
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    AF_INET, Counter, EnrolledPod, FailMode, MAX_ENROLLED, MAX_PENDING_CONNECTIONS, OrigDst,
    SockTuple, TunnelConfig,
};

/// Allow the operation (cgroup sock_addr and sock_ops return convention).
const ALLOW: i32 = 1;
/// Reject; the errno comes from `bpf_set_retval` (plain 0 alone gives EPERM).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
/// Flag for `bpf_sk_storage_get`: create the storage if absent.

#[map]
static NM_ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(MAX_ENROLLED, 0);

#[map]
static NM_TUNNEL_CFG: Array<TunnelConfig> = Array::with_max_entries(1, 0);

#[btf_map]
static NM_SOCK_ODST: SkStorage<OrigDst> = SkStorage::new();

#[map]
static NM_ODST_TUPLE: LruHashMap<SockTuple, OrigDst> =
    LruHashMap::with_max_entries(MAX_PENDING_CONNECTIONS, 0);

#[map]
static NM_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::SLOTS, 0);

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
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper without pointer arguments; valid in cgroup sock_addr programs (5.18+).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if ctx_read!(sa, type_) != SOCK_STREAM || ctx_read!(sa, protocol) != IPPROTO_TCP {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the helper in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately; entries are written whole by userspace.
    let Some(pod) = (unsafe { NM_ENROLLED.get(netns_cookie) }).copied() else {
        return ALLOW;
    };
    let dst_ip = ctx_read!(sa, user_ip4);
    let dst_port_raw = ctx_read!(sa, user_port);
    // Loopback (127.0.0.0/8: first address byte in memory) stays inside the pod: never captured.
    if dst_ip.to_ne_bytes()[0] == 127 {
        return ALLOW;
    }
    let cfg = NM_TUNNEL_CFG.get(0).copied().unwrap_or_default();
    if cfg.ip4 == 0 || cfg.port == 0 {
        // The agent has not (yet) told us where the tunnel is.
        return if pod.fail_mode == FailMode::Open as u8 {
            count(Counter::PassedUnconfigured);
            ALLOW
        } else {
            count(Counter::RefusedUnconfigured);
            refuse()
        };
    }
    // Never capture connections to the tunnel itself.
    if dst_ip == cfg.ip4 {
        return ALLOW;
    }
    let orig = OrigDst {
        ip: [dst_ip, 0, 0, 0],
        // `user_port` holds the port in network order in its low 16 bits.
        port: u16::from_be(dst_port_raw as u16),
        family: AF_INET,
        identity_id: pod.identity_id,
        workload_id: pod.workload_id,
        _pad: 0,
        netns_cookie,
    };
    let mut value = orig;
    // SAFETY: `ctx` is a connect4 context whose `sk` is a full socket; the helper checks it.
    let stored = unsafe { NM_SOCK_ODST.get_or_insert_ptr_mut(ctx, Some(&mut value)) };
    if stored.is_null() {
        // Without a recorded original destination the tunnel could only guess: refuse instead.
        count(Counter::OrigDstStoreFailed);
        return refuse();
    }
    // SAFETY: non-null pointer to this socket's storage, valid for the program's duration.
    unsafe { *stored = orig };
    // SAFETY: whole u32 stores into writable context fields (narrow stores are rejected).
    unsafe {
        (*sa).user_ip4 = cfg.ip4;
        (*sa).user_port = u32::from(cfg.port.to_be());
    }
    count(Counter::Redirected);
    ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    ALLOW as u32
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    if ctx_read!(ops, op) != BPF_SOCK_OPS_TCP_CONNECT_CB || ctx_read!(ops, family) != 2 {
        return;
    }
    // SAFETY: reading the `sk` pointer field of the context; null-checked below.
    let sk = unsafe { ptr::read_volatile(ptr::addr_of!((*ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return;
    }
    let map = ptr::from_ref(&NM_SOCK_ODST).cast_mut().cast();
    // SAFETY: `sk` is a non-null socket pointer from the context; no value, no create flag.
    let stored =
        unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast::<OrigDst>();
    if stored.is_null() {
        return; // not a redirected socket
    }
    // SAFETY: non-null pointer to the socket's storage.
    let orig = unsafe { *stored };
    let remote_port_raw = ctx_read!(ops, remote_port);
    let key = SockTuple {
        src_ip: [ctx_read!(ops, local_ip4), 0, 0, 0],
        dst_ip: [ctx_read!(ops, remote_ip4), 0, 0, 0],
        // sock_ops: `local_port` is host order; `remote_port` is network order in the upper 16 bits.
        src_port: ctx_read!(ops, local_port) as u16,
        dst_port: u32::from_be(remote_port_raw) as u16,
        family: AF_INET,
        _pad: 0,
    };
    if NM_ODST_TUPLE.insert(key, orig, u64::from(BPF_ANY)).is_err() {
        count(Counter::TupleMapUpdateFailed);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
