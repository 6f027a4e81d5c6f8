//! End to end: two `mesh-agent local` processes (as `nm-agent`, the same code), each in its own
//! "node" (network namespace + cgroup), fed one generated cluster file. Pods are namespaces in
//! child cgroups of their node's cgroup, where the agent attaches. Checks cross-node traffic
//! through the mesh (byte-exact, delivered from the destination node's tunnel address, access
//! log naming both identities), same-node traffic, and a DENY policy refused in the kernel.
//!
//! Addresses (every namespace is private to the test, so they never collide between tests):
//! node link 10.100.0.1 (node-a) ↔ 10.100.0.2 (node-b); pods on node-a 10.1.<i>.2 behind
//! 10.1.<i>.1, on node-b 10.2.<i>.2 behind 10.2.<i>.1; tunnel addresses 169.254.100.1 / .2.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::{
    ChildCgroup, NetNs, agent_exe, probe_exe, require_root, run, unique_prefix,
    with_process_in_cgroup,
};

const ECHO_PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;
const NODE_A: &str = "10.100.0.1";
const NODE_B: &str = "10.100.0.2";
const TUNNEL_A: &str = "169.254.100.1";
const TUNNEL_B: &str = "169.254.100.2";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
/// How long an agent may take from start to ready (loading eBPF, CA, certificates).
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A pod: its namespace and cgroup.
struct Pod {
    cgroup: ChildCgroup,
    ns: NetNs,
    ip: String,
}

/// A running echo server inside a pod; reports each accepted peer.
struct Echo {
    child: Child,
    peers: mpsc::Receiver<String>,
}

