//! The benchmark (`cargo xtask bench`, binary `nm-bench`): the mesh against the raw path in one
//! run, on a lab of its own (prefix `nm-bench`, topology `tests/lab/bench.yaml`, state in
//! `target/bench/lab`). Method and the latest numbers: docs/performance.md.
//!
//! Three paths, all from the `client-a` pod's network namespace:
//! - `raw`: to `server-b`'s namespace, but client and server run in the cgroup
//!   `<cgroup2>/nm-bench/raw`, outside the node cgroups the agents' connect hooks are attached
//!   to, so the kernel routes them over the same veths with no mesh;
//! - `mesh_same_node`: `client-a` → `server-a` from the pods' cgroups (through node-a's tunnel);
//! - `mesh_cross_node`: `client-a` → `server-b` (both tunnels, HBONE over mTLS between them).
//!
//! Every round runs each test on each path, in a rotating order, so slow drift of a shared
//! machine hits all paths alike; the report takes medians over rounds, and ratios to raw round
//! by round (paired).

pub mod history;
pub mod k8s_scale;
pub mod load;
pub mod plot;
pub mod report;
pub mod soak;
pub mod third_party;

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{lab::Lab, run};

/// The bench lab's prefix (namespaces `nm-bench-…`, cgroup `<cgroup2>/nm-bench`).
pub const PREFIX: &str = "nm-bench";
/// The port of the mesh paths' servers (in the server pods' cgroups).
pub const MESH_PORT: u16 = 5201;
/// The port of the raw path's server (in the raw cgroup, `server-b`'s namespace).
pub const RAW_PORT: u16 = 5202;
/// Concurrent clients of the connection-rate test.
pub const CRR_CLIENTS: usize = 8;
/// The raw path's cgroup, a sibling of the node cgroups under the lab's.
const RAW_CGROUP: &str = "raw";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set a flag ([`interrupted`]): the run notices it, stops,
/// and its drop guards take down what it started (lab, control plane, children).
pub(crate) fn catch_interrupts() {
    // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
    unsafe {
        let handler = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// How long and how often.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Also run the third-party tools (iperf3, wrk against nginx; [`third_party`]).
    pub third_party: bool,
    pub rounds: usize,
    pub stream_secs: f64,
    pub rr_secs: f64,
    pub crr_secs: f64,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                third_party: false,
                rounds: 3,
                stream_secs: 1.5,
                rr_secs: 1.0,
                crr_secs: 1.5,
            }
        } else {
            Self {
                quick,
                third_party: false,
                rounds: 7,
                stream_secs: 3.0,
                rr_secs: 2.0,
                crr_secs: 3.0,
            }
        }
    }
}

/// One measured path.
#[derive(Clone, Debug)]
pub struct PathSpec {
    pub name: &'static str,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub dst: SocketAddr,
    pub mesh: bool,
}

/// The tests of one round, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Stream1,
    Stream4,
    Rr1,
    Rr1k,
    Crr,
}

impl Test {
    pub const ALL: [Test; 5] = [
        Test::Stream1,
        Test::Stream4,
        Test::Rr1,
        Test::Rr1k,
        Test::Crr,
    ];
}

/// One run of one test on one path: the generator's JSON and what the agents did meanwhile.
#[derive(Clone, Debug)]
pub struct Sample {
    pub round: usize,
    pub path: &'static str,
    pub test: Test,
    pub result: serde_json::Value,
    /// utime + stime of both agents during the run.
    pub agent_cpu_s: f64,
    /// The largest VmRSS of one agent seen during the run.
    pub agent_rss_max_kb: u64,
}

