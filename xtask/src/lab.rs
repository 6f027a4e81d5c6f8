//! `cargo xtask lab [up [--kubernetes]|down|status|exec POD -- CMD]`: builds the eBPF object and
//! the tests crate's binaries (`nm-lab`, `nm-agent`, `nm-probe`), then runs `nm-lab` (root) with
//! the same arguments from the workspace root. xtask does not depend on mesh-agent: its build
//! needs the eBPF object this task builds first. `up --kubernetes` also needs kube-apiserver,
//! etcd, kubectl and helm: it builds them like `cargo xtask k8s build` (once; later runs reuse the
//! cache) and hands their directory to `nm-lab` (`NODEMESH_K8S_BIN`); so do `down` and `status`
//! when the cache is there. `env` builds nothing: it prints the exports for the Kubernetes mode
//! (`eval "$(cargo xtask lab env)"`: `KUBECONFIG` = the lab's admin kubeconfig, and the directory
//! of that kubectl and helm first in `PATH`).

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf, k8s, setup,
    util::{cargo_target_dir, exec, workspace_root},
};

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// `up` (default; `up --kubernetes` for the Kubernetes mode), `down`, `status`,
    /// `exec POD -- CMD...`, or `env` (the Kubernetes mode's exports).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root();
    if opts.args == ["env"] {
        return print_env(&root);
    }
    let read_only = matches!(
        opts.args.first().map(String::as_str),
        Some("down" | "status")
    );
    if !read_only {
        // A fresh machine: install the BPF toolchain first (not the test runner).
        setup::ensure_lab_tools()?;
    }
    build_ebpf::run(build_ebpf::Options::default())?;
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "-p", "nodemesh-tests", "--bins"]),
    )?;
    let kubernetes = opts.args.iter().any(|a| a == "--kubernetes");
    let mut nm_lab = Command::new(cargo_target_dir().join("debug/nm-lab"));
    if kubernetes {
        nm_lab.env(k8s::BIN_ENV, k8s::build()?);
    }
    exec(nm_lab.current_dir(&root).args(&opts.args))
}

/// `env`: only the exports on stdout (for `eval`), nothing built.
fn print_env(root: &std::path::Path) -> Result<()> {
    let kubeconfig = root.join("target/lab/kubeconfig");
    let pointer = root.join(k8s::BIN_DIR_POINTER);
    if !kubeconfig.is_file() {
        eprintln!("# the lab is not up in Kubernetes mode: run `cargo xtask lab up --kubernetes`");
    }
    let quote =
        |p: &std::path::Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    println!("export KUBECONFIG={}", quote(&kubeconfig));
    match std::fs::read_to_string(&pointer) {
        Ok(bin) => println!(
            "export PATH={}:\"$PATH\"",
            quote(std::path::Path::new(bin.trim()))
        ),
        Err(_) => eprintln!(
            "# kubectl and helm are not built yet: `cargo xtask lab up --kubernetes` builds them"
        ),
    }
    Ok(())
}
