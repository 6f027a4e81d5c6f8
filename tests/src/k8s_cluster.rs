//! A two-node cluster in Kubernetes mode for end-to-end tests (`tests/k8s_mode.rs`): the nodes
//! and pods of [`crate::cluster`] (network namespaces, child cgroups, real eBPF), a real
//! kube-apiserver and etcd ([`crate::k8s::ControlPlane`]) running in node a's namespace and
//! reached by both agents on node a's address, and one `mesh-agent node` per node fed by it,
//! running with the `nodemesh-agent` ServiceAccount's own token and the chart's RBAC.
//!
//! There is no kubelet: a pod is created as an API object (with `spec.nodeName`), then built on
//! its node as a kubelet would — a network namespace, the kubelet's cgroup names with the UID the
//! API server gave it (node a as the systemd driver names them, node b as cgroupfs does), a
//! pause process in the sandbox container — and its `status.podIP` written through the status
//! subresource. The agents find the pods' namespaces through those cgroups
//! (`mesh_agent::podns`), as on a real node.

use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::{
    ChildCgroup, NetNs,
    cluster::{Agent, Node, Pod, hold_from, node, roundtrip_from},
    k8s::{ControlPlane, Network, Options},
    lab::{kubelet_cgroups, start_pause},
    require_root, unique_prefix,
};

/// Node link, pods and tunnel addresses (all inside the test's own namespaces).
pub const NODE_A: &str = "10.170.0.1";
pub const NODE_B: &str = "10.170.0.2";
pub const TUNNEL_A: &str = "169.254.170.1";
pub const TUNNEL_B: &str = "169.254.170.2";
/// Pods on node a are `10.171.<i>.2`, on node b `10.172.<i>.2`.
const PODS: [u8; 2] = [171, 172];
/// The namespace the test's workloads live in.
pub const NS: &str = "demo";
/// The enrollment label.
pub const ENROLL: &str = "nodemesh.io/dataplane=enabled";
const SYSTEM_NS: &str = "nodemesh-system";
/// The mesh CA's port on node a's address ([`KCluster::start_ca`]).
pub const CA_PORT: u16 = 15012;
/// The name the CA's certificate carries and the agents verify.
pub const CA_NAME: &str = "nodemesh-ca.nodemesh-system.svc";

/// `mesh-agent controller` (its CA: what the agents get certificates from) running in node a's
/// namespace.
pub struct CaProcess {
    child: Child,
    pub log: PathBuf,
}

