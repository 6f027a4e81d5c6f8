//! `cargo xtask fuzz`: builds and runs the fuzz targets of `mesh-agent/fuzz` with cargo-fuzz
//! (libFuzzer) on the stable compiler, and prints one line per target: executions, time,
//! executions per second. `cargo xtask test` runs every target for a few seconds (`--smoke`);
//! longer runs are `--seconds N` or `--runs N` (docs/fuzzing.md).
//!
//! Stable Rust: cargo-fuzz passes `-Z` flags only for sanitizers, which are not used here
//! (`--sanitizer none`: the fuzzed code is safe Rust, where a panic, a hang or unbounded memory
//! is the bug to find, and libFuzzer finds those itself); `RUSTC_BOOTSTRAP=1` covers the rest
//! (cargo-fuzz's `--cfg fuzzing` build and libfuzzer-sys). Corpora and crash artefacts live under
//! `target/fuzz/` (`$CARGO_TARGET_DIR/fuzz/` when that is set); the committed seeds are read
//! from `mesh-agent/fuzz/seeds/<target>/`.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf, setup,
    util::{cargo_target_dir, exec, workspace_root},
};

/// Every fuzz target (`mesh-agent/fuzz/Cargo.toml`), in the order the smoke run takes them.
pub const TARGETS: [&str; 7] = [
    "spiffe_id",
    "peer_certificate",
    "connect_headers",
    "policy_compile",
    "local_config",
    "k8s_objects",
    "hbone_inbound",
];

/// Seconds per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 10;

#[derive(clap::Args, Default)]
pub struct Options {
    /// Targets to run (default: all).
    pub targets: Vec<String>,
    /// Stop each target after this many seconds.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Stop each target after this many executions.
    #[arg(long)]
    pub runs: Option<u64>,
    /// A few seconds per target (what `cargo xtask test` runs), on an unoptimised build.
    #[arg(long)]
    pub smoke: bool,
    /// Only build the targets.
    #[arg(long)]
    pub build_only: bool,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("mesh-agent/fuzz")
}

/// The fuzz build, corpora, artefacts and logs: `target/fuzz`, or `fuzz/` in `CARGO_TARGET_DIR`
/// (CI's cache outside the clone, so its corpora add up from run to run).
fn out_dir() -> PathBuf {
    cargo_target_dir().join("fuzz")
}

/// `dev`: cargo-fuzz's `--dev` (unoptimised, still instrumented): what the smoke run uses, since
/// an optimised instrumented build of the agent's whole dependency tree costs a cold CI machine
/// far more than the seconds of fuzzing it buys; long runs build optimised.
fn cargo_fuzz(sub: &str, dev: bool) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(out_dir())
        .args(["--sanitizer", "none"]);
    if dev {
        cmd.arg("--dev");
    }
    cmd
}

/// Builds every target (release, or `dev` for the smoke run; debug assertions on, coverage
/// instrumentation).
pub fn build(dev: bool) -> Result<()> {
    exec(&mut cargo_fuzz("build", dev))
        .context("building the fuzz targets failed (the compiler's messages are above)")
}

/// What one run did, from libFuzzer's closing line (`Done N runs in S second(s)`).
struct Outcome {
    runs: u64,
    seconds: f64,
}

fn run_target(target: &str, limit: &[String], dev: bool) -> Result<Outcome> {
    let corpus = out_dir().join("corpus").join(target);
    let artifacts = out_dir().join("artifacts").join(target);
    let logs = out_dir().join("logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = cargo_fuzz("run", dev);
    cmd.arg(target).arg(&corpus);
    let seeds = fuzz_dir().join("seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // A single input taking seconds is a hang; 2 GiB is far beyond any input's need.
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .args(limit)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    println!(
        "fuzz {target} {} (log: {})",
        limit.join(" "),
        log_path.display()
    );
    let began = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({status}) after {:.0} s; the end of its log:\n{}\n\n\
             The input that failed is in {}. Reproduce it with `RUSTC_BOOTSTRAP=1 cargo fuzz \
             run --fuzz-dir mesh-agent/fuzz --target-dir {} -s none {target} <file>`, fix \
             the code (bad input must give an error, never a panic or a hang) and add the input \
             as a regression test next to the code it broke.",
            began.elapsed().as_secs_f64(),
            tail.join("\n"),
            artifacts.display(),
            out_dir().display()
        );
    }
    parse_done(&text).with_context(|| {
        format!(
            "fuzz target {target}: no `Done N runs` line in {}",
            log_path.display()
        )
    })
}

/// Parses libFuzzer's `Done 123 runs in 10 second(s)`.
fn parse_done(log: &str) -> Option<Outcome> {
    let line = log.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut words = line.split_whitespace();
    let runs = words.nth(1)?.parse().ok()?;
    let seconds = words.nth(2)?.parse().ok()?;
    Some(Outcome { runs, seconds })
}

pub fn run(opts: Options) -> Result<()> {
    setup::ensure_cargo_fuzz()?;
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &opts.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "unknown fuzz target `{t}`; the targets: {}",
                    TARGETS.join(", ")
                );
            }
        }
        opts.targets.iter().map(String::as_str).collect()
    };
    // The agent embeds the eBPF object: build it first, as every other task that builds the
    // agent does (a fresh clone has none).
    build_ebpf::run(build_ebpf::Options::default())?;
    build(opts.smoke)?;
    if opts.build_only {
        return Ok(());
    }
    let mut limit = Vec::new();
    let seconds = match (opts.smoke, opts.seconds) {
        (true, _) => Some(SMOKE_SECONDS),
        (false, s) => s,
    };
    if let Some(s) = seconds {
        limit.push(format!("-max_total_time={s}"));
    }
    if let Some(r) = opts.runs {
        limit.push(format!("-runs={r}"));
    }
    if limit.is_empty() {
        bail!("say how long: --smoke, --seconds N or --runs N");
    }
    let mut rows = Vec::new();
    for t in &targets {
        let o = run_target(t, &limit, opts.smoke)?;
        rows.push((t.to_string(), o));
    }
    println!(
        "\n{:<18} {:>14} {:>10} {:>10}",
        "target", "executions", "seconds", "exec/s"
    );
    for (t, o) in &rows {
        let rate = if o.seconds > 0.0 {
            o.runs as f64 / o.seconds
        } else {
            0.0
        };
        println!("{t:<18} {:>14} {:>10.0} {:>10.0}", o.runs, o.seconds, rate);
    }
    println!(
        "{} fuzz target(s) ran without a crash, a hang or running out of memory",
        rows.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_closing_line() {
        let log = "#1000\tDONE   cov: 10 ft: 20 corp: 3/30b exec/s: 100 rss: 40Mb\n\
                   Done 1000 runs in 10 second(s)\n";
        let o = parse_done(log).expect("parsed");
        assert_eq!(o.runs, 1000);
        assert_eq!(o.seconds, 10.0);
        assert!(parse_done("nothing here").is_none());
    }

    #[test]
    fn every_target_is_declared_in_the_fuzz_crate() {
        let manifest =
            std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} is not a [[bin]] of mesh-agent/fuzz/Cargo.toml"
            );
        }
        let declared = manifest.matches("[[bin]]").count();
        assert_eq!(declared, TARGETS.len(), "every [[bin]] is in fuzz::TARGETS");
    }
}
