//! Third-party load tools on the bench's paths (`nm-bench run --third-party`), so the figures
//! compare with other meshes' published ones: iperf3 (bulk, 1 and 4 flows) and wrk against
//! nginx (keep-alive latency with one connection, keep-alive requests per second with 16
//! connections, new connections per second with `Connection: close` and 8 connections), all
//! from Debian (`cargo xtask setup` installs `iperf3`, `wrk` and `nginx-light`).
//!
//! Same places as the bench's own load: servers in `server-a` (same node), `server-b` (cross
//! node) and the raw cgroup in `server-b`'s namespace; clients in `client-a`'s namespace, in its
//! pod's cgroup (mesh) or the raw cgroup (raw). Each tool runs through `nm-bench exec CGROUP
//! NETNS PROG ARGS…`, which joins the place and execs the tool. Rounds rotate the path order
//! like the bench's; medians over rounds, ratios to raw paired by round.

use crate::bench::report::{median, ratio_cell};
use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{PathSpec, check_interrupted};

/// iperf3's ports: the mesh servers' and the raw one's.
pub const IPERF_MESH_PORT: u16 = 5301;
pub const IPERF_RAW_PORT: u16 = 5302;
/// nginx's ports: the mesh servers' and the raw one's.
pub const NGINX_MESH_PORT: u16 = 8081;
pub const NGINX_RAW_PORT: u16 = 8082;
/// Rounds of the third-party tests (each runs every test on every path).
pub const ROUNDS: usize = 3;
/// Seconds per test.
pub const SECS: u32 = 3;

/// The tools' paths.
#[derive(Clone, Debug)]
pub struct Tools {
    pub iperf3: PathBuf,
    pub wrk: PathBuf,
    pub nginx: PathBuf,
}

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds iperf3, wrk and nginx, or says how to install them.
pub fn tools() -> Result<Tools> {
    let (iperf3, wrk, nginx) = (find("iperf3"), find("wrk"), find("nginx"));
    match (iperf3, wrk, nginx) {
        (Some(iperf3), Some(wrk), Some(nginx)) => Ok(Tools { iperf3, wrk, nginx }),
        (i, w, n) => {
            let missing: Vec<&str> = [
                ("iperf3", i.is_none()),
                ("wrk", w.is_none()),
                ("nginx", n.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, gone)| gone.then_some(name))
            .collect();
            bail!(
                "{} not found: `cargo xtask setup` installs them (Debian: `apt-get install iperf3 \
                 wrk nginx-light`)",
                missing.join(", ")
            )
        }
    }
}

/// One server place: its cgroup, namespace, address and ports.
#[derive(Clone, Debug)]
pub struct ServerPlace {
    pub name: &'static str,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub ip: IpAddr,
    pub iperf_port: u16,
    pub nginx_port: u16,
}

/// `nm-bench exec CGROUP NETNS PROG ARGS…`.
fn exec_in(cgroup: &Path, netns: &Path, prog: &Path) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("exec").arg(cgroup).arg(netns).arg(prog);
    Ok(cmd)
}

/// Waits until `ready` holds or `child` exits (then fails naming `what` and `log`).
fn wait_ready(child: &mut Child, what: &str, log: &Path, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited at start ({status}): {}",
                fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "{what} not ready within 10 s; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn nginx_conf(dir: &Path, name: &str, ip: IpAddr, port: u16) -> String {
    let d = dir.display();
    format!(
        "# nm-bench --third-party: nginx for the `{name}` place.\n\
         daemon off;\nmaster_process off;\npid {d}/nginx-{name}.pid;\n\
         error_log {d}/nginx-{name}.log warn;\nworker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 60s;\n\
         \x20 client_body_temp_path {d}/nginx-{name}-tmp;\n  proxy_temp_path {d}/nginx-{name}-tmp;\n\
         \x20 fastcgi_temp_path {d}/nginx-{name}-tmp;\n  uwsgi_temp_path {d}/nginx-{name}-tmp;\n\
         \x20 scgi_temp_path {d}/nginx-{name}-tmp;\n\
         \x20 server {{\n    listen {ip}:{port} backlog=4096;\n    location / {{ return 200 \"nodemesh\\n\"; }}\n  }}\n}}\n"
    )
}