/// Brings the bench lab up from `config`, measures, always takes it down, and writes
/// `report.md` and `report.json` into `out`.
pub fn run_bench(workspace: &Path, config: &Path, out: &Path, plan: Plan) -> Result<()> {
    let lab = Lab::new(PREFIX, workspace.join("target").join("bench").join("lab"))?;
    catch_interrupts();
    claim(&lab)?;
    // The third-party tools must be there before the lab goes up.
    let tools = plan.third_party.then(third_party::tools).transpose()?;
    let started = Instant::now();
    let load_before = report::load_average();
    let (samples, idle_kb, after_kb, third) = measure(&lab, config, plan, tools.as_ref(), out)?;
    let mut report = report::Report::new(plan, &samples, idle_kb, started.elapsed());
    report.set_rss_after_load(idle_kb, after_kb);
    report.meta = report::RunMeta {
        finished_utc: report::utc_minute(std::time::SystemTime::now()),
        load_before,
        load_after: report::load_average(),
    };
    fs::create_dir_all(out)?;
    let mut md = report.markdown();
    let mut json = report.json();
    if let Some(tp) = &third {
        md.push('\n');
        md.push_str(&tp.markdown());
        json["third_party"] = tp.json();
    }
    fs::write(out.join("report.md"), &md)?;
    fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    fs::write(out.join("paths.svg"), report.paths_chart()?)?;
    println!("\n{md}");
    println!(
        "written: {}, report.json and paths.svg",
        out.join("report.md").display()
    );
    if !plan.quick {
        // A full run joins the committed history (docs/performance.md, "History").
        let file = workspace.join(HISTORY_FILE);
        history::append(
            &file,
            history::entry(&json, git_commit(workspace).as_deref()),
        )?;
        history::draw(&file, &out.join("history.svg"))?;
        println!(
            "appended to {} (commit it with the run's notes); chart {}",
            file.display(),
            out.join("history.svg").display()
        );
    }
    Ok(())
}

/// The committed bench history, relative to the workspace ([`history`]).
pub const HISTORY_FILE: &str = "docs/bench-history.json";

/// The short commit id of the workspace's HEAD, with `+` when the tree has changes.
fn git_commit(workspace: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}+") } else { head })
}

fn check_interrupted() -> Result<()> {
    ensure!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted (the lab is being taken down)"
    );
    Ok(())
}

fn raw_cgroup(lab: &Lab) -> Result<PathBuf> {
    Ok(mesh_agent::cgroup::cgroup2_mount()?
        .join(lab.prefix())
        .join(RAW_CGROUP))
}

/// Makes the bench lab this invocation's: refuses (touching nothing) while a bench lab runs
/// (`nm-bench up`, or another run), and removes what a crashed run left behind otherwise.
fn claim(lab: &Lab) -> Result<()> {
    ensure!(
        !lab.is_running()?,
        "the bench lab `{}` is up (`nm-bench up`, or another benchmark running): take it down with \
         `target/release/nm-bench down` first; nothing was changed",
        lab.prefix()
    );
    // A soak beside the bench would distort both (the soak has a lab of its own, so that
    // `nm-bench down` never ends it).
    let soak = Lab::new(soak::PREFIX, PathBuf::new())?;
    ensure!(
        lab.prefix() != PREFIX || !soak.is_running()?,
        "a soak is running (lab `{}`, `nm-bench soak`): wait for it to end (or stop it with \
         Ctrl-C); nothing was changed",
        soak::PREFIX
    );
    teardown(lab).context("cannot clean up an earlier bench lab")
}

/// Kills what runs in the raw cgroup and removes it, then takes the lab down.
fn teardown(lab: &Lab) -> Result<()> {
    let raw = raw_cgroup(lab)?;
    if raw.is_dir() {
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            for pid in procs(&raw) {
                // SAFETY: plain syscall with integers; a stale pid at worst gets ESRCH.
                unsafe { libc::kill(pid, signal) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while !procs(&raw).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        fs::remove_dir(&raw).with_context(|| format!("cannot remove {}", raw.display()))?;
    }
    lab.down()
}

fn procs(cg: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The agents: the processes directly in the node cgroups (pods are in cgroups below them).
fn agent_pids(lab: &Lab, topo: &serde_json::Value) -> Result<Vec<libc::pid_t>> {
    let mut pids = Vec::new();
    for n in topo["nodes"].as_array().context("lab.json has no nodes")? {
        let cg = n["cgroup"].as_str().context("a node without a cgroup")?;
        let found = procs(Path::new(cg));
        ensure!(
            found.len() == 1,
            "expected one agent in {cg}, found {:?}; see the agent log in {}",
            found,
            lab.state_dir().display()
        );
        pids.extend(found);
    }
    Ok(pids)
}

/// utime + stime of `pid` in seconds (all its threads).
fn cpu_seconds(pid: libc::pid_t) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("agent {pid} is gone"))?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("unexpected /proc/<pid>/stat")
    };
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(total as f64 / hz as f64)
}

