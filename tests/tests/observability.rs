//! Root end-to-end checks of one `mesh-agent local` (as `nm-agent`) in its own "node" (network
//! namespace + cgroup) through its stats and admin endpoints: `/readyz`, polled from the agent's
//! start, is 503 while a gate is pending and turns 200 once it clears, `/config_dump` shows certificate serials and eBPF map
//! fill, `/metrics` has the map and runtime gauges and Istio's workload labels for a same-node
//! connection through a service VIP, and SIGTERM drains and exits, closing the servers. Across
//! nodes (the two-node cluster of `nodemesh_tests::cluster`), one connection carries both
//! workloads' exact Istio labels and `mutual_tls` on node a (source) and node b (destination),
//! with exact opened/closed/byte deltas.
//!
//! The gate kept pending: the config places a third workload on the node whose network
//! namespace does not exist yet, so `workloads-enrolled` stays pending; the test then creates
//! the namespace and edits the file, and the reload enrolls it.
//!
//! Addresses (private to the test's namespaces): node 10.100.0.1 (on the node's `lo`), tunnel
//! 169.254.100.1; pods 10.1.<i>.2 behind 10.1.<i>.1; service VIP 10.96.0.10:80 → 8080.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::{
    ChildCgroup, NetNs, agent_exe,
    cluster::{self, Agent, Echo, Node, Pod},
    http_in_netns, metric_sum, probe_exe, require_root, run, unique_prefix,
};

const NODE: &str = "10.100.0.1";
const TUNNEL: &str = "169.254.100.1";
const VIP: &str = "10.96.0.10";
const ECHO_PORT: u16 = 8080;
const STATS_PORT: u16 = 15020;
const ADMIN_PORT: u16 = 15000;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
/// How long an agent may take from start to ready (loading eBPF, CA, certificates).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long a polled condition may take (a reload polls the file every 100 ms).
const WITHIN: Duration = Duration::from_secs(10);

fn addr(ip: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(ip.parse()?, port))
}

/// The cluster file: client and server pods, a `late` workload whose namespace is `late_netns`
/// (`late_label` changes the file without changing anything else), the `web` service.
fn config(client: &Pod, server: &Pod, late_netns: &Path, late_label: &str) -> String {
    format!(
        r#"apiVersion: local.nodemesh.io/v1alpha1
kind: LocalCluster
thisNode: a
nodes:
- {{name: a, address: {NODE}, tunnelAddress: {TUNNEL}}}
workloads:
- {{name: client, namespace: demo, serviceAccount: client, labels: {{app.kubernetes.io/name: shop-client, version: v3}}, ips: [{}], netns: {}, node: a}}
- {{name: server, namespace: demo, serviceAccount: server, labels: {{app: web}}, ips: [{}], netns: {}, node: a}}
- {{name: late, namespace: demo, serviceAccount: late, labels: {{app: late, try: "{late_label}"}}, ips: [10.1.3.2], netns: {}, node: a}}
services:
- {{name: web, namespace: demo, vips: [{VIP}], ports: [{{port: 80, targetPort: {ECHO_PORT}}}], selector: {{matchLabels: {{app: web}}}}}}
"#,
        client.ip,
        client.ns.path().display(),
        server.ip,
        server.ns.path().display(),
        late_netns.display(),
    )
}

/// Field order is drop order: the agent first, then pods (cgroups, then namespaces), then the
/// node.
struct Setup {
    agent: Agent,
    /// `/readyz` answers seen while the agent started (before its ready file).
    startup_readyz: Vec<(u16, String)>,
    _echo: Echo,
    client: Pod,
    server: Pod,
    node: Node,
    dir: tempfile::TempDir,
    prefix: String,
}

impl Setup {
    fn up() -> Result<Self> {
        require_root();
        let p = unique_prefix();
        // One node: its address on `lo` (no node link).
        let node = cluster::node(&p, "a")?;
        node.ns
            .exec(&["ip", "addr", "add", &format!("{NODE}/32"), "dev", "lo"])?;
        let client = cluster::pod(&p, &node, "client", 1, 1)?;
        let server = cluster::pod(&p, &node, "server", 1, 2)?;
        let echo = Echo::start(&server, ECHO_PORT)?;
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("cluster.yaml");
        let late = Path::new("/run/netns").join(format!("{p}-late"));
        fs::write(&cfg, config(&client, &server, &late, "1"))?;
        // `/readyz` from the very start: the stats server answers before the agent is ready.
        let mut startup_readyz = Vec::new();
        let readyz = addr(NODE, STATS_PORT)?;
        let node_ns = node.ns.path();
        let agent = Agent::start_watching(&node, &cfg, dir.path(), &format!("{p}-a"), &[], || {
            if let Ok(answer) = http_in_netns(&node_ns, readyz, "GET", "/readyz") {
                startup_readyz.push(answer);
            }
        })?;
        Ok(Self {
            agent,
            startup_readyz,
            _echo: echo,
            client,
            server,
            node,
            dir,
            prefix: p,
        })
    }