/// Starts iperf3 and nginx in every place; the caller kills the children (the lab's teardown
/// also ends them: they live in the lab's cgroups).
pub fn start_servers(tools: &Tools, places: &[ServerPlace], dir: &Path) -> Result<Vec<Child>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut children = Vec::new();
    let result = (|| -> Result<()> {
        for p in places {
            let log = dir.join(format!("iperf3-{}.log", p.name));
            let _ = fs::remove_file(&log);
            let mut iperf = exec_in(&p.cgroup, &p.netns, &tools.iperf3)?
                .args([
                    "-s",
                    "-B",
                    &p.ip.to_string(),
                    "-p",
                    &p.iperf_port.to_string(),
                ])
                .arg("--logfile")
                .arg(&log)
                // Without it the banner waits in a buffer and readiness is never seen.
                .arg("--forceflush")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start iperf3")?;
            let ready = wait_ready(&mut iperf, "iperf3 -s", &log, || {
                fs::read_to_string(&log).is_ok_and(|l| l.contains("Server listening"))
            });
            children.push(iperf);
            ready?;
            let conf = dir.join(format!("nginx-{}.conf", p.name));
            fs::create_dir_all(dir.join(format!("nginx-{}-tmp", p.name)))?;
            fs::write(&conf, nginx_conf(dir, p.name, p.ip, p.nginx_port))?;
            let log = dir.join(format!("nginx-{}.log", p.name));
            let pid = dir.join(format!("nginx-{}.pid", p.name));
            let _ = fs::remove_file(&pid);
            let mut nginx = exec_in(&p.cgroup, &p.netns, &tools.nginx)?
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start nginx")?;
            let ready = wait_ready(&mut nginx, "nginx", &log, || pid.exists());
            children.push(nginx);
            ready?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        return Err(e);
    }
    Ok(children)
}

/// The tests, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tool {
    Iperf1,
    Iperf4,
    WrkP50,
    WrkRps,
    WrkCps,
}

impl Tool {
    pub const ALL: [Tool; 5] = [
        Tool::Iperf1,
        Tool::Iperf4,
        Tool::WrkP50,
        Tool::WrkRps,
        Tool::WrkCps,
    ];

    /// The metric name in the report and its label.
    pub fn metric(self) -> (&'static str, &'static str) {
        match self {
            Tool::Iperf1 => ("iperf3_1flow_gbit_s", "iperf3, 1 flow (Gbit/s)"),
            Tool::Iperf4 => ("iperf3_4flow_gbit_s", "iperf3, 4 flows (Gbit/s)"),
            Tool::WrkP50 => (
                "wrk_keepalive_p50_us",
                "wrk → nginx, keep-alive p50, 1 connection (µs)",
            ),
            Tool::WrkRps => (
                "wrk_keepalive_req_s",
                "wrk → nginx, keep-alive req/s, 16 connections",
            ),
            Tool::WrkCps => (
                "wrk_new_conn_s",
                "wrk → nginx, new connections/s (Connection: close), 8 connections",
            ),
        }
    }

    /// Latency: the ratio is "added µs" instead of mesh / raw.
    fn is_latency(self) -> bool {
        self == Tool::WrkP50
    }
}

