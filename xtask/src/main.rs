//! `cargo xtask …`: developer tasks for nodemesh. One file per subcommand, each with an
//! `Options` struct and `run(opts)`.

mod build_ebpf;
mod setup;
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
    /// Everything CI checks: setup, eBPF build, fmt, clippy (host and eBPF), unit and root tests.
    Test(test::Options),
    /// The local lab demo (coming with the lab issue).
    Lab,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(opts),
        Command::BuildEbpf(opts) => build_ebpf::run(opts),
        Command::Test(opts) => test::run(opts),
        Command::Lab => Err(anyhow::anyhow!(
            "the local lab is not built yet (it arrives with the lab issue); \
             `cargo xtask test` runs everything that exists today"
        )),
    };
    if let Err(e) = result {
        eprintln!("\nerror: {e:#}");
        std::process::exit(1);
    }
}
