//! The pod network-namespace finder (`mesh_agent::podns`) on the real kernel: "pods" whose
//! processes sit in a test cgroup under kubelet-style names (systemd and cgroupfs drivers) and
//! in namespaces of their own; the finder must find each pod's namespace from its UID through
//! `/proc`, notice when the sandbox is replaced, and find the new one. Root.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use mesh_agent::{
    netns::netns_cookie,
    podns::{NetnsFinder, PodNetnsError, ProcScanner},
};
use nodemesh_tests::{ChildCgroup, NetNs, probe_exe, require_root, unique_prefix};

/// Cgroups below a test cgroup, removed deepest first on drop (after the processes are gone).
struct Tree {
    dirs: Vec<PathBuf>,
}

impl Tree {
    fn new() -> Self {
        Self { dirs: Vec::new() }
    }

    /// Creates `base/rel` level by level and returns it.
    fn add(&mut self, base: &Path, rel: &str) -> Result<PathBuf> {
        let mut dir = base.to_path_buf();
        for part in rel.split('/') {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                self.dirs.push(dir.clone());
            }
        }
        Ok(dir)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(dir) {
                eprintln!("cleanup: cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// A process of a pod (`sleep` in the pod's cgroup and namespace), killed and reaped on drop.
struct PodProcess {
    child: Child,
}

impl PodProcess {
    /// Starts it and waits until it is in `cgroup` and in the namespace at `netns`.
    fn start(cgroup: &Path, netns: &Path) -> Result<Self> {
        let child = Command::new(probe_exe()?)
            .arg(cgroup)
            .arg(netns)
            .args(["exec", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start nm-probe")?;
        let proc = Self { child };
        let want = fs::metadata(netns)?.ino();
        let dir = PathBuf::from(format!("/proc/{}", proc.pid()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // `sleep` runs once the probe has joined both and exec'd.
            let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let ino = fs::metadata(dir.join("ns/net")).map(|m| m.ino()).ok();
            if comm.trim() == "sleep" && ino == Some(want) {
                return Ok(proc);
            }
            ensure!(
                Instant::now() < deadline,
                "process {} did not reach {} in {}",
                proc.pid(),
                cgroup.display(),
                netns.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn test_uid(n: u32) -> String {
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

fn ns_inode(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// The layout of one cgroup driver: the pod's cgroup (relative to the node's) and its
/// containers' names.
struct Driver {
    pod_dir: String,
    sandbox: &'static str,
    app: &'static str,
    new_sandbox: &'static str,
}

fn systemd(uid: &str) -> Driver {
    let u = uid.replace('-', "_");
    Driver {
        pod_dir: format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
        ),
        sandbox: "cri-containerd-abc.scope",
        app: "cri-containerd-def.scope",
        new_sandbox: "cri-containerd-abd.scope",
    }
}

fn cgroupfs(uid: &str) -> Driver {
    Driver {
        pod_dir: format!("kubepods/burstable/pod{uid}"),
        sandbox: "abc",
        app: "def",
        new_sandbox: "abd",
    }
}

/// A pod with a sandbox and an app container in `ns1` is found; its sandbox replaced by one in
/// `ns2` is noticed, and the new namespace found.
fn finds_and_follows(driver_of: fn(&str) -> Driver, n: u32) -> Result<()> {
    require_root();
    let prefix = unique_prefix();
    let ns1 = NetNs::new(&format!("{prefix}-p1"))?;
    let ns2 = NetNs::new(&format!("{prefix}-p2"))?;
    let node = ChildCgroup::new(&format!("{prefix}-node"))?;
    let mut tree = Tree::new();
    let uid = test_uid(n);
    let driver = driver_of(&uid);
    // The node's cgroup stands for the node: kubelet's tree below it, as on a nested node.
    let pod = tree.add(node.path(), &driver.pod_dir)?;
    let sandbox_cg = tree.add(&pod, driver.sandbox)?;
    let app_cg = tree.add(&pod, driver.app)?;
    let new_sandbox_cg = tree.add(&pod, driver.new_sandbox)?;

    let sandbox = PodProcess::start(&sandbox_cg, &ns1.path())?;
    let app = PodProcess::start(&app_cg, &ns1.path())?;
    let scanner = ProcScanner::new("/proc").with_min_rescan(Duration::ZERO);
    let found = scanner.find(&uid)?;
    ensure!(
        found.inode == ns_inode(&ns1.path())?,
        "found {found:?}, but the pod's namespace is {}",
        ns1.name()
    );
    ensure!(
        [sandbox.pid(), app.pid()].contains(&found.pid),
        "found through process {}, which is not the pod's ({} or {})",
        found.pid,
        sandbox.pid(),
        app.pid()
    );
    let cookie1 = netns_cookie(&ns1.path())?;
    ensure!(
        netns_cookie(&found.path)? == cookie1,
        "the cookie of {} is not the pod's",
        found.path.display()
    );
    let opened = found.open()?;
    ensure!(opened.metadata()?.ino() == found.inode, "open() checks");
    ensure!(found.is_current(), "the sandbox runs");
    ensure!(scanner.netns_of(&uid).map_err(anyhow::Error::msg)? == found.path);

    // The sandbox is replaced: every process of the pod ends, a new sandbox starts in ns2.
    sandbox.stop();
    app.stop();
    ensure!(!found.is_current(), "the sandbox's end is noticed");
    match scanner.find(&uid) {
        Err(PodNetnsError::NotFound { .. }) => {}
        other => anyhow::bail!("a pod without processes: {other:?}"),
    }
    let new_sandbox = PodProcess::start(&new_sandbox_cg, &ns2.path())?;
    let found2 = scanner.find(&uid)?;
    ensure!(found2.pid == new_sandbox.pid(), "{found2:?}");
    ensure!(found2.inode == ns_inode(&ns2.path())?, "{found2:?}");
    let cookie2 = netns_cookie(&found2.path)?;
    ensure!(cookie2 == netns_cookie(&ns2.path())? && cookie2 != cookie1);
    ensure!(
        scanner.netns_of(&uid).map_err(anyhow::Error::msg)? == found2.path,
        "the trait returns the new path"
    );
    drop(new_sandbox);
    drop(tree);
    Ok(())
}

#[test]
fn systemd_driver_pod_is_found_and_followed() -> Result<()> {
    finds_and_follows(systemd, 1)
}

#[test]
fn cgroupfs_driver_pod_is_found_and_followed() -> Result<()> {
    finds_and_follows(cgroupfs, 2)
}

#[test]
fn host_network_pod_is_refused() -> Result<()> {
    require_root();
    let prefix = unique_prefix();
    let node = ChildCgroup::new(&format!("{prefix}-node"))?;
    let mut tree = Tree::new();
    let uid = test_uid(3);
    let pod = tree.add(node.path(), &systemd(&uid).pod_dir)?;
    let ctr = tree.add(&pod, "cri-containerd-host.scope")?;
    // The test's own namespace stands for the host's (the finder takes the agent's own and pid
    // 1's as the host's; pid 1's may be unreadable in a container).
    let own = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
    let host = PodProcess::start(&ctr, &own)?;
    let err = ProcScanner::new("/proc")
        .with_min_rescan(Duration::ZERO)
        .find(&uid)
        .expect_err("a hostNetwork pod");
    ensure!(
        matches!(err, PodNetnsError::HostNetwork { pid, .. } if pid == host.pid()),
        "{err}"
    );
    drop(host);
    drop(tree);
    Ok(())
}
