//! `cargo xtask lab [up|down|status|exec POD -- CMD]`: builds the eBPF object and the tests
//! crate's binaries (`nm-lab`, `nm-agent`, `nm-probe`), then runs `nm-lab` (root) with the same
//! arguments from the workspace root. xtask does not depend on mesh-agent: its build needs the
//! eBPF object this task builds first.

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf,
    util::{exec, workspace_root},
};

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// `up` (default), `down`, `status`, or `exec POD -- CMD...`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root();
    build_ebpf::run(build_ebpf::Options::default())?;
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "-p", "nodemesh-tests", "--bins"]),
    )?;
    exec(
        Command::new(root.join("target/debug/nm-lab"))
            .current_dir(&root)
            .args(&opts.args),
    )
}
