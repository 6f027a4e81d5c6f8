//! `nm-bench`: the benchmark (`cargo xtask bench` builds it in release and runs it as root from
//! the workspace root; the method is in `nodemesh_tests::bench` and docs/performance.md).
//!
//! - `nm-bench run [--quick] [--third-party] [--config FILE] [--out DIR]` (defaults
//!   `tests/lab/bench.yaml`, `target/bench`): brings the bench lab up, measures raw, mesh
//!   same-node and mesh cross-node (with `--third-party` also with iperf3 and wrk against
//!   nginx, `bench::third_party`), takes the lab down (also on error and Ctrl-C) and writes
//!   `report.md`, `report.json` and the chart `paths.svg`; a full run also appends to
//!   `docs/bench-history.json` and draws `history.svg`.
//! - `nm-bench up [--config FILE]` / `nm-bench down`: the same lab and servers left running (for
//!   profiling: it prints the command that drives each path), and its removal.
//! - `nm-bench k8s-scale [--pods N] [--services N] [--nodes N] [--probe-pods N] [--out DIR]`:
//!   the Kubernetes scale benchmark (`bench::k8s_scale`; defaults 5,000 pods, 500 services, 50
//!   nodes, 100 probe pods), merged into `DIR/report.{md,json}` (default `target/bench`).
//!   It runs `nm-bench k8s-source-probe KUBECONFIG NODE` as its child: the source alone.
//! - `nm-bench charts [--report REPORT_JSON] [--history FILE] [--out DIR]`: redraws the charts
//!   of an earlier run (`paths.svg` from its `report.json`, `history.svg` from the history).
//! - `nm-bench soak --minutes N [--interval SECS] [--config FILE] [--out DIR]`: the soak
//!   (`bench::soak`, `cargo xtask soak`): mixed traffic through the bench lab for N minutes, the
//!   agents sampled every SECS (default 5); report in `DIR/report.{md,json}` and `DIR/soak.svg`
//!   (default `target/soak`); fails when its verdict does. For tests: `--seconds N` instead of
//!   `--minutes`, and `--prefix P` (a lab of its own beside a running bench lab).
//! - The load, each in its own process placed in a cgroup and network namespace:
//!   `nm-bench serve CGROUP NETNS ADDR`, `stream CGROUP NETNS DST FLOWS SECS`,
//!   `rr CGROUP NETNS DST SIZE SECS`, `crr CGROUP NETNS DST CLIENTS SECS`, and the soak's
//!   `mix CGROUP NETNS SAME_NODE_DST CROSS_NODE_DST SECS`; `exec CGROUP NETNS PROGRAM ARGS…`
//!   places a third-party tool and execs it.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use nodemesh_tests::bench::{self, k8s_scale, load, soak};

