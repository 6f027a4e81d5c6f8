//! `mesh-agent`: the nodemesh node agent binary. Thin: parses arguments, sets up logging and calls
//! into the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::datapath::Datapath;

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "nodemesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load every eBPF program into the kernel (running the verifier) and report, without
    /// attaching anything. Exits non-zero with the verifier's reason if a program is rejected.
    CheckKernel,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckKernel => match Datapath::load() {
            Ok(_) => {
                println!("ok: the kernel accepted every nodemesh eBPF program");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    eprintln!("  caused by: {s}");
                    source = s.source();
                }
                ExitCode::FAILURE
            }
        },
    }
}
