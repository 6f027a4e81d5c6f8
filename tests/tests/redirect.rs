//! Root tests of connect4/connect6 redirect (IPv4, IPv6, IPv4-mapped IPv6), exclusions, early
//! policy deny and the tunnel-liveness fail modes. Everything runs in throw-away namespaces and a
//! child cgroup; see `nodemesh_tests::Node` for the addresses.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_agent::{
    datapath::{Datapath, OrigDstSource},
    map_model::{Action, Cidr, Exclusion, PeerIdentity, PolicyRule, Proto},
    maps::{KernelMaps, TunnelSettings},
    netns::netns_cookie,
};
use mesh_common::{EnrolledPod, FailMode, MtlsMode, OUTBOUND_PORT};
use nodemesh_tests::{
    ChildCgroup, Node, TUNNEL_IP4, TUNNEL_IP6, accept_now, probe_connect, require_root,
    unique_prefix,
};

const SERVER_PORT: u16 = 8080;
const POD_IDENTITY: u32 = 42;

/// One enrolled pod behind a node with a dual-stack tunnel and a dual-stack "real server".
/// Field order is drop order: links first, then the cgroup, then the namespaces.
struct Setup {
    dp: Datapath,
    cookie: u64,
    tunnel4: TcpListener,
    tunnel6: TcpListener,
    server: TcpListener,
    cgroup: ChildCgroup,
    node: Node,
}

