//! `nm-lab`: the local lab (`cargo xtask lab` builds and runs it; docs in `nodemesh_tests::lab`).
//!
//! - `nm-lab up [--config FILE]` (default `tests/lab/lab.yaml`): builds the lab, prints a summary
//!   and writes `target/lab/lab.json`.
//! - `nm-lab down`: removes everything (also after a crash).
//! - `nm-lab status`: prints `lab.json` and whether each agent serves.
//! - `nm-lab exec POD -- CMD...`: runs CMD in the pod's cgroup and network namespace.
//!
//! The workspace root is the current directory (xtask runs it there).

use std::{os::unix::process::CommandExt, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use nodemesh_tests::{lab, probe_exe, require_root};

const USAGE: &str = "usage: nm-lab [up [--config FILE] | down | status | exec POD -- CMD...]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workspace = std::env::current_dir()?;
    require_root();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] | ["up"] => up(&workspace, workspace.join("tests/lab/lab.yaml")),
        ["up", "--config", file] => up(&workspace, PathBuf::from(file)),
        ["down"] => {
            lab::down(&workspace)?;
            println!("lab down: namespaces, cgroups, pins, processes and target/lab removed");
            Ok(())
        }
        ["status"] => {
            match lab::status(&workspace)? {
                None => println!("the lab is down"),
                Some(l) => {
                    for n in l["nodes"].as_array().into_iter().flatten() {
                        let ready = lab::state_dir(&workspace)
                            .join(n["name"].as_str().unwrap_or_default())
                            .join("ready")
                            .exists();
                        println!(
                            "node {}: agent {}; log {}",
                            n["name"].as_str().unwrap_or_default(),
                            if ready { "serving" } else { "NOT serving" },
                            n["log"].as_str().unwrap_or_default()
                        );
                    }
                    println!("{}", serde_json::to_string_pretty(&l)?);
                }
            }
            Ok(())
        }
        ["exec", pod, "--", cmd @ ..] if !cmd.is_empty() => {
            let (cgroup, netns) = lab::pod_place(&workspace, pod)?;
            let e = std::process::Command::new(probe_exe()?)
                .arg(cgroup)
                .arg(netns)
                .arg("exec")
                .args(cmd)
                .exec();
            Err(e).context("cannot run nm-probe")
        }
        _ => bail!(USAGE),
    }
}

fn up(workspace: &std::path::Path, config: PathBuf) -> Result<()> {
    let lab = match lab::up(&config, workspace) {
        Ok(l) => l,
        Err(e) => {
            let _ = lab::down(workspace);
            return Err(e.context("lab up failed (cleaned up)"));
        }
    };
    println!(
        "lab up ({} pods):",
        lab["pods"].as_array().map_or(0, Vec::len)
    );
    for p in lab["pods"].as_array().into_iter().flatten() {
        println!(
            "  pod {:<10} node {:<7} ip {}",
            p["name"].as_str().unwrap_or_default(),
            p["node"].as_str().unwrap_or_default(),
            p["ip"].as_str().unwrap_or_default()
        );
    }
    println!("\ndemo traffic:");
    let rows = lab::demo(workspace)?;
    for r in &rows {
        println!(
            "  {} {:<58} expected {:<24} got {}",
            if r.ok { "ok  " } else { "FAIL" },
            r.what,
            r.expected,
            r.outcome
        );
    }
    println!("\ntopology: target/lab/lab.json; agent logs (access lines): target/lab/<node>.log");
    println!(
        "explore: cargo xtask lab exec client-a -- CMD; cargo xtask lab status; cargo xtask lab down"
    );
    if rows.iter().any(|r| !r.ok) {
        bail!("some demo rows did not behave as expected (see the agent logs)");
    }
    Ok(())
}
