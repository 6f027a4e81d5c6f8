//! The lab in Kubernetes mode (`cargo xtask lab up --kubernetes`): the nodes and pods of the local
//! lab ([`crate::lab`]), a real etcd and kube-apiserver ([`crate::k8s::ControlPlane`]), and a
//! stand-in for what a cluster has and this machine lacks (a kubelet, the DaemonSet and
//! Deployment controllers, cluster DNS), so that `helm install` of the real chart runs nodemesh on
//! the lab.
//!
//! Where things run and how they are reached:
//! - etcd and kube-apiserver run in node a's network namespace (the API on `<node a>:6443`, which
//!   the agents dial, and on 127.0.0.1:6443 there). The host reaches it as kind publishes a
//!   cluster's API: on a loopback port of the host (`127.0.0.1:<ephemeral>`), forwarded into node
//!   a's namespace by the stand-in. `<state>/kubeconfig` (`target/lab/kubeconfig`) is an admin
//!   kubeconfig for that port: `KUBECONFIG=target/lab/kubeconfig kubectl …`, `helm …`.
//! - The stand-in (`nm-lab kubelet`, log `<state>/kubelet.log`) runs on the host in the lab's
//!   cgroup `<cgroup2>/<prefix>/kubelet` with the control plane as its children, so `lab down`
//!   ends all of them with the rest of the lab. It polls the API every second.
//!
//! What the stand-in does, as the cluster's components would:
//! - DaemonSets (one pod per node whose labels match the `nodeSelector`) and Deployments
//!   (`replicas` pods, spread over the nodes): it creates the Pod objects (`spec.nodeName` set,
//!   named `<daemonset>-<node>` and `<deployment>-<i>`), and runs each pod's init containers and
//!   containers as processes on the node, as a kubelet with a container runtime would: in the
//!   node's network namespace (these pods run with the node's address, as `hostNetwork` ones do),
//!   in kubelet-named cgroups below the node's, with the rendered `command`/`args`/`env` (downward
//!   API fields filled in, `$(VAR)` expanded), only the container's capabilities (the bounding
//!   set), its `runAsUser`, the pod's own ServiceAccount token (a kubeconfig named by
//!   `KUBECONFIG`, instead of the in-cluster mount), projected ServiceAccount tokens for their
//!   audiences, bound to the pod (refreshed at 80 % of their life, as the kubelet does), and
//!   `hostPath` volumes mapped onto the node (see [`host_path`]). Image `…/mesh-agent` is the
//!   locally built agent (`nm-agent`). A changed pod template (`helm upgrade`) replaces the pods; a
//!   removed workload (`helm uninstall`) stops them and deletes their Pod objects. Pod and
//!   workload status (Running, ready from the containers' `readinessProbe`) is written, so
//!   `kubectl get pods`, `kubectl rollout status` and `helm install --wait` work.
//! - Cluster DNS: each container sees its own `/etc/hosts` (a private mount namespace) naming
//!   every Service with a selector, `<svc>.<ns>.svc[.cluster.local]`, with the address of a pod
//!   of the stand-in's it selects (there is no kube-proxy: the name resolves to the endpoint). So
//!   the agents reach the controller's CA at `nodemesh-ca.nodemesh-system.svc:15012`, the chart's
//!   default `agent.caProvider=controller`.
//! - Logs: a DaemonSet's first container on a node logs to `<state>/<node>.log` (the agents';
//!   access lines there), every other container to `<state>/pods/<pod>_<container>.log`.
//!   `kubectl logs` does not work (no kubelet serves it).
//!
//! What `up` writes through the API: Node objects for the lab's nodes (`InternalIP` = the node
//! address, label `kubernetes.io/os: linux`), the workloads' namespaces (not enrolled) and
//! ServiceAccounts, each pod (built on its node with the UID the API server gave it, then status
//! Running with its address), and the lab file's services (ClusterIP = the file's VIP, with an
//! EndpointSlice, since no controller writes one).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{Hash, Hasher},
    io::{BufRead, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{
    agent_exe,
    chart::container_process,
    k8s::{self, Binaries, ControlPlane, Network, Options},
    lab::{Lab, kubelet_cgroups},
    probe_exe,
};

/// The lab's own stand-in's cgroup, below the lab's (`down` ends it first).
pub const KUBELET_CGROUP: &str = "kubelet";
/// The file `up` writes for the stand-in: the nodes (name, address, netns, cgroup).
const CLUSTER_FILE: &str = "kubernetes.json";
/// The file the stand-in writes once the API serves (the host port of the forward).
const READY_FILE: &str = "kubelet.ready";
/// How often the stand-in looks at the API.
const POLL: Duration = Duration::from_secs(1);
/// A container that exited is started again after this long (a kubelet backs off from 10 s).
const RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// The control plane's start on a loaded 2-core machine (its own ready timeout is 90 s).
pub const API_READY_WITHIN: Duration = Duration::from_secs(180);
/// The lifetime asked for the tokens in the containers' kubeconfigs.
const API_TOKEN_SECS: i64 = 24 * 3600;

/// One node as the stand-in sees it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    /// The kubelet's cgroup driver on this node (systemd names, else cgroupfs).
    pub systemd: bool,
}

/// What `up` hands the stand-in.
#[derive(Clone, Debug)]
pub struct ClusterInfo {
    pub nodes: Vec<NodeInfo>,
}

impl ClusterInfo {
    fn to_json(&self) -> Value {
        json!({"nodes": self.nodes.iter().map(|n| json!({
            "name": n.name, "ip": n.ip.to_string(), "netns": n.netns, "cgroup": n.cgroup,
            "systemd": n.systemd,
        })).collect::<Vec<_>>()})
    }

