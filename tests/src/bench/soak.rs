//! The soak (`cargo xtask soak --minutes N`, `nm-bench soak`): mixed traffic through the bench
//! lab for a long time, the agents sampled every few seconds, and a verdict on whether their
//! memory, file descriptors, threads and tasks stay flat and their error counters stay still.
//! Method and criteria: docs/performance.md, "Soak".
//!
//! - **Lab**: the bench lab's topology under a prefix of its own ([`PREFIX`]: `nm-bench down`
//!   never ends a soak; a soak refuses to start beside a running bench lab or soak, and the
//!   bench refuses to start beside a soak), from a copy of its file in `OUT/files/` that
//!   includes a policy file the soak rewrites every [`Options::policy_every`] (two forms that
//!   allow the same traffic), so the agents reload their policies under load.
//! - **Traffic** ([`super::load::mix`], one process in `client-a`'s pod): per destination (same
//!   node `server-a`, cross node `server-b`) kept-alive request/response connections (one for
//!   the whole run, one renewed every 20 s), connection churn at 100 per second, and a 2 s bulk
//!   burst every 10 s alternating destinations.
//! - **Samples**, per agent: `VmRSS` and `Threads` (`/proc/PID/status`), open fds
//!   (`/proc/PID/fd`), and from its `/metrics`: tokio tasks (`nodemesh_runtime_alive_tasks`),
//!   pool connections and streams, connections done (`istio_tcp_connections_closed_total`),
//!   policy reloads, and the error counters of [`ERROR_COUNTERS`].
//! - **Output** in `OUT` (default `target/soak`): `report.md`, `report.json`, `soak.svg`.

use crate::bench::report::median;
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    Setup, catch_interrupts, claim, generator, interrupted,
    plot::{self, LinePanel, Series},
    report::{load_average, utc_minute},
    setup, teardown,
};
use crate::lab::Lab;

/// Runs shorter than this are not judged on memory (the warm-up would dominate).
pub const MIN_JUDGED: Duration = Duration::from_secs(120);
/// A resource is flat when the median of the last third of the load is at most the median of
/// the second third times `1 + FLAT_GROWTH`, plus the resource's slack ([`Resource::slack`]).
pub const FLAT_GROWTH: f64 = 0.10;
/// Connection churn may fail this share of its attempts (a connect timing out on a loaded
/// machine); kept-alive exchanges and bulk bursts may not fail at all.
pub const CHURN_FAILURE_SHARE: f64 = 0.001;
/// The agents' counters that must not move during a soak: (label, metric, label filter).
pub const ERROR_COUNTERS: [(&str, &str, &str); 9] = [
    (
        "tls_handshake_failures",
        "nodemesh_tls_handshake_failures_total",
        "",
    ),
    (
        "connections_failed",
        "istio_tcp_connections_failed_total",
        "",
    ),
    (
        "config_reload_failures",
        "nodemesh_config_reloads_total",
        "result=\"failure\"",
    ),
    (
        "splice_refused",
        "nodemesh_same_node_splice_refused_total",
        "",
    ),
    (
        "datapath_refused_unconfigured",
        "nodemesh_datapath_events_total",
        "event=\"refused_unconfigured\"",
    ),
    (
        "datapath_passed_unconfigured",
        "nodemesh_datapath_events_total",
        "event=\"passed_unconfigured\"",
    ),
    (
        "datapath_tunnel_stale",
        "nodemesh_datapath_events_total",
        "event=\"refused_tunnel_stale\"",
    ),
    (
        "datapath_orig_dst_failed",
        "nodemesh_datapath_events_total",
        "event=\"orig_dst_store_failed\"",
    ),
    (
        "datapath_tuple_map_failed",
        "nodemesh_datapath_events_total",
        "event=\"tuple_map_update_failed\"",
    ),
];

/// The soak lab's prefix: a lab of its own (namespaces `nm-soak-…`, cgroup `<cgroup2>/nm-soak`),
/// so that `nm-bench down` (which removes the bench lab whoever runs it) never ends a soak. A soak
/// refuses to start while the bench lab runs, and the bench refuses while a soak runs.
pub const PREFIX: &str = "nm-soak";

/// What `nm-bench soak` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the traffic runs.
    pub duration: Duration,
    /// How often the agents are sampled.
    pub interval: Duration,
    /// How often the policy file is rewritten.
    pub policy_every: Duration,
    /// The lab file to copy (default `tests/lab/bench.yaml`).
    pub config: PathBuf,
    /// Where the report goes (default `target/soak`); the lab's state is in `OUT/lab`.
    pub out: PathBuf,
    /// The lab's prefix (default the bench's; tests use their own).
    pub prefix: String,
}

impl Options {
    pub fn new(workspace: &Path, duration: Duration) -> Self {
        Self {
            duration,
            interval: Duration::from_secs(5),
            policy_every: Self::policy_every_for(duration),
            config: workspace.join("tests/lab/bench.yaml"),
            out: workspace.join("target/soak"),
            prefix: PREFIX.to_owned(),
        }
    }

