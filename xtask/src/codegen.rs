//! `cargo xtask codegen`: regenerates the files derived from Rust types and committed to the
//! repository: the chart's CRDs (`charts/nodemesh/files/crds/`, from `mesh-agent/src/crd.rs`). xtask
//! does not depend on mesh-agent (its build needs the eBPF object), so this builds the eBPF
//! object first and runs the agent's hidden `write-crds` command. A mesh-agent test fails when
//! the committed files differ from what this writes.

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf,
    util::{exec, workspace_root},
};

/// Where the generated CRDs go, relative to the workspace root.
pub const CRD_DIR: &str = "charts/nodemesh/files/crds";

#[derive(clap::Args, Debug, Default)]
pub struct Options {}

pub fn run(_opts: Options) -> Result<()> {
    let root = workspace_root();
    build_ebpf::run(build_ebpf::Options::default())?;
    std::fs::create_dir_all(root.join(CRD_DIR))?;
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args([
                "run",
                "-q",
                "-p",
                "mesh-agent",
                "--",
                "write-crds",
                "--out-dir",
            ])
            .arg(CRD_DIR),
    )
}
