//! Fault injection (issue 11 item 3): two `mesh-agent local` nodes of `cluster::Cluster`, traffic
//! from the client pod on node a (this test process, moved into the pod's cgroup, its sockets
//! made in the pod's namespace) to a server in a pod of node b, and one fault per test. Each
//! asserts the outcome: nothing reaches a server except through the mesh (the servers record
//! every peer, and only the destination node's tunnel address may appear: a bypass would show
//! the client's own address, since these servers are under no plaintext guard), no agent
//! panics, agent memory stays bounded, and recovery happens within a stated bound.
//!
//! - `sigkill_under_load_twenty_times`: node a's agent SIGKILLed 20 times while three client
//!   threads make round trips; a new agent (same instance, adopting the pins) each time.
//! - `expired_certificate_with_the_ca_down`: 10 s certificates, then the CA refuses
//!   (`--ca-fault-file`); connections work until expiry, then are refused with the reason logged
//!   and counted; the CA back, connections work again.
//! - `enrolled_pods_map_full`: an enrolled-pods map of 2 (`--max-enrolled-pods`) and a third pod
//!   on node a: logged, counted, captured by nothing, its plaintext to STRICT pods dropped; once a
//!   place frees up it is enrolled and meshed.
//! - `peer_node_unreachable`: every IP packet on the node link dropped: connections to node b
//!   fail in bounded time, the pool stays small, same-node traffic and health are unaffected;
//!   the link back, node b is reached again.
//! - `loss_and_delay_on_the_node_link`: 5 % loss and up to 20 ms delay: byte-exact round trips
//!   of 4 MiB, slower but complete.
//! - `slow_readers_are_backpressured`: a server pushing to 16 clients that never read: the
//!   server is stopped by flow control and the agents' memory grows by a bounded amount.
//! - `ten_thousand_idle_connections`: 10,000 connections held through the tunnel: memory and
//!   descriptors per connection, and a sample still echoes (the server is a pod's echo process
//!   here: this process's descriptor limit holds the clients only).
//!
//! Link faults: `nodemesh_tests::faults::{blackhole, lossy}` (netem when the kernel has it).
//! Measured outcomes are printed (`--nocapture`) and recorded in docs/faults.md.
//! Addresses: node link 10.120.0.1 ↔ .2, pods 10.21.<i>.2 (node a) / 10.22.<i>.2 (node b), tunnel
//! addresses 169.254.120.1 / .2 (each test has its own namespaces).

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::{
    cluster::{Agent, Cluster, Echo, Net, Pod, addr, roundtrip_from, scrape, workload},
    faults::{
        InCgroup, Mode, Server, blackhole, connect_from, echo_roundtrip, fd_count, lossy,
        nofile_soft_limit, pattern, rss_kib, set_nofile_soft,
    },
    metric_sum, unique_prefix,
};

const PORT: u16 = 8080;
const NET: Net = Net {
    node_a: "10.120.0.1",
    node_b: "10.120.0.2",
    tunnel_a: "169.254.120.1",
    tunnel_b: "169.254.120.2",
    pods_a: 21,
    pods_b: 22,
};

fn tunnel_b() -> IpAddr {
    IpAddr::V4(NET.tunnel_b.parse().expect("valid"))
}

/// STRICT mTLS for every workload of `demo`.
const STRICT: &str = r#"---
apiVersion: security.nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: demo}
spec:
  mtls: {mode: STRICT}
"#;

/// The cluster file: client and server-a on node a, server-b on node b, all STRICT, plus
/// `extra` workload lines.
fn config_with(client: &Pod, server_a: &Pod, server_b: &Pod, extra: &str) -> String {
    format!(
        "{}{}{}{}{extra}{STRICT}",
        NET.cluster_head(),
        workload(client, "client", "client", "", "a"),
        workload(server_a, "server-a", "server", "app: server", "a"),
        workload(server_b, "server-b", "server", "app: server", "b"),
    )
}

/// The cluster with `args` for both agents (the user-space copy for same-node traffic: these
/// tests are about the node link and the agent, and the splice self-test lengthens every start).
fn up(args: &[&str]) -> Result<Cluster> {
    let mut all = vec!["--same-node-path", "copy"];
    all.extend_from_slice(args);
    Cluster::up(NET, &all, |c, a, b| config_with(c, a, b, ""))
}

fn agent_pid(agent: &Agent) -> u32 {
    agent.child.id()
}

/// Fails if an agent's log shows a panic.
fn no_panic(c: &Cluster) -> Result<()> {
    for a in &c.agents {
        ensure!(
            !a.logs().contains("panicked"),
            "agent {} panicked:\n{}",
            a.log.display(),
            a.logs()
        );
    }
    Ok(())
}

