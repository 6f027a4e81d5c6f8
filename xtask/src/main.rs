//! `cargo xtask …`: developer tasks for nodemesh. One file per subcommand, each with an
//! `Options` struct and `run(opts)`.

mod bench;
mod build_ebpf;
mod codegen;
mod deny;
mod fuzz;
mod image;
mod k8s;
mod lab;
mod setup;
mod soak;
mod test;
mod toolchain;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodemesh developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building the eBPF programs needs (idempotent: checks before it acts).
    Setup(setup::Options),
    /// Build the eBPF object that mesh-agent embeds.
    BuildEbpf(build_ebpf::Options),
    /// Regenerate the committed files derived from Rust types (the chart's CRDs); a test fails
    /// when they are stale.
    Codegen(codegen::Options),
    /// The container image (charts/image/Dockerfile): builds mesh-agent and stages the context
    /// in target/image; builds the image when docker, podman or buildah is present.
    Image(image::Options),
    /// Build and run the fuzz targets (`mesh-agent/fuzz`): `--smoke` (seconds each, as CI),
    /// `--seconds N` or `--runs N`; prints executions and exec/s per target.
    Fuzz(fuzz::Options),
    /// `cargo deny check` with `xtask/deny/deny.toml`: advisories (from the vendored database),
    /// licences, duplicate versions, sources.
    Deny(deny::Options),
    /// Everything CI checks: setup, eBPF build, fmt, clippy (host and eBPF), unit and root tests.
    Test(test::Options),
    /// The local lab: two nodes and their pods on this machine (`up`, the default; `down`;
    /// `status`; `exec POD -- CMD`). Needs root. Topology in target/lab/lab.json.
    Lab(lab::Options),
    /// The mesh against the raw path in one run (root): throughput, latency, connection rate,
    /// agent CPU and memory. Report in target/bench/report.{md,json}.
    Bench(bench::Options),
    /// The soak (root): mixed traffic through the bench lab for `--minutes N`, the agents' RSS,
    /// open fds, threads, tasks and error counters over time, and a verdict (flat memory, no
    /// errors). Report and chart in target/soak/.
    Soak(soak::Options),
    /// A real Kubernetes control plane built from the Go module proxy: `build` (cached
    /// kube-apiserver, kubectl, etcd, helm), `up`, `down`, `env`, `status`.
    K8s(k8s::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(opts),
        Command::BuildEbpf(opts) => build_ebpf::run(opts),
        Command::Codegen(opts) => codegen::run(opts),
        Command::Image(opts) => image::run(opts),
        Command::Test(opts) => test::run(opts),
        Command::Fuzz(opts) => fuzz::run(opts),
        Command::Deny(opts) => deny::run(opts),
        Command::Lab(opts) => lab::run(opts),
        Command::Bench(opts) => bench::run(opts),
        Command::Soak(opts) => soak::run(opts),
        Command::K8s(opts) => k8s::run(opts),
    };
    if let Err(e) = result {
        eprintln!("\nerror: {e:#}");
        std::process::exit(1);
    }
}
