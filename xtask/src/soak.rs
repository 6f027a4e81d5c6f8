//! `cargo xtask soak --minutes N`: builds the eBPF object and the tests crate's binaries in
//! release (as `cargo xtask bench`), then runs `nm-bench soak` (root) from the workspace root:
//! mixed traffic through the bench lab for N minutes, the agents' RSS, open fds, threads, tokio
//! tasks and error counters sampled over time; report in `target/soak/report.{md,json}` and the
//! chart `target/soak/soak.svg` (docs/performance.md, "Soak"). Fails when the verdict does.
//! Do not run it under `nice`: a soak measures the agents as they would run.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    build_ebpf, setup,
    util::{cargo_target_dir, exec, workspace_root},
};

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// How long the traffic runs (fractions allowed). Memory is judged from 2 minutes on; 30
    /// minutes is the acceptance run.
    #[arg(long)]
    pub minutes: Option<f64>,
    /// How often the agents are sampled, in seconds (default 5; 2 for runs under a minute).
    #[arg(long)]
    pub interval: Option<u64>,
    /// Seconds instead of minutes (tests and quick checks).
    #[arg(long, hide = true, conflicts_with = "minutes")]
    pub seconds: Option<u64>,
}

pub fn run(opts: Options) -> Result<()> {
    let duration = match (opts.minutes, opts.seconds) {
        (Some(m), None) => vec!["--minutes".to_owned(), m.to_string()],
        (None, Some(s)) => vec!["--seconds".to_owned(), s.to_string()],
        _ => bail!("say how long: `cargo xtask soak --minutes N`"),
    };
    let root = workspace_root();
    setup::ensure_lab_tools()?;
    build_ebpf::run(build_ebpf::Options::default())?;
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "-p", "nodemesh-tests", "--bins"]),
    )?;
    let mut soak = Command::new(cargo_target_dir().join("release/nm-bench"));
    soak.current_dir(&root).arg("soak").args(duration);
    if let Some(i) = opts.interval {
        soak.args(["--interval", &i.to_string()]);
    }
    exec(&mut soak)
}
