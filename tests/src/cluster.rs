//! A two-node cluster of real agents for end-to-end tests (`tests/e2e.rs`, `tests/local_mode.rs`):
//! each node is a network namespace and a child cgroup running `mesh-agent local` (as `nm-agent`,
//! started inside them by `nm-probe exec`); pods are namespaces in child cgroups of their node's
//! cgroup (a client and a server on node a, a server on node b); one generated cluster file.
//!
//! Every object is private to the test (unique names, own namespaces), so tests with different
//! [`Net`]s or the same one never collide. Guards clean up in `Drop`, also on failure: agents are
//! stopped (SIGTERM, then SIGKILL) and uninstalled, then pods, then nodes.

use std::{
    collections::VecDeque,
    fs,
    io::Read,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    ChildCgroup, NetNs, agent_exe, probe_exe, require_root, run, unique_prefix,
    with_process_in_cgroup,
};

/// How long an agent may take from start to ready (loading eBPF, CA, certificates).
pub const READY_WITHIN: Duration = Duration::from_secs(20);
/// The agents' stats server port (`/metrics`, `/readyz`) on the node address.
pub const STATS_PORT: u16 = 15020;

pub fn addr(ip: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(ip.parse()?, port))
}

/// A pod: its namespace, cgroup and address.
pub struct Pod {
    pub cgroup: ChildCgroup,
    pub ns: NetNs,
    pub ip: String,
}

/// A node: its namespace and cgroup (where its agent attaches).
pub struct Node {
    pub name: String,
    pub cgroup: ChildCgroup,
    pub ns: NetNs,
}

/// A node named `name` (its namespace forwards between its pods and the node link).
pub fn node(prefix: &str, name: &str) -> Result<Node> {
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
pub fn pod(prefix: &str, node: &Node, name: &str, net: u8, i: u8) -> Result<Pod> {
    let ns = NetNs::new(&format!("{prefix}-{name}"))?;
    let gw = format!("10.{net}.{i}.1");
    let ip = format!("10.{net}.{i}.2");
    crate::veth(
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

/// An echo server inside a pod (`nm-probe echo`: streams, one thread per connection); reports
/// each accepted peer. Dropping it stops the server, so its port refuses.
///
/// The server prints `peer=…` (flushed) before it echoes a byte, so once a round trip through
/// it has completed its line is in the pipe: reading the pipe in the caller's thread (not
/// through a reader thread, which may lag) makes [`Echo::accepted`] exact.
pub struct Echo {
    child: Child,
    out: Mutex<EchoOutput>,
}

struct EchoOutput {
    stdout: std::process::ChildStdout,
    partial: Vec<u8>,
    lines: VecDeque<String>,
}

impl EchoOutput {
    /// Takes in what the server has written so far, without blocking.
    fn pull(&mut self) -> Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            match self.stdout.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    self.partial.extend_from_slice(&buf[..n]);
                    while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = self.partial.drain(..=i).collect();
                        self.lines
                            .push_back(String::from_utf8_lossy(&line[..i]).into_owned());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the echo server's output"),
            }
        }
    }
}

impl Echo {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
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
        // SAFETY: fcntl on a descriptor this process owns (the pipe's read end); only the
        // O_NONBLOCK flag is added to the flags the kernel returned.
        let nonblocking = unsafe {
            let fd = stdout.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        ensure!(
            nonblocking,
            "cannot make the echo server's output non-blocking: {}",
            std::io::Error::last_os_error()
        );
        let echo = Self {
            child,
            out: Mutex::new(EchoOutput {
                stdout,
                partial: Vec::new(),
                lines: VecDeque::new(),
            }),
        };
        let first = echo.next_line()?;
        ensure!(first == "ready", "echo server failed: {first}");
        Ok(echo)
    }