fn agents_cpu(pids: &[libc::pid_t]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// VmRSS of `pid` in KiB.
fn rss_kb(pid: libc::pid_t) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("agent {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn max_rss_kb(pids: &[libc::pid_t]) -> Result<u64> {
    let mut max = 0;
    for &p in pids {
        max = max.max(rss_kb(p)?);
    }
    Ok(max)
}

/// `nm-bench VERB CGROUP NETNS ARGS…` as a child process.
fn generator(cgroup: &Path, netns: &Path, verb: &str, args: &[String]) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(verb).arg(cgroup).arg(netns).args(args);
    Ok(cmd)
}

/// Starts a server and waits for its `ready`.
fn start_server(cgroup: &Path, netns: &Path, addr: SocketAddr) -> Result<Child> {
    let mut child = generator(cgroup, netns, "serve", &[addr.to_string()])?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start a bench server")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    // The server prints `ready` once it listens, or exits with an error (EOF here).
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the bench server on {addr} did not start (see its error above)");
    }
    Ok(child)
}

fn pod(topo: &serde_json::Value, name: &str) -> Result<(PathBuf, PathBuf, String)> {
    let p = topo["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .with_context(|| format!("no pod {name} in the bench lab file"))?;
    let s = |k: &str| -> Result<String> {
        Ok(p[k]
            .as_str()
            .with_context(|| format!("pod {name} has no {k}"))?
            .to_owned())
    };
    Ok((s("cgroup")?.into(), s("netns")?.into(), s("ip")?))
}

/// Connection-rate tests churn through ephemeral ports: reuse TIME_WAIT ports and widen the
/// range in every namespace that opens connections (pods and nodes: the agents connect too).
fn tune_namespaces(topo: &serde_json::Value) -> Result<()> {
    let netns = topo["nodes"]
        .as_array()
        .into_iter()
        .chain(topo["pods"].as_array())
        .flatten()
        .filter_map(|n| n["netns"].as_str());
    for ns in netns {
        let name = Path::new(ns)
            .file_name()
            .context("netns path")?
            .to_string_lossy()
            .into_owned();
        if name.contains("-idle-") {
            continue;
        }
        run(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
            ],
        )?;
    }
    Ok(())
}

/// The bench lab, up and serving: its agents, idle memory, servers and the three paths.
pub struct Setup {
    pub agents: Vec<libc::pid_t>,
    pub idle_kb: u64,
    pub servers: Vec<Child>,
    pub paths: Vec<PathSpec>,
}

/// Brings the bench lab up and starts the servers. On error it removes what it made: a failed
/// `Lab::up` its own part, a later error the whole lab (this call made it).
pub fn setup(lab: &Lab, config: &Path) -> Result<Setup> {
    println!("bench lab up from {} ...", config.display());
    let topo = lab.up(config).context("bench lab up")?;
    servers_and_paths(lab, &topo).map_err(|e| match teardown(lab) {
        Ok(()) => e,
        Err(down) => e.context(format!("and taking the bench lab down failed: {down:#}")),
    })
}