    fn get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let ip = if port == ADMIN_PORT {
            "127.0.0.1"
        } else {
            NODE
        };
        http_in_netns(&self.node.ns.path(), addr(ip, port)?, "GET", path)
    }

    fn scrape(&self) -> Result<String> {
        let (status, body) = self.get(STATS_PORT, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(body)
    }

    /// Polls `f` until it returns `Some`, failing after [`WITHIN`] with the agent's log.
    fn poll<T>(&self, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(v) = f()? {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: not within {WITHIN:?}; agent log:\n{}",
                self.agent.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn roundtrip(&self, dst: SocketAddr, payload: &str) -> Result<()> {
        let out = Command::new(probe_exe()?)
            .arg(self.client.cgroup.path())
            .arg(self.client.ns.path())
            .arg("roundtrip")
            .arg(dst.to_string())
            .arg(payload)
            .output()?;
        ensure!(
            out.status.success(),
            "round trip to {dst}: {}{}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.agent.logs()
        );
        Ok(())
    }
}

/// The one sample line of `name` whose labels contain every one of `labels`.
fn sample<'a>(exposition: &'a str, name: &str, labels: &[&str]) -> Option<&'a str> {
    exposition.lines().find(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') && labels.iter().all(|w| rest.contains(w)))
    })
}

