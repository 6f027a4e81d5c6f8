//! End-to-end tests of issue 5 not covered by `local_mode.rs`: two `mesh-agent local` processes
//! (as `nm-agent`), each in its own "node" (network namespace + cgroup), one generated cluster
//! file, pods as namespaces in child cgroups of their node's cgroup.
//!
//! - service VIP: connections to a VIP with an endpoint on each node are spread across both; when
//!   one endpoint's pod stops listening (the same-node one, then the remote one) or its node is
//!   down, every new connection succeeds through the other and node a logs the ejection; a pod
//!   that listens again gets traffic once its ejection (`--ejection-ms`, 2 s here) expires; a
//!   connection to a refusing pod's own address fails at once.
//! - forged path: an HBONE CONNECT made straight to the destination node's :15008 (skipping the
//!   source node's kernel deny) with a valid mesh certificate of a denied identity gets 401 and
//!   is counted as a policy deny on the destination node; the same path to an allowed port
//!   gets 200.
//! - data integrity: 4 concurrent streams of 64 MiB each (256 MiB) from a pod on node a to the
//!   echo server on node b come back complete, with matching checksums.
//! - restart: node a's agent is SIGKILLed while a connection carries traffic and restarted; a new
//!   connection from the unchanged client pod works within 2 s of its readiness (it adopts the
//!   pins); after teardown (SIGTERM + uninstall) both instances' pin directories are gone and
//!   the node cgroups have no program attached (`BPF_PROG_QUERY`).
//!
//! - same-node authorization: a DENY that selects only server-a (server-b shares its identity,
//!   so the kernel's identity-keyed early deny cannot refuse it) is enforced by node a's tunnel
//!   on the same-node path: the client's connection is closed unanswered, server-a accepts
//!   nothing, node a counts the deny and logs it; the same client reaches server-b.
//!
//! - ports of deliveries: with node a's ephemeral range cut to 64 ports, 96 same-node
//!   connections that the client closes first (so node a's socket to the pod waits in
//!   `TIME_WAIT`, holding its port) to two ports of server-a all succeed, and more sockets wait
//!   in `TIME_WAIT` at once than the range has ports: the tunnel's port is unique per
//!   destination, not per node (`IP_BIND_ADDRESS_NO_PORT`).
//!
//! Addresses (private to each test's namespaces): node link 10.110.0.1 (a) ↔ 10.110.0.2 (b);
//! pods on node a 10.11.<i>.2, on node b 10.12.<i>.2; tunnel addresses 169.254.110.1 / .2;
//! the service VIP 10.96.110.10:80 → 8080.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, ensure};
use mesh_agent::identity::{LocalCa, SpiffeId, TrustBundle, tls};
use nodemesh_tests::{
    cluster::{Cluster, Echo, Net, Pod, addr, scrape, strict_and_deny_client, workload},
    with_process_in_cgroup,
};

const ECHO_PORT: u16 = 8080;
/// The client may not reach the servers on this port (DENY policy).
const DENIED_PORT: u16 = 9090;
const HBONE_PORT: u16 = 15008;
const VIP: &str = "10.96.110.10";
const VIP_PORT: u16 = 80;
const NODE_A: &str = "10.110.0.1";
const NODE_B: &str = "10.110.0.2";
const TUNNEL_A: &str = "169.254.110.1";
const TUNNEL_B: &str = "169.254.110.2";
const NET: Net = Net {
    node_a: NODE_A,
    node_b: NODE_B,
    tunnel_a: TUNNEL_A,
    tunnel_b: TUNNEL_B,
    pods_a: 11,
    pods_b: 12,
};
/// How long the agents skip a service endpoint that could not be reached (`--ejection-ms`):
/// short, so the VIP test sees an endpoint come back within a few seconds.
const EJECTION: Duration = Duration::from_secs(2);

/// The cluster: a client and a server on node a, a server on node b, the service `echo` with
/// both servers as endpoints.
fn up() -> Result<Cluster> {
    let ejection = EJECTION.as_millis().to_string();
    Cluster::up(NET, &["--ejection-ms", &ejection], config)
}

