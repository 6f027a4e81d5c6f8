//! Root test of the first datapath slice: connect4 + sock_ops attached to a child cgroup.
//!
//! Topology (all in throw-away namespaces):
//!   pod A (enrolled) eth0 10.77.1.2 ── veth ── 10.77.1.1 node ── veth ── 10.77.2.1 ── pod B (not enrolled) 10.77.2.2
//! The node namespace holds the "tunnel" listener on 169.254.77.1:15001 (a /32 on its loopback)
//! and a "real server" on port 8080 of every node address.

use std::{
    io::{ErrorKind, Read},
    net::{SocketAddr, TcpListener, TcpStream},
};

use anyhow::{Context, Result, bail};
use mesh_agent::{
    datapath::{Datapath, OrigDstError},
    maps::KernelMaps,
    netns::{in_netns, netns_cookie},
};
use mesh_common::{EnrolledPod, FailMode, MtlsMode};
use nodemesh_tests::{
    ChildCgroup, NetNs, probe_connect, require_root, tunnel_v4, unique_prefix, veth,
};

const TUNNEL: &str = "169.254.77.1:15001";

/// Accepts a connection that must already be queued (the probe returned only after its connect
/// completed), or reports that none arrived. Never waits.
fn accept_now(listener: &TcpListener) -> Result<Option<TcpStream>> {
    listener.set_nonblocking(true)?;
    match listener.accept() {
        Ok((s, _)) => {
            s.set_nonblocking(false)?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn read_all(mut s: &TcpStream) -> Result<String> {
    let mut buf = String::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.read_to_string(&mut buf)?;
    Ok(buf)
}

#[test]
fn enrolled_connect_is_redirected_and_others_are_untouched() -> Result<()> {
    require_root();
    let p = unique_prefix();
    // Declaration order = reverse drop order: the datapath (links) goes first, then the
    // cgroup, then the namespaces.
    let node = NetNs::new(&format!("{p}-node"))?;
    let pod_a = NetNs::new(&format!("{p}-a"))?;
    let pod_b = NetNs::new(&format!("{p}-b"))?;
    veth(&node, "va", "10.77.1.1/24", &pod_a, "eth0", "10.77.1.2/24")?;
    veth(&node, "vb", "10.77.2.1/24", &pod_b, "eth0", "10.77.2.2/24")?;
    pod_a.exec(&["ip", "route", "add", "default", "via", "10.77.1.1"])?;
    pod_b.exec(&["ip", "route", "add", "default", "via", "10.77.2.1"])?;
    node.exec(&["ip", "addr", "add", "169.254.77.1/32", "dev", "lo"])?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;

    let tunnel_addr: SocketAddr = TUNNEL.parse()?;
    let tunnel = in_netns(&node.path(), move || TcpListener::bind(tunnel_addr))?;
    let server = in_netns(&node.path(), || TcpListener::bind("0.0.0.0:8080"))?;

    let mut dp = Datapath::load().context("load eBPF programs")?;
    dp.attach(cgroup.path())?;
    dp.set_tunnel(&tunnel_v4(tunnel_addr))?;
    let cookie_a = netns_cookie(&pod_a.path())?;
    let cookie_b = netns_cookie(&pod_b.path())?;
    assert_ne!(cookie_a, cookie_b);
    let pod = EnrolledPod {
        workload_id: 7,
        identity_id: 42,
        mtls_mode: MtlsMode::Strict as u8,
        fail_mode: FailMode::Closed as u8,
        ..Default::default()
    };
    dp.enroll(cookie_a, pod)?;
    let reader = dp.orig_dst_reader();

    // 1. Enrolled pod A connects to the real server; it must land on the tunnel instead.
    let real_dst: SocketAddr = "10.77.1.1:8080".parse()?;
    let a = probe_connect(cgroup.path(), &pod_a, real_dst, "hello from a")?;
    if accept_now(&server)?.is_some() {
        bail!(
            "the enrolled pod's connection reached the real server: connect4 did not redirect it"
        );
    }
    let conn = accept_now(&tunnel)?.context("no connection arrived at the tunnel")?;
    assert_eq!(
        conn.peer_addr()?,
        a.local,
        "the tunnel sees the pod's own address and port"
    );
    let orig = reader.original_destination(&conn)?;
    assert_eq!(orig.addr, real_dst);
    assert_eq!(
        (orig.identity_id, orig.workload_id, orig.netns_cookie),
        (42, 7, cookie_a)
    );
    assert_eq!(read_all(&conn)?, "hello from a");
    // The record is consumed: a second read is a miss, not a stale answer.
    assert!(matches!(
        reader.original_destination(&conn),
        Err(OrigDstError::NotFound { .. })
    ));

    // 2. Pod B is in the same cgroup but not enrolled: its connect is untouched.
    let b_dst: SocketAddr = "10.77.2.1:8080".parse()?;
    let b = probe_connect(cgroup.path(), &pod_b, b_dst, "hello from b")?;
    assert!(
        accept_now(&tunnel)?.is_none(),
        "a non-enrolled pod's connection reached the tunnel"
    );
    let conn_b =
        accept_now(&server)?.context("pod B's connection did not reach the real server")?;
    assert_eq!(conn_b.peer_addr()?, b.local);
    assert_eq!(read_all(&conn_b)?, "hello from b");

    // 3. A connection made straight to the tunnel port has no record: an error, never a guess.
    probe_connect(cgroup.path(), &pod_b, tunnel_addr, "direct")?;
    let direct = accept_now(&tunnel)?.context("direct connection to the tunnel did not arrive")?;
    let err = reader.original_destination(&direct).unwrap_err();
    assert!(matches!(err, OrigDstError::NotFound { .. }), "{err}");

    let counters = dp.counters()?;
    assert_eq!(counters["redirected"], 1, "{counters:?}");
    Ok(())
}

#[test]
fn enrolled_pod_is_refused_until_the_tunnel_is_configured() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let pod = NetNs::new(&format!("{p}-a"))?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
    let server = in_netns(&pod.path(), || TcpListener::bind("127.0.0.1:0"))?;
    let server_addr = server.local_addr()?;
    pod.exec(&["ip", "addr", "add", "10.78.0.1/32", "dev", "lo"])?;
    let own = in_netns(&pod.path(), || TcpListener::bind("10.78.0.1:9000"))?;

    let mut dp = Datapath::load()?;
    dp.attach(cgroup.path())?;
    let cookie = netns_cookie(&pod.path())?;
    dp.enroll(
        cookie,
        EnrolledPod {
            fail_mode: FailMode::Closed as u8,
            ..Default::default()
        },
    )?;

    // Loopback is never captured, tunnel or not.
    probe_connect(cgroup.path(), &pod, server_addr, "lo")?;
    assert!(accept_now(&server)?.is_some());

    // No tunnel configured + fail-closed: refused with ECONNREFUSED, never a plaintext bypass.
    let err = probe_connect(cgroup.path(), &pod, "10.78.0.1:9000".parse()?, "x").unwrap_err();
    assert!(err.to_string().contains("Connection refused"), "{err:#}");
    assert!(accept_now(&own)?.is_none());
    assert_eq!(dp.counters()?["refused_unconfigured"], 1);

    // Fail-open pod: passes untouched.
    dp.enroll(
        cookie,
        EnrolledPod {
            fail_mode: FailMode::Open as u8,
            ..Default::default()
        },
    )?;
    probe_connect(cgroup.path(), &pod, "10.78.0.1:9000".parse()?, "x")?;
    assert!(accept_now(&own)?.is_some());
    assert_eq!(dp.counters()?["passed_unconfigured"], 1);
    Ok(())
}