    /// Once a minute, but at least three changes in a short run.
    pub fn policy_every_for(duration: Duration) -> Duration {
        (duration / 4).clamp(Duration::from_secs(5), Duration::from_secs(60))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the traffic starts (the lab just up).
    Idle,
    Load,
    /// A while after the traffic ended.
    After,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Load => "load",
            Phase::After => "after",
        }
    }
}

/// One agent at one moment.
#[derive(Clone, Debug, Default)]
pub struct AgentSample {
    pub rss_kb: u64,
    pub fds: u64,
    pub threads: u64,
    /// Tokio tasks alive (`nodemesh_runtime_alive_tasks`), if the agent exports it.
    pub tasks: Option<u64>,
    pub pool_connections: u64,
    pub pool_streams: u64,
    /// `istio_tcp_connections_closed_total`, every series.
    pub connections_closed: u64,
    /// `nodemesh_config_reloads_total{result="success"}`.
    pub reloads: u64,
    /// [`ERROR_COUNTERS`] by label.
    pub errors: BTreeMap<&'static str, u64>,
}

impl AgentSample {
    fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "rss_kb": self.rss_kb, "fds": self.fds, "threads": self.threads, "tasks": self.tasks,
            "pool_connections": self.pool_connections, "pool_streams": self.pool_streams,
            "connections_closed": self.connections_closed, "reloads": self.reloads,
            "errors": self.errors,
        })
    }
}

/// Every agent at one moment, and the traffic's counters so far.
#[derive(Clone, Debug)]
pub struct Tick {
    /// Seconds since the traffic started (negative: before).
    pub t_s: f64,
    pub phase: Phase,
    pub agents: Vec<AgentSample>,
    /// The generator's last counters ([`super::load::MixCounters`]).
    pub client: serde_json::Value,
}

/// One agent to sample: its node, pid and stats address (in the node's namespace).
struct Probe {
    node: String,
    pid: libc::pid_t,
    netns: PathBuf,
    stats: SocketAddr,
}

fn status_field(pid: libc::pid_t, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("agent {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn sample(p: &Probe) -> Result<AgentSample> {
    let fds = fs::read_dir(format!("/proc/{}/fd", p.pid))
        .with_context(|| format!("agent {} ({}) is gone", p.pid, p.node))?
        .count() as u64;
    let (status, text) = crate::http_in_netns(&p.netns, p.stats, "GET", "/metrics")
        .with_context(|| format!("scraping the agent of {}", p.node))?;
    ensure!(
        status == 200,
        "{}'s /metrics answered {status}: {text}",
        p.node
    );
    let sum = |name: &str, labels: &[&str]| crate::metric_sum(&text, name, labels);
    let errors = ERROR_COUNTERS
        .iter()
        .map(|(label, metric, filter)| {
            let filter: Vec<&str> = (!filter.is_empty())
                .then_some(*filter)
                .into_iter()
                .collect();
            (*label, sum(metric, &filter))
        })
        .collect();
    Ok(AgentSample {
        rss_kb: status_field(p.pid, "VmRSS:")?,
        fds,
        threads: status_field(p.pid, "Threads:")?,
        tasks: text
            .contains("nodemesh_runtime_alive_tasks")
            .then(|| sum("nodemesh_runtime_alive_tasks", &[])),
        pool_connections: sum("nodemesh_pool_connections", &[]),
        pool_streams: sum("nodemesh_pool_streams", &[]),
        connections_closed: sum("istio_tcp_connections_closed_total", &[]),
        reloads: sum("nodemesh_config_reloads_total", &["result=\"success\""]),
        errors,
    })
}

/// The two policy files the soak alternates: both allow exactly the soak's traffic (the
/// client's identity to the servers' port), so a reload must never break a connection.
fn policy_text(form: usize) -> String {
    let ports = if form.is_multiple_of(2) {
        format!("[\"{}\"]", super::MESH_PORT)
    } else {
        format!("[\"{}\", \"{}\"]", super::MESH_PORT, super::RAW_PORT)
    };
    format!(
        "# Written by `nm-bench soak` (form {form}); rewritten while the soak runs, always \
         allowing the\n# same traffic, so the agents reload their policies under load.\n\
         apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: soak-allow-clients\n  namespace: bench\nspec:\n  selector:\n    matchLabels:\n      \
         app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: \
         [\"cluster.local/ns/bench/sa/client\"]\n    to:\n    - operation:\n        ports: \
         {ports}\n"
    )
}

const POLICY_FILE: &str = "soak-policies.yaml";

/// Writes the policy file atomically (the agents poll it: never let them read half a file).
fn write_policy(dir: &Path, form: usize) -> Result<()> {
    let tmp = dir.join(format!(".{POLICY_FILE}.tmp"));
    fs::write(&tmp, policy_text(form))?;
    fs::rename(&tmp, dir.join(POLICY_FILE))
        .with_context(|| format!("cannot replace {}", dir.join(POLICY_FILE).display()))
}

/// Copies the lab file into `dir` with its namespaces renamed to `prefix` and an `include` of
/// the soak's policy file; returns the copy's path.
fn lab_files(config: &Path, prefix: &str, dir: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string(config)
        .with_context(|| format!("cannot read the lab file {}", config.display()))?;
    ensure!(
        !text.lines().any(|l| l.starts_with("include:")),
        "{} already includes other files: the soak adds its own policy file",
        config.display()
    );
    let text = text.replace(
        &format!("/run/netns/{}-", super::PREFIX),
        &format!("/run/netns/{prefix}-"),
    );
    let mut out = String::new();
    let mut added = false;
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if !added && line.starts_with("kind: LocalCluster") {
            out.push_str(&format!("include:\n- {POLICY_FILE}\n"));
            added = true;
        }
    }
    ensure!(
        added,
        "{} is not a LocalCluster file (no `kind: LocalCluster` line)",
        config.display()
    );
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_policy(dir, 0)?;
    let lab_file = dir.join("soak.yaml");
    fs::write(&lab_file, out)?;
    Ok(lab_file)
}