/// Fails unless every agent process is still running.
fn alive(c: &mut Cluster) -> Result<()> {
    for a in &mut c.agents {
        if let Some(status) = a.child.try_wait()? {
            bail!("agent {} exited ({status}):\n{}", a.log.display(), a.logs());
        }
    }
    Ok(())
}

/// One short round trip from the client pod's namespace (the test process is in its cgroup).
fn client_roundtrip(c: &Cluster, dst: SocketAddr, seed: u64) -> Result<()> {
    let stream = connect_from(&c.client.ns.path(), dst, Duration::from_secs(5))?;
    echo_roundtrip(stream, &pattern(seed, 2048), Duration::from_secs(10))
}

/// Polls `f` until it succeeds; the time it took. Fails after `within`.
fn until_ok(what: &str, within: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() > within => {
                bail!("{what}: not within {within:?}; last error: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `name{labels}` summed on the node's agent.
fn metric(c: &Cluster, node: usize, name: &str, labels: &[&str]) -> Result<u64> {
    let (n, ip) = [(&c.node_a, NET.node_a), (&c.node_b, NET.node_b)][node];
    Ok(metric_sum(&scrape(n, ip)?, name, labels))
}

/// How one round trip of the load ended.
#[derive(Clone, Debug)]
struct Attempt {
    start: Instant,
    end: Instant,
    error: Option<(ErrorKind, String)>,
}

fn io_kind(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map_or(ErrorKind::Other, std::io::Error::kind)
}

/// Whether a failed round trip failed closed: refused, reset (also seen as `ENOTCONN` by a
/// write after the reset arrived), aborted, or closed early (an echo shorter than what was
/// sent). A timeout would be a hang, not a refusal.
fn failed_closed(kind: ErrorKind, msg: &str) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::NotConnected
    ) || msg.contains("echo returned")
}

#[test]
fn sigkill_under_load_twenty_times() -> Result<()> {
    const KILLS: usize = 20;
    /// From the kill to the first round trip through the new agent that started after it.
    const RECOVERY_BOUND: Duration = Duration::from_secs(5);
    let mut c = up(&[])?;
    let dst = addr(&c.server_b.ip, PORT)?;
    let server = Server::start(&c.server_b.ns.path(), dst, Mode::Echo)?;
    let instance = c.agents[0].instance().to_owned();
    let rss_b_before = rss_kib(agent_pid(&c.agents[1]))?;
    let _in_pod = InCgroup::enter(c.client.cgroup.path())?;

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let mut load = Vec::new();
    for t in 0..3u64 {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        let ns = c.client.ns.path();
        load.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let start = Instant::now();
                let r = connect_from(&ns, dst, Duration::from_secs(3))
                    .map_err(anyhow::Error::from)
                    .and_then(|s| {
                        echo_roundtrip(
                            s,
                            &pattern(t * 1_000_000 + i, 16 * 1024),
                            Duration::from_secs(5),
                        )
                    });
                let error = r.err().map(|e| (io_kind(&e), format!("{e:#}")));
                attempts.lock().expect("attempts").push(Attempt {
                    start,
                    end: Instant::now(),
                    error,
                });
                // Pacing (the load is a few connections per thread and 10 ms, not a flood).
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    // Successes that started after `t`.
    let successes_after = |t: Instant| {
        attempts
            .lock()
            .expect("attempts")
            .iter()
            .filter(|a| a.error.is_none() && a.start >= t)
            .map(|a| a.end)
            .min()
    };
    let count_after = |t: Instant| {
        attempts
            .lock()
            .expect("attempts")
            .iter()
            .filter(|a| a.error.is_none() && a.start >= t)
            .count()
    };
    let began = Instant::now();
    until_ok("load through the mesh", Duration::from_secs(10), || {
        ensure!(count_after(began) >= 10, "not yet");
        Ok(())
    })?;

    let mut gaps: Vec<(Instant, Instant)> = Vec::new();
    let mut recoveries = Vec::new();
    let mut since_ready = Vec::new();
    for i in 0..KILLS {
        no_panic(&c)?;
        let procs = node_procs(c.node_a.cgroup.path())?;
        ensure!(
            procs.len() == 1,
            "cycle {i}: node a's cgroup holds exactly its agent, found {procs:?}"
        );
        let killed = Instant::now();
        c.agents[0].kill()?;
        let ready = c.restart_agent(0)?;
        let deadline = killed + RECOVERY_BOUND * 3;
        let recovered = loop {
            if let Some(t) = successes_after(killed) {
                break t;
            }
            ensure!(
                Instant::now() < deadline,
                "cycle {i}: no round trip through the restarted agent within {:?}:\n{}",
                RECOVERY_BOUND * 3,
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        gaps.push((killed, recovered));
        recoveries.push(recovered - killed);
        since_ready.push(recovered.saturating_duration_since(ready));
        // Some steady traffic before the next kill.
        let settle = Instant::now();
        until_ok("load after the restart", Duration::from_secs(10), || {
            ensure!(count_after(settle) >= 6, "not yet");
            Ok(())
        })?;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
    }

    let attempts = attempts.lock().expect("attempts").clone();
    let failures: Vec<&Attempt> = attempts.iter().filter(|a| a.error.is_some()).collect();
    let outside_gaps: Vec<String> = failures
        .iter()
        .filter(|a| !gaps.iter().any(|(k, r)| a.end >= *k && a.start <= *r))
        .map(|a| format!("{:?}", a.error))
        .collect();
    let not_closed: Vec<String> = failures
        .iter()
        .filter_map(|a| a.error.as_ref())
        .filter(|(kind, msg)| !failed_closed(*kind, msg))
        .map(|e| format!("{e:?}"))
        .collect();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for (kind, msg) in failures.iter().filter_map(|a| a.error.as_ref()) {
        let name = if msg.contains("echo returned") {
            "closed early".to_owned()
        } else {
            format!("{kind:?}")
        };
        *kinds.entry(name).or_default() += 1;
    }
    recoveries.sort();
    since_ready.sort();
    let rss_b_after = rss_kib(agent_pid(&c.agents[1]))?;
    eprintln!(
        "{KILLS} SIGKILLs under load: {} round trips, {} failed (all in the gaps: {kinds:?}); kill → first \
         round trip through the new agent: min {:?}, median {:?}, max {:?}; after its readiness: \
         max {:?}; node b's agent RSS {rss_b_before} → {rss_b_after} KiB",
        attempts.len(),
        failures.len(),
        recoveries[0],
        recoveries[KILLS / 2],
        recoveries[KILLS - 1],
        since_ready[KILLS - 1],
    );
    ensure!(
        outside_gaps.is_empty(),
        "round trips failed while node a's agent was up: {outside_gaps:?}"
    );
    ensure!(
        not_closed.is_empty(),
        "failures must be refusals or resets (fail closed), not hangs: {not_closed:?}"
    );
    ensure!(
        recoveries[KILLS - 1] <= RECOVERY_BOUND,
        "recovery took up to {:?} (bound {RECOVERY_BOUND:?}): {recoveries:?}",
        recoveries[KILLS - 1]
    );
    server.only_from(tunnel_b())?;
    ensure!(
        rss_b_after <= rss_b_before + 32 * 1024,
        "node b's agent grew from {rss_b_before} to {rss_b_after} KiB over {KILLS} reconnections"
    );
    no_panic(&c)?;
    alive(&mut c)?;

    // Nothing left behind: the last agent stops cleanly, its pins go with uninstall, and no
    // process stays in node a's cgroup.
    drop(_in_pod);
    c.agents[0].sigterm();
    let status = c.agents[0].wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "the last agent exited with {status}");
    c.agents[0].stop();
    let pins =
        mesh_agent::datapath::Pins::new(mesh_agent::datapath::Pins::DEFAULT_BPFFS, &instance)?;
    ensure!(
        !pins.instance_dir().exists(),
        "pins left behind in {}",
        pins.instance_dir().display()
    );
    let procs = node_procs(c.node_a.cgroup.path())?;
    ensure!(
        procs.is_empty(),
        "processes left in node a's cgroup: {procs:?}"
    );
    Ok(())
}

/// The processes directly in a node's cgroup (its agent; pods are in child cgroups).
fn node_procs(cgroup: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(cgroup.join("cgroup.procs"))?
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn expired_certificate_with_the_ca_down() -> Result<()> {
    const TTL: Duration = Duration::from_secs(10);
    let faults = tempfile::tempdir()?;
    let ca_down = faults.path().join("ca-down");
    let ca_down_arg = ca_down.to_string_lossy().into_owned();
    let ttl = TTL.as_secs().to_string();
    let mut c = up(&[
        "--cert-ttl-secs",
        ttl.as_str(),
        "--ca-fault-file",
        ca_down_arg.as_str(),
    ])?;
    let dst = addr(&c.server_b.ip, PORT)?;
    let server = Server::start(&c.server_b.ns.path(), dst, Mode::Echo)?;
    let _in_pod = InCgroup::enter(c.client.cgroup.path())?;
    client_roundtrip(&c, dst, 1).context("before the fault")?;
    let expired_before = failures_no_cert(&c)?;
    let rss_before = rss_kib(agent_pid(&c.agents[0]))?;

    // The CA goes down: the current certificates stay in use until they expire (the
    // refresher renews at half-life, so each has at least ~TTL/2 left now).
    std::fs::write(&ca_down, "")?;
    let down_at = Instant::now();
    client_roundtrip(&c, dst, 2).context("right after the CA went down (certificates valid)")?;
    // Then connections are refused: polled until the first failure, which must come by the
    // expiry (TTL, plus the pool's next look at the clock).
    let mut seed = 3;
    let first_failure = loop {
        seed += 1;
        let started = Instant::now();
        match client_roundtrip(&c, dst, seed) {
            Ok(()) => {}
            Err(e) => {
                ensure!(
                    started.elapsed() < Duration::from_secs(5),
                    "a refused connection must fail at once, took {:?}: {e:#}",
                    started.elapsed()
                );
                ensure!(
                    failed_closed(io_kind(&e), &format!("{e:#}")),
                    "an expired identity's connection must be refused or reset: {e:#}"
                );
                break down_at.elapsed();
            }
        }
        ensure!(
            down_at.elapsed() < TTL + Duration::from_secs(5),
            "connections still succeed {:?} after the CA went down with {TTL:?} certificates",
            down_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let accepted = server.accepted();
    for i in 0..5 {
        let r = client_roundtrip(&c, dst, 100 + i);
        ensure!(r.is_err(), "expired certificate: connection {i} succeeded");
    }
    ensure!(
        server.accepted() == accepted,
        "the server got connections while the certificates were expired"
    );
    let refused = failures_no_cert(&c)? - expired_before;
    ensure!(
        refused >= 5,
        "each refused connection counts as nodemesh_tls_handshake_failures_total{{reason=\"no_local_certificate\"}} ({refused})"
    );
    ensure!(
        c.logs()
            .contains("certificate expired and its renewal failed"),
        "the expiry is logged:\n{}",
        c.logs()
    );

    // The CA is back: the next connection renews and succeeds.
    std::fs::remove_file(&ca_down)?;
    let mut seed = 1000;
    let recovery = until_ok(
        "a connection after the CA is back",
        Duration::from_secs(10),
        || {
            seed += 1;
            client_roundtrip(&c, dst, seed)
        },
    )?;
    eprintln!(
        "certificates of {TTL:?}, CA down: first refused connection {first_failure:?} after the CA \
         went down, {refused} refusals counted; CA back: served again after {recovery:?}"
    );
    ensure!(
        recovery < Duration::from_secs(3),
        "recovery took {recovery:?}"
    );
    let rss_after = rss_kib(agent_pid(&c.agents[0]))?;
    ensure!(
        rss_after <= rss_before + 16 * 1024,
        "node a grew from {rss_before} to {rss_after} KiB"
    );
    server.only_from(tunnel_b())?;
    no_panic(&c)?;
    alive(&mut c)
}

/// `nodemesh_tls_handshake_failures_total{reason="no_local_certificate"}` on both nodes.
fn failures_no_cert(c: &Cluster) -> Result<u64> {
    let name = "nodemesh_tls_handshake_failures_total";
    let labels = ["reason=\"no_local_certificate\""];
    Ok(metric(c, 0, name, &labels)? + metric(c, 1, name, &labels)?)
}

#[test]
fn enrolled_pods_map_full() -> Result<()> {
    let mut c = up(&["--max-enrolled-pods", "2"])?;
    // A third pod on node a, added to the file: the map of 2 holds client and server-a.
    let extra = nodemesh_tests::cluster::pod(&unique_prefix(), &c.node_a, "extra", NET.pods_a, 3)?;
    let extra_line = workload(&extra, "extra", "extra", "", "a");
    let with_extra = config_with(&c.client, &c.server_a, &c.server_b, &extra_line);
    c.write_config(&with_extra)?;
    let line = c.agents[0].wait_log("the map-full error for `extra`", |l| {
        l.contains("cannot enroll the workload") && l.contains("extra") && l.contains("ERROR")
    })?;
    eprintln!("node a logged: {line}");
    let not_enrolled = |c: &Cluster| {
        metric(
            c,
            0,
            "nodemesh_workloads_not_enrolled",
            &["reason=\"map_full\""],
        )
    };
    ensure!(
        not_enrolled(&c)? == 1,
        "one workload counted as not enrolled (map full)"
    );
    let m = scrape(&c.node_a, NET.node_a)?;
    ensure!(
        metric_sum(
            &m,
            "nodemesh_datapath_map_entries",
            &["map=\"NM_ENROLLED\""]
        ) == 2
            && metric_sum(
                &m,
                "nodemesh_datapath_map_capacity",
                &["map=\"NM_ENROLLED\""]
            ) == 2,
        "the enrolled-pods map is full (2 of 2)"
    );
    ensure!(
        metric_sum(&m, "nodemesh_workloads_enrolled", &[]) == 2,
        "two workloads enrolled"
    );

    // The pod that did not fit is outside the mesh: its plaintext to STRICT pods (real pods
    // here, under their node's plaintext guard) is dropped, on the other node and on its own.
    let echo_b = Echo::start(&c.server_b, PORT)?;
    let echo_a = Echo::start(&c.server_a, PORT)?;
    for (echo, server) in [(&echo_b, &c.server_b), (&echo_a, &c.server_a)] {
        let r = roundtrip_from(&extra, addr(&server.ip, PORT)?, "plaintext?");
        ensure!(
            r.is_err(),
            "the unenrolled pod reached {} in plaintext",
            server.ip
        );
        ensure!(
            echo.accepted() == 0,
            "{} accepted a connection of the unenrolled pod",
            server.ip
        );
    }
    // A restarted agent (the map adopted from the pins) keeps the pods it had enrolled and
    // leaves the same one out, whatever the key order says.
    c.agents[0].kill()?;
    c.restart_agent(0)?;
    c.agents[0].wait_log("the map-full error for `extra` after the restart", |l| {
        l.contains("cannot enroll the workload") && l.contains("extra")
    })?;
    ensure!(
        !c.agents[0]
            .logs()
            .lines()
            .any(|l| l.contains("cannot enroll the workload") && l.contains("server-a")),
        "the restarted agent unenrolled server-a to make room:\n{}",
        c.agents[0].logs()
    );
    ensure!(
        not_enrolled(&c)? == 1,
        "still one workload left out after the restart"
    );
    let rss_before = rss_kib(agent_pid(&c.agents[0]))?;
    // The enrolled client is meshed as before.
    c.roundtrip(addr(&c.server_b.ip, PORT)?, "meshed")?;
    let peer = echo_b.next_peer()?;
    ensure!(
        peer.ip() == tunnel_b(),
        "delivered by the tunnel, got {peer}"
    );
    no_panic(&c)?;
    alive(&mut c)?;

    // server-a leaves the node: its place goes to `extra`, which is then meshed.
    let without_a = format!(
        "{}{}{}{extra_line}{STRICT}",
        NET.cluster_head(),
        workload(&c.client, "client", "client", "", "a"),
        workload(&c.server_b, "server-b", "server", "app: server", "b"),
    );
    c.write_config(&without_a)?;
    until_ok("the freed place taken", Duration::from_secs(10), || {
        ensure!(not_enrolled(&c)? == 0, "still not enrolled");
        Ok(())
    })?;
    roundtrip_from(&extra, addr(&c.server_b.ip, PORT)?, "meshed now")
        .context("the pod enrolled once a place freed up")?;
    let peer = echo_b.next_peer()?;
    ensure!(
        peer.ip() == tunnel_b(),
        "delivered by the tunnel, got {peer}"
    );
    let rss_after = rss_kib(agent_pid(&c.agents[0]))?;
    ensure!(
        rss_after <= rss_before + 16 * 1024,
        "node a grew from {rss_before} to {rss_after} KiB"
    );
    no_panic(&c)?;
    alive(&mut c)
}

#[test]
fn peer_node_unreachable() -> Result<()> {
    /// A connection to an unreachable node fails within this: on a pooled connection that went
    /// dead, the CONNECT response timeout (15 s), or that connection closed by its keepalive
    /// first and one retry on a new one, which meets the handshake timeout (10 s); plus slack.
    const FAIL_WITHIN: Duration = Duration::from_secs(27);
    let mut c = up(&[])?;
    let dst_b = addr(&c.server_b.ip, PORT)?;
    let dst_a = addr(&c.server_a.ip, PORT)?;
    let server_b = Server::start(&c.server_b.ns.path(), dst_b, Mode::Echo)?;
    let _server_a = Server::start(&c.server_a.ns.path(), dst_a, Mode::Echo)?;
    let _in_pod = InCgroup::enter(c.client.cgroup.path())?;
    client_roundtrip(&c, dst_b, 1)?;
    client_roundtrip(&c, dst_a, 2)?;
    let rss_before = rss_kib(agent_pid(&c.agents[0]))?;

    let cut_a = blackhole(&c.node_a.ns, "wire0")?;
    let cut_b = blackhole(&c.node_b.ns, "wire0")?;
    eprintln!("{}", cut_a.describe);
    // Eight concurrent connections to node b, twice (the first wave may meet the pooled
    // connection that went dead, the second opens new ones).
    let mut max_pool = 0;
    let mut slowest = Duration::ZERO;
    for wave in 0..2 {
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let ns = c.client.ns.path();
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let r = connect_from(&ns, dst_b, Duration::from_secs(5))
                        .map_err(anyhow::Error::from)
                        .and_then(|s| {
                            echo_roundtrip(s, &pattern(i, 1024), Duration::from_secs(40))
                        });
                    (started.elapsed(), r)
                })
            })
            .collect();
        // Meanwhile: the pool stays small, the agent healthy, same-node traffic flows.
        while !threads.iter().all(std::thread::JoinHandle::is_finished) {
            max_pool = max_pool.max(metric(&c, 0, "nodemesh_pool_connections", &[])?);
            let (status, _) = nodemesh_tests::http_in_netns(
                &c.node_a.ns.path(),
                addr(NET.node_a, nodemesh_tests::cluster::STATS_PORT)?,
                "GET",
                "/healthz",
            )?;
            ensure!(
                status == 200,
                "node a's /healthz answered {status} during the outage"
            );
            client_roundtrip(&c, dst_a, 10 + wave)
                .context("same-node traffic during the outage")?;
            std::thread::sleep(Duration::from_millis(200));
        }
        for t in threads {
            let (took, r) = t
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
            let e = match r {
                Ok(()) => bail!("wave {wave}: a connection to the unreachable node succeeded"),
                Err(e) => e,
            };
            ensure!(
                failed_closed(io_kind(&e), &format!("{e:#}")),
                "wave {wave}: the connection must be reset, not hang: {e:#}"
            );
            ensure!(
                took <= FAIL_WITHIN,
                "wave {wave}: failed only after {took:?}"
            );
            slowest = slowest.max(took);
        }
    }
    let reason = c.agents[0].wait_log("the reason naming node b", |l| {
        l.contains(&format!("{}:15008", NET.node_b))
            && (l.contains("timed out") || l.contains("no CONNECT response") || l.contains("PONG"))
    })?;
    ensure!(
        max_pool <= 4,
        "the pool grew to {max_pool} connections to one unreachable node"
    );
    // Dead connections leave the pool (keepalive: a PING every 10 s, no PONG in 20 s).
    let emptied = until_ok(
        "the pool emptied of dead connections",
        Duration::from_secs(40),
        || {
            let n = metric(&c, 0, "nodemesh_pool_connections", &[])?;
            ensure!(n == 0, "{n} connection(s)");
            Ok(())
        },
    )?;

    // The link is back: node b is reached again.
    drop((cut_a, cut_b));
    let mut seed = 100;
    let recovery = until_ok("node b reached again", Duration::from_secs(20), || {
        seed += 1;
        client_roundtrip(&c, dst_b, seed)
    })?;
    let rss_after = rss_kib(agent_pid(&c.agents[0]))?;
    eprintln!(
        "node link blackholed: 16 connections failed, the slowest after {slowest:?}; pool at most \
         {max_pool} connection(s), empty {emptied:?} after the waves; reason: {reason}; reached again {recovery:?} after the link \
         came back; node a RSS {rss_before} → {rss_after} KiB"
    );
    ensure!(
        recovery <= Duration::from_secs(15),
        "recovery took {recovery:?}"
    );
    ensure!(
        rss_after <= rss_before + 16 * 1024,
        "node a grew from {rss_before} to {rss_after} KiB"
    );
    server_b.only_from(tunnel_b())?;
    no_panic(&c)?;
    alive(&mut c)
}

#[test]
fn loss_and_delay_on_the_node_link() -> Result<()> {
    const SIZE: usize = 4 << 20;
    let mut c = up(&[])?;
    let dst = addr(&c.server_b.ip, PORT)?;
    let server = Server::start(&c.server_b.ns.path(), dst, Mode::Echo)?;
    let _in_pod = InCgroup::enter(c.client.cgroup.path())?;
    let transfer = |seed: u64| -> Result<Duration> {
        let started = Instant::now();
        let threads: Vec<_> = (0..2u64)
            .map(|i| {
                let ns = c.client.ns.path();
                std::thread::spawn(move || -> Result<()> {
                    let s = connect_from(&ns, dst, Duration::from_secs(10))?;
                    // A read that stalls this long is a hang.
                    echo_roundtrip(s, &pattern(seed + i, SIZE), Duration::from_secs(30))
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
        }
        Ok(started.elapsed())
    };
    let clean = transfer(1)?;
    let rss_before = rss_kib(agent_pid(&c.agents[0]))?;
    let fault_a = lossy(&c.node_a.ns, "wire0", 5, 20)?;
    let _fault_b = lossy(&c.node_b.ns, "wire0", 5, 20)?;
    eprintln!("{}", fault_a.describe);
    let lossy_took = transfer(2)?;
    // Short connections too (their handshakes meet the loss).
    for i in 0..10 {
        client_roundtrip(&c, dst, 10 + i).with_context(|| format!("short connection {i}"))?;
    }
    let rss_after = rss_kib(agent_pid(&c.agents[0]))?;
    drop((fault_a, _fault_b));
    let mib_s = |d: Duration| (2 * 2 * SIZE) as f64 / d.as_secs_f64() / f64::from(1 << 20);
    eprintln!(
        "2 × {} MiB round trips: clean {clean:?} ({:.1} MiB/s), with loss and delay {lossy_took:?} \
         ({:.1} MiB/s), byte-exact; 10 short connections fine; node a RSS {rss_before} → {rss_after} KiB",
        SIZE >> 20,
        mib_s(clean),
        mib_s(lossy_took),
    );
    ensure!(
        lossy_took < Duration::from_secs(90),
        "the transfer took {lossy_took:?}"
    );
    ensure!(
        rss_after <= rss_before + 32 * 1024,
        "node a grew from {rss_before} to {rss_after} KiB"
    );
    server.only_from(tunnel_b())?;
    no_panic(&c)?;
    alive(&mut c)
}

#[test]
fn slow_readers_are_backpressured() -> Result<()> {
    const STALLED: usize = 16;
    let mut c = up(&[])?;
    let dst = addr(&c.server_b.ip, PORT)?;
    let server = Server::start(&c.server_b.ns.path(), dst, Mode::Push)?;
    let _in_pod = InCgroup::enter(c.client.cgroup.path())?;
    // Warm up (pool, certificates, allocator) with one connection read to a few MiB.
    {
        let mut s = connect_from(&c.client.ns.path(), dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 4 << 20];
        s.read_exact(&mut buf)?;
    }
    let (pid_a, pid_b) = (agent_pid(&c.agents[0]), agent_pid(&c.agents[1]));
    let before = (rss_kib(pid_a)?, rss_kib(pid_b)?);
    let pushed_before = server.pushed();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(connect_from(
            &c.client.ns.path(),
            dst,
            Duration::from_secs(5),
        )?);
    }
    // Wait until flow control has stopped the server: nothing pushed for a second.
    let mut last = server.pushed();
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while quiet_since.elapsed() < Duration::from_secs(1) {
        ensure!(
            Instant::now() < deadline,
            "the server never stopped: flow control does not reach it"
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = server.pushed();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    let after = (rss_kib(pid_a)?, rss_kib(pid_b)?);
    let held = server.pushed() - pushed_before;
    let grew = (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    );
    let per_conn = |g: u64| g / STALLED as u64;
    eprintln!(
        "{STALLED} clients that never read: the server was stopped after {} MiB in flight \
         ({} KiB per connection, kernel buffers included); agent RSS node a {} → {} KiB ({} KiB \
         per stalled connection), node b {} → {} KiB ({} KiB per stalled connection)",
        held >> 20,
        held / 1024 / STALLED as u64,
        before.0,
        after.0,
        per_conn(grew.0),
        before.1,
        after.1,
        per_conn(grew.1),
    );
    // Per stalled connection each agent may hold one stream window (4 MiB: received and not
    // yet written on node a, queued for sending on node b, whose h2 send buffer is one stream
    // window) and its copy buffer (256 KiB, twice while a chunk is in flight); the rest is the
    // kernel's socket buffers.
    let bound_kib = (4 * 1024 + 2 * 256) * STALLED as u64;
    for (node, g) in [("a", grew.0), ("b", grew.1)] {
        ensure!(
            g <= bound_kib,
            "node {node}'s agent grew by {g} KiB with {STALLED} stalled connections (bound \
             {bound_kib} KiB)"
        );
    }
    // Reading resumes the flow, in order.
    let mut s = stalled.pop().context("a stalled connection")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let chunk = pattern(7, 64 * 1024);
    let mut buf = vec![0u8; 8 << 20];
    s.read_exact(&mut buf)?;
    ensure!(
        buf.chunks(chunk.len()).all(|c| c == &chunk[..c.len()]),
        "the data of a backpressured connection arrives intact"
    );
    drop(stalled);
    server.only_from(tunnel_b())?;
    no_panic(&c)?;
    alive(&mut c)
}

#[test]
fn ten_thousand_idle_connections() -> Result<()> {
    const N: usize = 10_000;
    // The agents start with the usual soft limit of 1024 and must raise their own.
    set_nofile_soft(Some(1024))?;
    let mut c = up(&[])?;
    let dst = addr(&c.server_b.ip, PORT)?;
    // This process holds the 10,000 client sockets, the echo server (a pod's process, under
    // node b's plaintext guard; it inherits this limit) the 10,000 accepted ones. The hard
    // limit is what the machine gives (20,000 here; raising it needs CAP_SYS_RESOURCE).
    let limit = set_nofile_soft(None)?;
    ensure!(
        limit >= N as u64 + 1000,
        "this test needs an open-file hard limit above {} (have {limit})",
        N + 1000
    );
    let echo = Echo::start(&c.server_b, PORT)?;
    let _in_pod = InCgroup::enter(c.client.cgroup.path())?;
    client_roundtrip(&c, dst, 1)?;
    let (pid_a, pid_b) = (agent_pid(&c.agents[0]), agent_pid(&c.agents[1]));
    let limits = (nofile_soft_limit(pid_a)?, nofile_soft_limit(pid_b)?);
    ensure!(
        limits.0 > N as u64 && limits.1 > N as u64,
        "the agents must raise their open-file limit above {N} (they have {limits:?})"
    );
    let rss0 = (rss_kib(pid_a)?, rss_kib(pid_b)?);
    let fds0 = (fd_count(pid_a)?, fd_count(pid_b)?);
    let mut accepted = echo.accepted() as u64;
    let accepted0 = accepted;

    let started = Instant::now();
    let mut conns: Vec<TcpStream> = Vec::with_capacity(N);
    let ns = c.client.ns.path();
    // Batches of 500 from one namespace thread each; the next batch waits until the server
    // has every earlier one. The outbound's accept queue is 1024 deep: with two batches in
    // flight on a loaded machine it overflowed, the tunnel dropped the handshakes' last ACKs
    // and the kernel's SYN-ACK retransmissions (1, 2, 4 … 32 s apart) outlasted the deadline.
    for batch in 0..N / 500 {
        let made = mesh_agent::netns::in_netns(&ns, move || {
            (0..500)
                .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(10)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .with_context(|| format!("batch {batch}"))?;
        conns.extend(made);
        let want = accepted0 + conns.len() as u64;
        until_ok(
            "the server accepting the batch",
            Duration::from_secs(60),
            || {
                accepted += echo.accepted() as u64;
                ensure!(accepted >= want, "{accepted} of {want}");
                Ok(())
            },
        )?;
    }
    until_ok("every connection accepted", Duration::from_secs(60), || {
        accepted += echo.accepted() as u64;
        ensure!(accepted >= accepted0 + N as u64, "{accepted}");
        Ok(())
    })?;
    let opened_in = started.elapsed();
    let rss1 = (rss_kib(pid_a)?, rss_kib(pid_b)?);
    let fds1 = (fd_count(pid_a)?, fd_count(pid_b)?);
    let per_conn = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / N as f64;
    let pool = metric(&c, 0, "nodemesh_pool_connections", &[])?;
    eprintln!(
        "{N} idle connections opened in {opened_in:?}; node a (outbound): RSS {} → {} KiB = {:.1} \
         KiB per connection, fds {} → {}; node b (inbound): RSS {} → {} KiB = {:.1} KiB per \
         connection, fds {} → {}; {pool} pooled HBONE connection(s); open-file limits {limits:?}",
        rss0.0,
        rss1.0,
        per_conn(rss0.0, rss1.0),
        fds0.0,
        fds1.0,
        rss0.1,
        rss1.1,
        per_conn(rss0.1, rss1.1),
        fds0.1,
        fds1.1,
    );
    // One descriptor per connection on each node (the app's socket on a, the pod's on b), plus
    // the pool's TLS connections: bounded.
    ensure!(
        fds1.0 <= fds0.0 + N + 200 && fds1.1 <= fds0.1 + N + 200,
        "descriptors per connection: node a {fds0:?} → {fds1:?}"
    );
    for (node, (a, b)) in [("a", (rss0.0, rss1.0)), ("b", (rss0.1, rss1.1))] {
        ensure!(
            per_conn(a, b) <= 32.0,
            "node {node}: {:.1} KiB per idle connection (bound 32 KiB)",
            per_conn(a, b)
        );
    }
    // A sample (every 100th) still carries data.
    for (i, s) in conns.iter_mut().enumerate().step_by(100) {
        let token = format!("sample {i}\n");
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(token.as_bytes())?;
        let mut back = vec![0u8; token.len()];
        s.read_exact(&mut back)
            .with_context(|| format!("connection {i} after {N} were opened"))?;
        ensure!(back == token.as_bytes(), "connection {i} echoed {back:?}");
    }
    drop(conns);
    drop(echo);
    no_panic(&c)?;
    alive(&mut c)
}