fn config(client: &Pod, server_a: &Pod, server_b: &Pod) -> String {
    format!(
        r#"{head}{client}{server_a}{server_b}services:
- name: echo
  namespace: demo
  vips: [{VIP}]
  ports: [{{port: {VIP_PORT}, targetPort: {ECHO_PORT}}}]
  endpoints: [server-a, server-b]
{policies}"#,
        head = NET.cluster_head(),
        client = workload(client, "client", "client", "", "a"),
        server_a = workload(
            server_a,
            "server-a",
            "server",
            "app: server, instance: server-a",
            "a"
        ),
        server_b = workload(server_b, "server-b", "server", "app: server", "b"),
        policies = strict_and_deny_client(&format!("\"{DENIED_PORT}\"")),
    )
}

/// Round trips to `vip` until `echo` has accepted one, each of which must succeed; fails after
/// `within`. Returns how many it took.
fn until_reached(c: &Cluster, vip: SocketAddr, echo: &Echo, within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    for i in 0.. {
        c.roundtrip(vip, &format!("until reached {i}"))
            .with_context(|| format!("round trip {i} to the VIP:\n{}", c.logs()))?;
        if echo.accepted() > 0 {
            return Ok(i + 1);
        }
        ensure!(
            Instant::now() < deadline,
            "the endpoint got no connection within {within:?} ({i} round trips):\n{}",
            c.logs()
        );
    }
    unreachable!("the loop returns or fails")
}

/// `n` round trips to `vip`, every one of which must succeed; `what` names the situation.
fn all_succeed(c: &Cluster, vip: SocketAddr, n: usize, what: &str) -> Result<()> {
    for i in 0..n {
        c.roundtrip(vip, &format!("{what} {i}"))
            .with_context(|| format!("round trip {i} to the VIP with {what}:\n{}", c.logs()))?;
    }
    Ok(())
}

#[test]
fn service_vip_spreads_across_endpoints_and_avoids_a_down_one() -> Result<()> {
    let mut c = up()?;
    let mut echo_a = Echo::start(&c.server_a, ECHO_PORT)?;
    let mut echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let vip = addr(VIP, VIP_PORT)?;
    let ejected = |server: &Pod, why: &'static str| {
        let endpoint = format!("{}:{ECHO_PORT}", server.ip);
        c.agents[0].wait_log(&format!("the ejection of {endpoint} ({why})"), |l| {
            l.contains("endpoint ejected") && l.contains(&endpoint) && l.contains(why)
        })
    };

    // 20 connections to the VIP: each is echoed, and both endpoints (one per node) get some.
    all_succeed(&c, vip, 20, "both endpoints up")?;
    let (on_a, on_b) = (echo_a.accepted(), echo_b.accepted());
    assert_eq!(on_a + on_b, 20, "every connection reaches one endpoint");
    assert!(
        on_a > 0 && on_b > 0,
        "the VIP must spread connections over both endpoints: {on_a} on node a, {on_b} on node b"
    );

    // The same-node endpoint's pod stops listening (its port refuses): not one connection
    // fails; the one that finds it refusing is retried on server-b, which gets them all.
    drop(echo_a);
    all_succeed(&c, vip, 10, "server-a refusing")?;
    assert_eq!(echo_b.accepted(), 10, "all went to the remaining endpoint");
    ejected(&c.server_a, "same-node connect")?;
    // Back: once its ejection expires, traffic reaches it again.
    echo_a = Echo::start(&c.server_a, ECHO_PORT)?;
    let n = until_reached(&c, vip, &echo_a, EJECTION * 5)?;
    echo_b.accepted();
    eprintln!("server-a reached again after {n} round trips");

    // The remote endpoint's pod stops listening: node b's inbound answers 503, node a ejects
    // server-b and retries on server-a. A connection to that pod's own address (no other
    // endpoint) is reset at once.
    drop(echo_b);
    all_succeed(&c, vip, 10, "server-b refusing")?;
    assert_eq!(echo_a.accepted(), 10, "all went to the remaining endpoint");
    ejected(&c.server_b, "answered 503")?;
    let started = Instant::now();
    let direct = c.roundtrip(addr(&c.server_b.ip, ECHO_PORT)?, "to a refusing pod");
    ensure!(
        direct.is_err(),
        "a connection to a pod that refuses cannot succeed"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "a refusing pod's connection must fail at once, took {:?}: {direct:?}",
        started.elapsed()
    );
    echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let n = until_reached(&c, vip, &echo_b, EJECTION * 5)?;
    echo_a.accepted();
    eprintln!("server-b reached again after {n} round trips");

    // Node b goes down (its agent killed: its HBONE port refuses): new connections to the VIP
    // all succeed through the endpoint on node a.
    c.agents[1].kill()?;
    drop(echo_b);
    all_succeed(&c, vip, 10, "node b down")?;
    assert_eq!(echo_a.accepted(), 10, "all went to the remaining endpoint");
    Ok(())
}