const USAGE: &str = "usage: nm-bench run [--quick] [--third-party] [--config FILE] [--out DIR] | \
                     up [--config FILE] | down | \
                     k8s-scale [--pods N] [--services N] [--nodes N] [--probe-pods N] [--out DIR] | \
                     k8s-source-probe KUBECONFIG NODE | \
                     soak --minutes N [--interval SECS] [--config FILE] [--out DIR] | \
                     charts [--report REPORT_JSON] [--history FILE] [--out DIR] | \
                     serve CGROUP NETNS ADDR | stream CGROUP NETNS DST FLOWS SECS | \
                     rr CGROUP NETNS DST SIZE SECS | crr CGROUP NETNS DST CLIENTS SECS | \
                     mix CGROUP NETNS SAME_NODE_DST CROSS_NODE_DST SECS | \
                     exec CGROUP NETNS PROGRAM ARGS...";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "nm-bench creates network namespaces and cgroups and loads eBPF programs: run it as \
         root (`sudo -E cargo xtask bench`)"
    );
    Ok(())
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse().with_context(|| format!("bad {what} `{s}`"))
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["run", opts @ ..] => {
            require_root()?;
            let workspace = std::env::current_dir()?;
            let mut quick = false;
            let mut third_party = false;
            let mut config = workspace.join("tests/lab/bench.yaml");
            let mut out = workspace.join("target/bench");
            let mut it = opts.iter();
            while let Some(o) = it.next() {
                match *o {
                    "--quick" => quick = true,
                    "--third-party" => third_party = true,
                    "--config" => config = PathBuf::from(it.next().context(USAGE)?),
                    "--out" => out = PathBuf::from(it.next().context(USAGE)?),
                    _ => bail!(USAGE),
                }
            }
            let mut plan = bench::Plan::new(quick);
            plan.third_party = third_party;
            bench::run_bench(&workspace, &config, &out, plan)
        }
        ["up", opts @ ..] => {
            require_root()?;
            let workspace = std::env::current_dir()?;
            let config = match opts {
                [] => workspace.join("tests/lab/bench.yaml"),
                ["--config", file] => PathBuf::from(file),
                _ => bail!(USAGE),
            };
            bench::up_only(&workspace, &config)
        }
        ["k8s-scale", opts @ ..] => {
            require_root()?;
            let mut scale = k8s_scale::Scale::default();
            let mut out = std::env::current_dir()?.join("target/bench");
            let mut it = opts.iter();
            while let Some(o) = it.next() {
                let mut value = || it.next().context(USAGE);
                match *o {
                    "--pods" => scale.pods = parse("pod count", value()?)?,
                    "--services" => scale.services = parse("service count", value()?)?,
                    "--nodes" => scale.nodes = parse("node count", value()?)?,
                    "--probe-pods" => scale.probe_pods = parse("probe pod count", value()?)?,
                    "--out" => out = PathBuf::from(value()?),
                    _ => bail!(USAGE),
                }
            }
            let figures = k8s_scale::run(scale)?;
            figures.merge_into(&out)?;
            println!("{}", figures.markdown());
            Ok(())
        }
        ["k8s-source-probe", kubeconfig, node] => {
            k8s_scale::source_probe(kubeconfig.as_ref(), node)
        }
        ["soak", opts @ ..] => {
            require_root()?;
            let workspace = std::env::current_dir()?;
            let mut duration = None;
            let mut o = soak::Options::new(&workspace, Duration::ZERO);
            let mut interval = None;
            let mut it = opts.iter();
            while let Some(opt) = it.next() {
                let mut value = || it.next().context(USAGE);
                match *opt {
                    "--minutes" => {
                        let m: f64 = parse("minutes", value()?)?;
                        anyhow::ensure!(m.is_finite() && m > 0.0, "--minutes must be positive");
                        duration = Some(Duration::from_secs_f64(m * 60.0));
                    }
                    "--seconds" => {
                        duration = Some(Duration::from_secs(parse("seconds", value()?)?))
                    }
                    "--interval" => {
                        interval = Some(Duration::from_secs(parse("interval seconds", value()?)?))
                    }
                    "--config" => o.config = PathBuf::from(value()?),
                    "--out" => o.out = PathBuf::from(value()?),
                    "--prefix" => o.prefix = value()?.to_string(),
                    _ => bail!(USAGE),
                }
            }
            o.duration = duration.context("say how long: --minutes N")?;
            o.policy_every = soak::Options::policy_every_for(o.duration);
            if let Some(i) = interval {
                o.interval = i;
            } else if o.duration < Duration::from_secs(60) {
                // Short runs: enough samples to draw.
                o.interval = Duration::from_secs(2);
            }
            soak::run(&o)
        }
        ["charts", opts @ ..] => {
            // Redraws the charts of an earlier run: `paths.svg` from its report.json,
            // `history.svg` from the history file.
            let workspace = std::env::current_dir()?;
            let mut report = None;
            let mut history = workspace.join(bench::HISTORY_FILE);
            let mut out = workspace.join("target/bench");
            let mut it = opts.iter();
            while let Some(o) = it.next() {
                let mut value = || it.next().context(USAGE);
                match *o {
                    "--report" => report = Some(PathBuf::from(value()?)),
                    "--history" => history = PathBuf::from(value()?),
                    "--out" => out = PathBuf::from(value()?),
                    _ => bail!(USAGE),
                }
            }
            std::fs::create_dir_all(&out)?;
            if let Some(file) = report {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let json: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not JSON", file.display()))?;
                std::fs::write(out.join("paths.svg"), bench::report::paths_chart(&json)?)?;
            }
            bench::history::draw(&history, &out.join("history.svg"))?;
            println!("written: charts in {}", out.display());
            Ok(())
        }
        ["down"] => {
            require_root()?;
            bench::down_only(&std::env::current_dir()?)
        }
        [verb, cgroup, netns, rest @ ..] => {
            load::join_place(cgroup.as_ref(), netns.as_ref())?;
            let result = match (*verb, rest) {
                ("serve", [addr]) => return load::serve(parse("address", addr)?),
                ("exec", [program, args @ ..]) => {
                    use std::os::unix::process::CommandExt;
                    let e = std::process::Command::new(program).args(args).exec();
                    bail!("cannot run {program}: {e}");
                }
                ("mix", [same, cross, secs]) => {
                    return load::mix(
                        &[parse("address", same)?, parse("address", cross)?],
                        parse("seconds", secs)?,
                    );
                }
                ("stream", [dst, flows, secs]) => load::stream(
                    parse("address", dst)?,
                    parse("flows", flows)?,
                    parse("seconds", secs)?,
                )?,
                ("rr", [dst, size, secs]) => load::rr(
                    parse("address", dst)?,
                    parse("size", size)?,
                    parse("seconds", secs)?,
                )?,
                ("crr", [dst, clients, secs]) => load::crr(
                    parse("address", dst)?,
                    parse("clients", clients)?,
                    parse("seconds", secs)?,
                )?,
                _ => bail!(USAGE),
            };
            println!("{result}");
            Ok(())
        }
        _ => bail!(USAGE),
    }
}