#[test]
fn readiness_dump_gauges_labels_and_graceful_exit_of_a_local_agent() -> Result<()> {
    let s = Setup::up()?;

    // While starting: 503 naming the pending gates, never 200 (one gate stays pending).
    assert!(
        !s.startup_readyz.is_empty(),
        "no /readyz answer while the agent started:\n{}",
        s.agent.logs()
    );
    for (status, body) in &s.startup_readyz {
        assert_eq!(*status, 503, "{body}");
        let gates = body
            .strip_prefix("not ready: ")
            .and_then(|g| g.strip_suffix('\n'))
            .with_context(|| format!("{body:?}"))?;
        for gate in gates.split(", ") {
            assert!(
                [
                    "bpf-attached",
                    "certificates",
                    "config-synced",
                    "listeners-bound",
                    "workloads-enrolled"
                ]
                .contains(&gate),
                "{body}"
            );
        }
        assert!(gates.contains("workloads-enrolled"), "{body}");
    }
    assert!(
        s.startup_readyz
            .iter()
            .any(|(_, body)| body.contains("bpf-attached")),
        "the stats server answers before the programs are attached: {:?}",
        s.startup_readyz
    );

    // Serving, but not ready: the late workload cannot be enrolled yet.
    let (status, body) = s.get(STATS_PORT, "/healthz")?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = s.get(STATS_PORT, "/readyz")?;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: workloads-enrolled\n"),
        "/readyz before the late workload's namespace exists"
    );

    // The dump: map fill and certificates with serials.
    let (status, dump) = s.get(ADMIN_PORT, "/config_dump")?;
    assert_eq!(status, 200, "{dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).context("config dump JSON")?;
    let enrolled = &dump["maps"]["NM_ENROLLED"];
    assert_eq!(
        (enrolled["entries"].as_u64(), enrolled["capacity"].as_u64()),
        (Some(2), Some(u64::from(mesh_common::MAX_ENROLLED))),
        "client and server enrolled: {dump:#}"
    );
    assert_eq!(
        dump["maps"]["NM_POLICY"]["capacity"].as_u64(),
        Some(u64::from(mesh_common::MAX_POLICY_ENTRIES)),
        "{dump:#}"
    );
    assert!(
        dump["maps"]["NM_IDENTITY"]["entries"]
            .as_u64()
            .is_some_and(|n| n >= 3),
        "one identity entry per workload address at least: {dump:#}"
    );
    let certs = dump["certificates"].as_array().context("certificates")?;
    let mut serials = Vec::new();
    for id in [CLIENT_ID, SERVER_ID] {
        let c = certs
            .iter()
            .find(|c| c["identity"] == id)
            .with_context(|| format!("no certificate of {id}: {dump:#}"))?;
        let serial = c["serial"].as_str().context("serial")?;
        assert!(
            !serial.is_empty()
                && serial
                    .split(':')
                    .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok()),
            "serial {serial:?}"
        );
        serials.push(serial.to_owned());
        let left = c["expires_in_seconds"].as_i64().context("time left")?;
        assert!(left > 3600, "{id}: {left} s left");
    }
    assert_ne!(
        serials[0], serials[1],
        "each certificate has its own serial"
    );

    // The gauges.
    let m = s.scrape()?;
    let map = |name: &str, map: &str| metric_sum(&m, name, &[&format!("map=\"{map}\"")]);
    assert_eq!(
        map("nodemesh_datapath_map_entries", "NM_ENROLLED"),
        2,
        "{m}"
    );
    assert_eq!(
        map("nodemesh_datapath_map_capacity", "NM_ENROLLED"),
        u64::from(mesh_common::MAX_ENROLLED),
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "nodemesh_runtime_workers", &[]),
        3,
        "mesh-agent local runs one control-plane worker and two tunnel shards:\n{m}"
    );
    assert!(
        metric_sum(&m, "nodemesh_runtime_alive_tasks", &[]) >= 3,
        "{m}"
    );
    assert!(m.contains("\nnodemesh_runtime_global_queue_depth "), "{m}");
    for shard in ["0", "1"] {
        for name in [
            "nodemesh_shard_alive_tasks",
            "nodemesh_shard_busy_seconds_total",
        ] {
            assert!(
                m.contains(&format!("\n{name}{{shard=\"{shard}\"}} ")),
                "{name} of shard {shard} missing:\n{m}"
            );
        }
    }

    // A same-node connection through the service VIP carries both workloads' Istio labels.
    s.roundtrip(addr(VIP, 80)?, "labels through the mesh")?;
    let closed = "istio_tcp_connections_closed_total";
    let m = s.poll("the closed connection", || {
        let m = s.scrape()?;
        Ok((metric_sum(&m, closed, &["reporter=\"source\""]) >= 1).then_some(m))
    })?;
    let want: Vec<String> = [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_canonical_service=\"shop-client\"",
        "source_canonical_revision=\"v3\"",
        "source_workload_namespace=\"demo\"",
        &format!("source_principal=\"{CLIENT_ID}\"")[..],
        "source_app=\"shop-client\"",
        "destination_workload=\"server\"",
        "destination_canonical_service=\"web\"",
        "destination_canonical_revision=\"latest\"",
        "destination_workload_namespace=\"demo\"",
        &format!("destination_principal=\"{SERVER_ID}\"")[..],
        "destination_app=\"web\"",
        "destination_service=\"web.demo.svc.cluster.local\"",
        "destination_service_name=\"web\"",
        "destination_service_namespace=\"demo\"",
        "connection_security_policy=\"none\"",
        "response_flags=\"-\"",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    let line = sample(&m, closed, &want)
        .with_context(|| format!("no {closed} sample with {want:?}:\n{m}"))?;
    assert!(line.ends_with(" 1"), "{line}");
    for ip in [&s.client.ip, &s.server.ip, &VIP.to_owned()] {
        assert!(
            !m.lines()
                .filter(|l| l.starts_with("istio_"))
                .any(|l| l.contains(ip.as_str())),
            "an address is a label value:\n{m}"
        );
    }

    // The late workload's namespace appears; an edit of the file makes the agent enroll it,
    // which clears the last gate.
    let late = NetNs::new(&format!("{}-late", s.prefix))?;
    let tmp = s.dir.path().join("cluster.yaml.new");
    fs::write(&tmp, config(&s.client, &s.server, &late.path(), "2"))?;
    fs::rename(&tmp, s.dir.path().join("cluster.yaml"))?;
    s.poll("/readyz 200 after the late workload is enrolled", || {
        let (status, body) = s.get(STATS_PORT, "/readyz")?;
        match status {
            200 => Ok(Some(())),
            503 => {
                assert_eq!(body, "not ready: workloads-enrolled\n");
                Ok(None)
            }
            other => bail!("/readyz answered {other}: {body}"),
        }
    })?;
    let m = s.scrape()?;
    assert_eq!(
        metric_sum(
            &m,
            "nodemesh_datapath_map_entries",
            &["map=\"NM_ENROLLED\""]
        ),
        3,
        "{m}"
    );

    // SIGTERM: drain, close the servers, exit 0; the stats port then refuses.
    let mut s = s;
    s.agent.sigterm();
    let status = s.agent.wait_exit(Duration::from_secs(15))?;
    assert!(status.success(), "exit: {status}\n{}", s.agent.logs());
    let logs = s.agent.logs();
    assert!(logs.contains("draining the tunnel"), "{logs}");
    let refused = http_in_netns(
        &s.node.ns.path(),
        addr(NODE, STATS_PORT)?,
        "GET",
        "/healthz",
    );
    assert!(
        refused.is_err(),
        "the stats server still answers after exit: {refused:?}"
    );
    drop(s);
    drop(late);
    Ok(())
}

