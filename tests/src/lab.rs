//! The local lab (`cargo xtask lab`, binary `nm-lab`): the cluster of a local-mode file
//! (`tests/lab/lab.yaml`) built on this machine. Each node is a network namespace
//! `nm-lab-<node>` with a cgroup `<cgroup2>/nm-lab/<node>`; each workload a namespace (its
//! `netns` path) and cgroups below its node's named the way the kubelet names them (see
//! "Pods' cgroups"); veth pairs join pods to their node (the node side holds `<pod /24>.1`, the
//! pod's gateway) and the two nodes to each other (their `address`es, one /24). One
//! `mesh-agent local` (`nm-agent`) runs per node inside the node's namespace and cgroup, and an
//! echo server on port 8080 in every pod whose name starts with `server`. The topology goes to
//! `target/lab/lab.json`.
//!
//! Every name derives from the lab's prefix (`nm-lab` for `cargo xtask lab`; tests and the
//! benchmark use their own, so they can run beside a user's lab), so `down` removes everything a
//! previous `up` made even after a crash: processes found in the lab's cgroups
//! (`<cgroup2>/<prefix>/…`), pins of the agents' instances (`<prefix>-<node>`), namespaces named
//! `<prefix>-*`, the cgroups and the state directory. The pods' namespaces come from the lab file,
//! so they must be named `/run/netns/<prefix>-…` too (`up` checks). Two labs' prefixes must not
//! extend one another with a dash (`nm-lab` and `nm-lab-x`): `down` of the first would take the
//! second's namespaces.
//!
//! `up` touches nothing while anything of the lab exists (`lab.json`, a namespace, the cgroup):
//! a second `up` says the lab is already up and leaves it serving. An `up` that fails later
//! removes exactly what it created (its processes, its agents' pins, namespaces and cgroups).
//!
//! Pods' cgroups: every pod has a UID (`metadata.uid`; [`Lab::with_pod_uid`] sets it, e.g. to the
//! apiserver's, otherwise [`default_pod_uid`] derives one from the prefix and the pod's name) and
//! lives where a kubelet would put it, so `mesh_agent::podns` finds its namespace for real: the
//! first node's kubelet uses the systemd driver
//! (`<node>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/`, `uid_`
//! the UID with `_` for `-`, containers `cri-containerd-<id>.scope`), the second the cgroupfs one
//! (`<node>/kubepods/besteffort/pod<uid>/<id>`). Each pod has a sandbox container running a pause
//! process (`sleep`) for as long as the lab is up, and an app container (its `cgroup` in
//! `lab.json`, where the echo servers and `lab exec` run).

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_agent::{local_config::LocalConfigSource, model::ClusterModel};

use crate::{agent_exe, probe_exe, run};

/// Prefix of every namespace, cgroup and pin instance `cargo xtask lab` makes.
pub const PREFIX: &str = "nm-lab";
/// The echo port of the lab's servers (the services' `targetPort`).
pub const ECHO_PORT: u16 = 8080;
/// The agents' glibc tunables: `memmove` keeps vector copies up to 4 MiB instead of `rep movsb`
/// (docs/performance.md, "Tunables").
pub const AGENT_GLIBC_TUNABLES: &str = "glibc.cpu.x86_rep_movsb_threshold=4194304";
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Appends the processes of cgroup `dir` and of every cgroup below it to `out` (a cgroup that
/// is gone counts as empty).
pub fn pids_in(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            pids_in(&e.path(), out);
        }
    }
}

/// Copies the lab's files (`tests/lab/lab.yaml`, `policies.yaml`) into `dir` with the pods'
/// network namespaces renamed to `prefix`, so a test's lab runs beside a user's (`nm-lab
/// --prefix`); returns the copy of `lab.yaml`.
pub fn files_for_prefix(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab");
    for f in ["lab.yaml", "policies.yaml"] {
        let text = fs::read_to_string(src.join(f)).with_context(|| format!("read {f}"))?;
        fs::write(
            dir.join(f),
            text.replace(
                &format!("/run/netns/{PREFIX}-"),
                &format!("/run/netns/{prefix}-"),
            ),
        )
        .with_context(|| format!("write {}", dir.join(f).display()))?;
    }
    Ok(dir.join("lab.yaml"))
}