impl CaProcess {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node `i`'s cgroup levels above the pods (`kubepods.slice/kubepods-besteffort.slice` or
/// `kubepods/besteffort`), removed innermost first.
struct KubeletRoot {
    levels: Vec<ChildCgroup>,
    systemd: bool,
}

impl KubeletRoot {
    fn new(node: &Node, systemd: bool) -> Result<Self> {
        let base = relative(node.cgroup.path())?;
        let names: [&str; 2] = if systemd {
            ["kubepods.slice", "kubepods-besteffort.slice"]
        } else {
            ["kubepods", "besteffort"]
        };
        let mut levels = Vec::new();
        let mut at = base;
        for n in names {
            at = at.join(n);
            levels.push(ChildCgroup::new(&at.to_string_lossy())?);
        }
        Ok(Self { levels, systemd })
    }
}

impl Drop for KubeletRoot {
    fn drop(&mut self) {
        while let Some(level) = self.levels.pop() {
            drop(level);
        }
    }
}

fn relative(path: &Path) -> Result<PathBuf> {
    let root = mesh_agent::cgroup::cgroup2_mount()?;
    Ok(path.strip_prefix(&root)?.to_path_buf())
}

/// A pod built the way a kubelet would (see the module comment). `pod.cgroup` is its app
/// container's cgroup (where echo servers and probes run).
pub struct KPod {
    pub name: String,
    pub uid: String,
    pub node: usize,
    pause: Child,
    /// Field order is drop order: the app container's cgroup and the namespace (`pod`), then
    /// the sandbox's cgroup, then the pod's.
    pub pod: Pod,
    _sandbox: ChildCgroup,
    _pod_cg: ChildCgroup,
}

impl Drop for KPod {
    fn drop(&mut self) {
        // The cgroups can only go once the pause process has.
        let _ = self.pause.kill();
        let _ = self.pause.wait();
    }
}

/// The cluster. Field order is drop order: agents, pods, cgroup levels, control plane, nodes.
pub struct KCluster {
    pub agents: Vec<Agent>,
    /// With [`KCluster::start_ca`]: the CA, and each node agent's pod-bound token file.
    pub ca: Option<CaProcess>,
    ca_tokens: Vec<PathBuf>,
    /// `--cert-ttl-secs` of agents started with the CA.
    pub cert_ttl_secs: u64,
    pub pods: Vec<KPod>,
    roots: Vec<KubeletRoot>,
    pub cp: ControlPlane,
    pub nodes: Vec<Node>,
    pub dir: tempfile::TempDir,
    prefix: String,
    next_pod: [u8; 2],
}

impl KCluster {
    /// Two nodes and a control plane in node a's namespace with the CRDs, the chart's
    /// ServiceAccounts and RBAC, both Node objects, and namespace [`NS`] (enrolled when
    /// `enrolled`). No pods and no agents yet.
    pub fn up(enrolled: bool) -> Result<Self> {
        require_root();
        let prefix = unique_prefix();
        let a = node(&prefix, "node-a")?;
        let b = node(&prefix, "node-b")?;
        crate::veth(
            &a.ns,
            "wire0",
            &format!("{NODE_A}/24"),
            &b.ns,
            "wire0",
            &format!("{NODE_B}/24"),
        )?;
        a.ns.exec(&["ip", "route", "add", "10.172.0.0/16", "via", NODE_B])?;
        b.ns.exec(&["ip", "route", "add", "10.171.0.0/16", "via", NODE_A])?;
        a.ns.exec(&["ip", "link", "set", "lo", "up"])?;
        b.ns.exec(&["ip", "link", "set", "lo", "up"])?;
        let node_a_ip: IpAddr = NODE_A.parse()?;
        let cp = ControlPlane::start_with(Options {
            network: Network::Existing(a.ns.path()),
            extra_sans: vec![node_a_ip],
            ..Options::new(&prefix)
        })?;
        let roots = vec![KubeletRoot::new(&a, true)?, KubeletRoot::new(&b, false)?];
        let cluster = Self {
            agents: Vec::new(),
            ca: None,
            ca_tokens: Vec::new(),
            cert_ttl_secs: 24 * 3600,
            pods: Vec::new(),
            roots,
            cp,
            nodes: vec![a, b],
            dir: tempfile::tempdir()?,
            prefix,
            next_pod: [1, 1],
        };
        cluster.cp.install_chart(SYSTEM_NS)?;
        for (name, ip) in [("node-a", NODE_A), ("node-b", NODE_B)] {
            cluster.cp.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"
            ))?;
            cluster.cp.kubectl(&[
                "patch",
                "node",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &format!(
                    r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#
                ),
            ])?;
        }
        let labels = if enrolled {
            "\n  labels:\n    nodemesh.io/dataplane: enabled"
        } else {
            ""
        };
        cluster.cp.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}{labels}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: client\n  namespace: {NS}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: server\n  namespace: {NS}\n"
        ))?;
        Ok(cluster)
    }

    /// Creates pod `name` (service account `sa`, label `app: <app>`) on node `n` (0 or 1): the
    /// API object, then its namespace, cgroups and pause process, then its status (Running,
    /// its address). Returns its index in [`KCluster::pods`].
    pub fn add_pod(&mut self, name: &str, sa: &str, app: &str, n: usize) -> Result<usize> {
        let node_name = ["node-a", "node-b"][n];
        self.cp.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  \
             labels:\n    app: {app}\nspec:\n  nodeName: {node_name}\n  serviceAccountName: {sa}\n  \
             containers:\n  - name: app\n    image: registry.k8s.io/pause:3.10\n    ports:\n    \
             - containerPort: 8080\n"
        ))?;
        let uid = self
            .cp
            .kubectl(&[
                "get",
                "pod",
                name,
                "-n",
                NS,
                "-o",
                "jsonpath={.metadata.uid}",
            ])?
            .trim()
            .to_owned();
        ensure!(!uid.is_empty(), "pod {name} has no UID");
        let i = self.next_pod[n];
        self.next_pod[n] += 1;
        let net = PODS[n];
        let node = &self.nodes[n];
        let ns = NetNs::new(&format!("{}-{name}", self.prefix))?;
        let (gw, ip) = (format!("10.{net}.{i}.1"), format!("10.{net}.{i}.2"));
        crate::veth(
            &node.ns,
            &short_if(&format!("v{name}")),
            &format!("{gw}/24"),
            &ns,
            "eth0",
            &format!("{ip}/24"),
        )?;
        ns.exec(&["ip", "route", "add", "default", "via", &gw])?;
        let root = &self.roots[n];
        let (sandbox_abs, app_abs) = kubelet_cgroups(node.cgroup.path(), root.systemd, &uid);
        let sandbox_dir = relative(&sandbox_abs)?;
        let app_dir = relative(&app_abs)?;
        let pod_dir = sandbox_dir.parent().context("pod cgroup")?.to_path_buf();
        let pod_cg = ChildCgroup::new(&pod_dir.to_string_lossy())?;
        let sandbox = ChildCgroup::new(&sandbox_dir.to_string_lossy())?;
        let app = ChildCgroup::new(&app_dir.to_string_lossy())?;
        let pause = start_pause(sandbox.path(), &ns.path())?;
        self.pods.push(KPod {
            name: name.to_owned(),
            uid,
            node: n,
            pause,
            pod: Pod {
                cgroup: app,
                ns,
                ip: ip.clone(),
            },
            _sandbox: sandbox,
            _pod_cg: pod_cg,
        });
        self.cp.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            NS,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
            ),
        ])?;
        Ok(self.pods.len() - 1)
    }

    /// Deletes pod `name` from the API (now, no grace) and then from its node.
    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        self.cp.kubectl(&[
            "delete",
            "pod",
            name,
            "-n",
            NS,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])?;
        self.pods.retain(|p| p.name != name);
        Ok(())
    }

    pub fn pod(&self, name: &str) -> Result<&KPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))
    }

    /// Starts `mesh-agent controller` (with the `nodemesh-controller` ServiceAccount's token and
    /// the chart's RBAC), its CA on node a's address, creates each node agent's pod object
    /// (`nodemesh-system/nodemesh-agent-<a|b>`) and a token bound to it for the CA's audience;
    /// agents started afterwards get their certificates from the CA instead of a local CA.
    pub fn start_ca(&mut self) -> Result<()> {
        for (n, node) in ["node-a", "node-b"].iter().enumerate() {
            let pod = format!("nodemesh-agent-{}", ["a", "b"][n]);
            self.cp.apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {SYSTEM_NS}\n\
                 spec:\n  nodeName: {node}\n  serviceAccountName: nodemesh-agent\n  containers:\n  \
                 - name: agent\n    image: example.invalid/nodemesh\n"
            ))?;
            let token = self.cp.token(
                SYSTEM_NS,
                "nodemesh-agent",
                Some(mesh_agent::ca::DEFAULT_AUDIENCE),
                Some(&pod),
            )?;
            let path = self.dir.path().join(format!("{pod}.token"));
            std::fs::write(&path, token)?;
            self.ca_tokens.push(path);
        }
        let kubeconfig = self.cp.service_account_kubeconfig(
            SYSTEM_NS,
            "nodemesh-controller",
            Some(NODE_A.parse()?),
        )?;
        let log = self.dir.path().join("controller.log");
        let child = self
            .cp
            .command(crate::agent_exe()?)?
            .arg("controller")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--metrics-addr", &format!("{NODE_A}:15014")])
            .args(["--lease-namespace", SYSTEM_NS, "--identity", "controller-0"])
            .args(["--ca-listen", &format!("{NODE_A}:{CA_PORT}")])
            .args(["--ca-namespace", SYSTEM_NS])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start the controller")?;
        let mut ca = CaProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ca.logs().contains("CA serving") {
            if let Some(status) = ca.child.try_wait()? {
                anyhow::bail!("the controller exited ({status}):\n{}", ca.logs());
            }
            ensure!(
                Instant::now() < deadline,
                "the CA was not serving within 60 s:\n{}",
                ca.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ca = Some(ca);
        Ok(())
    }

    /// Starts both agents (a, then b: the first creates the shared local CA) with the
    /// `nodemesh-agent` ServiceAccount's token, reaching the API on node a's address.
    pub fn start_agents(&mut self) -> Result<()> {
        let kubeconfig = self.cp.service_account_kubeconfig(
            SYSTEM_NS,
            "nodemesh-agent",
            Some(NODE_A.parse()?),
        )?;
        for n in 0..2 {
            let agent = self.start_agent(n, &kubeconfig)?;
            self.agents.push(agent);
        }
        Ok(())
    }

    fn start_agent(&self, n: usize, kubeconfig: &Path) -> Result<Agent> {
        let node = &self.nodes[n];
        let (tunnel, addr) = [(TUNNEL_A, NODE_A), (TUNNEL_B, NODE_B)][n];
        let args: Vec<OsString> = vec![
            "node".into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--node".into(),
            ["node-a", "node-b"][n].into(),
            "--tunnel-ip4".into(),
            tunnel.into(),
            "--metrics-addr".into(),
            format!("{addr}:15020").into(),
        ];
        let mut args = args;
        match self.ca_tokens.get(n).filter(|_| self.ca.is_some()) {
            Some(token) => args.extend([
                "--ca-address".into(),
                format!("{NODE_A}:{CA_PORT}").into(),
                "--ca-server-name".into(),
                CA_NAME.into(),
                "--ca-token-file".into(),
                token.into(),
                "--cert-ttl-secs".into(),
                self.cert_ttl_secs.to_string().into(),
            ]),
            None => args.extend(["--ca-dir".into(), self.dir.path().join("ca").into()]),
        }
        let instance = format!("{}-{}", self.prefix, ["a", "b"][n]);
        Agent::spawn(node, self.dir.path(), &instance, &args, || {})
    }

    /// A byte-exact round trip from pod `from` to `dst`; the error carries the probe's reason.
    pub fn roundtrip(&self, from: &str, dst: SocketAddr) -> Result<()> {
        roundtrip_from(&self.pod(from)?.pod, dst, "hello-k8s")
    }

    /// A connection from pod `from` that the test holds (reads time out after 10 s).
    pub fn hold(&self, from: &str, dst: SocketAddr) -> Result<std::net::TcpStream> {
        hold_from(&self.pod(from)?.pod, dst)
    }

    /// Every agent's log (and the CA's), for failure messages.
    pub fn logs(&self) -> String {
        let mut all: String = self
            .agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.log.display(), a.settled_logs()))
            .collect();
        if let Some(ca) = &self.ca {
            all.push_str(&format!("--- {}\n{}", ca.log.display(), ca.logs()));
        }
        all
    }
}

/// Polls `f` until it returns `Ok(true)` or `within` passes; the error says what was awaited
/// and carries the last error seen.
pub fn until(what: &str, within: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {within:?} (last error: {last})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn short_if(name: &str) -> String {
    let mut s = name.to_owned();
    s.truncate(15);
    s
}