impl Setup {
    fn new(fail_mode: FailMode) -> Result<Self> {
        require_root();
        let p = unique_prefix();
        let node = Node::new(&p, 1)?;
        let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
        let tunnel4 = node.listen(SocketAddr::new(TUNNEL_IP4.into(), OUTBOUND_PORT))?;
        let tunnel6 = node.listen(SocketAddr::new(TUNNEL_IP6.into(), OUTBOUND_PORT))?;
        // `[::]` is dual-stack: it also receives IPv4 connections.
        let server = node.listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), SERVER_PORT))?;
        let mut dp = Datapath::load().context("load eBPF programs")?;
        dp.attach(cgroup.path())?;
        dp.set_tunnel(&TunnelSettings {
            ip4: TUNNEL_IP4,
            ip6: Some(TUNNEL_IP6),
            port: OUTBOUND_PORT,
            stale_after: None,
        })?;
        let cookie = netns_cookie(&node.pods[0].ns.path())?;
        dp.enroll(
            cookie,
            EnrolledPod {
                workload_id: 7,
                identity_id: POD_IDENTITY,
                mtls_mode: MtlsMode::Strict as u8,
                fail_mode: fail_mode as u8,
                ..Default::default()
            },
        )?;
        Ok(Self {
            dp,
            cookie,
            tunnel4,
            tunnel6,
            server,
            cgroup,
            node,
        })
    }

    /// Connects from the pod to `dst` and returns the probe's local address, or the error text.
    fn connect(&self, dst: SocketAddr) -> Result<SocketAddr> {
        Ok(probe_connect(self.cgroup.path(), &self.node.pods[0].ns, dst, "hi")?.local)
    }

    /// Asserts that the last connection arrived at the tunnel (`v6` listener or not) with
    /// original destination `dst`, and nowhere else.
    fn expect_redirected(&self, v6: bool, dst: SocketAddr, local: SocketAddr) -> Result<()> {
        if accept_now(&self.server)?.is_some() {
            bail!("a connection to {dst} reached the real server: it was not redirected");
        }
        let (tunnel, other) = if v6 {
            (&self.tunnel6, &self.tunnel4)
        } else {
            (&self.tunnel4, &self.tunnel6)
        };
        assert!(accept_now(other)?.is_none(), "arrived on the wrong family");
        let conn = accept_now(tunnel)?.with_context(|| format!("{dst}: nothing at the tunnel"))?;
        assert_eq!(canonical(conn.peer_addr()?), canonical(local));
        let orig = self.dp.orig_dst_reader().original_destination(&conn)?;
        assert_eq!(orig.addr, dst);
        assert_eq!(
            (orig.identity_id, orig.netns_cookie),
            (POD_IDENTITY, self.cookie)
        );
        Ok(())
    }

    /// Asserts that the last connection reached the real server untouched.
    fn expect_direct(&self, local: SocketAddr) -> Result<()> {
        assert!(accept_now(&self.tunnel4)?.is_none(), "redirected (v4)");
        assert!(accept_now(&self.tunnel6)?.is_none(), "redirected (v6)");
        let conn = accept_now(&self.server)?.context("nothing at the real server")?;
        assert_eq!(canonical(conn.peer_addr()?), canonical(local));
        Ok(())
    }

    fn expect_refused(&self, dst: SocketAddr) -> Result<()> {
        let err = self.connect(dst).expect_err("connect must fail");
        assert!(
            err.to_string().contains("Connection refused"),
            "expected ECONNREFUSED: {err:#}"
        );
        assert!(accept_now(&self.server)?.is_none());
        assert!(accept_now(&self.tunnel4)?.is_none());
        assert!(accept_now(&self.tunnel6)?.is_none());
        Ok(())
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

#[test]
fn ipv4_ipv6_and_mapped_connects_are_redirected() -> Result<()> {
    let s = Setup::new(FailMode::Closed)?;
    let pod = &s.node.pods[0];

    let dst4 = SocketAddr::new(pod.gw4.into(), SERVER_PORT);
    let local = s.connect(dst4)?;
    s.expect_redirected(false, dst4, local)?;

    let dst6 = SocketAddr::new(pod.gw6.into(), SERVER_PORT);
    let local = s.connect(dst6)?;
    s.expect_redirected(true, dst6, local)?;

    // A dual-stack socket connecting to `::ffff:10.77.1.1` (the Java case): an IPv4 connection,
    // redirected to the IPv4 tunnel, original destination reported as IPv4.
    let mapped = SocketAddr::new(pod.gw4.to_ipv6_mapped().into(), SERVER_PORT);
    let local = s.connect(mapped)?;
    assert!(local.is_ipv6(), "the probe used an AF_INET6 socket");
    s.expect_redirected(false, dst4, local)?;

    // IPv6 loopback stays inside the pod.
    let lo = mesh_agent::netns::in_netns(&pod.ns.path(), || TcpListener::bind("[::1]:0"))?;
    s.connect(lo.local_addr()?)?;
    assert!(accept_now(&lo)?.is_some(), "::1 must not be captured");

    assert_eq!(s.dp.counters()?["redirected"], 3);
    Ok(())
}

#[test]
fn exclusions_are_respected() -> Result<()> {
    let mut s = Setup::new(FailMode::Closed)?;
    let pod = &s.node.pods[0];
    let (gw4, gw6): (IpAddr, IpAddr) = (pod.gw4.into(), pod.gw6.into());
    s.dp.add_exclusion(&Exclusion::CidrPort(Cidr::host(gw4), SERVER_PORT))?;
    s.dp.add_exclusion(&Exclusion::Cidr("fd77:1::/64".parse()?))?;

    // Excluded: IPv4 host+port, the same as mapped, IPv6 prefix (all ports).
    for dst in [
        SocketAddr::new(gw4, SERVER_PORT),
        SocketAddr::new(pod.gw4.to_ipv6_mapped().into(), SERVER_PORT),
        SocketAddr::new(gw6, SERVER_PORT),
    ] {
        let local = s.connect(dst)?;
        s.expect_direct(local).with_context(|| format!("{dst}"))?;
    }
    assert_eq!(s.dp.counters()?["excluded"], 3);

    // Another port of the IPv4 host is not excluded; a listener there proves it was redirected.
    let other = SocketAddr::new(gw4, SERVER_PORT + 1);
    let local = s.connect(other)?;
    s.expect_redirected(false, other, local)?;

    // A port-only exclusion covers every address.
    s.dp.add_exclusion(&Exclusion::Port(SERVER_PORT + 1))?;
    let _server2 = s.node.listen(SocketAddr::new(
        Ipv6Addr::UNSPECIFIED.into(),
        SERVER_PORT + 1,
    ))?;
    let local = s.connect(other)?;
    assert!(accept_now(&s.tunnel4)?.is_none(), "port exclusion ignored");
    let conn = accept_now(&_server2)?.context("port-excluded connect did not arrive")?;
    assert_eq!(canonical(conn.peer_addr()?), canonical(local));

    // The tunnel address itself is never captured.
    let to_tunnel = SocketAddr::new(TUNNEL_IP4.into(), OUTBOUND_PORT);
    s.connect(to_tunnel)?;
    let direct = accept_now(&s.tunnel4)?.context("direct tunnel connect missing")?;
    assert!(
        s.dp.orig_dst_reader()
            .original_destination(&direct)
            .is_err(),
        "a direct connection has no original destination"
    );
    Ok(())
}

#[test]
fn policy_denies_early_with_econnrefused_and_counts() -> Result<()> {
    let mut s = Setup::new(FailMode::Closed)?;
    let pod = &s.node.pods[0];
    let (gw4, gw6): (IpAddr, IpAddr) = (pod.gw4.into(), pod.gw6.into());
    let server_identity = 100;
    s.dp.set_identity(&Cidr::host(gw4), server_identity)?;
    s.dp.set_identity(&"fd77:1::/64".parse()?, server_identity)?;
    s.dp.set_policy(&PolicyRule {
        src_identity: POD_IDENTITY,
        dst: PeerIdentity::Id(server_identity),
        port: Some(SERVER_PORT),
        proto: Proto::Tcp,
        action: Action::Deny,
    })?;

    s.expect_refused(SocketAddr::new(gw4, SERVER_PORT))?;
    s.expect_refused(SocketAddr::new(gw6, SERVER_PORT))?;
    s.expect_refused(SocketAddr::new(
        pod.gw4.to_ipv6_mapped().into(),
        SERVER_PORT,
    ))?;
    let c = s.dp.counters()?;
    assert_eq!((c["denied_policy"], c["redirected"]), (3, 0), "{c:?}");

    // Another port is allowed and proceeds (to the tunnel).
    let allowed = SocketAddr::new(gw4, SERVER_PORT + 1);
    let local = s.connect(allowed)?;
    s.expect_redirected(false, allowed, local)?;

    // A more specific allow wins over a wildcard deny of everything else.
    s.dp.set_policy(&PolicyRule {
        src_identity: POD_IDENTITY,
        dst: PeerIdentity::Any,
        port: None,
        proto: Proto::Tcp,
        action: Action::Deny,
    })?;
    s.dp.set_policy(&PolicyRule {
        src_identity: POD_IDENTITY,
        dst: PeerIdentity::Id(server_identity),
        port: Some(SERVER_PORT + 1),
        proto: Proto::Tcp,
        action: Action::Allow,
    })?;
    s.expect_refused(SocketAddr::new(gw4, SERVER_PORT + 2))?;
    let local = s.connect(allowed)?;
    s.expect_redirected(false, allowed, local)?;
    assert_eq!(s.dp.counters()?["denied_policy"], 4);
    Ok(())
}

/// Destinations that are neither workloads nor service VIPs (the kube API, an external
/// database) go out untouched, with the pod's own address as the source the server sees, after
/// the policy check; mesh destinations are still redirected. An empty mesh-destination map (the
/// other tests) captures everything.
#[test]
fn destinations_outside_the_mesh_pass_untouched_with_the_pods_address() -> Result<()> {
    let mut s = Setup::new(FailMode::Closed)?;
    let pod = &s.node.pods[0];
    let (gw4, gw6): (IpAddr, IpAddr) = (pod.gw4.into(), pod.gw6.into());
    // Outside the mesh: more addresses of the node, served by the same `[::]` listener.
    let (out4, out6): (IpAddr, IpAddr) = ("10.77.250.1".parse()?, "fd77:250::1".parse()?);
    for (family, addr) in [("-4", "10.77.250.1/32"), ("-6", "fd77:250::1/128")] {
        s.node
            .ns
            .exec(&["ip", family, "addr", "add", addr, "dev", "lo"])?;
    }
    // The mesh: the gateways stand for workloads (a VIP is the same kind of entry).
    s.dp.add_mesh_destination(&Cidr::host(gw4))?;
    s.dp.add_mesh_destination(&Cidr::host(gw6))?;
    // Members only (the catch-all not written yet): everything is still captured.
    let early = SocketAddr::new(out4, SERVER_PORT);
    let local = s.connect(early)?;
    s.expect_redirected(false, early, local)?;
    s.dp.pass_outside_mesh()?;

    for (dst, pod_ip) in [
        (SocketAddr::new(out4, SERVER_PORT), IpAddr::from(pod.ip4)),
        (
            SocketAddr::new(
                "10.77.250.1"
                    .parse::<std::net::Ipv4Addr>()?
                    .to_ipv6_mapped()
                    .into(),
                SERVER_PORT,
            ),
            IpAddr::from(pod.ip4),
        ),
        (SocketAddr::new(out6, SERVER_PORT), IpAddr::from(pod.ip6)),
    ] {
        let local = s.connect(dst)?;
        assert!(accept_now(&s.tunnel4)?.is_none(), "{dst}: redirected (v4)");
        assert!(accept_now(&s.tunnel6)?.is_none(), "{dst}: redirected (v6)");
        let conn = accept_now(&s.server)?.with_context(|| format!("{dst}: not at the server"))?;
        let peer = canonical(conn.peer_addr()?);
        assert_eq!(peer, canonical(local));
        assert_eq!(
            peer.ip(),
            pod_ip,
            "{dst}: the server sees the pod's own address"
        );
    }

    // Mesh destinations are still redirected (the server would see them otherwise).
    let dst4 = SocketAddr::new(gw4, SERVER_PORT);
    let local = s.connect(dst4)?;
    s.expect_redirected(false, dst4, local)?;
    let dst6 = SocketAddr::new(gw6, SERVER_PORT);
    let local = s.connect(dst6)?;
    s.expect_redirected(true, dst6, local)?;

    // The early deny comes first: a denied destination outside the mesh is refused.
    s.dp.set_policy(&PolicyRule {
        src_identity: POD_IDENTITY,
        dst: PeerIdentity::World,
        port: Some(SERVER_PORT + 1),
        proto: Proto::Tcp,
        action: Action::Deny,
    })?;
    s.expect_refused(SocketAddr::new(out4, SERVER_PORT + 1))?;

    // A fail-closed pod reaches the outside even with the tunnel down (nothing to tunnel).
    s.dp.set_tunnel(&TunnelSettings {
        ip4: TUNNEL_IP4,
        ip6: Some(TUNNEL_IP6),
        port: OUTBOUND_PORT,
        stale_after: Some(Duration::from_secs(3600)),
    })?;
    let local = s.connect(SocketAddr::new(out6, SERVER_PORT))?;
    s.expect_direct(local)?;
    s.expect_refused(dst4)?;

    // A member that leaves the mesh goes out untouched from then on.
    s.dp.remove_mesh_destination(&Cidr::host(gw4))?;
    let local = s.connect(dst4)?;
    s.expect_direct(local)?;

    let c = s.dp.counters()?;
    assert_eq!(
        (
            c["passed_outside_mesh"],
            c["redirected"],
            c["denied_policy"],
            c["refused_tunnel_stale"]
        ),
        (5, 3, 1, 1),
        "{c:?}"
    );
    Ok(())
}

#[test]
fn udp_is_denied_by_udp_policy_only() -> Result<()> {
    let mut s = Setup::new(FailMode::Closed)?;
    let pod = &s.node.pods[0];
    let (gw4, gw6): (IpAddr, IpAddr) = (pod.gw4.into(), pod.gw6.into());
    s.dp.set_identity(&Cidr::host(gw4), 100)?;
    s.dp.set_identity(&Cidr::host(gw6), 100)?;
    let rule = PolicyRule {
        src_identity: POD_IDENTITY,
        dst: PeerIdentity::Id(100),
        port: Some(53),
        proto: Proto::Udp,
        action: Action::Deny,
    };
    s.dp.set_policy(&rule)?;
    for dst in [
        SocketAddr::new(gw4, 53),
        SocketAddr::new(gw6, 53),
        SocketAddr::new(pod.gw4.to_ipv6_mapped().into(), 53),
    ] {
        let err = nodemesh_tests::probe_udp_connect(s.cgroup.path(), &pod.ns, dst)
            .expect_err("denied UDP connect must fail");
        assert!(
            err.to_string().contains("Connection refused"),
            "{dst}: {err:#}"
        );
    }
    assert_eq!(s.dp.counters()?["denied_policy"], 3);
    // Unconnected UDP (sendto) is checked too.
    for dst in [SocketAddr::new(gw4, 53), SocketAddr::new(gw6, 53)] {
        let err = nodemesh_tests::probe_udp_send(s.cgroup.path(), &pod.ns, dst)
            .expect_err("denied UDP sendto must fail");
        assert!(
            err.to_string().contains("Connection refused"),
            "{dst}: {err:#}"
        );
    }
    nodemesh_tests::probe_udp_send(s.cgroup.path(), &pod.ns, SocketAddr::new(gw4, 54))?;
    assert_eq!(s.dp.counters()?["denied_policy"], 5);
    // Another UDP port, and TCP to the same port, are not affected by the UDP rule.
    nodemesh_tests::probe_udp_connect(s.cgroup.path(), &pod.ns, SocketAddr::new(gw4, 54))?;
    let tcp = SocketAddr::new(gw4, 53);
    let local = s.connect(tcp)?;
    s.expect_redirected(false, tcp, local)?;
    s.dp.remove_policy(&rule)?;
    nodemesh_tests::probe_udp_connect(s.cgroup.path(), &pod.ns, SocketAddr::new(gw4, 53))?;
    Ok(())
}

#[test]
fn stale_tunnel_refuses_fail_closed_pods() -> Result<()> {
    let mut s = Setup::new(FailMode::Closed)?;
    let dst = SocketAddr::new(s.node.pods[0].gw4.into(), SERVER_PORT);
    s.dp.set_tunnel(&TunnelSettings {
        ip4: TUNNEL_IP4,
        ip6: Some(TUNNEL_IP6),
        port: OUTBOUND_PORT,
        stale_after: Some(Duration::from_secs(3600)),
    })?;
    // Never beaten: down.
    s.expect_refused(dst)?;
    assert_eq!(s.dp.counters()?["refused_tunnel_stale"], 1);

    let hb = s.dp.heartbeat();
    hb.beat()?;
    let local = s.connect(dst)?;
    s.expect_redirected(false, dst, local)?;

    // A window shorter than the time between beat and connect: stale, without sleeping.
    s.dp.set_tunnel(&TunnelSettings {
        stale_after: Some(Duration::from_nanos(1)),
        ip4: TUNNEL_IP4,
        ip6: Some(TUNNEL_IP6),
        port: OUTBOUND_PORT,
    })?;
    hb.beat()?;
    s.expect_refused(dst)?;
    assert_eq!(s.dp.counters()?["refused_tunnel_stale"], 2);
    Ok(())
}

#[test]
fn stale_tunnel_passes_fail_open_pods_untouched() -> Result<()> {
    let mut s = Setup::new(FailMode::Open)?;
    let dst = SocketAddr::new(s.node.pods[0].gw6.into(), SERVER_PORT);
    s.dp.set_tunnel(&TunnelSettings {
        ip4: TUNNEL_IP4,
        ip6: Some(TUNNEL_IP6),
        port: OUTBOUND_PORT,
        stale_after: Some(Duration::from_secs(3600)),
    })?;
    let hb = s.dp.heartbeat();
    hb.beat()?;
    let local = s.connect(dst)?;
    s.expect_redirected(true, dst, local)?;

    hb.stop()?;
    let local = s.connect(dst)?;
    s.expect_direct(local)?;
    assert_eq!(s.dp.counters()?["passed_tunnel_stale"], 1);
    Ok(())
}

/// With sock_ops also on the tunnel's cgroup, the original destination is moved into the
/// accepted socket's own storage at PASSIVE_ESTABLISHED (v4 seen through a dual-stack listener as
/// mapped, and v6), and read from there.
#[test]
fn original_destination_is_handed_over_into_the_accepted_socket() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let node = Node::new(&p, 1)?;
    let pods = ChildCgroup::new(&format!("{p}-pods"))?;
    let tunnel_cg = ChildCgroup::new(&format!("{p}-tunnel"))?;
    let pod = &node.pods[0];
    // One dual-stack listener on every node address, created from inside the tunnel's cgroup.
    let tunnel = nodemesh_tests::with_process_in_cgroup(tunnel_cg.path(), || {
        node.listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), OUTBOUND_PORT))
    })?;
    let mut dp = Datapath::load()?;
    dp.attach(pods.path())?;
    dp.attach_tunnel(tunnel_cg.path())?;
    dp.set_tunnel(&TunnelSettings {
        ip4: TUNNEL_IP4,
        ip6: Some(TUNNEL_IP6),
        port: OUTBOUND_PORT,
        stale_after: None,
    })?;
    let cookie = netns_cookie(&pod.ns.path())?;
    dp.enroll(
        cookie,
        EnrolledPod {
            identity_id: POD_IDENTITY,
            ..Default::default()
        },
    )?;
    let reader = dp.orig_dst_reader();
    for dst in [
        SocketAddr::new(pod.gw4.into(), SERVER_PORT),
        SocketAddr::new(pod.gw6.into(), SERVER_PORT),
    ] {
        let local = probe_connect(pods.path(), &pod.ns, dst, "x")?.local;
        let conn = accept_now(&tunnel)?.with_context(|| format!("{dst}: nothing at the tunnel"))?;
        assert_eq!(canonical(conn.peer_addr()?), canonical(local));
        let orig = reader.original_destination(&conn)?;
        assert_eq!(orig.addr, dst);
        assert_eq!(orig.netns_cookie, cookie);
        assert_eq!(orig.source, OrigDstSource::SocketStorage, "{dst}");
        // The record stays with the socket (it dies with it, no later connection can see it);
        // the tuple entry was removed at hand-over.
        assert_eq!(reader.original_destination(&conn)?.addr, dst);
        assert!(
            reader
                .lookup(conn.peer_addr()?, conn.local_addr()?)
                .is_err()
        );
    }
    let c = dp.counters()?;
    assert_eq!(
        (c["orig_dst_handed_over"], c["redirected"]),
        (2, 2),
        "{c:?}"
    );
    drop(dp);
    drop(tunnel);
    Ok(())
}