/// `mesh-agent node --metrics-addr`: the data path alone serves the map gauges.
#[test]
fn node_mode_serves_map_gauges() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let ns = NetNs::new(&format!("{p}-n"))?;
    let cgroup = ChildCgroup::new(&format!("{p}-n"))?;
    let instance = format!("{p}-n");
    let stats = addr("127.0.0.1", STATS_PORT)?;
    // `mesh-agent node --datapath-only` of this instance, in the node's cgroup and namespace.
    let datapath = || -> Result<Command> {
        let mut cmd = Command::new(probe_exe()?);
        cmd.arg(cgroup.path())
            .arg(ns.path())
            .arg("exec")
            .arg(agent_exe()?)
            .args([
                "node",
                "--datapath-only",
                "--instance",
                &instance,
                "--cgroup",
            ])
            .arg(cgroup.path())
            .args(["--tunnel-ip4", TUNNEL]);
        Ok(cmd)
    };
    let mut child = datapath()?
        .args(["--metrics-addr", &stats.to_string()])
        .args(["--exclude", "10.96.0.0/12", "--exclude", "@53"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start mesh-agent node")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let outcome = (|| -> Result<()> {
        let line = rx
            .recv_timeout(READY_WITHIN)
            .context("mesh-agent node said nothing")?;
        ensure!(line == "ready", "mesh-agent node: {line}");
        let (status, body) = http_in_netns(&ns.path(), stats, "GET", "/readyz")?;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        // A second data path of the running instance stops at the instance claim, before it
        // touches the first one's pins or programs.
        let second = datapath()?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run the second mesh-agent node")?;
        let deadline = Instant::now() + READY_WITHIN;
        let mut second = second;
        while second.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = second.kill();
                let _ = second.wait();
                bail!("the second data path of a running instance did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let second = second.wait_with_output()?;
        let err = String::from_utf8_lossy(&second.stderr);
        ensure!(
            !second.status.success(),
            "the second data path must fail: {err}"
        );
        ensure!(
            err.contains(&format!("another agent runs instance `{instance}`")),
            "the second data path says why: {err}"
        );
        let (status, body) = http_in_netns(&ns.path(), stats, "GET", "/readyz")?;
        assert_eq!(
            (status, body.as_str()),
            (200, "ready\n"),
            "the first still serves"
        );
        let (status, m) = http_in_netns(&ns.path(), stats, "GET", "/metrics")?;
        assert_eq!(status, 200, "{m}");
        let map = |name: &str, map: &str| metric_sum(&m, name, &[&format!("map=\"{map}\"")]);
        assert_eq!(map("nodemesh_datapath_map_entries", "NM_EXCLUDE"), 2, "{m}");
        assert_eq!(
            map("nodemesh_datapath_map_capacity", "NM_EXCLUDE"),
            u64::from(mesh_common::MAX_EXCLUSIONS),
            "{m}"
        );
        assert_eq!(
            map("nodemesh_datapath_map_entries", "NM_ENROLLED"),
            0,
            "{m}"
        );
        assert_eq!(
            map("nodemesh_datapath_map_capacity", "NM_ENROLLED"),
            u64::from(mesh_common::MAX_ENROLLED),
            "{m}"
        );
        assert!(
            m.contains("nodemesh_datapath_events_total{event=\"redirected\"} 0"),
            "{m}"
        );
        assert_eq!(
            metric_sum(&m, "nodemesh_runtime_workers", &[]),
            1,
            "current-thread runtime:\n{m}"
        );
        Ok(())
    })();
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: `kill` takes plain integers; the pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    run(
        &agent_exe()?.to_string_lossy(),
        &["uninstall", "--instance", &instance],
    )?;
    outcome?;
    let status = status.context("mesh-agent node did not exit on SIGTERM")?;
    assert!(status.success(), "exit: {status}");
    drop(cgroup);
    drop(ns);
    Ok(())
}