/// One lab: the prefix of its names and where it keeps its state (`lab.json`, logs, the CA and
/// the agents' state directories).
#[derive(Clone, Debug)]
pub struct Lab {
    prefix: String,
    state: PathBuf,
    /// Pod UIDs given by [`Lab::with_pod_uid`]; other pods get [`default_pod_uid`].
    pod_uids: BTreeMap<String, String>,
}

impl Lab {
    /// The lab of `cargo xtask lab`: prefix `nm-lab`, state in `target/lab` of the workspace.
    pub fn default_for(workspace: &Path) -> Self {
        Self {
            prefix: PREFIX.to_owned(),
            state: workspace.join("target").join("lab"),
            pod_uids: BTreeMap::new(),
        }
    }

    /// A lab with its own names (ASCII letters, digits and `-`; at most 20 characters).
    pub fn new(prefix: &str, state: PathBuf) -> Result<Self> {
        ensure!(
            !prefix.is_empty()
                && prefix.len() <= 20
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "lab prefix `{prefix}`: use 1 to 20 ASCII letters, digits or `-`"
        );
        Ok(Self {
            prefix: prefix.to_owned(),
            state,
            pod_uids: BTreeMap::new(),
        })
    }

    /// Gives pod `name` the UID `uid` (e.g. the apiserver's `metadata.uid` of its Pod) instead of
    /// [`default_pod_uid`]; its cgroups are named after it.
    pub fn with_pod_uid(mut self, name: &str, uid: &str) -> Self {
        self.pod_uids.insert(name.to_owned(), uid.to_owned());
        self
    }

    /// The UID of pod `name` (`uid` in `lab.json`).
    pub fn pod_uid(&self, name: &str) -> String {
        self.pod_uids
            .get(name)
            .cloned()
            .unwrap_or_else(|| default_pod_uid(&self.prefix, name))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the lab keeps its state (`lab.json`, `<node>.log`, `<node>/ready`, `ca/`).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    fn cgroup(&self) -> Result<PathBuf> {
        Ok(mesh_agent::cgroup::cgroup2_mount()?.join(&self.prefix))
    }

    /// The network namespace name of node `node` (also its agent's pin instance).
    pub fn node_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    fn owns_ns(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with('-'))
    }
}

fn ns_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .context("netns path has no file name")?
        .to_string_lossy()
        .into_owned())
}

fn exec_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// The /24 gateway (`.1`) of a pod address.
fn gateway(ip: IpAddr) -> Result<std::net::Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Ok(std::net::Ipv4Addr::new(a, b, c, 1))
        }
        IpAddr::V6(_) => bail!("the lab builds IPv4 pods only (got {ip})"),
    }
}