/// Sleeps until `deadline` in short steps; fails when interrupted (Ctrl-C).
fn sleep_until(deadline: Instant) -> Result<()> {
    loop {
        ensure!(
            !interrupted(),
            "interrupted (the soak lab is being taken down)"
        );
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(200)));
    }
}

/// `nm-bench soak`: brings the lab up, runs the traffic for `opts.duration` while sampling,
/// always takes the lab down, writes the report and fails when the verdict does.
pub fn run(opts: &Options) -> Result<()> {
    ensure!(
        opts.duration >= Duration::from_secs(10),
        "a soak runs for 10 seconds at least"
    );
    ensure!(
        opts.interval >= Duration::from_secs(1) && opts.interval * 3 <= opts.duration,
        "the sampling interval must be at least 1 s and at most a third of the run"
    );
    let lab = Lab::new(&opts.prefix, opts.out.join("lab"))?;
    catch_interrupts();
    // Tests give a prefix of their own and run beside whatever runs.
    let bench = Lab::new(super::PREFIX, PathBuf::new())?;
    ensure!(
        opts.prefix != PREFIX || !bench.is_running()?,
        "the bench lab `{}` is up (`nm-bench up`, or a benchmark running): a soak beside it would \
         distort both; run the soak when it is down; nothing was changed",
        super::PREFIX
    );
    ensure!(
        !lab.is_running()?,
        "a soak is running (lab `{}`): wait for it to end or stop it with Ctrl-C; nothing was \
         changed",
        lab.prefix()
    );
    claim(&lab)?;
    let files = opts.out.join("files");
    let lab_file = lab_files(&opts.config, &opts.prefix, &files)?;
    let started = Instant::now();
    let load_before = load_average();
    let s = setup(&lab, &lab_file)?;
    let mut mix: Option<Child> = None;
    let result = drive(&lab, &s, opts, &files, &mut mix);
    if let Some(mut c) = mix {
        let _ = c.kill();
        let _ = c.wait();
    }
    let Setup { servers, .. } = s;
    for mut c in servers {
        let _ = c.kill();
        let _ = c.wait();
    }
    // This call made the lab: it always takes it down.
    let down = teardown(&lab);
    let (ticks, nodes, changes) = result?;
    down.context("soak lab teardown")?;
    let report = SoakReport {
        opts: opts.clone(),
        nodes,
        ticks,
        policy_changes: changes,
        finished_utc: utc_minute(std::time::SystemTime::now()),
        took: started.elapsed(),
        load: (load_before, load_average()),
    };
    let verdict = report.write(&opts.out)?;
    ensure!(
        verdict,
        "the soak failed its verdict: see {}",
        opts.out.join("report.md").display()
    );
    Ok(())
}

type Driven = (Vec<Tick>, Vec<String>, usize);