/// ≥1,000 concurrent redirected connections from three pods whose ephemeral port ranges are
/// narrowed to the same 450 ports, so every source port is in use by all three pods at once:
/// each connection's original destination must come back exactly, and the probe's payload
/// (its own destination) must match it.
#[test]
fn original_destinations_survive_colliding_ephemeral_ports() -> Result<()> {
    colliding_ports(OrigDstSource::TupleMap)
}

/// The same through the sock_ops hand-off into each accepted socket's storage.
#[test]
fn original_destinations_survive_colliding_ephemeral_ports_via_socket_storage() -> Result<()> {
    colliding_ports(OrigDstSource::SocketStorage)
}

fn colliding_ports(via: OrigDstSource) -> Result<()> {
    require_root();
    const PODS: u8 = 3;
    const PER_POD: usize = 400;
    let p = unique_prefix();
    let node = Node::new(&p, PODS)?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
    let tunnel_cg = ChildCgroup::new(&format!("{p}-tunnel"))?;
    let tunnel_addr = SocketAddr::new(TUNNEL_IP4.into(), OUTBOUND_PORT);
    let tunnel = match via {
        OrigDstSource::TupleMap => node.listen(tunnel_addr)?,
        OrigDstSource::SocketStorage => {
            nodemesh_tests::with_process_in_cgroup(tunnel_cg.path(), || node.listen(tunnel_addr))?
        }
    };
    let mut dp = Datapath::load()?;
    dp.attach(cgroup.path())?;
    if via == OrigDstSource::SocketStorage {
        dp.attach_tunnel(tunnel_cg.path())?;
    }
    dp.set_tunnel(&nodemesh_tests::tunnel_v4(SocketAddr::new(
        TUNNEL_IP4.into(),
        OUTBOUND_PORT,
    )))?;
    let mut cookies = Vec::new();
    for (i, pod) in node.pods.iter().enumerate() {
        pod.ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=40000 40449",
        ])?;
        let cookie = netns_cookie(&pod.ns.path())?;
        dp.enroll(
            cookie,
            EnrolledPod {
                workload_id: i as u32 + 1,
                identity_id: 10 + i as u32,
                ..Default::default()
            },
        )?;
        cookies.push(cookie);
    }
    let reader = dp.orig_dst_reader();
    let total = usize::from(PODS) * PER_POD;
    // The tunnel: accept, read the original destination, compare with what the probe says.
    let acceptor = std::thread::spawn(move || -> Result<Vec<(u64, SocketAddr, SocketAddr)>> {
        let mut seen = Vec::with_capacity(total);
        for _ in 0..total {
            let conn = nodemesh_tests::accept_within(&tunnel, Duration::from_secs(20))?
                .context("fewer connections than expected arrived at the tunnel")?;
            let orig = reader.original_destination(&conn)?;
            anyhow::ensure!(orig.source == via, "found via {:?}", orig.source);
            let mut line = String::new();
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            BufReader::new(&conn).read_line(&mut line)?;
            let told: SocketAddr = line.trim().parse().context("probe payload")?;
            seen.push((orig.netns_cookie, orig.addr, told));
        }
        Ok(seen)
    });
    let mut probes = Vec::new();
    for pod in &node.pods {
        // Destinations spread over 50 ports of the pod's gateway; nothing listens there.
        probes.push(nodemesh_tests::ManyProbe::start(
            cgroup.path(),
            &pod.ns,
            PER_POD,
            pod.gw4.into(),
            9000,
            50,
        )?);
    }
    for probe in &mut probes {
        probe.wait_ready()?;
    }
    let seen = acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
    assert_eq!(seen.len(), total);
    let mut per_pod = vec![0usize; node.pods.len()];
    for (cookie, orig, told) in &seen {
        assert_eq!(orig, told, "original destination mismatch");
        let i = cookies
            .iter()
            .position(|c| c == cookie)
            .context("record from an unknown pod")?;
        assert_eq!(
            orig.ip(),
            IpAddr::from(node.pods[i].gw4),
            "wrong pod's record"
        );
        per_pod[i] += 1;
    }
    assert_eq!(per_pod, vec![PER_POD; node.pods.len()]);
    let c = dp.counters()?;
    assert_eq!(
        (
            c["redirected"],
            c["orig_dst_misses"],
            c["tuple_map_update_failed"]
        ),
        (total as u64, 0, 0),
        "{c:?}"
    );
    drop(probes);
    Ok(())
}
