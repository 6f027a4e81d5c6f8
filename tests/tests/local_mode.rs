//! End to end: two `mesh-agent local` processes (as `nm-agent`, the same code), each in its own
//! "node" (network namespace + cgroup), fed one generated cluster file. Pods are namespaces in
//! child cgroups of their node's cgroup, where the agent attaches. Checks cross-node traffic
//! through the mesh (byte-exact, delivered from the destination node's tunnel address, access
//! log naming both identities), same-node traffic, a DENY policy refused in the kernel, and a
//! policy file edit closing live cross-node and same-node connections it now denies.
//!
//! Addresses (every namespace is private to the test, so they never collide between tests):
//! node link 10.100.0.1 (node-a) ↔ 10.100.0.2 (node-b); pods on node-a 10.1.<i>.2 behind
//! 10.1.<i>.1, on node-b 10.2.<i>.2 behind 10.2.<i>.1; tunnel addresses 169.254.100.1 / .2.

use std::{
    io::{Read, Write},
    net::TcpStream,
    ops::{Deref, DerefMut},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::cluster::{
    Cluster, Echo, Net, Pod, STATS_PORT, addr, delta, scrape, scrape_until, strict_and_deny_client,
    workload,
};

const ECHO_PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;
const NODE_A: &str = "10.100.0.1";
const NODE_B: &str = "10.100.0.2";
const TUNNEL_A: &str = "169.254.100.1";
const TUNNEL_B: &str = "169.254.100.2";
const NET: Net = Net {
    node_a: NODE_A,
    node_b: NODE_B,
    tunnel_a: TUNNEL_A,
    tunnel_b: TUNNEL_B,
    pods_a: 1,
    pods_b: 2,
};
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// The cluster with an echo server in each server pod. Field order is drop order: the echo
/// servers leave their pods before the pods' cgroups are removed.
struct Mesh {
    echo_b: Echo,
    echo_a: Echo,
    cluster: Cluster,
}

impl Deref for Mesh {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl DerefMut for Mesh {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

fn config(client: &Pod, server_a: &Pod, server_b: &Pod, denied_ports: &[u16]) -> String {
    let ports = denied_ports
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"{head}{client}{local_server}{server}{policies}---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin-port-local, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: local}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{ports: [{ports}]}}}}]
"#,
        head = NET.cluster_head(),
        client = workload(client, "client", "client", "", "a"),
        local_server = workload(server_a, "local-server", "local-server", "app: local", "a"),
        server = workload(server_b, "server", "server", "app: server", "b"),
        policies = strict_and_deny_client(&ports),
    )
}

/// One 4-byte echo on a held connection.
fn ping(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf)?;
    ensure!(&buf == b"ping", "echoed {buf:?}");
    Ok(())
}

impl Mesh {
    fn up() -> Result<Self> {
        let cluster = Cluster::up(NET, &[], |client, server_a, server_b| {
            config(client, server_a, server_b, &[DENIED_PORT])
        })?;
        Ok(Self {
            echo_b: Echo::start(&cluster.server_b, ECHO_PORT)?,
            echo_a: Echo::start(&cluster.server_a, ECHO_PORT)?,
            cluster,
        })
    }

    /// Rewrites the cluster file with DENY on `ports`.
    fn set_denied_ports(&self, ports: &[u16]) -> Result<()> {
        self.write_config(&config(&self.client, &self.server_a, &self.server_b, ports))
    }
}

/// Every frame seen on one interface of a namespace while it runs (an `AF_PACKET` socket: no
/// tcpdump needed).
struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u8>>,
}

