//! The node agent, built as a binary of the tests crate so the end-to-end tests can run it
//! (cargo only exposes a package's own binaries to its tests). The same code as `mesh-agent`:
//! both call `mesh_agent::cli::main`.

fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