fn drive(
    lab: &Lab,
    s: &Setup,
    opts: &Options,
    files: &Path,
    mix: &mut Option<Child>,
) -> Result<Driven> {
    let topo = lab.status()?.context("the soak lab has no lab.json")?;
    let nodes = topo["nodes"].as_array().context("lab.json has no nodes")?;
    ensure!(
        nodes.len() == s.agents.len(),
        "{} nodes but {} agents",
        nodes.len(),
        s.agents.len()
    );
    let mut probes = Vec::new();
    for (n, &pid) in nodes.iter().zip(&s.agents) {
        let get = |k: &str| n[k].as_str().with_context(|| format!("a node without {k}"));
        let port = get("metrics_url")?
            .trim_start_matches("http://")
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .context("a node's metrics_url without a port")?;
        probes.push(Probe {
            node: get("name")?.to_owned(),
            pid,
            netns: get("netns")?.into(),
            stats: SocketAddr::new(get("ip")?.parse()?, port),
        });
    }
    let names = probes.iter().map(|p| p.node.clone()).collect();
    let sample_all = |t_s: f64, phase: Phase, client: serde_json::Value| -> Result<Tick> {
        Ok(Tick {
            t_s,
            phase,
            agents: probes.iter().map(sample).collect::<Result<_>>()?,
            client,
        })
    };
    let client_path = s
        .paths
        .iter()
        .find(|p| p.name == "mesh_cross_node")
        .context("no cross-node path")?;
    let dst = |name: &str| -> Result<String> {
        Ok(s.paths
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no path {name}"))?
            .dst
            .to_string())
    };
    let mut ticks = vec![sample_all(0.0, Phase::Idle, serde_json::json!({}))?];
    print_tick(&ticks[0], &probes);
    let secs = opts.duration.as_secs_f64();
    let mut child = generator(
        &client_path.cgroup,
        &client_path.netns,
        "mix",
        &[
            dst("mesh_same_node")?,
            dst("mesh_cross_node")?,
            format!("{secs}"),
        ],
    )?
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .context("cannot start the soak's traffic")?;
    let stdout = child.stdout.take().context("the traffic's stdout")?;
    *mix = Some(child);
    let client = Arc::new(Mutex::new(serde_json::json!({})));
    let reader = {
        let client = client.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Ok(mut c) = client.lock()
                {
                    *c = v;
                }
            }
        })
    };
    let latest = || client.lock().map(|c| c.clone()).unwrap_or_default();
    let start = Instant::now();
    let end = start + opts.duration;
    let mut changes = 0;
    let mut next_policy = start + opts.policy_every;
    let mut k = 1u32;
    println!(
        "soak: {} s of mixed traffic, sampling every {} s (Ctrl-C stops it and takes the lab down)",
        secs,
        opts.interval.as_secs_f64()
    );
    loop {
        let next = start + opts.interval * k;
        if next > end {
            break;
        }
        sleep_until(next)?;
        k += 1;
        if let Some(c) = mix.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("the soak's traffic generator exited early ({status}); see its error above");
        }
        if Instant::now() >= next_policy {
            changes += 1;
            write_policy(files, changes)?;
            next_policy += opts.policy_every;
        }
        let tick = sample_all(start.elapsed().as_secs_f64(), Phase::Load, latest())?;
        print_tick(&tick, &probes);
        ticks.push(tick);
    }
    // The generator stops by itself at the end of the run.
    let wait_until = end + Duration::from_secs(60);
    let status = loop {
        if let Some(c) = mix.as_mut()
            && let Some(status) = c.try_wait()?
        {
            break status;
        }
        ensure!(
            Instant::now() < wait_until,
            "the soak's traffic did not stop within 60 s of its end: a connection may hang in \
             an agent (see {})",
            lab.state_dir().display()
        );
        sleep_until(Instant::now() + Duration::from_millis(100))?;
    };
    *mix = None;
    let _ = reader.join();
    ensure!(
        status.success(),
        "the soak's traffic generator failed ({status})"
    );
    let last = ticks.last().map(|t| t.t_s).unwrap_or_default();
    let finals = latest();
    ensure!(
        finals["done"] == true,
        "the soak's traffic generator ended without its final counters"
    );
    // Memory once the load is gone (issue 15: RSS 10 s after the load).
    let after = Duration::from_secs(10).min(opts.duration / 2);
    sleep_until(Instant::now() + after)?;
    let tick = sample_all(last.max(secs) + after.as_secs_f64(), Phase::After, finals)?;
    print_tick(&tick, &probes);
    ticks.push(tick);
    Ok((ticks, names, changes))
}

fn print_tick(t: &Tick, probes: &[Probe]) {
    let agents: Vec<String> = t
        .agents
        .iter()
        .zip(probes)
        .map(|(a, p)| {
            format!(
                "{} rss {:.1} MiB fds {} threads {} tasks {} errors {}",
                p.node,
                a.rss_kb as f64 / 1024.0,
                a.fds,
                a.threads,
                a.tasks.map_or("–".into(), |v| v.to_string()),
                a.error_total()
            )
        })
        .collect();
    println!(
        "  {:>7.1} s {:<5} {}",
        t.t_s,
        t.phase.as_str(),
        agents.join(" | ")
    );
}

/// A sampled resource of the agents and how much slack its flatness check allows.
#[derive(Clone, Copy, Debug)]
pub enum Resource {
    Rss,
    Fds,
    Threads,
    Tasks,
}

impl Resource {
    pub const ALL: [Resource; 4] = [
        Resource::Rss,
        Resource::Fds,
        Resource::Threads,
        Resource::Tasks,
    ];

