//! Helpers for nodemesh's root integration tests: throw-away network namespaces wired with veth
//! pairs, child cgroups, and a probe process that acts as an application inside a "pod".
//!
//! Everything a helper creates is named `nmt-<pid>-<n>-…` and removed by its guard's `Drop`, so a
//! failing test cleans up too. Nothing is ever attached to the machine's root cgroup.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail, ensure};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix for one test's objects (interface names must stay under 16 bytes).
pub fn unique_prefix() -> String {
    format!(
        "nmt{}x{}",
        std::process::id() % 100_000,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics with instructions unless the test runs as root. Root tests are never silently skipped.
pub fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!(
            "this test loads eBPF programs and creates network namespaces and cgroups: it needs \
             root. Run `sudo -E cargo xtask test`."
        );
    }
}

/// Runs a command and fails with its full command line and stderr if it does not succeed.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{cmd}` (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it (and so their peers).
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Connects `a` and `b` with a veth pair and gives each end an address (`ip/prefix`).
pub fn veth(
    a: &NetNs,
    a_if: &str,
    a_addr: &str,
    b: &NetNs,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A child cgroup of the cgroup v2 hierarchy, removed on drop.
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    pub fn new(name: &str) -> Result<Self> {
        let root = mesh_agent::cgroup::cgroup2_mount()?;
        let path = root.join(name);
        ensure!(path != root, "refusing to use the cgroup root");
        fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // Probe processes have exited and been reaped, so the cgroup is empty.
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cleanup: cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

/// What the probe reported after a successful connect.
#[derive(Debug)]
pub struct ProbeConnect {
    /// The probe socket's local address (the pod side of the 4-tuple).
    pub local: SocketAddr,
}

/// Runs the probe as an application inside `netns` and `cgroup`: it connects to `dst`, sends
/// `payload` and exits. Returns once the connection is established and the payload written.
pub fn probe_connect(
    cgroup: &Path,
    netns: &NetNs,
    dst: SocketAddr,
    payload: &str,
) -> Result<ProbeConnect> {
    let out = Command::new(env_probe()?)
        .arg(cgroup)
        .arg(netns.path())
        .arg("connect")
        .arg(dst.to_string())
        .arg(payload)
        .output()
        .context("cannot start nm-probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "probe connect to {dst} from {} failed: {}{}",
            netns.name(),
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let local = stdout
        .lines()
        .find_map(|l| l.strip_prefix("local="))
        .context("probe did not print its local address")?
        .parse()
        .context("probe printed a bad local address")?;
    Ok(ProbeConnect { local })
}

fn env_probe() -> Result<PathBuf> {
    // Set by cargo for integration tests of this package.
    let exe = option_env!("CARGO_BIN_EXE_nm-probe").map(PathBuf::from);
    let exe = match exe {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("no target dir")?
            .join("nm-probe"),
    };
    ensure!(
        exe.is_file(),
        "nm-probe binary not found at {}",
        exe.display()
    );
    Ok(exe)
}
