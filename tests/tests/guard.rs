//! Root test of the plaintext guard (cgroup_skb ingress): listeners of an enrolled STRICT pod
//! accept only the tunnel address, except allow-listed probe ports; connected sockets and
//! non-enrolled or PERMISSIVE pods are unaffected.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use mesh_agent::{
    datapath::Datapath,
    map_model::{Cidr, Exclusion, PodSpec},
    maps::{KernelMaps, TunnelSettings},
    netns::netns_cookie,
};
use mesh_common::{FailMode, MtlsMode, OUTBOUND_PORT};
use nodemesh_tests::{
    ChildCgroup, ManyProbe, Node, TUNNEL_IP4, TUNNEL_IP6, connect_and_read, probe_connect,
    require_root, unique_prefix,
};

const APP_PORT: u16 = 9000;
const PROBE_PORT: u16 = 9001;
/// Long enough for a SYN and its SYN-ACK across two veths; a dropped SYN is retried only after
/// a second, so this cannot pass by luck.
const DROPPED_AFTER: Duration = Duration::from_millis(600);

#[test]
fn strict_pod_listeners_accept_only_the_tunnel_and_probe_ports() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let node = Node::new(&p, 2)?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
    let (pod, other) = (&node.pods[0], &node.pods[1]);
    let mut dp = Datapath::load()?;
    dp.attach(cgroup.path())?;
    dp.set_tunnel(&TunnelSettings {
        ip4: TUNNEL_IP4,
        ip6: Some(TUNNEL_IP6),
        port: OUTBOUND_PORT,
        stale_after: None,
    })?;
    let strict = PodSpec {
        workload_id: 1,
        identity_id: 5,
        ip4: Some(pod.ip4),
        ip6: Some(pod.ip6),
        mtls: MtlsMode::Strict,
        fail: FailMode::Closed,
        plaintext_ports: vec![PROBE_PORT],
    };
    let cookie = dp.enroll_netns(&pod.ns.path(), &strict)?;
    assert_eq!(cookie, netns_cookie(&pod.ns.path())?);
    let unspec: IpAddr = std::net::Ipv6Addr::UNSPECIFIED.into();
    let _server = ManyProbe::serve(
        cgroup.path(),
        &pod.ns,
        &[
            SocketAddr::new(unspec, APP_PORT),
            SocketAddr::new(unspec, PROBE_PORT),
        ],
    )
    .and_then(|mut s| s.wait_ready().map(|()| s))?;
    let app4 = SocketAddr::new(pod.ip4.into(), APP_PORT);
    let app6 = SocketAddr::new(pod.ip6.into(), APP_PORT);

    // Plaintext from another pod's namespace: dropped (v4 and v6), and counted.
    for dst in [app4, app6] {
        let got = connect_and_read(&other.ns, None, dst, DROPPED_AFTER)?;
        assert_eq!(got, None, "plaintext SYN to {dst} was not dropped");
    }
    assert!(dp.counters()?["guard_dropped"] >= 2);

    // From the tunnel address (in the node namespace): accepted.
    let got = connect_and_read(
        &node.ns,
        Some(TUNNEL_IP4.into()),
        app4,
        Duration::from_secs(5),
    )?;
    assert_eq!(got.as_deref(), Some("ok\n"), "tunnel (v4) was refused");
    let got = connect_and_read(
        &node.ns,
        Some(TUNNEL_IP6.into()),
        app6,
        Duration::from_secs(5),
    )?;
    assert_eq!(got.as_deref(), Some("ok\n"), "tunnel (v6) was refused");
    // From the node but another source address (kubelet-like): dropped on the app port ...
    assert_eq!(
        connect_and_read(&node.ns, None, app4, DROPPED_AFTER)?,
        None,
        "node source other than the tunnel reached the app port"
    );
    // ... and allowed on the allow-listed probe port, from anywhere.
    for (ns, dst) in [
        (&node.ns, SocketAddr::new(pod.ip4.into(), PROBE_PORT)),
        (&other.ns, SocketAddr::new(pod.ip6.into(), PROBE_PORT)),
    ] {
        let got = connect_and_read(ns, None, dst, Duration::from_secs(5))?;
        assert_eq!(got.as_deref(), Some("ok\n"), "probe port {dst} unreachable");
    }

    // Connected sockets are not affected: the STRICT pod's own outbound connection (excluded
    // from the tunnel, so it goes straight to the other pod) receives its SYN-ACK and data.
    let other_server = node_listener(&other.ns, SocketAddr::new(other.ip4.into(), 7000))?;
    dp.add_exclusion(&Exclusion::Cidr(Cidr::host(other.ip4.into())))?;
    probe_connect(
        cgroup.path(),
        &pod.ns,
        SocketAddr::new(other.ip4.into(), 7000),
        "x",
    )
    .context("the STRICT pod's outbound connection was broken by the guard")?;
    assert!(nodemesh_tests::accept_now(&other_server)?.is_some());

    // PERMISSIVE: plaintext reaches the listener again.
    dp.enroll_pod(
        cookie,
        &PodSpec {
            mtls: MtlsMode::Permissive,
            ..strict
        },
    )?;
    let got = connect_and_read(&other.ns, None, app4, Duration::from_secs(5))?;
    assert_eq!(
        got.as_deref(),
        Some("ok\n"),
        "PERMISSIVE pod refused plaintext"
    );
    Ok(())
}

fn node_listener(ns: &nodemesh_tests::NetNs, addr: SocketAddr) -> Result<std::net::TcpListener> {
    Ok(mesh_agent::netns::in_netns(&ns.path(), move || {
        std::net::TcpListener::bind(addr)
    })?)
}