    fn from_json(v: &Value) -> Result<Self> {
        let nodes = v["nodes"]
            .as_array()
            .context("no nodes")?
            .iter()
            .map(|n| -> Result<NodeInfo> {
                let s = |k: &str| -> Result<&str> {
                    n[k].as_str().with_context(|| format!("a node without {k}"))
                };
                Ok(NodeInfo {
                    name: s("name")?.to_owned(),
                    ip: s("ip")?.parse()?,
                    netns: PathBuf::from(s("netns")?),
                    cgroup: PathBuf::from(s("cgroup")?),
                    systemd: n["systemd"].as_bool().unwrap_or(false),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { nodes })
    }
}

/// The host-side admin kubeconfig of the lab (`<state>/kubeconfig`).
pub fn kubeconfig_path(lab: &Lab) -> PathBuf {
    lab.state_dir().join("kubeconfig")
}

/// The `nm-lab` binary (beside `nm-probe`).
pub fn lab_exe() -> Result<PathBuf> {
    let probe = probe_exe()?;
    let exe = probe.with_file_name("nm-lab");
    ensure!(
        exe.is_file(),
        "nm-lab binary not found at {} (build the tests crate's binaries)",
        exe.display()
    );
    Ok(exe)
}

/// Starts the stand-in (`nm-lab --prefix … --state-dir … kubelet`) for `cluster` and waits until
/// the API serves on the host. Returns the child (for `up` to remove on failure) and the API's
/// host URL.
pub fn start_kubelet(lab: &Lab, cluster: &ClusterInfo) -> Result<(Child, String)> {
    let state = lab.state_dir();
    fs::write(
        state.join(CLUSTER_FILE),
        serde_json::to_string_pretty(&cluster.to_json())?,
    )?;
    let _ = fs::remove_file(state.join(READY_FILE));
    let log = state.join("kubelet.log");
    let out = fs::File::create(&log)?;
    let mut child = Command::new(lab_exe()?)
        .args(["--prefix", lab.prefix(), "--state-dir"])
        .arg(state)
        .arg("kubelet")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Outlives `up` and a Ctrl-C in its terminal.
        .process_group(0)
        .spawn()
        .context("cannot start the lab's kubelet stand-in (nm-lab kubelet)")?;
    let deadline = Instant::now() + API_READY_WITHIN;
    loop {
        if let Ok(port) = fs::read_to_string(state.join(READY_FILE)) {
            return Ok((child, format!("https://127.0.0.1:{}", port.trim())));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the control plane did not start ({status}); {}",
                tail(&log, 20)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the control plane was not serving within {API_READY_WITHIN:?}; {}",
                tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "the end of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}

/// `kubectl` as the lab's admin from the host, with `stdin` as its input when given.
pub fn kubectl(lab: &Lab, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let bins = Binaries::locate()?;
    let mut cmd = Command::new(bins.kubectl());
    cmd.arg(format!("--kubeconfig={}", kubeconfig_path(lab).display()))
        .arg(format!(
            "--cache-dir={}",
            lab.state_dir().join("kubectl-cache").display()
        ))
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot start kubectl")?;
    if let Some(input) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "`kubectl {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        stdin
            .map(|s| format!("\n--- input ---\n{s}"))
            .unwrap_or_default()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl apply -f -` of `yaml` as the lab's admin.
pub fn apply(lab: &Lab, yaml: &str) -> Result<String> {
    kubectl(lab, &["apply", "-f", "-"], Some(yaml))
}

// ---------------------------------------------------------------------------------------------
// The stand-in.

/// `nm-lab kubelet`: runs until killed (`lab down`). See the module comment.
pub fn run_kubelet(lab: &Lab) -> Result<()> {
    let state = lab.state_dir().to_path_buf();
    let own_cg = mesh_agent::cgroup::cgroup2_mount()?
        .join(lab.prefix())
        .join(KUBELET_CGROUP);
    fs::write(own_cg.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("cannot join cgroup {}", own_cg.display()))?;
    let cluster = ClusterInfo::from_json(&serde_json::from_str(&fs::read_to_string(
        state.join(CLUSTER_FILE),
    )?)?)?;
    let api_node = cluster.nodes.first().context("no nodes")?.clone();
    let cp = ControlPlane::start_with(Options {
        network: Network::Existing(api_node.netns.clone()),
        extra_sans: vec![IpAddr::V4(api_node.ip)],
        dir: Some(state.join("control-plane")),
        progress: true,
        ..Options::new(lab.prefix())
    })?;
    // The host's way in: a loopback port forwarded into node a's namespace.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), k8s::API_PORT);
    let ns = api_node.netns.clone();
    std::thread::spawn(move || forward(listener, ns, target));
    let admin = fs::read_to_string(cp.admin_kubeconfig())?;
    let host_kubeconfig = admin.replace(
        &format!("server: {}", cp.server(None)),
        &format!("server: https://127.0.0.1:{port}"),
    );
    ensure!(
        host_kubeconfig != admin,
        "the admin kubeconfig has no server line"
    );
    let path = kubeconfig_path(lab);
    fs::write(&path, host_kubeconfig)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    fs::write(state.join(READY_FILE), port.to_string())?;
    eprintln!(
        "kubelet: API on https://127.0.0.1:{port} (host) and {}",
        cp.server(Some(IpAddr::V4(api_node.ip)))
    );

    let mut kubelet = Kubelet {
        lab: lab.clone(),
        cluster,
        api_server: cp.server(Some(IpAddr::V4(api_node.ip))),
        ca_pem: fs::read_to_string(cp.ca_cert())?,
        pods: BTreeMap::new(),
        hosts: String::new(),
        workload_status: BTreeMap::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = k8s::kube_client(&path).await?;
        loop {
            if let Err(e) = kubelet.reconcile(&client).await {
                eprintln!("kubelet: {e:#}");
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// Accepts on `listener` and joins each connection to `target` in the namespace `netns`.
fn forward(listener: TcpListener, netns: PathBuf, target: SocketAddr) {
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let ns = netns.clone();
        std::thread::spawn(move || {
            let upstream = mesh_agent::netns::in_netns(&ns, move || {
                TcpStream::connect_timeout(&target, Duration::from_secs(5))
            });
            let Ok(upstream) = upstream else { return };
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                return;
            };
            std::thread::spawn(move || pipe(c2, u2));
            pipe(upstream, client);
        });
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A pod the stand-in runs.
struct RunningPod {
    namespace: String,
    name: String,
    uid: String,
    node: usize,
    hash: u64,
    /// Its containers' processes (name, child, restarts, when it may start again).
    containers: Vec<Container>,
    /// The spec with host paths mapped (what the processes are made from).
    spec: Value,
    dir: PathBuf,
    tokens: Vec<TokenFile>,
    grace: Duration,
    ready: bool,
    status_written: Option<bool>,
}

struct Container {
    name: String,
    child: Option<Child>,
    restarts: u32,
    start_after: Instant,
    log: PathBuf,
}

struct TokenFile {
    path: PathBuf,
    service_account: String,
    audience: Option<String>,
    seconds: i64,
    written: Instant,
    owner_uid: Option<u32>,
}

struct Kubelet {
    lab: Lab,
    cluster: ClusterInfo,
    /// The API as the containers reach it (node a's address).
    api_server: String,
    ca_pem: String,
    pods: BTreeMap<(String, String), RunningPod>,
    hosts: String,
    /// Last status written per workload (kind, ns, name).
    workload_status: BTreeMap<(String, String, String), Value>,
}

/// A pod the workloads ask for.
struct Desired {
    namespace: String,
    name: String,
    node: usize,
    owner: (String, String),
    template: Value,
    hash: u64,
}

fn template_hash(t: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.to_string().hash(&mut h);
    h.finish()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

impl Kubelet {
    async fn reconcile(&mut self, client: &kube::Client) -> Result<()> {
        use k8s_openapi::api::{
            apps::v1::{DaemonSet, Deployment},
            core::v1::{Node, Service},
        };
        use kube::{Api, api::ListParams};
        let lp = ListParams::default();
        let nodes = Api::<Node>::all(client.clone()).list(&lp).await?;
        let node_labels: BTreeMap<String, BTreeMap<String, String>> = nodes
            .items
            .iter()
            .filter_map(|n| {
                let v = serde_json::to_value(n).ok()?;
                Some((
                    v["metadata"]["name"].as_str()?.to_owned(),
                    string_map(&v["metadata"]["labels"]),
                ))
            })
            .collect();
        let fits = |i: usize, template: &Value| -> bool {
            let want = string_map(&template["spec"]["nodeSelector"]);
            let have = node_labels
                .get(&self.cluster.nodes[i].name)
                .cloned()
                .unwrap_or_default();
            want.iter().all(|(k, v)| have.get(k) == Some(v))
        };
        let mut desired = Vec::new();
        for ds in Api::<DaemonSet>::all(client.clone()).list(&lp).await?.items {
            let v = serde_json::to_value(&ds)?;
            let (ns, name) = meta(&v)?;
            let template = v["spec"]["template"].clone();
            for i in 0..self.cluster.nodes.len() {
                if fits(i, &template) {
                    desired.push(Desired {
                        name: format!("{name}-{}", self.cluster.nodes[i].name),
                        namespace: ns.clone(),
                        node: i,
                        owner: ("DaemonSet".into(), name.clone()),
                        hash: template_hash(&template),
                        template: template.clone(),
                    });
                }
            }
        }
        for d in Api::<Deployment>::all(client.clone())
            .list(&lp)
            .await?
            .items
        {
            let v = serde_json::to_value(&d)?;
            let (ns, name) = meta(&v)?;
            let template = v["spec"]["template"].clone();
            let replicas = v["spec"]["replicas"].as_u64().unwrap_or(1);
            let nodes: Vec<usize> = (0..self.cluster.nodes.len())
                .filter(|i| fits(*i, &template))
                .collect();
            if nodes.is_empty() {
                continue;
            }
            for r in 0..replicas {
                let r = usize::try_from(r)?;
                desired.push(Desired {
                    name: format!("{name}-{r}"),
                    namespace: ns.clone(),
                    node: nodes[r % nodes.len()],
                    owner: ("Deployment".into(), name.clone()),
                    hash: template_hash(&template),
                    template: template.clone(),
                });
            }
        }

        // Gone or changed: stop, then delete the Pod object.
        let wanted: BTreeMap<(String, String), u64> = desired
            .iter()
            .map(|d| ((d.namespace.clone(), d.name.clone()), d.hash))
            .collect();
        let stale: Vec<(String, String)> = self
            .pods
            .iter()
            .filter(|(k, p)| wanted.get(*k) != Some(&p.hash))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(mut pod) = self.pods.remove(&key) {
                eprintln!("kubelet: stopping pod {}/{}", pod.namespace, pod.name);
                stop_pod(&mut pod);
                delete_pod(client, &pod.namespace, &pod.name).await?;
            }
        }

        // Hosts (cluster DNS) before anything starts that may resolve a name.
        let services = Api::<Service>::all(client.clone()).list(&lp).await?;
        self.write_hosts(&services.items, &desired)?;

        for d in &desired {
            let key = (d.namespace.clone(), d.name.clone());
            if !self.pods.contains_key(&key) {
                eprintln!(
                    "kubelet: starting pod {}/{} on {}",
                    d.namespace, d.name, self.cluster.nodes[d.node].name
                );
                match self.create_pod(client, d).await {
                    Ok(pod) => {
                        self.pods.insert(key, pod);
                    }
                    Err(e) => eprintln!("kubelet: pod {}/{}: {e:#}", d.namespace, d.name),
                }
            }
        }
        let keys: Vec<_> = self.pods.keys().cloned().collect();
        for key in keys {
            self.tend(client, &key).await?;
        }
        self.write_workload_status(client, &desired).await
    }

    /// Resolves every Service with a selector to one of the stand-in's pods it selects, for the
    /// containers' `/etc/hosts`.
    fn write_hosts(
        &mut self,
        services: &[k8s_openapi::api::core::v1::Service],
        desired: &[Desired],
    ) -> Result<()> {
        let mut text = String::from(
            "# The lab's cluster DNS (nm-lab kubelet): Services resolve to a selected pod.\n\
             127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        );
        for svc in services {
            let v = serde_json::to_value(svc)?;
            let (ns, name) = meta(&v)?;
            let selector = string_map(&v["spec"]["selector"]);
            if selector.is_empty() {
                continue;
            }
            let pod = desired.iter().find(|d| {
                d.namespace == ns && {
                    let labels = string_map(&d.template["metadata"]["labels"]);
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                }
            });
            if let Some(p) = pod {
                let ip = self.cluster.nodes[p.node].ip;
                text.push_str(&format!(
                    "{ip} {name}.{ns}.svc {name}.{ns}.svc.cluster.local\n"
                ));
            }
        }
        if text != self.hosts {
            // In place: the containers' /etc/hosts are bind mounts of this inode.
            let path = self.lab.state_dir().join("hosts");
            let mut f = fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
            f.set_permissions(fs::Permissions::from_mode(0o644))?;
            self.hosts = text;
        }
        Ok(())
    }

    async fn create_pod(&self, client: &kube::Client, d: &Desired) -> Result<RunningPod> {
        use k8s_openapi::api::core::v1::Pod;
        use kube::{Api, api::PostParams};
        let node = &self.cluster.nodes[d.node];
        let mut spec = d.template["spec"].clone();
        spec["nodeName"] = json!(node.name);
        let labels = d.template["metadata"]["labels"].clone();
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": d.name, "namespace": d.namespace, "labels": labels,
                "annotations": d.template["metadata"]["annotations"].clone(),
            },
            "spec": spec,
        });
        let mut obj = obj;
        if obj["metadata"]["annotations"].is_null() {
            obj["metadata"]
                .as_object_mut()
                .context("metadata")?
                .remove("annotations");
        }
        delete_pod(client, &d.namespace, &d.name).await?;
        let api = Api::<Pod>::namespaced(client.clone(), &d.namespace);
        let created = api
            .create(&PostParams::default(), &serde_json::from_value(obj)?)
            .await
            .context("cannot create the Pod object")?;
        let created = serde_json::to_value(&created)?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("no uid")?
            .to_owned();
        let dir = self
            .lab
            .state_dir()
            .join("pods")
            .join(format!("{}_{}", d.namespace, d.name));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        let user = run_as_user(&spec, None);
        let sa = spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        // Volumes: host paths onto the node, projected tokens and emptyDirs into the pod's dir.
        let mut tokens = Vec::new();
        for v in spec["volumes"].as_array_mut().into_iter().flatten() {
            let name = v["name"]
                .as_str()
                .context("volume without a name")?
                .to_owned();
            if let Some(p) = v["hostPath"]["path"].as_str() {
                let mapped = host_path(&self.lab, node, Path::new(p))?;
                v["hostPath"]["path"] = json!(mapped);
            } else if v["projected"].is_object() || v["emptyDir"].is_object() {
                let vdir = dir.join("volumes").join(&name);
                fs::create_dir_all(&vdir)?;
                for src in v["projected"]["sources"].as_array().into_iter().flatten() {
                    let t = &src["serviceAccountToken"];
                    if let Some(path) = t["path"].as_str() {
                        tokens.push(TokenFile {
                            path: vdir.join(path),
                            service_account: sa.clone(),
                            audience: t["audience"].as_str().map(str::to_owned),
                            seconds: t["expirationSeconds"].as_i64().unwrap_or(3600),
                            written: Instant::now(),
                            owner_uid: user,
                        });
                    }
                }
                chown(&vdir, user)?;
            }
        }
        // The API for the pod's containers: its ServiceAccount's token (instead of the
        // in-cluster mount, which would need the container's own filesystem).
        tokens.push(TokenFile {
            path: dir.join("token"),
            service_account: sa.clone(),
            audience: None,
            seconds: API_TOKEN_SECS,
            written: Instant::now(),
            owner_uid: user,
        });
        for t in &tokens {
            write_token(client, &d.namespace, &d.name, &uid, t).await?;
        }
        fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        fs::write(
            dir.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    \
                 certificate-authority: {}\nusers:\n- name: sa\n  user:\n    tokenFile: {}\n\
                 contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: sa\n    namespace: {}\n\
                 current-context: lab\n",
                self.api_server,
                dir.join("ca.crt").display(),
                dir.join("token").display(),
                d.namespace
            ),
        )?;
        for f in ["ca.crt", "kubeconfig"] {
            chown(&dir.join(f), user)?;
        }
        // The pod's directory must be reachable by a non-root container user.
        let mut at = dir.clone();
        while at.starts_with(self.lab.state_dir()) {
            fs::set_permissions(&at, fs::Permissions::from_mode(0o755))?;
            if !at.pop() {
                break;
            }
        }
        let grace = Duration::from_secs(
            spec["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30)
                .min(15),
        );
        let containers = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, c)| {
                let name = c["name"].as_str()?.to_owned();
                let log = if d.owner.0 == "DaemonSet" && i == 0 {
                    self.lab.state_dir().join(format!("{}.log", node.name))
                } else {
                    self.lab
                        .state_dir()
                        .join("pods")
                        .join(format!("{}_{name}.log", d.name))
                };
                Some(Container {
                    name,
                    child: None,
                    restarts: 0,
                    start_after: Instant::now(),
                    log,
                })
            })
            .collect();
        let mut pod = RunningPod {
            namespace: d.namespace.clone(),
            name: d.name.clone(),
            uid,
            node: d.node,
            hash: d.hash,
            containers,
            spec,
            dir,
            tokens,
            grace,
            ready: false,
            status_written: None,
        };
        // Init containers, in order, each to completion.
        let inits: Vec<String> = pod.spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect();
        for name in inits {
            let log = self
                .lab
                .state_dir()
                .join("pods")
                .join(format!("{}_{name}.log", d.name));
            let out = fs::File::create(&log)?;
            let status = self
                .command(&pod, &name)?
                .stdout(out.try_clone()?)
                .stderr(out)
                .status()
                .with_context(|| format!("init container {name}"))?;
            if !status.success() {
                stop_pod(&mut pod);
                bail!(
                    "init container {name} failed ({status}); see {}",
                    log.display()
                );
            }
        }
        Ok(pod)
    }

    /// The process of container `name` of `pod`, as a container runtime would start it.
    fn command(&self, pod: &RunningPod, name: &str) -> Result<Command> {
        let node = &self.cluster.nodes[pod.node];
        let fields = BTreeMap::from([
            ("spec.nodeName", node.name.clone()),
            ("status.hostIP", node.ip.to_string()),
            ("status.podIP", node.ip.to_string()),
            ("metadata.name", pod.name.clone()),
            ("metadata.namespace", pod.namespace.clone()),
            ("metadata.uid", pod.uid.clone()),
            (
                "spec.serviceAccountName",
                pod.spec["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
            ),
        ]);
        let volumes: Vec<(String, PathBuf)> = pod.spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["projected"].is_object() || v["emptyDir"].is_object())
            .filter_map(|v| {
                let n = v["name"].as_str()?.to_owned();
                let dir = pod.dir.join("volumes").join(&n);
                Some((n, dir))
            })
            .collect();
        let projected: BTreeMap<&str, PathBuf> = volumes
            .iter()
            .map(|(n, d)| (n.as_str(), d.clone()))
            .collect();
        let wrapper = json!({"spec": {"template": {"spec": pod.spec}}});
        let process = container_process(&wrapper, name, &fields, &projected)?;
        let spec_c = pod.spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod.spec["initContainers"].as_array().into_iter().flatten())
            .find(|c| c["name"] == name)
            .context("container")?;
        let user = run_as_user(&pod.spec, Some(spec_c));
        // Every container of the pod in its app container's cgroup (kubelet-named, its UID).
        let (_, cg) = kubelet_cgroups(&node.cgroup, node.systemd, &pod.uid);
        fs::create_dir_all(&cg)
            .with_context(|| format!("cannot create cgroup {}", cg.display()))?;
        let bounding: String = std::iter::once("-all".to_owned())
            .chain(
                process
                    .capabilities
                    .iter()
                    .map(|c| format!("+{}", c.to_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(probe_exe()?);
        cmd.arg(&cg)
            .arg(&node.netns)
            .args(["exec", "unshare", "--mount", "--propagation", "slave", "--"])
            // The container's own /etc/hosts (the lab's cluster DNS), then its process.
            .args(["sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""])
            .arg(self.lab.state_dir().join("hosts"))
            .arg("setpriv");
        if let Some(uid) = user.filter(|u| *u != 0) {
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups");
        }
        cmd.arg(format!("--bounding-set={bounding}"))
            .args(["--inh-caps=-all", "--"]);
        let image = spec_c["image"].as_str().unwrap_or_default();
        match process.command.split_first() {
            Some((program, rest)) => cmd.arg(program).args(rest),
            None if image.contains("mesh-agent") => cmd.arg(agent_exe()?),
            None => bail!("container {name}: image {image} has no entrypoint the lab knows"),
        };
        cmd.args(&process.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", "/")
            .envs(&process.env)
            .env("KUBECONFIG", pod.dir.join("kubeconfig"))
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Starts containers that are due, refreshes tokens, probes readiness, writes the status.
    async fn tend(&mut self, client: &kube::Client, key: &(String, String)) -> Result<()> {
        let mut starts = Vec::new();
        {
            let Some(pod) = self.pods.get_mut(key) else {
                return Ok(());
            };
            for (i, c) in pod.containers.iter_mut().enumerate() {
                if let Some(child) = c.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    eprintln!(
                        "kubelet: container {} of {}/{} exited ({status}); restarting in {:?}",
                        c.name, pod.namespace, pod.name, RESTART_BACKOFF
                    );
                    c.child = None;
                    c.restarts += 1;
                    c.start_after = Instant::now() + RESTART_BACKOFF;
                    pod.status_written = None;
                }
                if c.child.is_none() && Instant::now() >= c.start_after {
                    starts.push(i);
                }
            }
        }
        for i in starts {
            let Some(pod) = self.pods.get(key) else {
                continue;
            };
            let c = &pod.containers[i];
            let log = c.log.clone();
            let spawned = self.command(pod, &c.name).and_then(|mut cmd| {
                let out = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?;
                cmd.stdout(out.try_clone()?)
                    .stderr(out)
                    .spawn()
                    .context("cannot start the container")
            });
            let Some(pod) = self.pods.get_mut(key) else {
                continue;
            };
            let c = &mut pod.containers[i];
            match spawned {
                Ok(child) => c.child = Some(child),
                Err(e) => {
                    eprintln!("kubelet: container {}: {e:#}", c.name);
                    c.start_after = Instant::now() + RESTART_BACKOFF;
                }
            }
        }
        let Some(pod) = self.pods.get_mut(key) else {
            return Ok(());
        };
        for t in &mut pod.tokens {
            if t.written.elapsed().as_secs_f64() > 0.8 * t.seconds as f64 {
                write_token(client, &pod.namespace, &pod.name, &pod.uid, t).await?;
                t.written = Instant::now();
            }
        }
        let node = &self.cluster.nodes[pod.node];
        pod.ready = pod.containers.iter().all(|c| c.child.is_some()) && ready(&pod.spec, node);
        if pod.status_written != Some(pod.ready) {
            write_pod_status(client, pod, node).await?;
            pod.status_written = Some(pod.ready);
        }
        Ok(())
    }

    async fn write_workload_status(
        &mut self,
        client: &kube::Client,
        desired: &[Desired],
    ) -> Result<()> {
        use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
        use kube::{
            Api,
            api::{Patch, PatchParams},
        };
        let mut owners: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
        for d in desired {
            let e = owners
                .entry((d.owner.0.clone(), d.namespace.clone(), d.owner.1.clone()))
                .or_default();
            e.0 += 1;
            if self
                .pods
                .get(&(d.namespace.clone(), d.name.clone()))
                .is_some_and(|p| p.ready)
            {
                e.1 += 1;
            }
        }
        // Workloads gone (`helm uninstall`): forget them, and delete the ReplicaSets made for
        // Deployments (no garbage collector runs).
        let gone: Vec<(String, String, String)> = self
            .workload_status
            .keys()
            .filter(|(kind, ns, name)| {
                let owner = if kind == "ReplicaSet" {
                    (
                        "Deployment".to_owned(),
                        ns.clone(),
                        name.trim_end_matches("-lab").to_owned(),
                    )
                } else {
                    (kind.clone(), ns.clone(), name.clone())
                };
                !owners.contains_key(&owner)
            })
            .cloned()
            .collect();
        for key in gone {
            if key.0 == "ReplicaSet" {
                let api = Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(
                    client.clone(),
                    &key.1,
                );
                match api.delete(&key.2, &Default::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e).context("cannot delete a ReplicaSet"),
                }
            }
            self.workload_status.remove(&key);
        }
        for ((kind, ns, name), (want, ready)) in owners {
            let pp = PatchParams::default();
            let status = if kind == "DaemonSet" {
                let api = Api::<DaemonSet>::namespaced(client.clone(), &ns);
                let generation = api.get(&name).await?.metadata.generation.unwrap_or(0);
                let status = json!({"status": {
                    "observedGeneration": generation,
                    "desiredNumberScheduled": want, "currentNumberScheduled": want,
                    "updatedNumberScheduled": want, "numberMisscheduled": 0,
                    "numberReady": ready, "numberAvailable": ready,
                    "numberUnavailable": want - ready,
                }});
                if self
                    .workload_status
                    .get(&(kind.clone(), ns.clone(), name.clone()))
                    != Some(&status)
                {
                    api.patch_status(&name, &pp, &Patch::Merge(&status)).await?;
                }
                status
            } else {
                let api = Api::<Deployment>::namespaced(client.clone(), &ns);
                let deployment = serde_json::to_value(api.get(&name).await?)?;
                let generation = deployment["metadata"]["generation"].as_u64().unwrap_or(0);
                self.replica_set(client, &deployment, want, ready).await?;
                let status = json!({"status": {
                    "observedGeneration": generation, "replicas": want,
                    "updatedReplicas": want, "readyReplicas": ready,
                    "availableReplicas": ready, "unavailableReplicas": want - ready,
                    "conditions": [{"type": "Available",
                        "status": if ready == want { "True" } else { "False" },
                        "reason": "NmLab"}],
                }});
                if self
                    .workload_status
                    .get(&(kind.clone(), ns.clone(), name.clone()))
                    != Some(&status)
                {
                    api.patch_status(&name, &pp, &Patch::Merge(&status)).await?;
                }
                status
            };
            self.workload_status.insert((kind, ns, name), status);
        }
        Ok(())
    }
}

impl Kubelet {
    /// The Deployment's ReplicaSet (`<deployment>-lab`, its template and owner), with the
    /// replica counts as status: what `helm install --wait` looks for.
    async fn replica_set(
        &mut self,
        client: &kube::Client,
        deployment: &Value,
        want: u64,
        ready: u64,
    ) -> Result<()> {
        use k8s_openapi::api::apps::v1::ReplicaSet;
        use kube::{
            Api,
            api::{Patch, PatchParams},
        };
        let (ns, name) = meta(deployment)?;
        let rs_name = format!("{name}-lab");
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": rs_name, "namespace": ns,
                "labels": deployment["spec"]["template"]["metadata"]["labels"],
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                    "uid": deployment["metadata"]["uid"], "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "replicas": want,
                "selector": deployment["spec"]["selector"],
                "template": deployment["spec"]["template"],
            },
        });
        let status = json!({"status": {
            "replicas": want, "readyReplicas": ready, "availableReplicas": ready,
            "fullyLabeledReplicas": want,
            "observedGeneration": 1,
        }});
        let key = ("ReplicaSet".to_owned(), ns.clone(), rs_name.clone());
        let seen = json!([rs, status]);
        if self.workload_status.get(&key) == Some(&seen) {
            return Ok(());
        }
        let api = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
        let pp = PatchParams::apply("nm-lab-kubelet").force();
        let applied = api.patch(&rs_name, &pp, &Patch::Apply(&rs)).await?;
        let generation = applied.metadata.generation.unwrap_or(1);
        let mut status = status;
        status["status"]["observedGeneration"] = json!(generation);
        api.patch_status(&rs_name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        self.workload_status.insert(key, seen);
        Ok(())
    }
}

fn meta(v: &Value) -> Result<(String, String)> {
    Ok((
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        v["metadata"]["name"]
            .as_str()
            .context("an object without a name")?
            .to_owned(),
    ))
}

/// The container's `runAsUser`, else the pod's.
fn run_as_user(spec: &Value, container: Option<&Value>) -> Option<u32> {
    container
        .and_then(|c| c["securityContext"]["runAsUser"].as_u64())
        .or_else(|| spec["securityContext"]["runAsUser"].as_u64())
        .and_then(|u| u32::try_from(u).ok())
}

fn chown(path: &Path, user: Option<u32>) -> Result<()> {
    if let Some(uid) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))
            .with_context(|| format!("cannot chown {}", path.display()))?;
    }
    Ok(())
}

/// Where a `hostPath` of the pod's spec is on the lab node `node`: each node has its own
/// filesystem root `<state>/nodes/<node>/root`, except for the kernel's: `/proc` is the host's,
/// the cgroup v2 root (`/sys/fs/cgroup`) is the node's cgroup, and `/sys/fs/bpf` is a bpffs of
/// the node's own (mounted at `<state>/nodes/<node>/bpffs`), so two nodes' agents never share
/// pins.
pub fn host_path(lab: &Lab, node: &NodeInfo, path: &Path) -> Result<PathBuf> {
    let node_dir = lab.state_dir().join("nodes").join(&node.name);
    if path == Path::new("/proc") {
        return Ok(path.to_path_buf());
    }
    if path == Path::new("/sys/fs/cgroup") {
        return Ok(node.cgroup.clone());
    }
    if path == Path::new("/sys/fs/bpf") {
        let dir = node_dir.join("bpffs");
        fs::create_dir_all(&dir)?;
        if !is_mount_point(&dir)? {
            nix::mount::mount(
                Some("bpf"),
                &dir,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("cannot mount a bpffs at {}", dir.display()))?;
        }
        return Ok(dir);
    }
    let rel = path.strip_prefix("/").unwrap_or(path);
    let dir = node_dir.join("root").join(rel);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    Ok(out)
}

fn is_mount_point(dir: &Path) -> Result<bool> {
    Ok(mounts_below(dir)?.iter().any(|p| p == dir))
}

/// Whether the pod's first container's `readinessProbe` (`httpGet` on the pod's address, which
/// is the node's) answers 2xx; ready when it has none.
fn ready(spec: &Value, node: &NodeInfo) -> bool {
    let Some(c) = spec["containers"].as_array().and_then(|c| c.first()) else {
        return false;
    };
    let probe = &c["readinessProbe"]["httpGet"];
    if probe.is_null() {
        return true;
    }
    let port = match &probe["port"] {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(name) => c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == *name)
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok()),
        _ => None,
    };
    let Some(port) = port else { return false };
    let path = probe["path"].as_str().unwrap_or("/");
    crate::http_in_netns(
        &node.netns,
        SocketAddr::new(IpAddr::V4(node.ip), port),
        "GET",
        path,
    )
    .is_ok_and(|(code, _)| (200..400).contains(&code))
}

async fn write_token(
    client: &kube::Client,
    ns: &str,
    pod: &str,
    pod_uid: &str,
    t: &TokenFile,
) -> Result<()> {
    use k8s_openapi::api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    use kube::{Api, api::PostParams};
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: t.audience.iter().cloned().collect(),
            expiration_seconds: Some(t.seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(pod_uid.into()),
            }),
        },
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let answer = api
        .create_token_request(&t.service_account, &PostParams::default(), &req)
        .await
        .with_context(|| format!("TokenRequest for {ns}/{}", t.service_account))?;
    let token = answer.status.context("no token in the answer")?.token;
    let tmp = t.path.with_extension("new");
    fs::write(&tmp, token)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    chown(&tmp, t.owner_uid)?;
    fs::rename(&tmp, &t.path)?;
    Ok(())
}

async fn write_pod_status(client: &kube::Client, pod: &RunningPod, node: &NodeInfo) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::{
        Api,
        api::{Patch, PatchParams},
    };
    let now = humantime_now();
    let ready = if pod.ready { "True" } else { "False" };
    let statuses: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            let image = pod.spec["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == c.name.as_str())
                .and_then(|s| s["image"].as_str())
                .unwrap_or_default()
                .to_owned();
            json!({
                "name": c.name, "image": image, "imageID": "", "restartCount": c.restarts,
                "ready": pod.ready && c.child.is_some(), "started": c.child.is_some(),
                "state": if c.child.is_some() {
                    json!({"running": {"startedAt": now}})
                } else {
                    json!({"waiting": {"reason": "CrashLoopBackOff"}})
                },
            })
        })
        .collect();
    let ip = node.ip.to_string();
    let status = json!({"status": {
        "phase": "Running", "hostIP": ip, "hostIPs": [{"ip": ip}], "podIP": ip,
        "podIPs": [{"ip": ip}], "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ],
        "containerStatuses": statuses,
    }});
    Api::<Pod>::namespaced(client.clone(), &pod.namespace)
        .patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("status of pod {}/{}", pod.namespace, pod.name))?;
    Ok(())
}

/// RFC 3339 UTC, seconds.
fn humantime_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn delete_pod(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::{Api, api::DeleteParams};
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    match api
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot delete pod {ns}/{name}")),
    }
}

/// SIGTERM to every container, up to the grace period, then SIGKILL.
fn stop_pod(pod: &mut RunningPod) {
    for c in &pod.containers {
        if let Some(child) = &c.child
            && let Ok(pid) = i32::try_from(child.id())
        {
            // SAFETY: kill(2) with plain integers on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + pod.grace;
    for c in &mut pod.containers {
        if let Some(mut child) = c.child.take() {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pods' servers.

/// `nm-lab serve ADDR NAME`: the lab's server in Kubernetes mode. An HTTP request (`curl`) gets
/// `200` and `hello from NAME: you are <peer>`; any other bytes are echoed back until EOF (what
/// `nm-probe roundtrip` expects). Prints `peer=<addr>` per connection.
pub fn serve(addr: &str, name: &str) -> Result<()> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let _ = serve_one(stream, &name);
        });
    }
    Ok(())
}

fn serve_one(stream: TcpStream, name: &str) -> Result<()> {
    let peer = stream.peer_addr()?;
    println!("peer={peer}");
    let _ = std::io::stdout().flush();
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let head = reader.fill_buf()?.to_vec();
    let http = ["GET ", "HEAD ", "POST ", "PUT "]
        .iter()
        .any(|m| head.starts_with(m.as_bytes()));
    if http {
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        let body = format!("hello from {name}: you are {peer}\n");
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// What `up` writes through the API.

/// The chart's default `agent.tunnelIPv4` (the same on every node).
pub const CHART_TUNNEL_IP: &str = "169.254.7.1";

/// Writes the Node objects, the workloads' namespaces and ServiceAccounts and their Pod objects
/// (scheduled to their nodes); returns each pod's UID by name.
pub fn register(
    lab: &Lab,
    model: &mesh_agent::model::ClusterModel,
    cluster: &ClusterInfo,
) -> Result<BTreeMap<String, String>> {
    for n in &cluster.nodes {
        apply(
            lab,
            &format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {0}\n  labels:\n    \
                 kubernetes.io/os: linux\n    kubernetes.io/hostname: {0}\n",
                n.name
            ),
        )?;
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": n.ip.to_string()},
                          {"type": "Hostname", "address": n.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "NmLab",
                            "message": "a lab node (nm-lab kubelet)"}],
        }});
        kubectl(
            lab,
            &[
                "patch",
                "node",
                &n.name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
            None,
        )?;
    }
    let accounts: BTreeSet<(String, String)> = model
        .workloads()
        .map(|w| (w.key.namespace.clone(), w.service_account.clone()))
        .collect();
    let namespaces: BTreeSet<&String> = accounts.iter().map(|(ns, _)| ns).collect();
    let mut docs: Vec<Value> = namespaces
        .iter()
        .map(|ns| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .collect();
    docs.extend(accounts.iter().map(|(ns, sa)| {
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": sa, "namespace": ns}})
    }));
    for w in model.workloads() {
        let server = w.key.name.starts_with("server");
        let mut container = json!({"name": "app", "image": "nodemesh.local/lab-app:v1"});
        if server {
            container["ports"] = json!([{"name": "echo", "containerPort": crate::lab::ECHO_PORT}]);
        }
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": w.key.name, "namespace": w.key.namespace, "labels": w.labels},
            "spec": {"nodeName": w.node, "serviceAccountName": w.service_account,
                     "containers": [container]},
        }));
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    apply(lab, &list.to_string())?;
    let mut uids = BTreeMap::new();
    for w in model.workloads() {
        let uid = kubectl(
            lab,
            &[
                "get",
                "pod",
                &w.key.name,
                "-n",
                &w.key.namespace,
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        )?;
        ensure!(!uid.trim().is_empty(), "pod {} has no UID", w.key.name);
        uids.insert(w.key.name.clone(), uid.trim().to_owned());
    }
    Ok(uids)
}

/// Once the pods are built: their status (Running, their address) and the lab file's services
/// with an EndpointSlice each (no controller writes them).
pub fn pods_running(
    lab: &Lab,
    model: &mesh_agent::model::ClusterModel,
    pods: &[Value],
) -> Result<()> {
    let node_ip = |name: &str| model.node(name).map(|n| n.address.to_string());
    for p in pods {
        let (Some(name), Some(ns), Some(ip), Some(node)) = (
            p["name"].as_str(),
            p["namespace"].as_str(),
            p["ip"].as_str(),
            p["node"].as_str(),
        ) else {
            bail!("a pod without name, namespace, ip or node: {p}");
        };
        let host = node_ip(node).context("the pod's node")?;
        let status = json!({"status": {
            "phase": "Running", "hostIP": host, "hostIPs": [{"ip": host}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": humantime_now(),
            "conditions": [{"type": "Ready", "status": "True"},
                           {"type": "ContainersReady", "status": "True"},
                           {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "app", "image": "nodemesh.local/lab-app:v1",
                "imageID": "", "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": humantime_now()}}}],
        }});
        kubectl(
            lab,
            &[
                "patch",
                "pod",
                name,
                "-n",
                ns,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
            None,
        )?;
    }
    let mut docs = Vec::new();
    for s in model.services() {
        let endpoints: Vec<&mesh_agent::model::Workload> = s
            .endpoints
            .iter()
            .filter_map(|k| model.workloads().find(|w| w.key == *k))
            .collect();
        // The labels every endpoint has: the Service's selector.
        let mut selector = endpoints
            .first()
            .map(|w| w.labels.clone())
            .unwrap_or_default();
        selector.retain(|k, v| endpoints.iter().all(|w| w.labels.get(k) == Some(v)));
        let vip = s.vips.first().map(ToString::to_string);
        docs.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.key.name, "namespace": s.key.namespace},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": s.ports.iter().map(|p| json!({
                         "name": format!("tcp-{}", p.port), "port": p.port,
                         "targetPort": p.target_port, "protocol": "TCP"}))
                         .collect::<Vec<_>>()},
        }));
        docs.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-lab", s.key.name), "namespace": s.key.namespace,
                         "labels": {"kubernetes.io/service-name": s.key.name,
                                    "endpointslice.kubernetes.io/managed-by": "nm-lab"}},
            "addressType": "IPv4",
            "endpoints": endpoints.iter().map(|w| json!({
                "addresses": w.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "conditions": {"ready": true}, "nodeName": w.node,
                "targetRef": {"kind": "Pod", "name": w.key.name, "namespace": w.key.namespace},
            })).collect::<Vec<_>>(),
            "ports": s.ports.iter().map(|p| json!({
                "name": format!("tcp-{}", p.port), "port": p.target_port, "protocol": "TCP"}))
                .collect::<Vec<_>>(),
        }));
    }
    if !docs.is_empty() {
        apply(
            lab,
            &json!({"apiVersion": "v1", "kind": "List", "items": docs}).to_string(),
        )?;
    }
    Ok(())
}