/// A duration of wrk's output (`86.00us`, `1.20ms`, `2.00s`) in µs.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// wrk's text output: (requests per second, p50 µs if `--latency`, errors).
pub fn parse_wrk(out: &str) -> Result<(f64, Option<f64>, u64)> {
    let mut rps = None;
    let mut p50 = None;
    let mut errors = 0u64;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = wrk_duration_us(v);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 0`
            errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    let rps = rps.with_context(|| format!("no `Requests/sec` in wrk's output: {out}"))?;
    Ok((rps, p50, errors))
}

/// iperf3's `-J` output: received Gbit/s.
pub fn parse_iperf3(out: &str) -> Result<f64> {
    let v: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("iperf3 printed no JSON: {out}"))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no end.sum_received in iperf3's JSON: {out}"))
}

/// One client run of `tool` on `p` (the client place and the server's IP) to `port`s.
fn run_tool(
    tools: &Tools,
    tool: Tool,
    p: &PathSpec,
    iperf_port: u16,
    nginx_port: u16,
) -> Result<f64> {
    check_interrupted()?;
    let ip = p.dst.ip().to_string();
    let secs = SECS.to_string();
    let url = format!("http://{ip}:{nginx_port}/");
    let mut cmd = match tool {
        Tool::Iperf1 | Tool::Iperf4 => {
            let mut c = exec_in(&p.cgroup, &p.netns, &tools.iperf3)?;
            c.args(["-c", &ip, "-p", &iperf_port.to_string(), "-t", &secs, "-J"]);
            c.args(["-P", if tool == Tool::Iperf1 { "1" } else { "4" }]);
            c
        }
        Tool::WrkP50 | Tool::WrkRps | Tool::WrkCps => {
            let mut c = exec_in(&p.cgroup, &p.netns, &tools.wrk)?;
            let (threads, conns) = match tool {
                Tool::WrkP50 => ("1", "1"),
                Tool::WrkRps => ("2", "16"),
                _ => ("2", "8"),
            };
            c.args([
                "-t",
                threads,
                "-c",
                conns,
                "-d",
                &format!("{SECS}s"),
                "--latency",
            ]);
            if tool == Tool::WrkCps {
                c.args(["-H", "Connection: close"]);
            }
            c.arg(&url);
            c
        }
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {tool:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{tool:?} on {} failed ({}): {}{}",
        p.name,
        out.status,
        text.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    match tool {
        Tool::Iperf1 | Tool::Iperf4 => parse_iperf3(&text),
        _ => {
            let (rps, p50, errors) = parse_wrk(&text)?;
            // Connection: close makes wrk count a reconnect as a read error now and then;
            // anything above 1% is a failure of the path.
            ensure!(
                (errors as f64) <= 0.01 * rps * f64::from(SECS),
                "{tool:?} on {}: {errors} errors in {} requests",
                p.name,
                rps * f64::from(SECS)
            );
            if tool == Tool::WrkP50 {
                p50.with_context(|| format!("no p50 in wrk's output: {text}"))
            } else {
                Ok(rps)
            }
        }
    }
}

/// The third-party figures: path → metric → value, per round.
#[derive(Clone, Debug, Default)]
pub struct ThirdParty {
    /// (round, path, tool) → value.
    pub values: BTreeMap<(usize, &'static str, Tool), f64>,
    pub took: Duration,
}

/// Runs every tool on every path, [`ROUNDS`] rounds with the path order rotating.
pub fn measure(tools: &Tools, paths: &[PathSpec]) -> Result<ThirdParty> {
    let started = Instant::now();
    let mut tp = ThirdParty::default();
    for round in 0..ROUNDS {
        println!("third-party round {}/{ROUNDS}", round + 1);
        for tool in Tool::ALL {
            for i in 0..paths.len() {
                let p = &paths[(i + round) % paths.len()];
                let (iperf, nginx) = if p.mesh {
                    (IPERF_MESH_PORT, NGINX_MESH_PORT)
                } else {
                    (IPERF_RAW_PORT, NGINX_RAW_PORT)
                };
                let v = run_tool(tools, tool, p, iperf, nginx)?;
                println!("  {:<16} {:<8} {v:.2}", p.name, format!("{tool:?}"));
                tp.values.insert((round, p.name, tool), v);
            }
        }
    }
    tp.took = started.elapsed();
    Ok(tp)
}

impl ThirdParty {
    fn rounds(&self) -> usize {
        self.values.keys().map(|k| k.0 + 1).max().unwrap_or(0)
    }

    pub fn median(&self, path: &str, tool: Tool) -> Option<f64> {
        median(
            self.values
                .iter()
                .filter(|((_, p, t), _)| *p == path && *t == tool)
                .map(|(_, v)| *v)
                .collect(),
        )
    }

    /// Mesh / raw (or mesh − raw for latency), paired by round, median.
    pub fn ratio(&self, path: &str, tool: Tool) -> Option<f64> {
        median(
            (0..self.rounds())
                .filter_map(|r| {
                    let m = self.values.get(&(r, path, tool))?;
                    let raw = self.values.get(&(r, "raw", tool))?;
                    Some(if tool.is_latency() { m - raw } else { m / raw })
                })
                .collect(),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let mut paths = serde_json::Map::new();
        let mut ratios = serde_json::Map::new();
        for path in super::report::PATHS {
            let mut m = serde_json::Map::new();
            let mut r = serde_json::Map::new();
            for tool in Tool::ALL {
                let (metric, _) = tool.metric();
                if let Some(v) = self.median(path, tool) {
                    m.insert(metric.into(), v.into());
                }
                if path != "raw"
                    && let Some(v) = self.ratio(path, tool)
                {
                    let key = if tool.is_latency() {
                        "wrk_keepalive_p50_added_us".to_owned()
                    } else {
                        format!("{metric}_ratio")
                    };
                    r.insert(key, v.into());
                }
            }
            paths.insert(path.into(), m.into());
            if path != "raw" {
                ratios.insert(path.into(), r.into());
            }
        }
        serde_json::json!({
            "paths": paths, "ratios_to_raw": ratios,
            "run": {"rounds": self.rounds(), "secs": SECS, "took_s": self.took.as_secs_f64()},
        })
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "## Third-party tools ({} rounds of {} s per test, took {:.0} s)\n\n\
             iperf3, and wrk against nginx (Debian's), on the same paths. Medians over rounds; \
             ratios paired by round.\n\n\
             | tool | raw | mesh same node | mesh cross node | same/raw | cross/raw |\n\
             |---|---|---|---|---|---|\n",
            self.rounds(),
            SECS,
            self.took.as_secs_f64()
        );
        for tool in Tool::ALL {
            let (_, label) = tool.metric();
            let cell = |p: &str| self.median(p, tool).map_or("–".into(), fmt);
            let r = |p: &str| {
                self.ratio(p, tool)
                    .map_or("–".into(), |v| ratio_cell(v, tool.is_latency()))
            };
            s.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {} |\n",
                cell("raw"),
                cell("mesh_same_node"),
                cell("mesh_cross_node"),
                r("mesh_same_node"),
                r("mesh_cross_node"),
            ));
        }
        s
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let out = "Running 3s test @ http://10.201.2.20:8081/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    90.12us   20.00us   1.00ms   90.00%
    Req/Sec    10.50k     1.00k   12.00k    70.00%
  Latency Distribution
     50%   86.00us
     75%   95.00us
     90%    1.05ms
     99%    2.00s
  31000 requests in 3.00s, 4.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  10333.33
Transfer/sec:      1.33MB
";
        let (rps, p50, errors) = parse_wrk(out).expect("parses");
        assert!((rps - 10333.33).abs() < 1e-6);
        assert_eq!(p50, Some(86.0));
        assert_eq!(errors, 4);
        assert_eq!(wrk_duration_us("1.05ms"), Some(1050.0));
        assert_eq!(wrk_duration_us("2.00s"), Some(2e6));
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn iperf3_json_parses() {
        let out = r#"{"start": {}, "end": {"sum_received": {"bits_per_second": 14.5e9}}}"#;
        assert_eq!(parse_iperf3(out).expect("parses"), 14.5);
        assert!(parse_iperf3(r#"{"error": "unable to connect"}"#).is_err());
    }

    #[test]
    fn ratios_are_paired_and_latency_is_added() {
        let mut tp = ThirdParty::default();
        for (round, raw) in [(0, 10.0), (1, 20.0), (2, 40.0)] {
            tp.values.insert((round, "raw", Tool::Iperf1), raw);
            tp.values
                .insert((round, "mesh_cross_node", Tool::Iperf1), raw * 0.4);
            tp.values.insert((round, "raw", Tool::WrkP50), 80.0);
            tp.values
                .insert((round, "mesh_cross_node", Tool::WrkP50), 180.0);
        }
        assert!((tp.ratio("mesh_cross_node", Tool::Iperf1).expect("ratio") - 0.4).abs() < 1e-9);
        assert_eq!(tp.ratio("mesh_cross_node", Tool::WrkP50), Some(100.0));
        let j = tp.json();
        assert_eq!(j["paths"]["raw"]["iperf3_1flow_gbit_s"], 20.0);
        assert_eq!(
            j["ratios_to_raw"]["mesh_cross_node"]["wrk_keepalive_p50_added_us"],
            100.0
        );
        let md = tp.markdown();
        assert!(
            md.contains("| iperf3, 1 flow (Gbit/s) | 20.0 | – | 8.00 | – | 0.40× |"),
            "{md}"
        );
    }

    #[test]
    fn nginx_config_listens_on_the_place() {
        let conf = nginx_conf(
            Path::new("/tmp/x"),
            "server-b",
            "10.201.2.20".parse().expect("ip"),
            8081,
        );
        assert!(conf.contains("listen 10.201.2.20:8081 backlog=4096;"));
        assert!(conf.contains("master_process off;"));
        assert!(conf.contains("pid /tmp/x/nginx-server-b.pid;"));
    }
}
