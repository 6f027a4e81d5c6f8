//! `nm-lab`: the local lab (`cargo xtask lab` builds and runs it; docs in `nodemesh_tests::lab`).
//!
//! - `nm-lab up [--config FILE]` (default `tests/lab/lab.yaml`): builds the lab, prints a summary
//!   and writes `target/lab/lab.json`.
//! - `nm-lab up --kubernetes [--config FILE]`: the same nodes and pods in Kubernetes mode
//!   (`nodemesh_tests::lab_k8s`): a real kube-apiserver, no agents until `helm install`; prints
//!   the kubeconfig (`target/lab/kubeconfig`) and what to do next.
//! - `nm-lab down`: removes everything (also after a crash).
//! - `nm-lab status`: prints `lab.json` and whether each agent serves.
//! - `nm-lab exec POD -- CMD...`: runs CMD in the pod's cgroup and network namespace;
//!   `nm-lab exec NODE -- CMD...` in the node's network namespace (where its metrics listen).
//!
//! - Internal: `nm-lab kubelet` (the Kubernetes mode's stand-in, started by `up --kubernetes`),
//!   `nm-lab serve ADDR NAME` (the servers in the pods in Kubernetes mode).
//!
//! The workspace root is the current directory (xtask runs it there). `--prefix P --state-dir DIR`
//! before the command give the lab other names and another state directory (tests use them to
//! run beside a user's lab).

