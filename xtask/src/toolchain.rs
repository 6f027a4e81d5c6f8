//! Finding a compiler that can build for `bpfel-unknown-none`, and building commands with it.
//!
//! Two kinds work (see docs/development.md):
//! - **Debian**: `rustc-web` + `libstd-rust-web-dev-bpf` ship a compiler with a prebuilt `core`
//!   for the BPF targets (no nightly, no `-Z build-std`; `RUSTC_BOOTSTRAP=1` because aya-ebpf
//!   uses `asm_experimental_arch`). This is what CI machines use.
//! - **Nightly**: a rustup nightly with `rust-src`, building `core` with `-Z build-std=core`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use crate::util::{output, which};

pub const TARGET: &str = "bpfel-unknown-none";
const DEBIAN_BIN: &str = "/usr/bin";
/// Flags for the BPF build: BTF (for BTF maps and CO-RE) via bpf-linker, full debuginfo so the
/// BTF has names.
const BPF_RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf -C panic=abort";
/// Variables set by the outer `cargo xtask` (rustup's stable toolchain) that must not leak into
/// the BPF build.
const OUTER_ENV: [&str; 8] = [
    "CARGO",
    "RUSTC",
    "RUSTDOC",
    "RUSTUP_TOOLCHAIN",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Toolchain {
    Debian { llvm_major: u32 },
    Nightly { llvm_major: u32 },
}

impl Toolchain {
    pub fn llvm_major(&self) -> u32 {
        match self {
            Toolchain::Debian { llvm_major } | Toolchain::Nightly { llvm_major } => *llvm_major,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Toolchain::Debian { llvm_major } => {
                format!(
                    "Debian rustc with a prebuilt BPF core ({DEBIAN_BIN}/rustc, LLVM {llvm_major})"
                )
            }
            Toolchain::Nightly { llvm_major } => {
                format!("rustup nightly with rust-src, -Z build-std=core (LLVM {llvm_major})")
            }
        }
    }

    /// A `cargo <subcommand>` for the BPF target with this toolchain, with the environment of the
    /// outer `cargo xtask` (which points at rustup's stable toolchain) removed.
    pub fn cargo(&self, subcommand: &str) -> Command {
        let mut cmd = match self {
            Toolchain::Debian { .. } => Command::new(Path::new(DEBIAN_BIN).join("cargo")),
            Toolchain::Nightly { .. } => Command::new("cargo"),
        };
        for var in OUTER_ENV {
            cmd.env_remove(var);
        }
        match self {
            Toolchain::Debian { .. } => {
                // Debian's cargo, rustc and clippy-driver must be used together.
                let mut path = OsString::from(DEBIAN_BIN);
                path.push(":");
                path.push(std::env::var_os("PATH").unwrap_or_default());
                cmd.env("PATH", path)
                    .env("RUSTC", Path::new(DEBIAN_BIN).join("rustc"))
                    .env("RUSTC_BOOTSTRAP", "1")
                    .arg(subcommand);
            }
            Toolchain::Nightly { .. } => {
                cmd.arg("+nightly")
                    .arg(subcommand)
                    .args(["-Z", "build-std=core"]);
            }
        }
        cmd.env("RUSTFLAGS", BPF_RUSTFLAGS)
            .args(["--target", TARGET]);
        cmd
    }

    /// The clippy driver this toolchain needs, if it is missing.
    pub fn missing_clippy(&self) -> Option<&'static str> {
        match self {
            Toolchain::Debian { .. } => (!Path::new(DEBIAN_BIN).join("clippy-driver").is_file())
                .then_some("rust-web-clippy"),
            Toolchain::Nightly { .. } => output(Command::new("rustup").args([
                "component",
                "list",
                "--installed",
                "--toolchain",
                "nightly",
            ]))
            .filter(|s| s.lines().any(|l| l.starts_with("clippy")))
            .is_none()
            .then_some("clippy"),
        }
    }
}

/// Parses `LLVM version: 22.1.8` from `rustc -vV`.
pub fn parse_llvm_major(verbose_version: &str) -> Option<u32> {
    verbose_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

fn sysroot_has_bpf_core(sysroot: &Path) -> bool {
    let lib = sysroot.join("lib/rustlib").join(TARGET).join("lib");
    std::fs::read_dir(lib)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false)
}

/// Debian's compiler, if installed with its BPF `core`.
pub fn detect_debian() -> Option<Toolchain> {
    let rustc = Path::new(DEBIAN_BIN).join("rustc");
    // Debian's cargo comes from a separate package (cargo-web); without it the toolchain is
    // incomplete and setup must install it.
    if !rustc.is_file() || !Path::new(DEBIAN_BIN).join("cargo").is_file() {
        return None;
    }
    let sysroot = output(Command::new(&rustc).args(["--print", "sysroot"]))?;
    if !sysroot_has_bpf_core(Path::new(sysroot.trim())) {
        return None;
    }
    let llvm_major = parse_llvm_major(&output(Command::new(&rustc).arg("-vV"))?)?;
    Some(Toolchain::Debian { llvm_major })
}

/// A rustup nightly that has `rust-src`.
pub fn detect_nightly() -> Option<Toolchain> {
    which("rustup")?;
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let src = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !src.is_dir() {
        return None;
    }
    let llvm_major = parse_llvm_major(&output(
        Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]),
    )?)?;
    Some(Toolchain::Nightly { llvm_major })
}

/// The first usable eBPF toolchain: Debian's when present, else a nightly with rust-src.
pub fn detect() -> Option<Toolchain> {
    detect_debian().or_else(detect_nightly)
}

/// The LLVM major version a `bpf-linker` binary is linked against, when it can be told from its
/// dynamic dependencies (`libLLVM.so.22.1` or `libLLVM-22.so`).
pub fn bpf_linker_llvm_major(linker: &Path) -> Option<u32> {
    let ldd = output(Command::new("ldd").arg(linker))?;
    ldd.lines().find_map(|l| {
        let l = l.trim();
        let rest = l
            .strip_prefix("libLLVM.so.")
            .or_else(|| l.strip_prefix("libLLVM-"))?;
        rest.split(['.', ' ', '-']).next()?.parse().ok()
    })
}

/// Where `bpf-linker` is: on `PATH`, or in cargo's bin directory.
pub fn find_bpf_linker() -> Option<PathBuf> {
    which("bpf-linker").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let p = home.join("bin/bpf-linker");
        p.is_file().then_some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_parsed() {
        let v = "rustc 1.96.0 (ac68faa20 2026-05-25)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(v), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
