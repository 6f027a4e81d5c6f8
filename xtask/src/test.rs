//! `cargo xtask test`: the README's test command and CI's only step. Runs setup (a no-op when
//! everything is present), builds the eBPF object, checks formatting, runs clippy with
//! `-D warnings` on the host crates and, separately, on the eBPF crate, runs `cargo deny` and
//! every fuzz target for a few seconds, then runs every test
//! (unit tests and the root eBPF integration tests) with cargo-nextest, whose summary line is the
//! last thing printed. Before the tests it runs `k8s build` (seconds when the binaries are cached)
//! and passes their directory to the tests in `NODEMESH_K8S_BIN`, and the chart tests'
//! `kubernetes-validate` (installed by setup) in `NODEMESH_KUBERNETES_VALIDATE`.

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf, deny, fuzz, k8s, setup,
    util::{exec, workspace_root},
};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Skip `cargo xtask setup` (when you know the toolchain is in place).
    #[arg(long)]
    pub no_setup: bool,
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

pub fn run(opts: Options) -> Result<()> {
    if !opts.no_setup {
        setup::run(setup::Options::default())?;
    }
    build_ebpf::run(build_ebpf::Options::default())?;
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_ebpf::clippy()?;
    exec(cargo().args([
        "fmt",
        "--manifest-path",
        "mesh-agent/fuzz/Cargo.toml",
        "--",
        "--check",
    ]))?;
    deny::run(deny::Options::default())?;
    fuzz::run(fuzz::Options {
        smoke: true,
        ..Default::default()
    })?;
    let k8s_bin = k8s::build()?;
    // Recorded by setup; quiet and quick when present (also with --no-setup).
    let validate = setup::ensure_python_tools_quiet()?;
    exec(
        cargo()
            .env(k8s::BIN_ENV, &k8s_bin)
            .env(setup::KUBERNETES_VALIDATE_ENV, &validate)
            .args([
                "nextest",
                "run",
                "--workspace",
                "--exclude",
                "mesh-ebpf",
                "--no-fail-fast",
            ]),
    )
}