impl Capture {
    fn start(netns: &Path, ifname: &str) -> Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let name = std::ffi::CString::new(ifname)?;
        let fd = mesh_agent::netns::in_netns(netns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain syscall with integer arguments; the result is checked.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `name` is a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index == 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: `sll` is a valid sockaddr_ll and its size is passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 20_000,
            };
            // SAFETY: `tv` is a valid timeval and its size is passed.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(fd)
        })?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: `buf` is valid for `buf.len()` bytes.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if let Ok(n) = usize::try_from(n) {
                    all.extend_from_slice(&buf[..n]);
                }
            }
            all
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) -> Vec<u8> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cross_node_same_node_and_deny_through_two_local_agents() -> Result<()> {
    let c = Mesh::up()?;
    let dir_hint = c.dir.path().display().to_string();

    // Cross-node: byte-exact echo, delivered from node b's tunnel address; the node link
    // carries TLS 1.3 records (application data: 0x17 0x03 0x03), never the payload.
    let payload = "hello across the mesh \u{1F310} 0123456789";
    let capture = Capture::start(&c.node_b.ns.path(), "wire0")?;
    c.roundtrip(addr(&c.server_b.ip, ECHO_PORT)?, payload)
        .with_context(|| format!("cross-node round trip ({dir_hint}):\n{}", c.logs()))?;
    let wire = capture.finish();
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS record seen on the node link ({} bytes captured)",
        wire.len()
    );
    assert!(
        !contains(&wire, payload.as_bytes()),
        "the payload crossed the node link in plaintext"
    );
    let peer = c.echo_b.next_peer()?;
    assert_eq!(
        peer.ip().to_string(),
        TUNNEL_B,
        "the server pod must see the connection from node b's tunnel address"
    );
    // Node b's inbound access log names both identities.
    c.agents[1].wait_log("inbound access-log line naming both identities", |l| {
        l.contains("inbound") && l.contains(CLIENT_ID) && l.contains(SERVER_ID)
    })?;

    // Same node: through node a's tunnel, delivered from its tunnel address.
    c.roundtrip(addr(&c.server_a.ip, ECHO_PORT)?, "same node")
        .with_context(|| format!("same-node round trip:\n{}", c.logs()))?;
    assert_eq!(c.echo_a.next_peer()?.ip().to_string(), TUNNEL_A);

    // STRICT: plaintext from outside the mesh (node b's own namespace, not enrolled) never
    // reaches the enrolled server's port.
    let server = addr(&c.server_b.ip, ECHO_PORT)?;
    let plaintext = mesh_agent::netns::in_netns(&c.node_b.ns.path(), move || {
        Ok(TcpStream::connect_timeout(&server, Duration::from_secs(1)))
    })?;
    assert!(
        plaintext.is_err(),
        "a plaintext connection from a non-enrolled namespace reached a STRICT pod"
    );

    // DENY: refused by the kernel at connect time.
    let err = match c.roundtrip(addr(&c.server_b.ip, DENIED_PORT)?, "x") {
        Ok(()) => bail!("a denied connection went through"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("Connection refused"),
        "denied connect must fail with ECONNREFUSED, got: {err}"
    );
    Ok(())
}

