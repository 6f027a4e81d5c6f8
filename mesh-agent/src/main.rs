//! `mesh-agent`: the nodemesh node agent binary. Thin: parses arguments, sets up logging and calls
//! into the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::datapath::{Datapath, Pins, uninstall};

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
    /// Remove everything an agent instance pinned under bpffs: its programs detach (once no
    /// agent process of the instance is running) and its maps are freed. Idempotent.
    Uninstall {
        /// The agent instance whose pins to remove (`<bpffs>/nodemesh/<instance>`).
        #[arg(long)]
        instance: String,
        /// Where bpffs is mounted.
        #[arg(long, default_value = Pins::DEFAULT_BPFFS)]
        bpffs: std::path::PathBuf,
    },
}

fn report(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::FAILURE
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
            Err(e) => report(&e),
        },
        Command::Uninstall { instance, bpffs } => {
            match Pins::new(bpffs, &instance).and_then(|pins| uninstall(&pins)) {
                Ok(true) => {
                    println!("ok: removed the pins of instance {instance}");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("ok: instance {instance} had nothing pinned");
                    ExitCode::SUCCESS
                }
                Err(e) => report(&e),
            }
        }
    }
}