    fn output(&self) -> std::sync::MutexGuard<'_, EchoOutput> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next line the server prints (polled, within 10 s).
    fn next_line(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let mut out = self.output();
                out.pull()?;
                if let Some(line) = out.lines.pop_front() {
                    return Ok(line);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "echo server said nothing within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The peer address of the next accepted connection.
    pub fn next_peer(&self) -> Result<SocketAddr> {
        let line = self.next_line()?;
        line.strip_prefix("peer=")
            .with_context(|| format!("unexpected echo output {line}"))?
            .parse()
            .context("bad peer address")
    }

    /// How many connections it has accepted since the last call (or `next_peer`); exact for
    /// every connection a completed round trip went through.
    pub fn accepted(&self) -> usize {
        let mut out = self.output();
        if let Err(e) = out.pull() {
            eprintln!("echo server output: {e:#}");
        }
        out.lines
            .drain(..)
            .filter(|l| l.starts_with("peer="))
            .count()
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

/// A `mesh-agent local` process inside a node's namespace and cgroup; stopped and uninstalled
/// on drop (see [`Agent::disown_pins`]).
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
    state: PathBuf,
    instance: String,
}

impl Agent {
    /// Starts the agent of `node` on the cluster file `config`, its state and log under `dir`
    /// and the shared CA in `dir/ca`, with `extra` arguments; returns once it is ready.
    pub fn start(
        node: &Node,
        config: &Path,
        dir: &Path,
        instance: &str,
        extra: &[String],
    ) -> Result<Self> {
        Self::start_watching(node, config, dir, instance, extra, || {})
    }

    /// [`Agent::start`], calling `each` again and again while it waits for readiness (to
    /// observe the agent during its startup).
    pub fn start_watching(
        node: &Node,
        config: &Path,
        dir: &Path,
        instance: &str,
        extra: &[String],
        each: impl FnMut(),
    ) -> Result<Self> {
        let mut args: Vec<std::ffi::OsString> = vec!["local".into(), "--config".into()];
        args.push(config.into());
        args.extend(["--node".into(), node.name.clone().into()]);
        args.extend(["--ca-dir".into(), dir.join("ca").into_os_string()]);
        args.extend(["--poll-ms".into(), "100".into()]);
        let path = same_node_path();
        if !extra.iter().any(|a| a == "--same-node-path") {
            args.extend(["--same-node-path".into(), path.into()]);
        }
        args.extend(extra.iter().map(Into::into));
        let agent = Self::spawn(node, dir, instance, &args, each)?;
        if !extra.iter().any(|a| a == "--same-node-path") {
            agent.check_same_node_path(path)?;
        }
        Ok(agent)
    }

    /// Fails unless the agent's log says it carries same-node connections on `path` (`auto`:
    /// spliced in the kernel, which this kernel supports, so a fallback is a failure; `copy`:
    /// copied in user space).
    pub fn check_same_node_path(&self, path: &str) -> Result<()> {
        let want = match path {
            "copy" => "copied in user space (--same-node-path copy)",
            _ => "spliced in the kernel (self-test passed)",
        };
        ensure!(
            self.logs().contains(want),
            "the agent does not carry same-node connections as `--same-node-path {path}` \
             should (expected a log line containing {want:?}):\n{}",
            self.logs()
        );
        Ok(())
    }

    /// Starts `mesh-agent ARGS --state-dir DIR/<node> --cgroup <node cgroup> --instance
    /// INSTANCE` inside `node` (any mode: `local`, `node`), its log in `DIR/<node>.log`; returns
    /// once it is ready, calling `each` while it waits.
    pub fn spawn(
        node: &Node,
        dir: &Path,
        instance: &str,
        args: &[std::ffi::OsString],
        each: impl FnMut(),
    ) -> Result<Self> {
        let state = dir.join(&node.name);
        let log = dir.join(format!("{}.log", node.name));
        let child = Command::new(probe_exe()?)
            .arg(node.cgroup.path())
            .arg(node.ns.path())
            .arg("exec")
            .arg(agent_exe()?)
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .arg("--cgroup")
            .arg(node.cgroup.path())
            .args(["--instance", instance])
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
        agent.wait_ready(each)?;
        Ok(agent)
    }

    /// Waits for the ready file of this very process (`pid=` in it: a killed predecessor's
    /// file may still be there).
    fn wait_ready(&mut self, mut each: impl FnMut()) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        let mine = format!("pid={}", self.child.id());
        while !fs::read_to_string(self.state.join("ready"))
            .is_ok_and(|text| text.lines().any(|l| l == mine))
        {
            each();
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

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it has stopped growing (no new byte for 30 ms, at most 0.5 s), for failure
    /// messages: the agent writes access lines in batches when its shard goes idle, so the
    /// line of the connection that just failed may land a moment after the failure.
    pub fn settled_logs(&self) -> String {
        let len = || fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut seen = len();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(30));
            let now = len();
            if now == seen {
                break;
            }
            seen = now;
        }
        self.logs()
    }

    /// Waits until the log has a line for which `f` holds.
    pub fn wait_log(&self, what: &str, f: impl Fn(&str) -> bool) -> Result<String> {
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

    /// SIGKILL, as a crash: the pins stay.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Asks the agent to drain and exit (SIGTERM), without waiting.
    pub fn sigterm(&self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: `kill` takes plain integers; the pid is our unreaped child, so it cannot
            // have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits for the agent's exit; SIGKILL and an error after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the agent did not exit within {within:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Another `Agent` (a restart with the same instance) owns the pins now: this one's drop
    /// must not uninstall them.
    pub fn disown_pins(&mut self) {
        self.instance.clear();
    }

    /// SIGTERM, then SIGKILL if it does not exit in time; removes its pins unless disowned.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.sigterm();
            let _ = self.wait_exit(Duration::from_secs(15));
        }
        if !self.instance.is_empty()
            && let Ok(exe) = agent_exe()
            && let Err(e) = run(
                &exe.to_string_lossy(),
                &["uninstall", "--instance", &self.instance],
            )
        {
            eprintln!("cleanup: {e:#}");
        }
        self.instance.clear();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One test's addresses: node link `node_a` ↔ `node_b` (/24); pods on node a `10.<pods_a>.<i>.2`,
/// on node b `10.<pods_b>.<i>.2`; the nodes' tunnel addresses.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub node_a: &'static str,
    pub node_b: &'static str,
    pub tunnel_a: &'static str,
    pub tunnel_b: &'static str,
    pub pods_a: u8,
    pub pods_b: u8,
}

impl Net {
    /// The head of a cluster file on this net: node `a` is this node, both nodes listed, and an
    /// open `workloads:` list for [`workload`] lines.
    pub fn cluster_head(&self) -> String {
        format!(
            "apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\nthisNode: a\nnodes:\n\
             - {{name: a, address: {}, tunnelAddress: {}}}\n\
             - {{name: b, address: {}, tunnelAddress: {}}}\nworkloads:\n",
            self.node_a, self.tunnel_a, self.node_b, self.tunnel_b
        )
    }
}

/// One `workloads:` line: `pod` as `name` in namespace `demo` with service account `sa`,
/// `labels` (YAML flow-mapping entries, may be empty) on `node`.
pub fn workload(pod: &Pod, name: &str, sa: &str, labels: &str, node: &str) -> String {
    format!(
        "- {{name: {name}, namespace: demo, serviceAccount: {sa}, labels: {{{labels}}}, ips: [{}], netns: {}, node: {node}}}\n",
        pod.ip,
        pod.ns.path().display()
    )
}

/// The policies most cluster files share: STRICT mTLS in `demo`, and a DENY of the client's
/// identity to `app: server` pods on `ports` (YAML strings, e.g. `"9090"`).
pub fn strict_and_deny_client(ports: &str) -> String {
    format!(
        r#"---
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
"#
    )
}

/// The cluster: a client and a server on node a, a server on node b, an agent on each node.
/// Field order is drop order: agents, then pods, then nodes.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub client: Pod,
    pub server_a: Pod,
    pub server_b: Pod,
    pub node_a: Node,
    pub node_b: Node,
    pub dir: tempfile::TempDir,
    pub net: Net,
    agent_args: Vec<String>,
}

impl Cluster {
    /// Builds the nodes and pods of `net`, writes `config(client, server_a, server_b)` as the
    /// cluster file and starts both agents (with `agent_args` added), a before b.
    pub fn up(
        net: Net,
        agent_args: &[&str],
        config: impl FnOnce(&Pod, &Pod, &Pod) -> String,
    ) -> Result<Self> {
        require_root();
        let p = unique_prefix();
        let node_a = node(&p, "a")?;
        let node_b = node(&p, "b")?;
        crate::veth(
            &node_a.ns,
            "wire0",
            &format!("{}/24", net.node_a),
            &node_b.ns,
            "wire0",
            &format!("{}/24", net.node_b),
        )?;
        let (to_b, to_a) = (
            format!("10.{}.0.0/16", net.pods_b),
            format!("10.{}.0.0/16", net.pods_a),
        );
        node_a
            .ns
            .exec(&["ip", "route", "add", &to_b, "via", net.node_b])?;
        node_b
            .ns
            .exec(&["ip", "route", "add", &to_a, "via", net.node_a])?;
        let client = pod(&p, &node_a, "client", net.pods_a, 1)?;
        let server_a = pod(&p, &node_a, "srva", net.pods_a, 2)?;
        let server_b = pod(&p, &node_b, "srvb", net.pods_b, 1)?;
        let dir = tempfile::tempdir()?;
        fs::write(
            dir.path().join("cluster.yaml"),
            config(&client, &server_a, &server_b),
        )?;
        let mut cluster = Self {
            agents: Vec::new(),
            client,
            server_a,
            server_b,
            node_a,
            node_b,
            dir,
            net,
            agent_args: agent_args.iter().map(|&a| a.to_owned()).collect(),
        };
        // One after the other: the first creates the shared CA.
        for i in 0..2 {
            let agent = cluster.start_agent(i, &format!("{p}-{}", ["a", "b"][i]))?;
            cluster.agents.push(agent);
        }
        Ok(cluster)
    }

    fn start_agent(&self, i: usize, instance: &str) -> Result<Agent> {
        let node = [&self.node_a, &self.node_b][i];
        Agent::start(
            node,
            &self.config_path(),
            self.dir.path(),
            instance,
            &self.agent_args,
        )
    }

    /// Starts node `i`'s agent again with the same instance (so it adopts the pins) in place of
    /// the old one, which must have exited (see [`Agent::kill`]). Returns when the new agent
    /// became ready.
    pub fn restart_agent(&mut self, i: usize) -> Result<Instant> {
        let instance = self.agents[i].instance().to_owned();
        let restarted = self.start_agent(i, &instance)?;
        let ready_at = Instant::now();
        let mut old = std::mem::replace(&mut self.agents[i], restarted);
        old.disown_pins();
        drop(old);
        Ok(ready_at)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("cluster.yaml")
    }

    /// Replaces the cluster file by rename, as editors do.
    pub fn write_config(&self, contents: &str) -> Result<()> {
        let tmp = self.dir.path().join("cluster.yaml.new");
        fs::write(&tmp, contents)?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// A byte-exact round trip from the client pod; the error carries the probe's reason.
    pub fn roundtrip(&self, dst: SocketAddr, payload: &str) -> Result<()> {
        roundtrip_from(&self.client, dst, payload)
    }

    /// A connection from the client pod that the test holds (see [`hold_from`]).
    pub fn hold(&self, dst: SocketAddr) -> Result<TcpStream> {
        hold_from(&self.client, dst)
    }

    /// Every agent's log, for failure messages ([`Agent::settled_logs`]).
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.log.display(), a.settled_logs()))
            .collect()
    }
}