/// A UUID-shaped UID derived from the lab's prefix and a pod's name (stable across runs).
pub fn default_pod_uid(prefix: &str, pod: &str) -> String {
    let key = format!("{prefix}/{pod}");
    let (a, b) = (
        fnv1a(0xcbf2_9ce4_8422_2325, &key),
        fnv1a(0x8422_2325_cbf2_9ce4, &key),
    );
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

fn fnv1a(seed: u64, s: &str) -> u64 {
    s.bytes().fold(seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cgroups of a pod below its node's, named as a kubelet with the systemd or the cgroupfs
/// driver names them: (its sandbox container's, its app container's).
pub fn kubelet_cgroups(node_cg: &Path, systemd: bool, uid: &str) -> (PathBuf, PathBuf) {
    let id = |what: &str| {
        format!(
            "{:016x}",
            fnv1a(0xcbf2_9ce4_8422_2325, &format!("{uid}/{what}"))
        )
    };
    if systemd {
        let pod = node_cg.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let ctr = |what: &str| pod.join(format!("cri-containerd-{}.scope", id(what)));
        (ctr("sandbox"), ctr("app"))
    } else {
        let pod = node_cg.join(format!("kubepods/besteffort/pod{uid}"));
        (pod.join(id("sandbox")), pod.join(id("app")))
    }
}

/// Starts a pod's pause process in its sandbox cgroup and namespace and waits until it is there.
pub fn start_pause(cgroup: &Path, netns: &Path) -> Result<std::process::Child> {
    let child = Command::new(probe_exe()?)
        .arg(cgroup)
        .arg(netns)
        .args(["exec", "sleep", "infinity"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start a pod's pause process")?;
    let want = fs::metadata(netns)?.ino();
    let ns = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(&ns).map(|m| m.ino()).ok() != Some(want) {
        ensure!(
            Instant::now() < deadline,
            "the pause process in {} did not enter {}",
            cgroup.display(),
            netns.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

fn short_if(prefix: &str, name: &str) -> String {
    let mut s = format!("{prefix}{name}");
    s.truncate(15);
    s
}

/// What one `up` created, so that a failed `up` removes exactly that and nothing of a lab that
/// was already there (a second `up` while the lab is up, or two at once).
#[derive(Default)]
struct Made {
    children: Vec<std::process::Child>,
    /// Pin instances of agents this `up` started.
    instances: Vec<String>,
    netns: Vec<String>,
    /// Cgroups this `up` created, parents first.
    cgroups: Vec<PathBuf>,
}

impl Made {
    fn netns_add(&mut self, ns: &str) -> Result<()> {
        run("ip", &["netns", "add", ns])?;
        self.netns.push(ns.to_owned());
        Ok(())
    }

    fn cgroup(&mut self, dir: &Path) -> Result<()> {
        match fs::create_dir(dir) {
            Ok(()) => {
                self.cgroups.push(dir.to_path_buf());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot create cgroup {}", dir.display())),
        }
    }

    /// Creates `dir` and every missing cgroup between `base` (which exists) and it, parents first.
    fn cgroup_tree(&mut self, base: &Path, dir: &Path) -> Result<()> {
        let rel = dir
            .strip_prefix(base)
            .with_context(|| format!("{} is not below {}", dir.display(), base.display()))?;
        let mut at = base.to_path_buf();
        for part in rel.components() {
            at.push(part);
            self.cgroup(&at)?;
        }
        Ok(())
    }

    /// Removes what was made, newest first: processes (SIGTERM, then SIGKILL), the agents' pins,
    /// namespaces (their veths go with them), cgroups. Returns what could not be removed.
    fn undo(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &self.children {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: plain syscall with integers on our own child (not reaped yet, so the
                // pid cannot have been reused).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Processes this attempt's children started (the control plane under the kubelet
        // stand-in) live on in the cgroups it made.
        let mut made_cgroups = Vec::new();
        for cg in &self.cgroups {
            collect_cgroups(cg, &mut made_cgroups);
        }
        kill_all_in(&made_cgroups);
        for instance in &self.instances {
            let uninstall = agent_exe().and_then(|exe| {
                run(
                    &exe.to_string_lossy(),
                    &["uninstall", "--instance", instance],
                )
            });
            if let Err(e) = uninstall {
                problems.push(format!("{e:#}"));
            }
        }
        for ns in self.netns.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                problems.push(format!("{e:#}"));
            }
        }
        for cg in self.cgroups.iter().rev() {
            if let Err(e) = fs::remove_dir(cg) {
                problems.push(format!("cannot remove cgroup {}: {e}", cg.display()));
            }
        }
        problems
    }
}

impl Lab {
    /// Whether anything of the lab exists: `lab.json`, a namespace named `<prefix>-…` or the
    /// lab's cgroup. Returns what was found first.
    pub fn found(&self) -> Result<Option<String>> {
        if self.state.join("lab.json").exists() {
            return Ok(Some(format!("{}", self.state.join("lab.json").display())));
        }
        for line in run("ip", &["netns", "list"])?.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if self.owns_ns(name) {
                return Ok(Some(format!("network namespace {name}")));
            }
        }
        let cg = self.cgroup()?;
        if cg.exists() {
            return Ok(Some(format!("cgroup {}", cg.display())));
        }
        Ok(None)
    }

    /// Whether the Kubernetes mode's kubelet stand-in (with its control plane) runs.
    pub fn kubelet_running(&self) -> Result<bool> {
        let mut cgroups = Vec::new();
        collect_cgroups(
            &self.cgroup()?.join(crate::lab_k8s::KUBELET_CGROUP),
            &mut cgroups,
        );
        // The stand-in itself (`nm-lab … kubelet`), not only the control plane it started.
        Ok(cgroups.iter().flat_map(|cg| procs(cg)).any(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
                args.first().is_some_and(|a| a.ends_with(b"nm-lab"))
                    && args.last() == Some(&&b"kubelet"[..])
            })
        }))
    }

    /// Whether a process runs in the lab's cgroups (its agents or servers).
    pub fn is_running(&self) -> Result<bool> {
        let mut cgroups = Vec::new();
        collect_cgroups(&self.cgroup()?, &mut cgroups);
        Ok(cgroups.iter().any(|cg| !procs(cg).is_empty()))
    }

    /// Brings the lab up from `config`. The lab must be down: when anything of it exists, `up`
    /// fails before touching anything. When it fails later, it removes what it created itself
    /// (processes, pins of its agents, namespaces, cgroups) and nothing else; the logs stay in the
    /// state directory.
    pub fn up(&self, config: &Path) -> Result<serde_json::Value> {
        self.up_mode(config, false)
    }

    /// [`Lab::up`] in Kubernetes mode ([`crate::lab_k8s`]): the same nodes and pods, a real
    /// control plane and the kubelet stand-in instead of local agents; nodemesh itself comes with
    /// `helm install`.
    pub fn up_kubernetes(&self, config: &Path) -> Result<serde_json::Value> {
        self.up_mode(config, true)
    }

    fn up_mode(&self, config: &Path, kubernetes: bool) -> Result<serde_json::Value> {
        let config = fs::canonicalize(config)
            .with_context(|| format!("cannot find the lab file {}", config.display()))?;
        let model: std::sync::Arc<ClusterModel> = LocalConfigSource::new(&config, None)
            .load()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let nodes: Vec<_> = model.nodes().cloned().collect();
        ensure!(nodes.len() == 2, "the lab wires exactly two nodes");
        for w in model.workloads() {
            let ns = ns_name(&w.netns)?;
            ensure!(
                w.netns.parent() == Some(Path::new("/run/netns")) && self.owns_ns(&ns),
                "workload {}: its netns must be `/run/netns/{}-…` (got {}) so that `down` finds it",
                w.key.name,
                self.prefix,
                w.netns.display()
            );
        }
        if let Some(what) = self.found()? {
            if self.state.join("lab.json").exists() && self.is_running()? {
                bail!(
                    "the lab `{}` is already up (run `cargo xtask lab down` first); nothing was changed",
                    self.prefix
                );
            }
            bail!(
                "the lab `{}` is partly up or still being brought up ({what} exists): run \
                 `cargo xtask lab down` first; nothing was changed",
                self.prefix
            );
        }
        let mut made = Made::default();
        match self.build(&config, &model, &nodes, &mut made, kubernetes) {
            Ok(lab) => Ok(lab),
            Err(e) => {
                let problems = made.undo();
                let cleaned = if problems.is_empty() {
                    "what this attempt created is removed".to_owned()
                } else {
                    format!(
                        "removing what this attempt created left: {}",
                        problems.join("; ")
                    )
                };
                Err(e.context(format!(
                    "lab `{}` up failed ({cleaned}; logs in {})",
                    self.prefix,
                    self.state.display()
                )))
            }
        }
    }

    fn build(
        &self,
        config: &Path,
        model: &ClusterModel,
        nodes: &[mesh_agent::model::Node],
        made: &mut Made,
        kubernetes: bool,
    ) -> Result<serde_json::Value> {
        let state = self.state.clone();
        fs::create_dir_all(&state)?;
        let root_cg = self.cgroup()?;
        // The node namespaces first: `ip netns add` fails when one exists, so a second `up`
        // racing this one stops here, before it made anything the first one uses.
        for n in nodes {
            made.netns_add(&self.node_ns(&n.name))?;
        }
        made.cgroup(&root_cg)?;
        for n in nodes {
            let ns = self.node_ns(&n.name);
            exec_in(&ns, &["ip", "link", "set", "lo", "up"])?;
            exec_in(&ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
            made.cgroup(&root_cg.join(&n.name))?;
        }
        let (a, b) = (&nodes[0], &nodes[1]);
        run(
            "ip",
            &[
                "link",
                "add",
                "nmlab0",
                "netns",
                &self.node_ns(&a.name),
                "type",
                "veth",
                "peer",
                "name",
                "nmlab0",
                "netns",
                &self.node_ns(&b.name),
            ],
        )?;
        for n in [a, b] {
            exec_in(
                &self.node_ns(&n.name),
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", n.address),
                    "dev",
                    "nmlab0",
                ],
            )?;
            exec_in(
                &self.node_ns(&n.name),
                &["ip", "link", "set", "nmlab0", "up"],
            )?;
        }

        // Kubernetes mode: the control plane and the kubelet stand-in, then every pod as an API
        // object first (its UID names its cgroups).
        let mut uids = BTreeMap::new();
        let mut api = None;
        let cluster = crate::lab_k8s::ClusterInfo {
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| -> Result<crate::lab_k8s::NodeInfo> {
                    Ok(crate::lab_k8s::NodeInfo {
                        name: n.name.clone(),
                        ip: match n.address {
                            IpAddr::V4(v4) => v4,
                            IpAddr::V6(_) => bail!("the lab's nodes have IPv4 addresses"),
                        },
                        netns: Path::new("/run/netns").join(self.node_ns(&n.name)),
                        cgroup: root_cg.join(&n.name),
                        systemd: i == 0,
                    })
                })
                .collect::<Result<_>>()?,
        };
        if kubernetes {
            made.cgroup(&root_cg.join(crate::lab_k8s::KUBELET_CGROUP))?;
            let (child, url) = crate::lab_k8s::start_kubelet(self, &cluster)?;
            made.children.push(child);
            api = Some(url);
            uids = crate::lab_k8s::register(self, model, &cluster)?;
        }

        let mut pods = Vec::new();
        for w in model.workloads() {
            let ns = ns_name(&w.netns)?;
            let node_ns = self.node_ns(&w.node);
            let ip = *w.ips.first().context("workload without an address")?;
            let gw = gateway(ip)?;
            made.netns_add(&ns)?;
            run(
                "ip",
                &["netns", "exec", &ns, "ip", "link", "set", "lo", "up"],
            )?;
            let host_if = short_if("v", &w.key.name);
            run(
                "ip",
                &[
                    "link", "add", &host_if, "netns", &node_ns, "type", "veth", "peer", "name",
                    "eth0", "netns", &ns,
                ],
            )?;
            // Several pods of a node share the /24: the gateway address goes on each veth as /32
            // with a host route to the pod.
            exec_in(
                &node_ns,
                &["ip", "addr", "add", &format!("{gw}/32"), "dev", &host_if],
            )?;
            exec_in(&node_ns, &["ip", "link", "set", &host_if, "up"])?;
            // Pods see their /24 as on-link: the node answers ARP for the other pods.
            exec_in(
                &node_ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
                ],
            )?;
            exec_in(
                &node_ns,
                &["ip", "route", "add", &format!("{ip}/32"), "dev", &host_if],
            )?;
            exec_in(
                &ns,
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            exec_in(&ns, &["ip", "link", "set", "eth0", "up"])?;
            exec_in(
                &ns,
                &["ip", "route", "add", "default", "via", &gw.to_string()],
            )?;
            let peer = if w.node == a.name { b } else { a };
            let other_ns = self.node_ns(&peer.name);
            let via = model
                .node(&w.node)
                .context("workload's node")?
                .address
                .to_string();
            exec_in(
                &other_ns,
                &["ip", "route", "replace", &format!("{ip}/32"), "via", &via],
            )?;
            let uid = uids
                .get(&w.key.name)
                .cloned()
                .unwrap_or_else(|| self.pod_uid(&w.key.name));
            let systemd = w.node == a.name;
            let node_cg = root_cg.join(&w.node);
            let (sandbox_cg, cg) = kubelet_cgroups(&node_cg, systemd, &uid);
            made.cgroup_tree(&node_cg, &sandbox_cg)?;
            made.cgroup_tree(&node_cg, &cg)?;
            made.children.push(start_pause(&sandbox_cg, &w.netns)?);
            pods.push(serde_json::json!({
                "name": w.key.name, "node": w.node, "namespace": w.key.namespace,
                "service_account": w.service_account, "netns": w.netns, "ip": ip.to_string(),
                "cgroup": cg, "uid": uid,
            }));
            if w.key.name.starts_with("server") && kubernetes {
                // An HTTP answer for curl, an echo for anything else (`lab_k8s::serve`).
                let log = fs::File::create(state.join(format!("{}.log", w.key.name)))?;
                let child = Command::new(probe_exe()?)
                    .arg(&cg)
                    .arg(&w.netns)
                    .arg("exec")
                    .arg(crate::lab_k8s::lab_exe()?)
                    .args(["serve", &format!("{ip}:{ECHO_PORT}"), &w.key.name])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("cannot start a server")?;
                made.children.push(child);
            } else if w.key.name.starts_with("server") {
                let child = Command::new(probe_exe()?)
                    .arg(&cg)
                    .arg(&w.netns)
                    .args(["echo", &format!("{ip}:{ECHO_PORT}"), "--forever"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(fs::File::create(state.join(format!("{}.log", w.key.name)))?)
                    .spawn()
                    .context("cannot start an echo server")?;
                made.children.push(child);
            }
        }

        let mut node_json = Vec::new();
        if let Some(api) = api {
            crate::lab_k8s::pods_running(self, model, &pods)?;
            for n in &cluster.nodes {
                node_json.push(serde_json::json!({
                    "name": n.name, "netns": n.netns, "ip": n.ip.to_string(),
                    "tunnel_ip": crate::lab_k8s::CHART_TUNNEL_IP, "link_if": "nmlab0",
                    "metrics_url": format!("http://{}:15020/metrics", n.ip),
                    "log": state.join(format!("{}.log", n.name)), "cgroup": n.cgroup,
                }));
            }
            let lab = serde_json::json!({
                "config": config, "nodes": node_json, "pods": pods,
                "kubernetes": {
                    "api": api,
                    "kubeconfig": crate::lab_k8s::kubeconfig_path(self),
                    "control_plane_logs": state.join("control-plane"),
                    "kubelet_log": state.join("kubelet.log"),
                },
            });
            fs::write(state.join("lab.json"), serde_json::to_string_pretty(&lab)?)?;
            return Ok(lab);
        }
        for n in nodes {
            let node_state = state.join(&n.name);
            let log = state.join(format!("{}.log", n.name));
            let cg = root_cg.join(&n.name);
            // A ready file left by an earlier failed `up` must not announce this agent.
            match fs::remove_file(node_state.join("ready")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context("cannot remove a stale ready file");
                }
                _ => {}
            }
            let child = Command::new(probe_exe()?)
                .arg(&cg)
                .arg(Path::new("/run/netns").join(self.node_ns(&n.name)))
                .arg("exec")
                .arg(agent_exe()?)
                .args(["local", "--config"])
                .arg(config)
                .args(["--node", &n.name, "--state-dir"])
                .arg(&node_state)
                .arg("--ca-dir")
                .arg(state.join("ca"))
                .arg("--cgroup")
                .arg(&cg)
                .args(["--instance", &self.node_ns(&n.name)])
                // `NODEMESH_TEST_SAME_NODE_PATH=auto` splices same-node connections in the
                // kernel (the bench's before/after of the splice); the agent's default copies.
                .args(["--same-node-path", crate::cluster::lab_same_node_path()])
                // glibc's `rep movsb` memmove halves rustls decryption on the Zen 3 hosts we
                // develop on (glibc BZ 30994); docs/performance.md has the measurement.
                .env("GLIBC_TUNABLES", AGENT_GLIBC_TUNABLES)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log)?)
                .spawn()
                .context("cannot start an agent")?;
            made.children.push(child);
            made.instances.push(self.node_ns(&n.name));
            // One at a time: the first creates the shared CA.
            let deadline = Instant::now() + READY_WITHIN;
            while !node_state.join("ready").exists() {
                ensure!(
                    Instant::now() < deadline,
                    "agent {} not ready within {READY_WITHIN:?}; see {}",
                    n.name,
                    log.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            node_json.push(serde_json::json!({
                "name": n.name, "netns": Path::new("/run/netns").join(self.node_ns(&n.name)),
                "ip": n.address.to_string(), "tunnel_ip": n.tunnel_address.to_string(),
                "link_if": "nmlab0",
                "metrics_url": format!("http://{}:{}/metrics", n.address, n.metrics_port),
                "admin_url": format!("http://127.0.0.1:{}/", n.admin_port),
                "log": log, "cgroup": cg,
            }));
        }
        let services: Vec<_> = model
            .services()
            .map(|s| {
                serde_json::json!({
                    "name": s.key.name, "namespace": s.key.namespace,
                    "vip": s.vips.first().map(ToString::to_string),
                    "ports": s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let lab = serde_json::json!({
            "config": config, "nodes": node_json, "pods": pods, "services": services,
        });
        fs::write(state.join("lab.json"), serde_json::to_string_pretty(&lab)?)?;
        Ok(lab)
    }

    /// Removes everything the lab makes (idempotent; works without `lab.json`).
    pub fn down(&self) -> Result<()> {
        let mut problems = Vec::new();
        let root_cg = self.cgroup()?;
        // Processes: every one in a lab cgroup, deepest first. SIGTERM, then SIGKILL.
        // Kubernetes mode: the kubelet stand-in first (with its control plane), or it would
        // start again the containers this stops.
        let mut kubelet = Vec::new();
        collect_cgroups(&root_cg.join(crate::lab_k8s::KUBELET_CGROUP), &mut kubelet);
        kill_all_in(&kubelet);
        let mut cgroups = Vec::new();
        collect_cgroups(&root_cg, &mut cgroups);
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            for cg in &cgroups {
                for pid in procs(cg) {
                    // SAFETY: plain syscall with integers; a stale pid at worst gets ESRCH.
                    unsafe { libc::kill(pid, signal) };
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while cgroups.iter().any(|cg| !procs(cg).is_empty()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let nodes: Vec<String> = fs::read_dir(&root_cg)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for n in &nodes {
            let uninstall = agent_exe().and_then(|exe| {
                run(
                    &exe.to_string_lossy(),
                    &["uninstall", "--instance", &self.node_ns(n)],
                )
            });
            if let Err(e) = uninstall {
                problems.push(format!("{e:#}"));
            }
        }
        let list = run("ip", &["netns", "list"])?;
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if self.owns_ns(name)
                && let Err(e) = run("ip", &["netns", "del", name])
            {
                problems.push(format!("{e:#}"));
            }
        }
        for cg in cgroups.iter().rev() {
            if let Err(e) = fs::remove_dir(cg) {
                problems.push(format!("cannot remove cgroup {}: {e}", cg.display()));
            }
        }
        // The nodes' own bpffs (Kubernetes mode): unmounted, their pins go.
        if self.state.exists() {
            for m in crate::lab_k8s::mounts_below(&self.state)? {
                if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                    problems.push(format!("cannot unmount {}: {e}", m.display()));
                }
            }
        }
        if self.state.exists() {
            fs::remove_dir_all(&self.state)?;
        }
        ensure!(problems.is_empty(), "lab down: {}", problems.join("; "));
        Ok(())
    }
}

/// `dir` and every cgroup below it, parents first.
fn collect_cgroups(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                collect_cgroups(&e.path(), out);
            }
        }
    }
}

/// SIGKILL to every process in `cgroups`, waiting up to 10 s until they are gone.
fn kill_all_in(cgroups: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cgroups.iter().any(|cg| !procs(cg).is_empty()) && Instant::now() < deadline {
        for cg in cgroups {
            for pid in procs(cg) {
                // SAFETY: plain syscall with integers; a stale pid at worst gets ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn procs(cg: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Lab {
    /// The lab's `lab.json`, if it is up.
    pub fn status(&self) -> Result<Option<serde_json::Value>> {
        let path = self.state.join("lab.json");
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&fs::read_to_string(&path)?)?))
    }

    /// The cgroup and netns of pod `name` from `lab.json`.
    pub fn pod_place(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let lab = self
            .status()?
            .context("the lab is not up (`cargo xtask lab`)")?;
        let pods = lab["pods"].as_array().context("lab.json has no pods")?;
        let pod = pods
            .iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("no pod `{name}` in the lab"))?;
        let get = |k: &str| -> Result<PathBuf> {
            Ok(PathBuf::from(
                pod[k]
                    .as_str()
                    .with_context(|| format!("pod {name} has no {k}"))?,
            ))
        };
        Ok((get("cgroup")?, get("netns")?))
    }

    /// The network namespace of node `name` from `lab.json`.
    pub fn node_netns(&self, name: &str) -> Result<PathBuf> {
        let lab = self
            .status()?
            .context("the lab is not up (`cargo xtask lab`)")?;
        let nodes = lab["nodes"].as_array().context("lab.json has no nodes")?;
        let node = nodes
            .iter()
            .find(|n| n["name"] == name)
            .with_context(|| format!("no node or pod `{name}` in the lab"))?;
        Ok(PathBuf::from(
            node["netns"]
                .as_str()
                .with_context(|| format!("node {name} has no netns"))?,
        ))
    }
}

/// One row of the demo: what was tried, what should happen, what did.
pub struct DemoRow {
    pub what: String,
    pub expected: &'static str,
    pub outcome: String,
    pub ok: bool,
}

/// Sends the demo traffic from `client-a` (same-node, cross-node, via the first service, to the
/// denied port 9090) with `nm-probe roundtrip`, and reports each outcome.
pub fn demo(lab: &Lab) -> Result<Vec<DemoRow>> {
    let topo = lab.status()?.context("the lab is not up")?;
    let pods = topo["pods"].as_array().context("lab.json has no pods")?;
    let ip_of = |name: &str| -> Option<String> {
        pods.iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["ip"].as_str().map(str::to_owned))
    };
    let (cgroup, netns) = lab.pod_place("client-a")?;
    let mut tries = Vec::new();
    if let Some(ip) = ip_of("server-a") {
        tries.push((
            format!("client-a -> server-a {ip}:{ECHO_PORT} (same node)"),
            format!("{ip}:{ECHO_PORT}"),
            true,
        ));
    }
    if let Some(ip) = ip_of("server-b") {
        tries.push((
            format!("client-a -> server-b {ip}:{ECHO_PORT} (cross node, mTLS)"),
            format!("{ip}:{ECHO_PORT}"),
            true,
        ));
        tries.push((
            format!("client-a -> server-b {ip}:9090 (denied port)"),
            format!("{ip}:9090"),
            false,
        ));
    }
    if let Some(svc) = topo["services"].as_array().and_then(|s| s.first()) {
        let vip = svc["vip"].as_str().unwrap_or_default();
        let port = svc["ports"][0].as_u64().unwrap_or(80);
        tries.push((
            format!("client-a -> service {vip}:{port}"),
            format!("{vip}:{port}"),
            true,
        ));
    }
    let mut rows = Vec::new();
    for (what, dst, should_pass) in tries {
        let out = Command::new(probe_exe()?)
            .arg(&cgroup)
            .arg(&netns)
            .args(["roundtrip", &dst, "nodemesh lab demo"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let passed = out.status.success();
        let outcome = if passed {
            "echoed".to_owned()
        } else {
            text.lines()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or("failed")
                .to_owned()
        };
        rows.push(DemoRow {
            what,
            expected: if should_pass {
                "echoed"
            } else {
                "refused (ECONNREFUSED)"
            },
            ok: passed == should_pass && (passed || outcome.contains("refused")),
            outcome,
        });
    }
    Ok(rows)
}