/// An HBONE `CONNECT` to `authority` sent from `netns` (not enrolled: no redirect) straight to
/// `hbone`, presenting a certificate of `source` signed by the cluster's CA in `ca_dir` and asking
/// for `dst_identity`'s certificate. Returns the response status.
fn forged_connect(
    netns: &Path,
    ca_dir: &Path,
    source: &SpiffeId,
    dst_identity: &SpiffeId,
    hbone: SocketAddr,
    authority: SocketAddr,
) -> Result<u16> {
    let ca = LocalCa::open(ca_dir, "cluster.local")?;
    let now = SystemTime::now();
    let cert = ca.issue_with_validity(
        source,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )?;
    let bundle = TrustBundle::new("cluster.local", vec![ca.root().clone()]);
    let tls = tls::client_config(&cert, &bundle, dst_identity)?;
    let sni = tls::identity_sni(dst_identity);
    let tcp = mesh_agent::netns::in_netns(netns, move || {
        std::net::TcpStream::connect_timeout(&hbone, Duration::from_secs(5))
    })?;
    tcp.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(sni, tcp)
            .await
            .context("TLS handshake with the destination node")?;
        let (mut client, conn) = h2::client::handshake(stream)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        let req = mesh_agent::tunnel::pool::connect_request(authority, &http::HeaderMap::new())?;
        let (resp, _send) = client.send_request(req, false)?;
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .context("no CONNECT response within 10 s")??;
        Ok(resp.status().as_u16())
    })
}

#[test]
fn forged_hbone_connect_around_the_kernel_deny_is_refused_at_the_destination() -> Result<()> {
    let c = up()?;
    let _echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let client = SpiffeId::new("cluster.local", "demo", "client")?;
    let server = SpiffeId::new("cluster.local", "demo", "server")?;
    let hbone = addr(NODE_B, HBONE_PORT)?;
    let ca_dir = c.dir.path().join("ca");
    let forged = |port| {
        forged_connect(
            &c.node_a.ns.path(),
            &ca_dir,
            &client,
            &server,
            hbone,
            addr(&c.server_b.ip, port)?,
        )
    };

    // The path itself works: an allowed port is connected.
    let allowed = forged(ECHO_PORT).with_context(|| format!("allowed port:\n{}", c.logs()))?;
    assert_eq!(allowed, 200, "CONNECT to an allowed port:\n{}", c.logs());

    // The denied port: refused by node b's own policy check, and counted there.
    let deny = ["action=\"deny\""];
    let decisions = "nodemesh_policy_decisions_total";
    let before = nodemesh_tests::metric_sum(&scrape(&c.node_b, NODE_B)?, decisions, &deny);
    let status = forged(DENIED_PORT).with_context(|| format!("denied port:\n{}", c.logs()))?;
    assert_eq!(
        status,
        401,
        "a CONNECT of a denied identity to a denied port must get 401:\n{}",
        c.logs()
    );
    let after = nodemesh_tests::metric_sum(&scrape(&c.node_b, NODE_B)?, decisions, &deny);
    assert_eq!(after - before, 1, "node b counts one policy deny");
    Ok(())
}

