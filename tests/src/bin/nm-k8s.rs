//! `nm-k8s`: the Kubernetes control plane on the host for trying nodemesh by hand
//! (`cargo xtask k8s up|down|status` builds and runs it; `env` is xtask's own; the code is the
//! tests' harness, `nodemesh_tests::k8s`). The binaries come from `$NODEMESH_K8S_BIN`; state
//! lives in `target/k8s/` under the current directory (the workspace root).
//!
//! - `nm-k8s up [--api-port P] [--etcd-port P]`: starts etcd and kube-apiserver on 127.0.0.1
//!   (defaults 6443 and 2379/2380), writes `target/k8s/admin.kubeconfig`, and leaves them
//!   running.
//! - `nm-k8s down`: stops them (also after a crash, from the pid files) and removes
//!   `target/k8s`.
//! - `nm-k8s status`: the processes and `/readyz`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use nodemesh_tests::k8s::{self, Binaries, ControlPlane, Network, Options};

const USAGE: &str = "usage: nm-k8s up [--api-port P] [--etcd-port P] | down | status";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn state_dir() -> Result<PathBuf> {
    Ok(std::env::current_dir()?.join("target/k8s"))
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dir = state_dir()?;
    match args.as_slice() {
        ["up", opts @ ..] => {
            let mut o = Options::new("nodemesh");
            o.network = Network::Host;
            o.dir = Some(dir.clone());
            o.progress = true;
            let mut it = opts.iter();
            while let Some(flag) = it.next() {
                let value = it.next().context(USAGE)?;
                let port = value
                    .parse()
                    .with_context(|| format!("bad port `{value}`"))?;
                match *flag {
                    "--api-port" => o.api_port = port,
                    "--etcd-port" => o.etcd_port = port,
                    _ => bail!(USAGE),
                }
            }
            if k8s::detached_processes(&dir).iter().any(|(_, _, up)| *up) {
                println!(
                    "the control plane is already up (state in {}); `cargo xtask k8s down` \
                     stops it",
                    dir.display()
                );
                return Ok(());
            }
            // Leftovers of a crashed run.
            k8s::stop_detached(&dir)?;
            let cp = ControlPlane::start_with(o)?;
            let kubeconfig = cp.admin_kubeconfig().to_path_buf();
            let server = cp.server(None);
            cp.detach()?;
            println!(
                "k8s up: kube-apiserver at {server} (RBAC; etcd beside it), admin kubeconfig \
                 {}\nlogs in {}\nuse it: eval \"$(cargo xtask k8s env)\"; kubectl get ns\n\
                 stop it: cargo xtask k8s down",
                kubeconfig.display(),
                dir.display()
            );
            Ok(())
        }
        ["down"] => {
            if k8s::stop_detached(&dir)? {
                println!(
                    "k8s down: etcd and kube-apiserver stopped, {} removed",
                    dir.display()
                );
            } else {
                println!("k8s down: nothing to do ({} does not exist)", dir.display());
            }
            Ok(())
        }
        ["status"] => status(&dir),
        _ => bail!(USAGE),
    }
}

fn status(dir: &std::path::Path) -> Result<()> {
    let procs = k8s::detached_processes(dir);
    if procs.iter().all(|(_, pid, _)| pid.is_none()) {
        println!("the control plane is down");
        return Ok(());
    }
    for (name, pid, up) in &procs {
        match (pid, up) {
            (Some(p), true) => println!("{name}: running (pid {p})"),
            (Some(p), false) => {
                println!("{name}: NOT running (pid {p} gone; `k8s down` cleans up)")
            }
            (None, _) => println!("{name}: no pid file"),
        }
    }
    let bins = Binaries::locate()?;
    let out = std::process::Command::new(bins.kubectl())
        .arg(format!(
            "--kubeconfig={}",
            dir.join("admin.kubeconfig").display()
        ))
        .args(["get", "--raw=/readyz", "--request-timeout=5s"])
        .output()
        .context("cannot run kubectl")?;
    if out.status.success() {
        println!("/readyz: {}", String::from_utf8_lossy(&out.stdout).trim());
    } else {
        println!(
            "/readyz: not ready: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
