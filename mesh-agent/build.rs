//! Finds the eBPF object built by `cargo xtask build-ebpf` and hands its path to the crate, which
//! embeds it. The object is not built from here (a cargo-in-cargo build inherits the outer build's
//! environment and needs a different toolchain); instead a missing or stale object stops the build
//! with a message that names the command to run.

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

const OVERRIDE_ENV: &str = "NODEMESH_EBPF_OBJECT";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("mesh-agent lives in the workspace root")
        .to_path_buf();
    println!("cargo:rerun-if-env-changed={OVERRIDE_ENV}");

    if let Some(path) = env::var_os(OVERRIDE_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            fail(&format!(
                "{OVERRIDE_ENV}={} does not name a file.",
                path.display()
            ));
        }
        println!("cargo:rerun-if-changed={}", path.display());
        println!(
            "cargo:rustc-env=NODEMESH_EBPF_OBJECT_PATH={}",
            path.display()
        );
        return;
    }

    let object = root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    let sources = [
        root.join("mesh-ebpf/src"),
        root.join("mesh-ebpf/Cargo.toml"),
        root.join("mesh-common/src"),
        root.join("mesh-common/Cargo.toml"),
    ];
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    println!("cargo:rerun-if-changed={}", object.display());

    let Ok(built) = fs::metadata(&object).and_then(|m| m.modified()) else {
        fail(&format!(
            "the eBPF object {} does not exist.",
            object.display()
        ));
    };
    let newest = sources.iter().filter_map(|s| newest_mtime(s)).max();
    if let Some((newest, path)) = newest
        && newest > built
    {
        fail(&format!(
            "the eBPF object {} is older than {}.",
            object.display(),
            path.display()
        ));
    }
    println!(
        "cargo:rustc-env=NODEMESH_EBPF_OBJECT_PATH={}",
        object.display()
    );
}

fn newest_mtime(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

fn fail(what: &str) -> ! {
    eprintln!();
    eprintln!("error: {what}");
    eprintln!("  mesh-agent embeds the nodemesh eBPF programs. Build them first with:");
    eprintln!("      cargo xtask build-ebpf");
    eprintln!("  (on a new machine, `cargo xtask setup` installs the eBPF toolchain first;");
    eprintln!("   or point {OVERRIDE_ENV} at a prebuilt object).");
    eprintln!();
    std::process::exit(1);
}