fn servers_and_paths(lab: &Lab, topo: &serde_json::Value) -> Result<Setup> {
    let topo = topo.clone();
    check_interrupted()?;
    tune_namespaces(&topo)?;
    let agents = agent_pids(lab, &topo)?;
    let idle_kb = max_rss_kb(&agents)?;
    println!(
        "{} workloads, agents {:?}, idle VmRSS (largest) {:.1} MB",
        topo["pods"].as_array().map_or(0, Vec::len),
        agents,
        idle_kb as f64 / 1024.0
    );
    let raw_cg = raw_cgroup(lab)?;
    fs::create_dir_all(&raw_cg)?;
    let (client_cg, client_ns, _) = pod(&topo, "client-a")?;
    let (server_a_cg, server_a_ns, server_a_ip) = pod(&topo, "server-a")?;
    let (server_b_cg, server_b_ns, server_b_ip) = pod(&topo, "server-b")?;
    let addr =
        |ip: &str, port: u16| -> Result<SocketAddr> { Ok(SocketAddr::new(ip.parse()?, port)) };
    // Servers live in the lab's cgroups (the raw one too): teardown ends them.
    let servers = vec![
        start_server(&server_a_cg, &server_a_ns, addr(&server_a_ip, MESH_PORT)?)?,
        start_server(&server_b_cg, &server_b_ns, addr(&server_b_ip, MESH_PORT)?)?,
        start_server(&raw_cg, &server_b_ns, addr(&server_b_ip, RAW_PORT)?)?,
    ];
    let paths = vec![
        PathSpec {
            name: "raw",
            cgroup: raw_cg.clone(),
            netns: client_ns.clone(),
            dst: addr(&server_b_ip, RAW_PORT)?,
            mesh: false,
        },
        PathSpec {
            name: "mesh_same_node",
            cgroup: client_cg.clone(),
            netns: client_ns.clone(),
            dst: addr(&server_a_ip, MESH_PORT)?,
            mesh: true,
        },
        PathSpec {
            name: "mesh_cross_node",
            cgroup: client_cg,
            netns: client_ns,
            dst: addr(&server_b_ip, MESH_PORT)?,
            mesh: true,
        },
    ];
    Ok(Setup {
        agents,
        idle_kb,
        servers,
        paths,
    })
}

/// `nm-bench up`: the bench lab with its servers, left running for profiling; prints how to
/// drive each path. `nm-bench down` removes it (`run` and `up` refuse to start while it runs).
pub fn up_only(workspace: &Path, config: &Path) -> Result<()> {
    let lab = Lab::new(PREFIX, workspace.join("target").join("bench").join("lab"))?;
    claim(&lab)?;
    let s = setup(&lab, config)?;
    let exe = std::env::current_exe()?;
    for p in &s.paths {
        println!(
            "{}: {} stream {} {} {} 1 10   (or rr DST SIZE SECS, crr DST CLIENTS SECS)",
            p.name,
            exe.display(),
            p.cgroup.display(),
            p.netns.display(),
            p.dst
        );
    }
    println!(
        "agents: {:?}; remove with: {} down",
        s.agents,
        exe.display()
    );
    Ok(())
}

/// `nm-bench down`: removes the bench lab (also after a crash).
pub fn down_only(workspace: &Path) -> Result<()> {
    teardown(&Lab::new(
        PREFIX,
        workspace.join("target").join("bench").join("lab"),
    )?)
}

/// How long after the last load the agents' RSS is read (issue 15: memory returns after load).
pub const RSS_AFTER_LOAD: Duration = Duration::from_secs(10);

/// Samples, the largest agent RSS idle and [`RSS_AFTER_LOAD`] after the load (KiB), and the
/// third-party results.
type Measured = (Vec<Sample>, u64, u64, Option<third_party::ThirdParty>);