use std::{os::unix::process::CommandExt, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use nodemesh_tests::{
    lab::{self, Lab},
    lab_k8s, probe_exe, require_root,
};

const USAGE: &str = "usage: nm-lab [--prefix P --state-dir DIR] \
                     [up [--kubernetes] [--config FILE] | down | status | exec POD|NODE -- CMD...]";

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
    let all: Vec<String> = std::env::args().skip(1).collect();
    let workspace = std::env::current_dir()?;
    let (lab, args) = match all.as_slice() {
        [flag, prefix, state_flag, state, rest @ ..]
            if flag == "--prefix" && state_flag == "--state-dir" =>
        {
            (Lab::new(prefix, PathBuf::from(state))?, rest)
        }
        rest => (Lab::default_for(&workspace), rest),
    };
    require_root();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] | ["up"] => up(&lab, workspace.join("tests/lab/lab.yaml")),
        ["up", "--config", file] => up(&lab, PathBuf::from(file)),
        ["up", "--kubernetes"] => up_kubernetes(&lab, workspace.join("tests/lab/lab.yaml")),
        ["up", "--kubernetes", "--config", file] | ["up", "--config", file, "--kubernetes"] => {
            up_kubernetes(&lab, PathBuf::from(file))
        }
        ["kubelet"] => lab_k8s::run_kubelet(&lab),
        ["serve", addr, name] => lab_k8s::serve(addr, name),
        ["down"] => {
            lab.down()?;
            println!("lab down: namespaces, cgroups, pins, processes and target/lab removed");
            Ok(())
        }
        ["status"] => {
            match lab.status()? {
                None => println!("the lab is down"),
                Some(l) if !l["kubernetes"].is_null() => {
                    let k = &l["kubernetes"];
                    println!(
                        "Kubernetes mode: API {} (export KUBECONFIG={}); kubelet stand-in {}",
                        k["api"].as_str().unwrap_or_default(),
                        k["kubeconfig"].as_str().unwrap_or_default(),
                        if lab.kubelet_running()? {
                            "running"
                        } else {
                            "NOT running (see kubelet.log: `lab down`, then `up` again)"
                        }
                    );
                    println!("{}", serde_json::to_string_pretty(&l)?);
                }
                Some(l) => {
                    for n in l["nodes"].as_array().into_iter().flatten() {
                        let ready = lab
                            .state_dir()
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
        ["exec", name, "--", cmd @ ..] if !cmd.is_empty() => {
            let e = match lab.pod_place(name) {
                Ok((cgroup, netns)) => std::process::Command::new(probe_exe()?)
                    .arg(cgroup)
                    .arg(netns)
                    .arg("exec")
                    .args(cmd)
                    .exec(),
                // A node: its namespace only (the agent's cgroup is the node's).
                Err(pod_err) => {
                    let netns = lab
                        .node_netns(name)
                        .map_err(|_| pod_err.context(format!("`{name}` is no pod or node")))?;
                    std::process::Command::new("nsenter")
                        .arg(format!("--net={}", netns.display()))
                        .arg("--")
                        .args(cmd)
                        .exec()
                }
            };
            Err(e).context("cannot run the command")
        }
        _ => bail!(USAGE),
    }
}

fn up(place: &Lab, config: PathBuf) -> Result<()> {
    // A failed `up` removes what it made itself, and nothing of a lab that was already up.
    let lab = place.up(&config)?;
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
    let rows = lab::demo(place)?;
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
    for n in lab["nodes"].as_array().into_iter().flatten() {
        let name = n["name"].as_str().unwrap_or_default();
        println!(
            "metrics of {name}: cargo xtask lab exec {name} -- curl -s {}",
            n["metrics_url"].as_str().unwrap_or_default()
        );
    }
    println!(
        "explore: cargo xtask lab exec client-a -- CMD; cargo xtask lab status; cargo xtask lab down"
    );
    if rows.iter().any(|r| !r.ok) {
        bail!("some demo rows did not behave as expected (see the agent logs)");
    }
    Ok(())
}

fn up_kubernetes(place: &Lab, config: PathBuf) -> Result<()> {
    let lab = place.up_kubernetes(&config)?;
    let k = &lab["kubernetes"];
    let kubeconfig = k["kubeconfig"].as_str().unwrap_or_default();
    println!(
        "lab up in Kubernetes mode: kube-apiserver {} (it runs in {}'s network namespace; \
         this host reaches it through a forwarded loopback port)",
        k["api"].as_str().unwrap_or_default(),
        lab["nodes"][0]["name"].as_str().unwrap_or_default()
    );
    for n in lab["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node {:<8} InternalIP {}",
            n["name"].as_str().unwrap_or_default(),
            n["ip"].as_str().unwrap_or_default()
        );
    }
    for p in lab["pods"].as_array().into_iter().flatten() {
        println!(
            "  pod  {}/{:<10} node {:<7} ip {}",
            p["namespace"].as_str().unwrap_or_default(),
            p["name"].as_str().unwrap_or_default(),
            p["node"].as_str().unwrap_or_default(),
            p["ip"].as_str().unwrap_or_default()
        );
    }
    // A connection worth showing: the first client to a server on the other node.
    let pods: Vec<&serde_json::Value> = lab["pods"].as_array().into_iter().flatten().collect();
    let client = pods
        .iter()
        .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with("client")));
    let server = client.and_then(|c| {
        pods.iter().find(|p| {
            p["name"].as_str().is_some_and(|n| n.starts_with("server")) && p["node"] != c["node"]
        })
    });
    let (client, server_ip) = match (client, server) {
        (Some(c), Some(s)) => (
            c["name"].as_str().unwrap_or_default(),
            s["ip"].as_str().unwrap_or_default(),
        ),
        _ => ("POD", "SERVER_IP"),
    };
    println!(
        "\nno mesh yet: install it with Helm (the kubelet stand-in runs what the chart deploys):\n  \
         eval \"$(cargo xtask lab env)\"   # KUBECONFIG={kubeconfig}, PATH: kubectl, helm\n  \
         helm install nodemesh charts/nodemesh -n nodemesh-system --create-namespace --wait\n  \
         kubectl label namespace demo nodemesh.io/dataplane=enabled\n  \
         cargo xtask lab exec {client} -- curl -s http://{server_ip}:{port}/\n\
         agent logs (access lines): {state}/<node>.log; the stand-in's: {}\n\
         docs/kubernetes-mode.md, \"Try it on the lab\"; cargo xtask lab down removes everything",
        k["kubelet_log"].as_str().unwrap_or_default(),
        port = lab::ECHO_PORT,
        state = place.state_dir().display(),
    );
    Ok(())
}