#[test]
fn policy_reload_closes_denied_connections_and_a_killed_agent_recovers() -> Result<()> {
    let mut c = Mesh::up()?;
    let server = addr(&c.server_b.ip, ECHO_PORT)?;

    // A live cross-node connection, and a live same-node one.
    let mut held = c
        .hold(server)
        .with_context(|| format!("connect:\n{}", c.logs()))?;
    ping(&mut held)?;
    c.echo_b.next_peer()?;
    let local = addr(&c.server_a.ip, ECHO_PORT)?;
    let mut held_local = c
        .hold(local)
        .with_context(|| format!("connect same node:\n{}", c.logs()))?;
    ping(&mut held_local)?;
    c.echo_a.next_peer()?;

    // Deny the port they use: node b re-authorizes and closes the cross-node one, node a's
    // outbound the same-node one; new connects are refused.
    c.set_denied_ports(&[DENIED_PORT, ECHO_PORT])?;
    for (stream, which, agent) in [
        (&mut held, "cross-node", 1),
        (&mut held_local, "same-node", 0),
    ] {
        let mut rest = Vec::new();
        let closed = stream.read_to_end(&mut rest);
        // A read timeout is an error too, but it means the connection is still open.
        assert!(
            matches!(&closed, Ok(0))
                || closed.as_ref().is_err_and(|e| !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )),
            "the now-denied {which} connection must be closed, got {closed:?}\n{}",
            c.logs()
        );
        c.agents[agent].wait_log(
            &format!("re-authorization closing the {which} connection"),
            |l| l.contains("policy now denies it"),
        )?;
    }
    for dst in [server, local] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.roundtrip(dst, "x") {
                Err(e) if e.to_string().contains("Connection refused") => break,
                other => ensure!(
                    Instant::now() < deadline,
                    "connects to the denied port of {dst} still go through after the reload: {other:?}\n{}",
                    c.logs()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    c.set_denied_ports(&[DENIED_PORT])?;

    // SIGKILL node a's agent; a restart adopts the pins and serves again.
    c.agents[0].kill()?;
    let ready_at = c.restart_agent(0)?;
    let deadline = ready_at + Duration::from_secs(5);
    loop {
        match c.roundtrip(server, "after restart") {
            Ok(()) => break,
            Err(e) => ensure!(
                Instant::now() < deadline,
                "no traffic after the restart: {e:#}\n{}",
                c.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.agents[0].logs().contains("adopted"),
        "the restarted agent must adopt the pinned programs:\n{}",
        c.agents[0].logs()
    );

    // A broken file is reported and the last good state keeps serving.
    c.write_config("apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\nnodes: [\n")?;
    c.agents[0].wait_log("an error for the broken file", |l| {
        l.contains("ERROR") && l.contains("local config rejected")
    })?;
    c.roundtrip(server, "still serving")
        .with_context(|| format!("after a broken file:\n{}", c.logs()))?;
    Ok(())
}

const ADMIN_PORT: u16 = 15000;

#[test]
fn metrics_readiness_config_dump_and_quit_of_local_agents() -> Result<()> {
    let mut c = Mesh::up()?;
    for (node, ip) in [(&c.node_a, NODE_A), (&c.node_b, NODE_B)] {
        let (status, body) = nodemesh_tests::http_in_netns(
            &node.ns.path(),
            addr(ip, STATS_PORT)?,
            "GET",
            "/readyz",
        )?;
        assert_eq!(
            status, 200,
            "/readyz on {ip} once the agent is ready: {body}"
        );
    }

    // One cross-node transfer: counted once by node a (reporter=source) and once by node b
    // (reporter=destination), bytes exactly the payload each way.
    let (a0, b0) = (scrape(&c.node_a, NODE_A)?, scrape(&c.node_b, NODE_B)?);
    let payload = "metrics across the mesh 0123456789";
    let n = payload.len() as u64;
    c.roundtrip(addr(&c.server_b.ip, ECHO_PORT)?, payload)
        .with_context(|| format!("cross-node round trip:\n{}", c.logs()))?;
    let closed = "istio_tcp_connections_closed_total";
    for (node, ip, before, reporter) in [
        (&c.node_a, NODE_A, &a0, "reporter=\"source\""),
        (&c.node_b, NODE_B, &b0, "reporter=\"destination\""),
    ] {
        let after = scrape_until(node, ip, "the closed connection", |m| {
            delta(before, m, closed, &[reporter]) >= 1
        })?;
        for (metric, want) in [
            ("istio_tcp_connections_opened_total", 1),
            (closed, 1),
            ("istio_tcp_sent_bytes_total", n),
            ("istio_tcp_received_bytes_total", n),
        ] {
            assert_eq!(
                delta(before, &after, metric, &[reporter]),
                want,
                "{metric}{{{reporter}}} on {ip}:\n{after}"
            );
        }
    }
    let b1 = scrape(&c.node_b, NODE_B)?;
    assert_eq!(
        delta(
            &b0,
            &b1,
            "nodemesh_policy_decisions_total",
            &["action=\"allow\""]
        ),
        1,
        "node b authorizes the inbound connection once:\n{b1}"
    );

    // A kernel deny on node a (the source side).
    let a1 = scrape(&c.node_a, NODE_A)?;
    ensure!(
        c.roundtrip(addr(&c.server_b.ip, DENIED_PORT)?, "x")
            .is_err(),
        "a denied connection went through"
    );
    let event = "nodemesh_datapath_events_total";
    let denied = ["event=\"denied_policy\""];
    let a2 = scrape_until(&c.node_a, NODE_A, "the kernel deny", |m| {
        delta(&a1, m, event, &denied) >= 1
    })?;
    assert_eq!(delta(&a1, &a2, event, &denied), 1, "{a2}");

    // Outside the mesh: node a's own address is neither a workload nor a service VIP (it stands
    // for the kube API or a database outside the cluster): the client pod reaches it directly,
    // with its own address, counted in the kernel.
    let outside_port = 9443;
    let listener = mesh_agent::netns::in_netns(&c.node_a.ns.path(), move || {
        std::net::TcpListener::bind((NODE_A, outside_port))
    })?;
    let _held = c
        .hold(addr(NODE_A, outside_port)?)
        .with_context(|| format!("connect outside the mesh:\n{}", c.logs()))?;
    let conn = nodemesh_tests::accept_within(&listener, Duration::from_secs(5))?
        .context("the connection outside the mesh did not arrive")?;
    assert_eq!(
        conn.peer_addr()?.ip().to_string(),
        c.client.ip,
        "the destination sees the pod's own address, not a tunnel's"
    );
    let outside = ["event=\"passed_outside_mesh\""];
    let a3 = scrape_until(&c.node_a, NODE_A, "the pass outside the mesh", |m| {
        delta(&a2, m, event, &outside) >= 1
    })?;
    assert_eq!(delta(&a2, &a3, event, &outside), 1, "{a3}");
    assert_eq!(
        nodemesh_tests::metric_sum(&a2, "nodemesh_workloads_enrolled", &[]),
        2,
        "node a enrolls the client and local-server pods:\n{a2}"
    );
    assert!(
        a2.contains(&format!(
            "nodemesh_certificate_expiration_timestamp_seconds{{identity=\"{CLIENT_ID}\"}}"
        )),
        "the client's certificate expiry on node a:\n{a2}"
    );

    // The admin server, on the node namespace's loopback.
    let admin = addr("127.0.0.1", ADMIN_PORT)?;
    let (status, dump) =
        nodemesh_tests::http_in_netns(&c.node_a.ns.path(), admin, "GET", "/config_dump")?;
    assert_eq!(status, 200, "{dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).context("config dump JSON")?;
    assert_eq!(
        dump["maps"]["NM_MESH_DST"]["entries"], 4,
        "three workload addresses and the catch-all: {dump:#}"
    );
    let certs = dump["certificates"].as_array().context("certificates")?;
    assert!(
        certs
            .iter()
            .any(|c| c["identity"] == CLIENT_ID && c["not_after_unix_seconds"].is_i64()),
        "the client's certificate in node a's dump: {dump:#}"
    );
    let (status, body) = nodemesh_tests::http_in_netns(
        &c.node_a.ns.path(),
        admin,
        "POST",
        "/logging?level=info,mesh_agent=debug",
    )?;
    assert!(
        status == 200 && body.contains("mesh_agent=debug"),
        "/logging answered {status}: {body}"
    );

    // /quitquitquit drains and exits like SIGTERM.
    let (status, body) =
        nodemesh_tests::http_in_netns(&c.node_b.ns.path(), admin, "POST", "/quitquitquit")?;
    assert_eq!(status, 200, "{body}");
    let b = &mut c.agents[1];
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = b.child.try_wait()? {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "still running after /quitquitquit:\n{}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        exit.success(),
        "exit after /quitquitquit: {exit}\n{}",
        b.logs()
    );
    assert!(b.logs().contains("draining the tunnel"), "{}", b.logs());
    Ok(())
}