fn measure(
    lab: &Lab,
    config: &Path,
    plan: Plan,
    tools: Option<&third_party::Tools>,
    out: &Path,
) -> Result<Measured> {
    let Setup {
        agents,
        idle_kb,
        mut servers,
        paths,
    } = setup(lab, config)?;
    let result = (|| -> Result<(Vec<Sample>, u64, Option<third_party::ThirdParty>)> {
        // Warm-up: the first connection of a mesh path sets up its pool connection.
        for p in &paths {
            run_one(p, Test::Rr1, 0.3, &agents)?;
        }
        let mut samples = Vec::new();
        for round in 0..plan.rounds {
            println!("round {}/{}", round + 1, plan.rounds);
            for test in Test::ALL {
                for i in 0..paths.len() {
                    let p = &paths[(i + round) % paths.len()];
                    let secs = match test {
                        Test::Stream1 | Test::Stream4 => plan.stream_secs,
                        Test::Rr1 | Test::Rr1k => plan.rr_secs,
                        Test::Crr => plan.crr_secs,
                    };
                    let (result, cpu, rss) = run_one(p, test, secs, &agents)?;
                    println!("  {:<16} {:<8} {}", p.name, format!("{test:?}"), result);
                    samples.push(Sample {
                        round,
                        path: p.name,
                        test,
                        result,
                        agent_cpu_s: cpu,
                        agent_rss_max_kb: rss,
                    });
                }
            }
        }
        // The RSS once the load has ended: a fixed wait by definition of the figure (the agents
        // return freed memory on their own timer, every 5 s), not a synchronisation.
        println!(
            "waiting {} s after the load, then reading the agents' RSS",
            RSS_AFTER_LOAD.as_secs()
        );
        std::thread::sleep(RSS_AFTER_LOAD);
        let after_kb = max_rss_kb(&agents)?;
        let third = match tools {
            Some(tools) => {
                let topo = lab.status()?.context("the bench lab has no lab.json")?;
                let place = |name: &'static str, pod_name: &str, raw: bool| -> Result<_> {
                    let (cg, ns, ip) = pod(&topo, pod_name)?;
                    Ok(third_party::ServerPlace {
                        name,
                        cgroup: if raw { raw_cgroup(lab)? } else { cg },
                        netns: ns,
                        ip: ip.parse()?,
                        iperf_port: if raw {
                            third_party::IPERF_RAW_PORT
                        } else {
                            third_party::IPERF_MESH_PORT
                        },
                        nginx_port: if raw {
                            third_party::NGINX_RAW_PORT
                        } else {
                            third_party::NGINX_MESH_PORT
                        },
                    })
                };
                let places = [
                    place("server-a", "server-a", false)?,
                    place("server-b", "server-b", false)?,
                    place("raw", "server-b", true)?,
                ];
                servers.extend(third_party::start_servers(
                    tools,
                    &places,
                    &out.join("third-party"),
                )?);
                Some(third_party::measure(tools, &paths)?)
            }
            None => None,
        };
        Ok((samples, after_kb, third))
    })();
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    // This call made the lab (`setup`): it always takes it down.
    let down = teardown(lab);
    let (samples, after_kb, third) = result?;
    down.context("bench lab teardown")?;
    Ok((samples, idle_kb, after_kb, third))
}

/// Runs one test on one path; returns the generator's result, the agents' CPU seconds during
/// it and the largest agent VmRSS sampled meanwhile.
fn run_one(
    p: &PathSpec,
    test: Test,
    secs: f64,
    agents: &[libc::pid_t],
) -> Result<(serde_json::Value, f64, u64)> {
    check_interrupted()?;
    let secs_s = format!("{secs}");
    let dst = p.dst.to_string();
    let (verb, args) = match test {
        Test::Stream1 => ("stream", [dst, "1".into(), secs_s]),
        Test::Stream4 => ("stream", [dst, "4".into(), secs_s]),
        Test::Rr1 => ("rr", [dst, "1".into(), secs_s]),
        Test::Rr1k => ("rr", [dst, "1024".into(), secs_s]),
        Test::Crr => ("crr", [dst, CRR_CLIENTS.to_string(), secs_s]),
    };
    let cpu_before = agents_cpu(agents)?;
    let mut rss = max_rss_kb(agents)?;
    let mut child = generator(&p.cgroup, &p.netns, verb, &args)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a load generator")?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs) + Duration::from_secs(30);
    // Sample the agents' memory while the load runs.
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!(
                "{verb} on {} did not finish within {secs} s + 30 s: an agent may be stuck \
                 (reproduce with `nm-bench up` and read target/bench/lab/<node>.log)",
                p.name
            );
        }
        if p.mesh {
            rss = rss.max(max_rss_kb(agents)?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let cpu = agents_cpu(agents)? - cpu_before;
    ensure!(
        out.status.success(),
        "{verb} on {} ({}) failed: {}",
        p.name,
        p.dst,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .context("the generator printed nothing")?;
    let result: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("unexpected generator output {line:?}"))?;
    Ok((result, cpu, rss))
}
