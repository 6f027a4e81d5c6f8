//! `cargo xtask bench [--quick]`: builds the eBPF object and the tests crate's binaries in
//! release, then runs `nm-bench run` (root) from the workspace root: the mesh against the raw
//! path on a lab of its own, report in `target/bench/report.{md,json}` (docs/performance.md).
//! The full run then runs the Kubernetes scale benchmark (`nm-bench k8s-scale`: 5,000 pods and
//! 500 services in a real kube-apiserver; its section is merged into the same report; needs the
//! binaries of `cargo xtask k8s build`) and the criterion micro-benchmarks (`cargo bench -p
//! mesh-agent --bench hot_paths`; reports in `target/criterion`). `--quick` skips both.
//! `--third-party` also drives iperf3 and wrk against nginx on the same paths.

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf, setup,
    util::{cargo_target_dir, exec, workspace_root},
};

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// A short run (under 3 minutes after the build) for a first look; the full run's ratios
    /// repeat within 15%. Skips the Kubernetes scale run and the micro-benchmarks.
    #[arg(long)]
    pub quick: bool,
    /// Also drive Debian's iperf3, and wrk against nginx, on the same paths (about 3 minutes
    /// more; `cargo xtask setup` installs them). Their table goes into the same report.
    #[arg(long)]
    pub third_party: bool,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root();
    setup::ensure_lab_tools()?;
    if opts.third_party {
        setup::ensure_bench_tools()?;
    }
    build_ebpf::run(build_ebpf::Options::default())?;
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "-p", "nodemesh-tests", "--bins"]),
    )?;
    let mut bench = Command::new(cargo_target_dir().join("release/nm-bench"));
    bench.current_dir(&root).arg("run");
    if opts.quick {
        bench.arg("--quick");
    }
    if opts.third_party {
        bench.arg("--third-party");
    }
    exec(&mut bench)?;
    if !opts.quick {
        // One node's Kubernetes source against 5,000 pods and 500 services (issue 12).
        exec(
            Command::new(cargo_target_dir().join("release/nm-bench"))
                .current_dir(&root)
                .arg("k8s-scale"),
        )?;
        // The hot pure code (policy with 10k policies, maps for 5k workloads, HBONE headers).
        exec(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&root)
                .args(["bench", "-p", "mesh-agent", "--bench", "hot_paths"]),
        )?;
    }
    Ok(())
}