    fn name(self) -> &'static str {
        match self {
            Resource::Rss => "RSS (MiB)",
            Resource::Fds => "open fds",
            Resource::Threads => "threads",
            Resource::Tasks => "tokio tasks",
        }
    }

    fn value(self, a: &AgentSample) -> Option<f64> {
        match self {
            Resource::Rss => Some(a.rss_kb as f64 / 1024.0),
            Resource::Fds => Some(a.fds as f64),
            Resource::Threads => Some(a.threads as f64),
            Resource::Tasks => a.tasks.map(|t| t as f64),
        }
    }

    /// Absolute slack on top of [`FLAT_GROWTH`]: what moves with the connections in flight at
    /// the moment of a sample rather than with time.
    pub fn slack(self) -> f64 {
        match self {
            Resource::Rss => 1.0,
            Resource::Fds => 8.0,
            Resource::Threads => 2.0,
            Resource::Tasks => 16.0,
        }
    }
}

/// Least-squares slope of `points` (y per x unit).
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One line of the verdict.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub measured: String,
    pub limit: String,
    /// `None`: not judged (say why in `measured`).
    pub pass: Option<bool>,
}

/// A finished soak: its samples and what they say.
pub struct SoakReport {
    pub opts: Options,
    pub nodes: Vec<String>,
    pub ticks: Vec<Tick>,
    pub policy_changes: usize,
    pub finished_utc: String,
    pub took: Duration,
    pub load: (Option<f64>, Option<f64>),
}

impl SoakReport {
    /// `30 min`, or `20 s` for runs under two minutes.
    fn length(&self) -> String {
        let secs = self.opts.duration.as_secs_f64();
        if secs < 120.0 {
            format!("{secs:.0} s")
        } else {
            format!("{:.0} min", secs / 60.0)
        }
    }

    fn load_ticks(&self) -> Vec<&Tick> {
        self.ticks
            .iter()
            .filter(|t| t.phase == Phase::Load)
            .collect()
    }

    /// The load's samples split by time into thirds: (second third, last third).
    fn thirds(&self) -> (Vec<&Tick>, Vec<&Tick>) {
        let d = self.opts.duration.as_secs_f64();
        let load = self.load_ticks();
        let second = load
            .iter()
            .copied()
            .filter(|t| t.t_s > d / 3.0 && t.t_s <= 2.0 * d / 3.0)
            .collect();
        let last = load
            .iter()
            .copied()
            .filter(|t| t.t_s > 2.0 * d / 3.0)
            .collect();
        (second, last)
    }

    /// RSS growth over the last two thirds of the load, MiB per hour, per agent.
    pub fn rss_slope_mib_per_h(&self, agent: usize) -> Option<f64> {
        let d = self.opts.duration.as_secs_f64();
        let points: Vec<(f64, f64)> = self
            .load_ticks()
            .iter()
            .filter(|t| t.t_s > d / 3.0)
            .filter_map(|t| {
                let a = t.agents.get(agent)?;
                Some((t.t_s / 3600.0, a.rss_kb as f64 / 1024.0))
            })
            .collect();
        slope(&points)
    }