/// The same-node path the local-mode agents of the tests run with: `auto` (spliced in the kernel,
/// not yet the agent's default, so the tests keep it exercised) unless
/// `NODEMESH_TEST_SAME_NODE_PATH=copy`, so every same-node test runs on either path.
pub fn same_node_path() -> &'static str {
    match std::env::var("NODEMESH_TEST_SAME_NODE_PATH").as_deref() {
        Ok("copy") => "copy",
        _ => "auto",
    }
}

/// The same-node path of the lab and the bench: the agent's default (`copy`) unless
/// `NODEMESH_TEST_SAME_NODE_PATH=auto` (the bench's before/after of the splice).
pub fn lab_same_node_path() -> &'static str {
    match std::env::var("NODEMESH_TEST_SAME_NODE_PATH").as_deref() {
        Ok("auto") => "auto",
        _ => "copy",
    }
}

/// A byte-exact round trip from `pod` to `dst`; the error carries the probe's reason.
pub fn roundtrip_from(pod: &Pod, dst: SocketAddr, payload: &str) -> Result<()> {
    let out = Command::new(probe_exe()?)
        .arg(pod.cgroup.path())
        .arg(pod.ns.path())
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

/// A connection from `pod` (its cgroup and namespace) that the test holds; reads time out
/// after 10 s.
pub fn hold_from(pod: &Pod, dst: SocketAddr) -> Result<TcpStream> {
    let ns = pod.ns.path();
    let stream = with_process_in_cgroup(pod.cgroup.path(), || {
        Ok(mesh_agent::netns::in_netns(&ns, move || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        })?)
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// One `/metrics` scrape of a node's agent at `ip`, from inside the node's namespace.
pub fn scrape(node: &Node, ip: &str) -> Result<String> {
    let (status, body) =
        crate::http_in_netns(&node.ns.path(), addr(ip, STATS_PORT)?, "GET", "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}: {body}");
    Ok(body)
}

/// Scrapes until `done` holds (connection metrics are recorded when the tunnel sees the close).
pub fn scrape_until(
    node: &Node,
    ip: &str,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
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
pub fn delta(before: &str, after: &str, name: &str, labels: &[&str]) -> u64 {
    crate::metric_sum(after, name, labels).saturating_sub(crate::metric_sum(before, name, labels))
}
