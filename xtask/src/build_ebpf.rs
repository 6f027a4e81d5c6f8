//! `cargo xtask build-ebpf`: builds `mesh-ebpf` (release, with BTF) into `target/ebpf/`, where
//! `mesh-agent`'s build script finds it.

use anyhow::{Context, Result};

use crate::{
    toolchain::{self, Toolchain},
    util::{exec, workspace_root},
};

#[derive(clap::Args, Default)]
pub struct Options {}

/// The directory the BPF build uses, separate from the host build's target dir.
pub fn target_dir() -> std::path::PathBuf {
    workspace_root().join("target/ebpf")
}

pub fn toolchain_or_hint() -> Result<Toolchain> {
    toolchain::detect().context(
        "no compiler for the BPF target found: run `cargo xtask setup` \
         (it installs Debian's rustc-web + libstd-rust-web-dev-bpf, or a rustup nightly with rust-src)",
    )
}

pub fn run(_opts: Options) -> Result<()> {
    let tc = toolchain_or_hint()?;
    toolchain::find_bpf_linker().context("bpf-linker is not installed: run `cargo xtask setup`")?;
    println!("building eBPF programs with {}", tc.describe());
    let mut cmd = tc.cargo("build");
    cmd.current_dir(workspace_root())
        .args(["--release", "--package", "mesh-ebpf", "--target-dir"])
        .arg(target_dir());
    exec(&mut cmd)?;
    println!(
        "eBPF object: {}",
        target_dir()
            .join(toolchain::TARGET)
            .join("release/mesh-ebpf")
            .display()
    );
    Ok(())
}

/// `cargo clippy -D warnings` on the eBPF crate, with the same toolchain.
pub fn clippy() -> Result<()> {
    let tc = toolchain_or_hint()?;
    let mut cmd = tc.cargo("clippy");
    cmd.current_dir(workspace_root())
        .args(["--release", "--package", "mesh-ebpf", "--target-dir"])
        .arg(target_dir())
        .args(["--", "-D", "warnings"]);
    exec(&mut cmd)
}