impl Echo {
    fn start(pod: &Pod, port: u16) -> Result<Self> {
        let mut child = Command::new(probe_exe()?)
            .arg(pod.cgroup.path())
            .arg(pod.ns.path())
            .arg("echo")
            .arg(format!("{}:{port}", pod.ip))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the echo server")?;
        let stdout = child.stdout.take().context("echo stdout")?;
        let (tx, peers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let echo = Self { child, peers };
        let first = echo.next_line()?;
        ensure!(first == "ready", "echo server failed: {first}");
        Ok(echo)
    }

    fn next_line(&self) -> Result<String> {
        self.peers
            .recv_timeout(Duration::from_secs(10))
            .context("echo server said nothing within 10 s")
    }

    /// The peer address of the next accepted connection.
    fn next_peer(&self) -> Result<SocketAddr> {
        let line = self.next_line()?;
        line.strip_prefix("peer=")
            .with_context(|| format!("unexpected echo output {line}"))?
            .parse()
            .context("bad peer address")
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        // Closing stdin ends it; kill as a fallback.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `mesh-agent local` process inside a node's namespace and cgroup.
struct Agent {
    child: Child,
    log: PathBuf,
    state: PathBuf,
    instance: String,
}

impl Agent {
    fn start(node: &Node, config: &Path, dir: &Path, instance: &str) -> Result<Self> {
        let state = dir.join(&node.name);
        let log = dir.join(format!("{}.log", node.name));
        let child = Command::new(probe_exe()?)
            .arg(node.cgroup.path())
            .arg(node.ns.path())
            .arg("exec")
            .arg(agent_exe()?)
            .args(["local", "--config"])
            .arg(config)
            .args(["--node", &node.name, "--state-dir"])
            .arg(&state)
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .arg("--cgroup")
            .arg(node.cgroup.path())
            .args(["--instance", instance, "--poll-ms", "100"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("cannot start the agent")?;
        let mut agent = Self {
            child,
            log,
            state,
            instance: instance.to_owned(),
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        while !self.state.join("ready").exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!("agent exited ({status}) before ready:\n{}", self.logs());
            }
            ensure!(
                Instant::now() < deadline,
                "agent not ready within {READY_WITHIN:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line for which `f` holds.
    fn wait_log(&self, what: &str, f: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.logs().lines().find(|l| f(l)) {
                return Ok(l.to_owned());
            }
            ensure!(
                Instant::now() < deadline,
                "no {what} in the agent's log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL if it does not exit in time; removes its pins.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: `kill` takes plain integers; the pid is our unreaped child, so it
                // cannot have been reused by another process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(exe) = agent_exe()
            && let Err(e) = run(
                &exe.to_string_lossy(),
                &["uninstall", "--instance", &self.instance],
            )
        {
            eprintln!("cleanup: {e:#}");
        }
    }
}

struct Node {
    name: String,
    cgroup: ChildCgroup,
    ns: NetNs,
}

/// The whole cluster. Field order is drop order: pods (cgroups, then namespaces) before nodes.
struct Cluster {
    agents: Vec<Agent>,
    echo_b: Echo,
    echo_a: Echo,
    client: Pod,
    server_a: Pod,
    server_b: Pod,
    node_a: Node,
    node_b: Node,
    dir: tempfile::TempDir,
    prefix: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.stop();
        }
    }
}

fn node(prefix: &str, name: &str) -> Result<Node> {
    let ns = NetNs::new(&format!("{prefix}-{name}"))?;
    ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    let cgroup = ChildCgroup::new(&format!("{prefix}-{name}"))?;
    Ok(Node {
        name: name.to_owned(),
        cgroup,
        ns,
    })
}

/// A pod on `node` at `10.<net>.<i>.2`, its gateway `.1` on the node.
fn pod(prefix: &str, node: &Node, name: &str, net: u8, i: u8) -> Result<Pod> {
    let ns = NetNs::new(&format!("{prefix}-{name}"))?;
    let gw = format!("10.{net}.{i}.1");
    let ip = format!("10.{net}.{i}.2");
    nodemesh_tests::veth(
        &node.ns,
        &format!("v{name}"),
        &format!("{gw}/24"),
        &ns,
        "eth0",
        &format!("{ip}/24"),
    )?;
    ns.exec(&["ip", "route", "add", "default", "via", &gw])?;
    let cgroup = ChildCgroup::new(&format!(
        "{}/{name}",
        node.cgroup
            .path()
            .file_name()
            .context("node cgroup name")?
            .to_string_lossy()
    ))?;
    Ok(Pod { cgroup, ns, ip })
}

fn config(client: &Pod, server_a: &Pod, server_b: &Pod, denied_ports: &[u16]) -> String {
    let ports = denied_ports
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"apiVersion: local.nodemesh.io/v1alpha1
kind: LocalCluster
thisNode: a
nodes:
- {{name: a, address: {NODE_A}, tunnelAddress: {TUNNEL_A}}}
- {{name: b, address: {NODE_B}, tunnelAddress: {TUNNEL_B}}}
workloads:
- {{name: client, namespace: demo, serviceAccount: client, ips: [{}], netns: {}, node: a}}
- {{name: local-server, namespace: demo, serviceAccount: local-server, labels: {{app: local}}, ips: [{}], netns: {}, node: a}}
- {{name: server, namespace: demo, serviceAccount: server, labels: {{app: server}}, ips: [{}], netns: {}, node: b}}
---
apiVersion: security.nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {{name: default, namespace: demo}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin-port, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{ports: [{ports}]}}}}]
"#,
        client.ip,
        client.ns.path().display(),
        server_a.ip,
        server_a.ns.path().display(),
        server_b.ip,
        server_b.ns.path().display(),
    )
}

impl Cluster {
    fn up() -> Result<Self> {
        require_root();
        let p = unique_prefix();
        let node_a = node(&p, "a")?;
        let node_b = node(&p, "b")?;
        nodemesh_tests::veth(
            &node_a.ns,
            "wire0",
            &format!("{NODE_A}/24"),
            &node_b.ns,
            "wire0",
            &format!("{NODE_B}/24"),
        )?;
        node_a
            .ns
            .exec(&["ip", "route", "add", "10.2.0.0/16", "via", NODE_B])?;
        node_b
            .ns
            .exec(&["ip", "route", "add", "10.1.0.0/16", "via", NODE_A])?;
        let client = pod(&p, &node_a, "client", 1, 1)?;
        let server_a = pod(&p, &node_a, "srva", 1, 2)?;
        let server_b = pod(&p, &node_b, "srvb", 2, 1)?;
        let echo_a = Echo::start(&server_a, ECHO_PORT)?;
        let echo_b = Echo::start(&server_b, ECHO_PORT)?;
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("cluster.yaml");
        fs::write(&cfg, config(&client, &server_a, &server_b, &[DENIED_PORT]))?;
        let mut cluster = Self {
            agents: Vec::new(),
            echo_b,
            echo_a,
            client,
            server_a,
            server_b,
            node_a,
            node_b,
            dir,
            prefix: p.clone(),
        };
        // One after the other: the first creates the shared CA.
        let a = Agent::start(&cluster.node_a, &cfg, cluster.dir.path(), &format!("{p}-a"))?;
        cluster.agents.push(a);
        let b = Agent::start(&cluster.node_b, &cfg, cluster.dir.path(), &format!("{p}-b"))?;
        cluster.agents.push(b);
        Ok(cluster)
    }

    /// A round trip from the client pod; the error text carries the probe's reason.
    fn roundtrip(&self, dst: SocketAddr, payload: &str) -> Result<()> {
        let out = Command::new(probe_exe()?)
            .arg(self.client.cgroup.path())
            .arg(self.client.ns.path())
            .arg("roundtrip")
            .arg(dst.to_string())
            .arg(payload)
            .output()?;
        if !out.status.success() {
            bail!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("cluster.yaml")
    }

    /// Rewrites the cluster file with DENY on `ports` (replace by rename, as editors do).
    fn set_denied_ports(&self, ports: &[u16]) -> Result<()> {
        let tmp = self.dir.path().join("cluster.yaml.new");
        fs::write(
            &tmp,
            config(&self.client, &self.server_a, &self.server_b, ports),
        )?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// A connection from the client pod (its cgroup and namespace) that the test holds.
    fn hold(&self, dst: SocketAddr) -> Result<TcpStream> {
        let ns = self.client.ns.path();
        let stream = with_process_in_cgroup(self.client.cgroup.path(), || {
            Ok(mesh_agent::netns::in_netns(&ns, move || {
                TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            })?)
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.log.display(), a.logs()))
            .collect()
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

fn addr(ip: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(ip.parse()?, port))
}

#[test]
fn cross_node_same_node_and_deny_through_two_local_agents() -> Result<()> {
    let c = Cluster::up()?;
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
    let mut c = Cluster::up()?;
    let server = addr(&c.server_b.ip, ECHO_PORT)?;

    // A live cross-node connection.
    let mut held = c
        .hold(server)
        .with_context(|| format!("connect:\n{}", c.logs()))?;
    held.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    c.echo_b.next_peer()?;

    // Deny the port it uses: node b re-authorizes and closes it; new connects are refused.
    c.set_denied_ports(&[DENIED_PORT, ECHO_PORT])?;
    let mut rest = Vec::new();
    let closed = held.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "the now-denied connection must be closed, got {closed:?}"
    );
    c.agents[1].wait_log("re-authorization closing the connection", |l| {
        l.contains("policy now denies it")
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.roundtrip(server, "x") {
            Err(e) if e.to_string().contains("Connection refused") => break,
            other => ensure!(
                Instant::now() < deadline,
                "connects to the denied port still go through after the reload: {other:?}\n{}",
                c.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.set_denied_ports(&[DENIED_PORT])?;

    // SIGKILL node a's agent; a restart adopts the pins and serves again.
    c.agents[0].child.kill()?;
    c.agents[0].child.wait()?;
    let instance = format!("{}-a", c.prefix);
    let cfg = c.config_path();
    let restarted = Agent::start(&c.node_a, &cfg, c.dir.path(), &instance)?;
    let ready_at = Instant::now();
    // The killed agent's `Agent` still uninstalls the pins on drop; replace it.
    let old = std::mem::replace(&mut c.agents[0], restarted);
    drop(old);
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
    let tmp = c.dir.path().join("cluster.yaml.new");
    fs::write(
        &tmp,
        "apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\nnodes: [\n",
    )?;
    fs::rename(&tmp, c.config_path())?;
    c.agents[0].wait_log("an error for the broken file", |l| {
        l.contains("ERROR") && l.contains("local config rejected")
    })?;
    c.roundtrip(server, "still serving")
        .with_context(|| format!("after a broken file:\n{}", c.logs()))?;
    Ok(())
}

const STATS_PORT: u16 = 15020;
const ADMIN_PORT: u16 = 15000;

/// One `/metrics` scrape of a node's agent, from inside the node's namespace.
fn scrape(node: &Node, ip: &str) -> Result<String> {
    let (status, body) =
        nodemesh_tests::http_in_netns(&node.ns.path(), addr(ip, STATS_PORT)?, "GET", "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}: {body}");
    Ok(body)
}

/// Scrapes until `done` holds (connection metrics are recorded when the tunnel sees the close).
fn scrape_until(node: &Node, ip: &str, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(node, ip)?;
        if done(&m) {
            return Ok(m);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not seen within 10s on {ip}:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `after - before` of the summed samples of `name` with `labels`.
fn delta(before: &str, after: &str, name: &str, labels: &[&str]) -> u64 {
    nodemesh_tests::metric_sum(after, name, labels)
        .saturating_sub(nodemesh_tests::metric_sum(before, name, labels))
}

#[test]
fn metrics_readiness_config_dump_and_quit_of_local_agents() -> Result<()> {
    let mut c = Cluster::up()?;
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