/// xorshift64: a cheap, deterministic stream of words to send.
fn next_word(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A 64-bit FNV-1a-style checksum over 8-byte words (fast enough in a debug build).
fn fnv_word(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const STREAMS: u64 = 4;
const STREAM_BYTES: u64 = 64 << 20;
const CHUNK: usize = 64 << 10;

#[test]
fn data_integrity_256_mib_across_nodes_on_four_streams() -> Result<()> {
    use std::io::{Read, Write};
    let c = up()?;
    let _echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let dst = addr(&c.server_b.ip, ECHO_PORT)?;
    let ns = c.client.ns.path();
    let streams = with_process_in_cgroup(c.client.cgroup.path(), || {
        (0..STREAMS)
            .map(|_| {
                Ok(mesh_agent::netns::in_netns(&ns, move || {
                    std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                })?)
            })
            .collect::<Result<Vec<_>>>()
    })
    .with_context(|| format!("connect:\n{}", c.logs()))?;

    let mut workers = Vec::new();
    for (i, stream) in (0u64..).zip(streams) {
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut tx = stream.try_clone()?;
        let mut rx = stream;
        let sender = std::thread::spawn(move || -> Result<u64> {
            let mut state = 0x9e37_79b9_7f4a_7c15 ^ (i + 1);
            let mut hash = FNV_OFFSET;
            let mut buf = vec![0u8; CHUNK];
            for _ in 0..STREAM_BYTES / CHUNK as u64 {
                for w in buf.chunks_exact_mut(8) {
                    let word = next_word(&mut state);
                    hash = fnv_word(hash, word);
                    w.copy_from_slice(&word.to_le_bytes());
                }
                tx.write_all(&buf)?;
            }
            tx.shutdown(std::net::Shutdown::Write)?;
            Ok(hash)
        });
        let receiver = std::thread::spawn(move || -> Result<(u64, u64)> {
            let mut hash = FNV_OFFSET;
            let mut total = 0u64;
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            loop {
                let n = rx.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
                total += n as u64;
                let whole = filled - filled % 8;
                for w in buf[..whole].chunks_exact(8) {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(w);
                    hash = fnv_word(hash, u64::from_le_bytes(word));
                }
                buf.copy_within(whole..filled, 0);
                filled -= whole;
            }
            ensure!(filled == 0, "{filled} trailing bytes");
            Ok((total, hash))
        });
        workers.push((sender, receiver));
    }
    for (i, (sender, receiver)) in workers.into_iter().enumerate() {
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender {i} panicked"))?
            .with_context(|| format!("stream {i} send:\n{}", c.logs()))?;
        let (total, got) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver {i} panicked"))?
            .with_context(|| format!("stream {i} receive:\n{}", c.logs()))?;
        assert_eq!(total, STREAM_BYTES, "stream {i}: bytes echoed back");
        assert_eq!(got, sent, "stream {i}: checksum of the echoed data");
    }
    Ok(())
}

/// How many programs are attached to `cgroup` over every cgroup attach type the datapath could
/// use (`BPF_PROG_QUERY`, no `bpftool` needed).
fn attached_programs(cgroup: &Path) -> Result<u32> {
    use std::os::fd::AsRawFd;
    const BPF_PROG_QUERY: libc::c_long = 16;
    // BPF_CGROUP_INET_{INGRESS,EGRESS}, SOCK_CREATE, SOCK_OPS, INET{4,6}_{BIND,CONNECT,POST_BIND},
    // UDP{4,6}_SENDMSG, UDP{4,6}_RECVMSG, {GET,SET}SOCKOPT, INET{4,6}_GET{PEER,SOCK}NAME,
    // INET_SOCK_RELEASE.
    const TYPES: [u32; 22] = [
        0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 19, 20, 21, 22, 29, 30, 31, 32, 34, 6,
    ];
    let dir = fs::File::open(cgroup)?;
    let fd = u32::try_from(dir.as_raw_fd())?;
    let mut total = 0;
    for attach_type in TYPES {
        // The `query` member of `union bpf_attr`: target_fd, attach_type, query_flags,
        // attach_flags (u32 each), prog_ids (u64, null: count only), prog_cnt (u32).
        let mut attr = [0u8; 40];
        attr[0..4].copy_from_slice(&fd.to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        // SAFETY: `attr` is a valid, zero-filled `bpf_attr` prefix of the size passed; the kernel
        // writes only within it (prog_ids is null).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                attr.as_mut_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if rc == 0 {
            let mut cnt = [0u8; 4];
            cnt.copy_from_slice(&attr[24..28]);
            total += u32::from_ne_bytes(cnt);
        }
    }
    Ok(total)
}

#[test]
fn killed_agent_serves_again_within_2s_of_readiness_and_teardown_leaves_nothing() -> Result<()> {
    use std::io::{Read, Write};
    let mut c = up()?;
    let _echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let server = addr(&c.server_b.ip, ECHO_PORT)?;
    for node in [&c.node_a, &c.node_b] {
        ensure!(
            attached_programs(node.cgroup.path())? > 0,
            "no program attached to {} while the agent runs (the query sees nothing)",
            node.cgroup.path().display()
        );
    }

    // Traffic on a live connection while the agent is killed.
    let ns = c.client.ns.path();
    let mut live = with_process_in_cgroup(c.client.cgroup.path(), || {
        Ok(mesh_agent::netns::in_netns(&ns, move || {
            std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5))
        })?)
    })?;
    live.set_read_timeout(Some(Duration::from_secs(5)))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (flag, count) = (stop.clone(), rounds.clone());
    let pump = std::thread::spawn(move || {
        let mut buf = [7u8; 4096];
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if live.write_all(&buf).is_err() || live.read_exact(&mut buf).is_err() {
                break;
            }
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // Wait until data flows on it, then kill the agent under it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rounds.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        ensure!(
            Instant::now() < deadline,
            "no traffic on the live connection:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c.agents[0].kill()?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    pump.join().map_err(|_| anyhow::anyhow!("pump panicked"))?;

    // Restart with the same instance: ready, then serving within 2 s; the pod is untouched.
    let ready_at = c.restart_agent(0)?;
    // The killed agent's ready file was still there: the new one must not have been announced
    // by it (readiness would then start the 2 s clock before the agent serves).
    ensure!(
        c.agents[0]
            .logs()
            .contains("removed the ready file of a previous run"),
        "the restarted agent did not clear its predecessor's ready file:\n{}",
        c.agents[0].logs()
    );
    loop {
        match c.roundtrip(server, "after restart") {
            Ok(()) => break,
            Err(e) => ensure!(
                ready_at.elapsed() < Duration::from_secs(2),
                "no traffic within 2 s of the restarted agent's readiness: {e:#}\n{}",
                c.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        c.agents[0].logs().contains("adopted"),
        "the restarted agent must adopt the pinned programs:\n{}",
        c.agents[0].logs()
    );

    // Teardown: stop and uninstall both agents, then nothing pinned, nothing attached.
    let instances: Vec<String> = c.agents.iter().map(|a| a.instance().to_owned()).collect();
    drop(std::mem::take(&mut c.agents));
    for instance in &instances {
        let pins =
            mesh_agent::datapath::Pins::new(mesh_agent::datapath::Pins::DEFAULT_BPFFS, instance)?;
        assert!(
            !pins.instance_dir().exists(),
            "{} left after uninstall",
            pins.instance_dir().display()
        );
    }
    // The kernel frees a link whose last reference was its pin from deferred work: poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in [&c.node_a, &c.node_b] {
        loop {
            let n = attached_programs(node.cgroup.path())?;
            if n == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{n} programs still attached to {} after uninstall",
                node.cgroup.path().display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Denies the client on server-a only (by its `instance` label).
const DENY_SERVER_A: &str = r#"---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: not-server-a, namespace: demo}
spec:
  selector: {matchLabels: {instance: server-a}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
"#;

#[test]
fn same_node_connections_are_authorized_by_the_tunnel() -> Result<()> {
    let c = Cluster::up(NET, &[], |client, a, b| {
        format!("{}{DENY_SERVER_A}", config(client, a, b))
    })?;
    let echo_a = Echo::start(&c.server_a, ECHO_PORT)?;
    let _echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let to_a = addr(&c.server_a.ip, ECHO_PORT)?;
    let deny = ["action=\"deny\""];
    let decisions = "nodemesh_policy_decisions_total";
    let before = nodemesh_tests::metric_sum(&scrape(&c.node_a, NODE_A)?, decisions, &deny);

    // Cross node to server-b (same identity, not selected): allowed.
    c.roundtrip(addr(&c.server_b.ip, ECHO_PORT)?, "to server-b")
        .with_context(|| format!("server-b must be reachable:\n{}", c.logs()))?;
    // Same node to server-a: the kernel lets the connect through (no early-deny entry can say
    // "server-a but not server-b"), node a's tunnel refuses it.
    let denied = c.roundtrip(to_a, "to server-a");
    let err = match denied {
        Ok(()) => anyhow::bail!(
            "a same-node connection the policy denies was echoed:\n{}",
            c.logs()
        ),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        !err.contains("Connection refused"),
        "refused by the kernel, not by the tunnel (the test needs the tunnel's check): {err}"
    );
    ensure!(
        echo_a.accepted() == 0,
        "server-a must not see the denied connection"
    );
    let line = c.agents[0].wait_log("the same-node deny", |l| {
        l.contains("direction=\"outbound\"")
            && l.contains(&format!("endpoint={to_a} "))
            && l.contains("denied")
    })?;
    ensure!(
        line.contains("not-server-a"),
        "the access line names the policy: {line}"
    );
    let after = nodemesh_tests::metric_sum(&scrape(&c.node_a, NODE_A)?, decisions, &deny);
    ensure!(
        after == before + 1,
        "node a counts exactly one policy deny ({before} -> {after})"
    );
    Ok(())
}

/// Node a's ephemeral ports during [`deliveries_share_ports_across_destinations`].
const PORTS: (u16, u16) = (61000, 61063);

#[test]
fn deliveries_share_ports_across_destinations() -> Result<()> {
    let c = up()?;
    let range = format!("net.ipv4.ip_local_port_range={} {}", PORTS.0, PORTS.1);
    c.node_a.ns.exec(&["sysctl", "-q", "-w", &range])?;
    let ports = usize::from(PORTS.1 - PORTS.0) + 1;
    let second = ECHO_PORT + 1;
    let _echo = Echo::start(&c.server_a, ECHO_PORT)?;
    let _echo2 = Echo::start(&c.server_a, second)?;
    let per_destination = ports * 3 / 4;
    for i in 0..per_destination {
        for port in [ECHO_PORT, second] {
            // The probe half-closes first: node a passes the FIN on, so its socket to the pod
            // closes first and waits in TIME_WAIT with its port.
            c.roundtrip(
                addr(&c.server_a.ip, port)?,
                &format!("delivery {i} to {port}"),
            )
            .with_context(|| {
                format!(
                    "same-node connection {i} to port {port} failed ({ports} ephemeral \
                         ports on node a):\n{}",
                    c.logs()
                )
            })?;
        }
    }
    let waiting = c
        .node_a
        .ns
        .exec(&["ss", "-Htn", "state", "time-wait", "src", TUNNEL_A])?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    ensure!(
        waiting > ports,
        "the test needs node a to close first: {waiting} of its sockets in TIME_WAIT, not more \
         than its {ports} ports"
    );
    Ok(())
}