    pub fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let (second, last) = self.thirds();
        let judged = self.opts.duration >= MIN_JUDGED && second.len() >= 3 && last.len() >= 3;
        for (i, node) in self.nodes.iter().enumerate() {
            for r in Resource::ALL {
                let med = |ticks: &[&Tick]| {
                    median(
                        ticks
                            .iter()
                            .filter_map(|t| t.agents.get(i).and_then(|a| r.value(a)))
                            .collect(),
                    )
                };
                let name = format!("{node}: {} flat", r.name());
                let limit = format!(
                    "last third's median ≤ second third's × {:.2} + {}",
                    1.0 + FLAT_GROWTH,
                    r.slack()
                );
                match (judged, med(&second[..]), med(&last[..])) {
                    (true, Some(a), Some(b)) => {
                        let max = a * (1.0 + FLAT_GROWTH) + r.slack();
                        checks.push(Check {
                            name,
                            measured: format!("{a:.1} → {b:.1} ({:+.1}%)", (b / a - 1.0) * 100.0),
                            limit: format!("≤ {max:.1} ({limit})"),
                            pass: Some(b <= max),
                        });
                    }
                    (true, ..) => checks.push(Check {
                        name,
                        measured: "not exported by the agent".into(),
                        limit,
                        pass: None,
                    }),
                    (false, ..) => checks.push(Check {
                        name,
                        measured: format!(
                            "not judged: the run is shorter than {} s",
                            MIN_JUDGED.as_secs()
                        ),
                        limit,
                        pass: None,
                    }),
                }
            }
        }
        let (Some(first), Some(end)) = (self.ticks.first(), self.ticks.last()) else {
            return checks;
        };
        for (i, node) in self.nodes.iter().enumerate() {
            let (Some(a), Some(b)) = (first.agents.get(i), end.agents.get(i)) else {
                continue;
            };
            let moved: Vec<String> = b
                .errors
                .iter()
                .filter_map(|(k, v)| {
                    let was = a.errors.get(k).copied().unwrap_or_default();
                    (*v > was).then(|| format!("{k} +{}", v - was))
                })
                .collect();
            checks.push(Check {
                name: format!("{node}: error counters still"),
                measured: if moved.is_empty() {
                    "none moved".into()
                } else {
                    moved.join(", ")
                },
                limit: "no increase from before the load to after it".into(),
                pass: Some(moved.is_empty()),
            });
            let done = b.connections_closed.saturating_sub(a.connections_closed);
            checks.push(Check {
                name: format!("{node}: connections done"),
                measured: done.to_string(),
                limit: "> 0".into(),
                pass: Some(done > 0),
            });
            let reloads = b.reloads.saturating_sub(a.reloads);
            checks.push(Check {
                name: format!("{node}: policy reloads"),
                measured: format!("{reloads} ({} changes written)", self.policy_changes),
                limit: "≥ 1 when the policy changed".into(),
                pass: Some(self.policy_changes == 0 || reloads >= 1),
            });
        }
        let c = &end.client;
        let n = |k: &str| c[k].as_u64().unwrap_or_default();
        checks.push(Check {
            name: "keep-alive exchanges without a failure".into(),
            measured: format!("{} ok, {} failed", n("rr_ok"), n("rr_failed")),
            limit: "0 failed, > 0 ok".into(),
            pass: Some(n("rr_failed") == 0 && n("rr_ok") > 0),
        });
        checks.push(Check {
            name: "bulk bursts without a failure".into(),
            measured: format!(
                "{} ok ({:.2} GB), {} failed",
                n("bulk_ok"),
                n("bulk_bytes") as f64 / 1e9,
                n("bulk_failed")
            ),
            limit: "0 failed, > 0 ok".into(),
            pass: Some(n("bulk_failed") == 0 && n("bulk_ok") > 0),
        });
        let (ok, failed) = (n("conn_ok"), n("conn_failed"));
        checks.push(Check {
            name: "connection churn".into(),
            measured: format!("{ok} ok, {failed} failed"),
            limit: format!("≤ {}% failed, > 0 ok", CHURN_FAILURE_SHARE * 100.0),
            pass: Some(ok > 0 && (failed as f64) <= CHURN_FAILURE_SHARE * (ok + failed) as f64),
        });
        checks
    }

    pub fn pass(checks: &[Check]) -> bool {
        checks.iter().all(|c| c.pass != Some(false))
    }

    pub fn json(&self) -> serde_json::Value {
        let checks = self.checks();
        serde_json::json!({
            "pass": Self::pass(&checks),
            "checks": checks.iter().map(|c| serde_json::json!({
                "check": c.name, "measured": c.measured, "limit": c.limit, "pass": c.pass,
            })).collect::<Vec<_>>(),
            "nodes": self.nodes,
            "rss_slope_mib_per_h": (0..self.nodes.len())
                .map(|i| self.rss_slope_mib_per_h(i))
                .collect::<Vec<_>>(),
            "run": {
                "duration_s": self.opts.duration.as_secs_f64(),
                "interval_s": self.opts.interval.as_secs_f64(),
                "policy_every_s": self.opts.policy_every.as_secs_f64(),
                "policy_changes": self.policy_changes,
                "finished_utc": self.finished_utc,
                "took_s": self.took.as_secs_f64(),
                "load_before": self.load.0, "load_after": self.load.1,
                "machine": super::report::machine(),
            },
            "samples": self.ticks.iter().map(|t| serde_json::json!({
                "t_s": t.t_s, "phase": t.phase.as_str(),
                "agents": t.agents.iter().map(AgentSample::json).collect::<Vec<_>>(),
                "client": t.client,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn markdown(&self) -> String {
        let checks = self.checks();
        let pass = Self::pass(&checks);
        let mut s = format!(
            "# nodemesh soak ({} of mixed traffic, a sample every {} s; finished {}; load \
             average {} before, {} after)\n\n{}\n\n**Verdict: {}**\n\n",
            self.length(),
            self.opts.interval.as_secs_f64(),
            self.finished_utc,
            self.load.0.map_or("?".into(), |l| format!("{l:.1}")),
            self.load.1.map_or("?".into(), |l| format!("{l:.1}")),
            super::report::machine(),
            if pass { "PASS" } else { "FAIL" },
        );
        if let Some(end) = self.ticks.last() {
            let c = &end.client;
            let n = |k: &str| c[k].as_u64().unwrap_or_default();
            s.push_str(&format!(
                "Traffic from `client-a` to `server-a` (same node) and `server-b` (cross node): \
                 {} keep-alive exchanges ({} connections renewed), {} new connections, {} bulk \
                 bursts ({:.2} GB); the policy file rewritten {} times.\n\n",
                n("rr_ok"),
                n("renewed"),
                n("conn_ok"),
                n("bulk_ok"),
                n("bulk_bytes") as f64 / 1e9,
                self.policy_changes,
            ));
        }
        s.push_str("| check | measured | limit | |\n|---|---|---|---|\n");
        for c in &checks {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                c.name,
                c.measured,
                c.limit,
                match c.pass {
                    Some(true) => "pass",
                    Some(false) => "FAIL",
                    None => "–",
                }
            ));
        }
        s.push('\n');
        for (i, node) in self.nodes.iter().enumerate() {
            let idle = self.ticks.first().and_then(|t| t.agents.get(i));
            let after = self
                .ticks
                .iter()
                .rev()
                .find(|t| t.phase == Phase::After)
                .and_then(|t| t.agents.get(i));
            if let (Some(idle), Some(after)) = (idle, after) {
                s.push_str(&format!(
                    "- {node}: RSS idle {:.1} MiB, after the load {:.1} MiB ({:.2}× idle); RSS \
                     slope over the last two thirds {}.\n",
                    idle.rss_kb as f64 / 1024.0,
                    after.rss_kb as f64 / 1024.0,
                    after.rss_kb as f64 / idle.rss_kb.max(1) as f64,
                    self.rss_slope_mib_per_h(i)
                        .map_or("–".into(), |v| format!("{v:+.1} MiB/h")),
                ));
            }
        }
        s.push_str(
            "\nOver time (`t`: seconds since the traffic started; RSS in MiB; `conns`: \
             connections the agent finished; `errors`: the sum of its error counters; at most \
             40 rows):\n\n| t (s) | phase |",
        );
        for node in &self.nodes {
            s.push_str(&format!(
                " {node} RSS | fds | threads | tasks | pool conns/streams | conns | errors |"
            ));
        }
        s.push_str(" client ok / failed |\n|---|---|");
        for _ in &self.nodes {
            s.push_str("---|---|---|---|---|---|---|");
        }
        s.push_str("---|\n");
        let step = self.ticks.len().div_ceil(40).max(1);
        for (j, t) in self.ticks.iter().enumerate() {
            if j % step != 0 && j + 1 != self.ticks.len() {
                continue;
            }
            s.push_str(&format!("| {:.0} | {} |", t.t_s, t.phase.as_str()));
            for a in &t.agents {
                s.push_str(&format!(
                    " {:.1} | {} | {} | {} | {}/{} | {} | {} |",
                    a.rss_kb as f64 / 1024.0,
                    a.fds,
                    a.threads,
                    a.tasks.map_or("–".into(), |v| v.to_string()),
                    a.pool_connections,
                    a.pool_streams,
                    a.connections_closed,
                    a.error_total(),
                ));
            }
            let n = |k: &str| t.client[k].as_u64().unwrap_or_default();
            s.push_str(&format!(
                " {} / {} |\n",
                n("rr_ok") + n("conn_ok") + n("bulk_ok"),
                n("rr_failed") + n("conn_failed") + n("bulk_failed")
            ));
        }
        s.push_str(
            "\nChart: `soak.svg` (RSS, open fds, threads and tokio tasks per agent over time).\n",
        );
        s
    }

    /// RSS, fds, threads and tasks per agent over time (minutes).
    pub fn chart(&self) -> Result<String> {
        let panels: Vec<LinePanel> = Resource::ALL
            .iter()
            .map(|&r| LinePanel {
                title: format!("{} per agent", r.name()),
                y_desc: r.name().to_owned(),
                series: self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, node)| Series {
                        label: node.clone(),
                        points: self
                            .ticks
                            .iter()
                            .filter_map(|t| Some((t.t_s / 60.0, r.value(t.agents.get(i)?)?)))
                            .collect(),
                    })
                    .collect(),
                reference: None,
                legend_lower_right: true,
            })
            .collect();
        plot::lines(
            &format!(
                "nodemesh soak, {} of mixed traffic ({})",
                self.length(),
                self.finished_utc
            ),
            "minutes since the traffic started (the last point: after the load)",
            None,
            &panels,
            900,
            240,
        )
    }

    /// Writes `report.md`, `report.json` and `soak.svg` into `out`; returns the verdict.
    pub fn write(&self, out: &Path) -> Result<bool> {
        fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let md = self.markdown();
        fs::write(out.join("report.md"), &md)?;
        let json = self.json();
        fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&json)? + "\n",
        )?;
        fs::write(out.join("soak.svg"), self.chart()?)?;
        println!("\n{md}");
        println!(
            "written: {}, report.json and soak.svg",
            out.join("report.md").display()
        );
        Ok(json["pass"] == true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(rss_mib: f64, errors: u64, closed: u64, reloads: u64) -> AgentSample {
        AgentSample {
            rss_kb: (rss_mib * 1024.0) as u64,
            fds: 40,
            threads: 4,
            tasks: Some(20),
            pool_connections: 1,
            pool_streams: 2,
            connections_closed: closed,
            reloads,
            errors: [("tls_handshake_failures", errors)].into_iter().collect(),
        }
    }

    /// A 9-minute soak sampled every 30 s whose RSS follows `rss(t_min)`.
    fn soak(rss: impl Fn(f64) -> f64, late_error: bool) -> SoakReport {
        let mut ticks = vec![Tick {
            t_s: 0.0,
            phase: Phase::Idle,
            agents: vec![agent(12.0, 1, 0, 0)],
            client: serde_json::json!({}),
        }];
        for k in 1..=18u32 {
            let t = f64::from(k) * 30.0;
            ticks.push(Tick {
                t_s: t,
                phase: Phase::Load,
                agents: vec![agent(rss(t / 60.0), 1, u64::from(k) * 100, 3)],
                client: serde_json::json!({}),
            });
        }
        ticks.push(Tick {
            t_s: 550.0,
            phase: Phase::After,
            agents: vec![agent(20.0, 1 + u64::from(late_error), 1800, 9)],
            client: serde_json::json!({
                "rr_ok": 1000, "rr_failed": 0, "conn_ok": 5000, "conn_failed": 2,
                "bulk_ok": 50, "bulk_failed": 0, "bulk_bytes": 5_000_000_000u64, "done": true,
            }),
        });
        let mut opts = Options::new(Path::new("/w"), Duration::from_secs(540));
        opts.interval = Duration::from_secs(30);
        SoakReport {
            opts,
            nodes: vec!["node-a".into()],
            ticks,
            policy_changes: 8,
            finished_utc: "2026-12-07T03:00Z".into(),
            took: Duration::from_secs(600),
            load: (Some(1.0), Some(2.0)),
        }
    }

    fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    #[test]
    fn flat_memory_after_warm_up_passes() {
        // Grows in the first third (warm-up), then flat with noise.
        let r = soak(
            |m| {
                if m < 3.0 {
                    12.0 + m * 3.0
                } else {
                    21.0 + (m * 7.0).sin() * 0.3
                }
            },
            false,
        );
        let checks = r.checks();
        assert_eq!(check(&checks, "node-a: RSS (MiB) flat").pass, Some(true));
        assert_eq!(
            check(&checks, "node-a: error counters still").pass,
            Some(true)
        );
        assert_eq!(check(&checks, "node-a: connections done").measured, "1800");
        assert_eq!(
            check(&checks, "connection churn").pass,
            Some(true),
            "2 of 5002 is below 0.1%"
        );
        assert!(SoakReport::pass(&checks));
        assert!(r.rss_slope_mib_per_h(0).is_some_and(|s| s.abs() < 10.0));
        let md = r.markdown();
        assert!(md.contains("**Verdict: PASS**"), "{md}");
        assert!(md.contains("| 540 | load |"), "{md}");
    }

    #[test]
    fn growing_memory_or_a_new_error_fails() {
        // 2 MiB a minute for the whole run: the last third is 6 MiB above the second.
        let r = soak(|m| 12.0 + 2.0 * m, false);
        let checks = r.checks();
        let rss = check(&checks, "node-a: RSS (MiB) flat");
        assert_eq!(rss.pass, Some(false), "{rss:?}");
        assert!(!SoakReport::pass(&checks));
        assert!(
            r.rss_slope_mib_per_h(0)
                .is_some_and(|s| (s - 120.0).abs() < 1.0)
        );
        let r = soak(|_| 20.0, true);
        let checks = r.checks();
        let errors = check(&checks, "node-a: error counters still");
        assert_eq!(errors.pass, Some(false));
        assert_eq!(errors.measured, "tls_handshake_failures +1");
        assert!(r.markdown().contains("**Verdict: FAIL**"));
    }

    #[test]
    fn short_runs_are_not_judged_on_memory_and_the_files_parse() {
        let mut r = soak(|m| 12.0 + 2.0 * m, false);
        r.opts.duration = Duration::from_secs(60);
        let checks = r.checks();
        assert_eq!(check(&checks, "node-a: RSS (MiB) flat").pass, None);
        assert!(SoakReport::pass(&checks));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(r.write(dir.path()).expect("write"));
        let json: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(dir.path().join("report.json")).expect("json"),
        )
        .expect("parses");
        assert_eq!(json["samples"].as_array().map(Vec::len), Some(20));
        plot::check_svg(&fs::read_to_string(dir.path().join("soak.svg")).expect("svg"))
            .expect("svg");
    }

    #[test]
    fn lab_file_copy_renames_namespaces_and_includes_the_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/bench.yaml");
        let copy = lab_files(&config, "nmsoakx", dir.path()).expect("copy");
        let text = fs::read_to_string(&copy).expect("read");
        assert!(text.contains("include:\n- soak-policies.yaml\n"));
        assert!(!text.contains("/run/netns/nm-bench-"));
        assert!(text.contains("/run/netns/nmsoakx-client-a"));
        // Both policy forms load with the lab file (the agents would refuse a bad one).
        for form in 0..2 {
            write_policy(dir.path(), form).expect("policy");
            let model = mesh_agent::local_config::LocalConfigSource::new(&copy, None)
                .load()
                .unwrap_or_else(|e| panic!("form {form}: {e}"));
            assert_eq!(model.workloads().count(), 50);
        }
    }

    #[test]
    fn slope_and_median() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }
}