/// The cross-node test's addresses (private to its namespaces).
const CROSS: cluster::Net = cluster::Net {
    node_a: "10.140.0.1",
    node_b: "10.140.0.2",
    tunnel_a: "169.254.140.1",
    tunnel_b: "169.254.140.2",
    pods_a: 41,
    pods_b: 42,
};

/// Two nodes: the client on node a, `server-b` (app `web`) on node b; `server-a` is unused.
fn cross_node_config(client: &Pod, server_a: &Pod, server_b: &Pod) -> String {
    format!(
        "{}{}{}{}",
        CROSS.cluster_head(),
        cluster::workload(client, "client", "client", "app: shop-client", "a"),
        cluster::workload(server_a, "server-a", "server", "app: web", "a"),
        cluster::workload(server_b, "server-b", "server", "app: web", "b"),
    )
}

/// The labels of one sample line (`name{k="v",…} value`); values here hold no `"` or `,`.
fn labels_of(line: &str) -> std::collections::BTreeMap<&str, &str> {
    let inner = line
        .split_once('{')
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map_or("", |(inner, _)| inner);
    inner
        .split("\",")
        .filter_map(|kv| kv.split_once("=\""))
        .map(|(k, v)| (k, v.trim_end_matches('"')))
        .collect()
}

/// Issue 6 across nodes: one connection from the client pod on node a to the server pod on node
/// b is reported by node a (`reporter="source"`) and node b (`reporter="destination"`) with both
/// workloads' exact Istio labels, mTLS, and exact opened/closed/byte deltas.
#[test]
fn istio_labels_of_a_cross_node_connection_on_both_nodes() -> Result<()> {
    let c = cluster::Cluster::up(CROSS, &[], cross_node_config)?;
    let _echo = Echo::start(&c.server_b, ECHO_PORT)?;
    let nodes = [
        (&c.node_a, CROSS.node_a, "source"),
        (&c.node_b, CROSS.node_b, "destination"),
    ];
    let before = nodes
        .iter()
        .map(|(node, ip, _)| cluster::scrape(node, ip))
        .collect::<Result<Vec<_>>>()?;
    let payload = "istio labels across nodes 0123456789";
    let n = payload.len() as u64;
    c.roundtrip(addr(&c.server_b.ip, ECHO_PORT)?, payload)
        .with_context(|| format!("cross-node round trip:\n{}", c.logs()))?;

    let closed = "istio_tcp_connections_closed_total";
    for ((node, ip, reporter), before) in nodes.into_iter().zip(&before) {
        let reporter_label = format!("reporter=\"{reporter}\"");
        let sel = [reporter_label.as_str()];
        let after = cluster::scrape_until(node, ip, "the closed connection", |m| {
            cluster::delta(before, m, closed, &sel) >= 1
        })?;
        for (metric, want) in [
            ("istio_tcp_connections_opened_total", 1),
            (closed, 1),
            ("istio_tcp_sent_bytes_total", n),
            ("istio_tcp_received_bytes_total", n),
        ] {
            assert_eq!(
                cluster::delta(before, &after, metric, &sel),
                want,
                "{metric}{{{reporter_label}}} on {ip}:\n{after}"
            );
        }
        let lines: Vec<&str> = after
            .lines()
            .filter(|l| l.starts_with(&format!("{closed}{{")) && l.contains(&reporter_label))
            .collect();
        let [line] = lines[..] else {
            bail!("one {closed} series with {reporter_label} expected on {ip}, got {lines:#?}");
        };
        let labels = labels_of(line);
        for (key, want) in [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "demo"),
            ("source_principal", CLIENT_ID),
            ("source_app", "shop-client"),
            ("destination_workload", "server-b"),
            ("destination_workload_namespace", "demo"),
            ("destination_principal", SERVER_ID),
            ("destination_app", "web"),
            ("connection_security_policy", "mutual_tls"),
        ] {
            assert_eq!(
                labels.get(key).copied(),
                Some(want),
                "{key} on {ip} ({reporter}): {line}"
            );
        }
    }
    Ok(())
}
