//! `mesh-agent`: the nodemesh node agent binary. Thin: the command line lives in the library
//! (`mesh_agent::cli`).

fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
