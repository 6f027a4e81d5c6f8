//! The soak as `cargo xtask soak` runs it (`nm-bench soak`), for 20 seconds instead of minutes:
//! it brings the bench lab up under its own prefix (`nmsoakt`, beside a user's bench lab),
//! drives its mixed traffic, passes its verdict (no error counter moves, no failed exchange;
//! memory is judged from 2 minutes on), writes a report, JSON and chart that parse and hold
//! every sample, and takes its lab down. Root.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use nodemesh_tests::{bench::plot, require_root, run};

const PREFIX: &str = "nmsoakt";

fn leftovers() -> Result<Vec<String>> {
    let mut left: Vec<String> = run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(|n| format!("netns {n}"))
        .collect();
    let cg = mesh_agent::cgroup::cgroup2_mount()?.join(PREFIX);
    if cg.exists() {
        left.push(format!("cgroup {}", cg.display()));
    }
    Ok(left)
}

#[test]
fn soak_of_seconds_reports_samples_chart_and_verdict() -> Result<()> {
    require_root();
    let out = tempfile::tempdir()?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = Command::new(env!("CARGO_BIN_EXE_nm-bench"))
        .args([
            "soak",
            "--seconds",
            "20",
            "--interval",
            "2",
            "--prefix",
            PREFIX,
        ])
        .arg("--config")
        .arg(manifest.join("lab/bench.yaml"))
        .arg("--out")
        .arg(out.path())
        .current_dir(manifest.parent().context("workspace")?)
        .output()
        .context("cannot run nm-bench soak")?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(
        run.status.success(),
        "nm-bench soak failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    let left = leftovers()?;
    ensure!(left.is_empty(), "the soak left {left:?} behind");

    let md = std::fs::read_to_string(out.path().join("report.md"))?;
    ensure!(md.contains("**Verdict: PASS**"), "{md}");
    ensure!(
        md.contains("not judged: the run is shorter than 120 s"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json"))?)?;
    ensure!(json["pass"] == true, "{json}");
    let samples = json["samples"].as_array().context("samples")?;
    let load = samples.iter().filter(|s| s["phase"] == "load").count();
    ensure!(
        load >= 9,
        "a sample every 2 s for 20 s, got {load} under load"
    );
    ensure!(samples.first().is_some_and(|s| s["phase"] == "idle"));
    ensure!(samples.last().is_some_and(|s| s["phase"] == "after"));
    for s in samples {
        let agents = s["agents"].as_array().context("agents")?;
        ensure!(agents.len() == 2, "both agents in every sample: {s}");
        for a in agents {
            ensure!(a["rss_kb"].as_u64().is_some_and(|v| v > 1024), "{a}");
            ensure!(a["fds"].as_u64().is_some_and(|v| v > 3), "{a}");
            ensure!(a["threads"].as_u64().is_some_and(|v| v >= 1), "{a}");
            ensure!(
                a["tasks"].as_u64().is_some_and(|v| v >= 1),
                "tokio tasks: {a}"
            );
        }
    }
    let last = samples.last().context("a last sample")?;
    let client = &last["client"];
    for k in ["rr_ok", "conn_ok", "bulk_ok"] {
        ensure!(client[k].as_u64().is_some_and(|v| v > 0), "{k}: {client}");
    }
    for a in last["agents"].as_array().context("agents")? {
        ensure!(
            a["connections_closed"].as_u64().is_some_and(|v| v > 100),
            "the agents saw the churn: {a}"
        );
        ensure!(
            a["reloads"].as_u64().is_some_and(|v| v >= 1),
            "the policy changes reached the agents: {a}"
        );
    }
    plot::check_svg(&std::fs::read_to_string(out.path().join("soak.svg"))?)?;
    Ok(())
}
