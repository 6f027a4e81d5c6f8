//! The Kubernetes source (`mesh_agent::k8s::source`) against a real kube-apiserver: objects
//! written with kubectl converge into the expected model in-process; a namespace label change
//! un-enrolls and re-enrolls; an API server restart mid-watch keeps the last model (never a
//! half-empty one) and converges afterwards. The source's client runs with the
//! `nodemesh-system/nodemesh-agent` ServiceAccount's own token and the agent's least-privilege
//! ClusterRole, so a missing verb fails the test.
//!
//! Needs root (network namespaces) and the binaries of `cargo xtask k8s build`.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use mesh_agent::{
    k8s::{
        NetnsFinder,
        convert::{REMOTE_NETNS, Settings},
        source::{SourceOptions, SourceStatus, start},
    },
    model::{ClusterModel, ObjectKey},
    policy::{ConnectionAttrs, PeerIdentity},
};
use nodemesh_tests::{
    agent_exe, cluster,
    k8s::{ControlPlane, Network, Options, block_on_in_netns, kube_client},
    probe_exe, require_root, unique_prefix,
};
use tokio::sync::watch;

const THIS: &str = "node-a";

/// The policy CRDs in their smallest form (the schema-checked ones come with the chart's
/// `crds/`; this test is about the source, which reads whatever the API server stores).
const CRDS: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: authorizationpolicies.security.nodemesh.io}
spec:
  group: security.nodemesh.io
  scope: Namespaced
  names: {kind: AuthorizationPolicy, plural: authorizationpolicies, singular: authorizationpolicy}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: peerauthentications.security.nodemesh.io}
spec:
  group: security.nodemesh.io
  scope: Namespaced
  names: {kind: PeerAuthentication, plural: peerauthentications, singular: peerauthentication}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

/// The agent's ClusterRole, as `charts/nodemesh/templates/agent-rbac.yaml` grants it.
const AGENT_RBAC: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: nodemesh-agent}
rules:
- apiGroups: ['']
  resources: [pods, nodes, namespaces, services]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
- apiGroups: [security.nodemesh.io]
  resources: [authorizationpolicies, peerauthentications]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: nodemesh-agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: nodemesh-agent}
subjects:
- {kind: ServiceAccount, name: nodemesh-agent, namespace: nodemesh-system}
";

/// Every pod of this node is in `/run/netns/<uid>` (the path is only recorded here).
struct ByUid;

impl NetnsFinder for ByUid {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        Ok(PathBuf::from(format!("/run/netns/{pod_uid}")))
    }
}

fn node_object(cp: &ControlPlane, name: &str, ip: &str) -> Result<()> {
    cp.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n"
    ))?;
    cp.kubectl(&[
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#),
    ])?;
    Ok(())
}

/// A pod with `spec.nodeName`, then `status.podIPs` written through the status subresource
/// (there is no kubelet).
fn pod(cp: &ControlPlane, ns: &str, name: &str, node: &str, ip: &str) -> Result<()> {
    cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: sa-{name}\n  \
         containers: [{{name: main, image: x, ports: [{{name: tcp, containerPort: 5432}}]}}]\n"
    ))?;
    cp.kubectl(&[
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#),
    ])?;
    Ok(())
}

fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not within {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn names(model: &ClusterModel) -> Vec<String> {
    model.workloads().map(|w| w.key.to_string()).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP")
}

/// Whether `from` (a service account of `shop`) may connect to workload `shop/to` on `port`.
fn allowed(model: &ClusterModel, from_sa: &str, to: &str, port: u16) -> Result<bool> {
    let w = model
        .workload(&ObjectKey::new("shop", to))
        .with_context(|| format!("no workload shop/{to}"))?;
    let conn = ConnectionAttrs {
        src_identity: Some(PeerIdentity {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: from_sa.into(),
        }),
        src_ip: ip("10.1.0.5"),
        dst_ip: w.ips[0],
        dst_port: port,
    };
    Ok(model.policies().authorize(&w.meta(), &conn).is_allowed())
}

/// The source, run on its own thread inside the control plane's namespace until dropped.
struct Source {
    models: watch::Receiver<Arc<ClusterModel>>,
    status: watch::Receiver<SourceStatus>,
    /// Workload counts of every model published, in order.
    history: Arc<Mutex<Vec<usize>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// A source whose first model is not there yet.
struct Starting {
    first: std::sync::mpsc::Receiver<(
        watch::Receiver<Arc<ClusterModel>>,
        watch::Receiver<SourceStatus>,
    )>,
    history: Arc<Mutex<Vec<usize>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Starting {
    /// Waits for the first model at most `within`; `Err(self)` if there is none yet.
    fn wait(mut self, within: Duration) -> std::result::Result<Source, Self> {
        match self.first.recv_timeout(within) {
            Ok((models, status)) => Ok(Source {
                models,
                status,
                history: self.history.clone(),
                stop: self.stop.take(),
                thread: self.thread.take(),
            }),
            Err(_) => Err(self),
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Source {
    /// Runs the source on its own thread in `netns`, its client on `kubeconfig`.
    fn spawn(netns: PathBuf, kubeconfig: PathBuf) -> Starting {
        let (tx, first) = std::sync::mpsc::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let history = Arc::new(Mutex::new(Vec::new()));
        let h = history.clone();
        let thread = std::thread::spawn(move || {
            block_on_in_netns(&netns, move || async move {
                let client = kube_client(&kubeconfig).await?;
                let mut settings = Settings::new(THIS, ip("169.254.7.1"));
                settings.trust_domain = "cluster.local".into();
                let mut opts = SourceOptions::new(settings);
                opts.rescan = Duration::from_millis(500);
                let watch = tokio::select! {
                    watch = start(client, opts, Arc::new(ByUid)) => watch,
                    _ = &mut stopped => return Ok(()),
                };
                let mut models = watch.models.clone();
                h.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(models.borrow_and_update().workloads().count());
                let record = tokio::spawn(async move {
                    while models.changed().await.is_ok() {
                        let n = models.borrow_and_update().workloads().count();
                        h.lock().unwrap_or_else(|p| p.into_inner()).push(n);
                    }
                });
                let _ = tx.send((watch.models.clone(), watch.status.clone()));
                let _ = stopped.await;
                record.abort();
                drop(watch);
                Ok(())
            })
        });
        Starting {
            first,
            history,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn start(netns: PathBuf, kubeconfig: PathBuf) -> Result<Self> {
        Self::spawn(netns, kubeconfig)
            .wait(Duration::from_secs(60))
            .map_err(|_| anyhow::anyhow!("the source did not publish a first model within 60 s"))
    }

    fn model(&self) -> Arc<ClusterModel> {
        self.models.borrow().clone()
    }

    fn history(&self) -> Vec<usize> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn objects_from_the_api_server_converge_into_the_model() -> Result<()> {
    require_root();
    let mut cp = ControlPlane::start(&unique_prefix())?;
    cp.apply(CRDS)?;
    cp.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/authorizationpolicies.security.nodemesh.io",
        "crd/peerauthentications.security.nodemesh.io",
    ])?;
    cp.create_service_account("nodemesh-system", "nodemesh-agent")?;
    cp.apply(AGENT_RBAC)?;
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.io/dataplane: enabled}}\n",
    )?;
    node_object(&cp, THIS, "10.0.0.1")?;
    node_object(&cp, "node-b", "10.0.0.2")?;
    pod(&cp, "shop", "web", THIS, "10.1.0.5")?;
    pod(&cp, "shop", "db", "node-b", "10.2.0.7")?;
    cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.20, ports: [{name: sql, port: 5432, targetPort: tcp}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}\n\
         addressType: IPv4\nports: [{name: sql, port: 5432, protocol: TCP}]\n\
         endpoints: [{addresses: [10.2.0.7], conditions: {ready: true}, targetRef: {kind: Pod, name: db, namespace: shop}}]\n",
    )?;
    let netns = cp
        .netns()
        .context("the control plane has a namespace")?
        .to_owned();
    // The agent's own identity: a missing verb in AGENT_RBAC keeps a store unsynced, and the
    // source never publishes (the start above times out).
    let kubeconfig = cp.service_account_kubeconfig("nodemesh-system", "nodemesh-agent", None)?;
    let source = Source::start(netns, kubeconfig)?;

    // The first model: both pods, the service with its ready endpoint, both nodes.
    let model = source.model();
    assert_eq!(names(&model), ["shop/db", "shop/web"]);
    let web = model
        .workload(&ObjectKey::new("shop", "web"))
        .context("web")?;
    assert_eq!(web.node, THIS);
    assert!(web.netns.starts_with("/run/netns/"), "{:?}", web.netns);
    assert_eq!(
        web.identity.spiffe_id(),
        "spiffe://cluster.local/ns/shop/sa/sa-web"
    );
    let db = model
        .workload(&ObjectKey::new("shop", "db"))
        .context("db")?;
    assert_eq!(db.netns, PathBuf::from(REMOTE_NETNS));
    assert_eq!(
        model.node("node-b").context("node-b")?.address,
        ip("10.0.0.2")
    );
    let svc = model
        .service(&ObjectKey::new("shop", "db"))
        .context("service")?;
    assert_eq!(svc.vips, [ip("10.96.0.20")]);
    assert_eq!(svc.target_port(5432), Some(5432));
    assert_eq!(svc.endpoints, [ObjectKey::new("shop", "db")]);
    assert!(allowed(&model, "sa-web", "db", 5432)?);
    let enrolled = model.enrollments();
    assert_eq!(enrolled.len(), 1, "only this node's pods are enrolled");
    assert_eq!(
        enrolled[0].mtls.mode,
        mesh_agent::policy::MtlsMode::Permissive
    );

    // A DENY policy converges.
    cp.apply(
        "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-web, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: db}}\n  action: DENY\n  \
         rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-web]}}]}]\n",
    )?;
    eventually("the DENY policy applies", Duration::from_secs(20), || {
        ensure!(
            !allowed(&source.model(), "sa-web", "db", 5432)?,
            "still allowed"
        );
        Ok(())
    })?;

    // Every kind is watched, not only listed (a ClusterRole without `watch` on one of them
    // fails here): an endpoint turning unready, a new Service port, a new Node, a
    // PeerAuthentication.
    cp.kubectl(&[
        "patch",
        "endpointslice",
        "db-1",
        "-n",
        "shop",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/endpoints/0/conditions/ready","value":false}]"#,
    ])?;
    eventually(
        "an unready endpoint leaves",
        Duration::from_secs(20),
        || {
            let m = source.model();
            let svc = m
                .service(&ObjectKey::new("shop", "db"))
                .context("service")?;
            ensure!(svc.endpoints.is_empty(), "{:?}", svc.endpoints);
            Ok(())
        },
    )?;
    cp.kubectl(&[
        "patch", "service", "db", "-n", "shop", "--type=json", "-p",
        r#"[{"op":"add","path":"/spec/ports/-","value":{"name":"admin","port":8080,"targetPort":8081}}]"#,
    ])?;
    eventually("a new service port", Duration::from_secs(20), || {
        let m = source.model();
        let svc = m
            .service(&ObjectKey::new("shop", "db"))
            .context("service")?;
        ensure!(svc.target_port(8080) == Some(8081), "{:?}", svc.ports);
        Ok(())
    })?;
    node_object(&cp, "node-c", "10.0.0.3")?;
    eventually("a new node", Duration::from_secs(20), || {
        let m = source.model();
        ensure!(
            m.node("node-c").map(|n| n.address) == Some(ip("10.0.0.3")),
            "no node-c"
        );
        Ok(())
    })?;
    cp.apply(
        "apiVersion: security.nodemesh.io/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {name: web-strict, namespace: shop}\n\
         spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}\n",
    )?;
    eventually(
        "the PeerAuthentication applies",
        Duration::from_secs(20),
        || {
            let m = source.model();
            let e = m.enrollments();
            let web = e
                .iter()
                .find(|e| e.workload.name == "web")
                .context("web enrolled")?;
            ensure!(
                web.mtls.mode == mesh_agent::policy::MtlsMode::Strict,
                "{:?}",
                web.mtls
            );
            Ok(())
        },
    )?;

    // Removing the namespace label un-enrolls every pod of it; putting it back re-enrolls.
    cp.kubectl(&["label", "namespace", "shop", "nodemesh.io/dataplane-"])?;
    eventually(
        "the label's removal un-enrolls",
        Duration::from_secs(20),
        || {
            let m = source.model();
            ensure!(m.workloads().count() == 0, "still {:?}", names(&m));
            Ok(())
        },
    )?;
    let svc = source.model();
    let svc = svc
        .service(&ObjectKey::new("shop", "db"))
        .context("service stays")?;
    assert!(svc.endpoints.is_empty(), "no mesh endpoint is left");
    cp.kubectl(&[
        "label",
        "namespace",
        "shop",
        "nodemesh.io/dataplane=enabled",
    ])?;
    eventually("the label re-enrolls", Duration::from_secs(20), || {
        let m = source.model();
        ensure!(names(&m) == ["shop/db", "shop/web"], "{:?}", names(&m));
        Ok(())
    })?;

    // The API server restarted mid-watch: the model stays (no empty model is ever published),
    // and changes made afterwards converge.
    let before_restart = source.history().len();
    let published_before = source.status.borrow().published;
    cp.restart_apiserver()?;
    assert_eq!(names(&source.model()), ["shop/db", "shop/web"]);
    pod(&cp, "shop", "api", THIS, "10.1.0.6")?;
    eventually(
        "a pod made after the restart enrolls",
        Duration::from_secs(60),
        || {
            let m = source.model();
            ensure!(
                names(&m) == ["shop/api", "shop/db", "shop/web"],
                "{:?}",
                names(&m)
            );
            Ok(())
        },
    )?;
    let after: Vec<usize> = source.history()[before_restart..].to_vec();
    assert!(
        after.iter().all(|n| *n >= 2),
        "a model with fewer workloads was published across the restart: {after:?}"
    );
    assert!(source.status.borrow().published > published_before);
    assert!(
        !allowed(&source.model(), "sa-web", "db", 5432)?,
        "the policy survived"
    );
    drop(source);
    cp.stop()
}

/// `mesh-agent node` (as `nm-agent`) in a node's namespace and cgroup, fed by the real API
/// server running in the same namespace; stopped and uninstalled on drop.
struct NodeAgent {
    child: std::process::Child,
    log: PathBuf,
    state: PathBuf,
    instance: String,
}

impl NodeAgent {
    /// Starts the agent and returns at once; [`NodeAgent::wait_ready`] waits for it.
    fn spawn(
        node: &cluster::Node,
        kubeconfig: &std::path::Path,
        dir: &std::path::Path,
        netns_dir: &std::path::Path,
    ) -> Result<Self> {
        let state = dir.join("state");
        let log = dir.join("agent.log");
        let instance = format!("{}-k8s", node.name);
        let child = std::process::Command::new(probe_exe()?)
            .arg(node.cgroup.path())
            .arg(node.ns.path())
            .arg("exec")
            .arg(agent_exe()?)
            .args(["node", "--node", THIS, "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--state-dir")
            .arg(&state)
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .arg("--cgroup")
            .arg(node.cgroup.path())
            .args(["--instance", &instance, "--pod-netns-dir"])
            .arg(netns_dir)
            .args(["--metrics-addr", "10.1.1.1:15020"])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start the agent")?;
        Ok(NodeAgent {
            child,
            log,
            state,
            instance,
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let mine = format!("pid={}", self.child.id());
        eventually("the agent is ready", Duration::from_secs(60), || {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("agent exited ({status}):\n{}", self.logs());
            }
            let ready = std::fs::read_to_string(self.state.join("ready")).unwrap_or_default();
            ensure!(
                ready.lines().any(|l| l == mine),
                "not ready:\n{}",
                self.logs()
            );
            Ok(())
        })
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(exe) = agent_exe() {
            let _ = std::process::Command::new(exe)
                .args(["uninstall", "--instance", &self.instance])
                .output();
        }
    }
}

fn roundtrip(pod: &cluster::Pod, dst: &str, payload: &str) -> Result<()> {
    let out = std::process::Command::new(probe_exe()?)
        .arg(pod.cgroup.path())
        .arg(pod.ns.path())
        .arg("roundtrip")
        .arg(dst)
        .arg(payload)
        .output()?;
    ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn uid(cp: &ControlPlane, ns: &str, pod: &str) -> Result<String> {
    Ok(cp
        .kubectl(&[
            "get",
            "pod",
            pod,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?
        .trim()
        .to_owned())
}

/// The whole agent in Kubernetes mode on one node: pods of an enrolled namespace are captured
/// (the server sees the tunnel address), and a DENY policy made with kubectl refuses new
/// connections.
#[test]
fn mesh_agent_node_enrolls_pods_and_enforces_a_policy_from_the_api_server() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let node = cluster::node(&p, "a")?;
    let client = cluster::pod(&p, &node, "client", 1, 1)?;
    let server = cluster::pod(&p, &node, "server", 1, 2)?;
    let mut opts = Options::new(&p);
    opts.network = Network::Existing(node.ns.path());
    let cp = ControlPlane::start_with(opts)?;
    cp.create_service_account("nodemesh-system", "nodemesh-agent")?;
    cp.apply(AGENT_RBAC)?;
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.io/dataplane: enabled}}\n",
    )?;
    // The node's InternalIP is an address of its namespace (the client pod's gateway).
    node_object(&cp, THIS, "10.1.1.1")?;
    pod(&cp, "shop", "client", THIS, &client.ip)?;
    pod(&cp, "shop", "server", THIS, &server.ip)?;
    let dir = tempfile::tempdir()?;
    let netns_dir = dir.path().join("netns");
    std::fs::create_dir(&netns_dir)?;
    for (name, ns) in [("client", &client.ns), ("server", &server.ns)] {
        std::os::unix::fs::symlink(ns.path(), netns_dir.join(uid(&cp, "shop", name)?))?;
    }
    let echo = cluster::Echo::start(&server, 8080)?;
    let kubeconfig = cp.service_account_kubeconfig("nodemesh-system", "nodemesh-agent", None)?;
    let mut agent = NodeAgent::spawn(&node, &kubeconfig, dir.path(), &netns_dir)?;

    // Without the policy CRDs the agent waits: its stats server says why it is not ready.
    let stats = cluster::addr("10.1.1.1", cluster::STATS_PORT)?;
    let waiting = eventually("/readyz names the model", Duration::from_secs(20), || {
        let (code, body) = nodemesh_tests::http_in_netns(&node.ns.path(), stats, "GET", "/readyz")?;
        ensure!(
            code == 503 && body.contains("model-synced"),
            "{code} {body}"
        );
        Ok(body)
    })
    .with_context(|| agent.logs())?;
    assert!(waiting.contains("not ready"), "{waiting}");
    ensure!(
        agent.child.try_wait()?.is_none(),
        "the agent exited:\n{}",
        agent.logs()
    );
    cp.apply(CRDS)?;
    agent.wait_ready()?;
    assert!(
        agent
            .logs()
            .contains("CRD (security.nodemesh.io/v1alpha1) is not installed"),
        "the missing CRD was not logged:\n{}",
        agent.logs()
    );

    let metrics = cluster::scrape_until(&node, "10.1.1.1", "both pods enrolled", |m| {
        m.lines().any(|l| l == "nodemesh_workloads_enrolled 2")
    })
    .with_context(|| agent.logs())?;
    assert!(metrics.contains("nodemesh_workloads_enrolled 2"));

    // Captured: the server sees the connection delivered from the tunnel address.
    let dst = format!("{}:8080", server.ip);
    roundtrip(&client, &dst, "through the mesh").with_context(|| agent.logs())?;
    let peer = echo.next_peer()?;
    assert_eq!(peer.ip(), ip("169.254.7.1"), "not delivered by the tunnel");

    cp.apply(
        "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-client, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  \
         rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-client]}}]}]\n",
    )?;
    eventually(
        "the DENY policy refuses new connections",
        Duration::from_secs(20),
        || {
            ensure!(
                roundtrip(&client, &dst, "denied?").is_err(),
                "still allowed"
            );
            Ok(())
        },
    )
    .with_context(|| agent.logs())?;
    drop(agent);
    drop(echo);
    cp.stop()
}

/// A policy CRD that is not installed keeps the source waiting (no model, no crash; the log
/// says to install it at every retry), and it proceeds once the CRDs are there.
#[test]
fn a_missing_crd_holds_the_first_model_until_it_is_installed() -> Result<()> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    cp.create_service_account("nodemesh-system", "nodemesh-agent")?;
    cp.apply(AGENT_RBAC)?;
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.io/dataplane: enabled}}\n",
    )?;
    node_object(&cp, THIS, "10.0.0.1")?;
    pod(&cp, "shop", "web", THIS, "10.1.0.5")?;
    let netns = cp
        .netns()
        .context("the control plane has a namespace")?
        .to_owned();
    let kubeconfig = cp.service_account_kubeconfig("nodemesh-system", "nodemesh-agent", None)?;
    let starting = Source::spawn(netns, kubeconfig);
    let Err(starting) = starting.wait(Duration::from_secs(5)) else {
        anyhow::bail!("a model was published without the policy CRDs");
    };
    cp.apply(CRDS)?;
    let source = starting
        .wait(Duration::from_secs(60))
        .map_err(|_| anyhow::anyhow!("no model within 60 s of installing the CRDs"))?;
    assert_eq!(names(&source.model()), ["shop/web"]);
    drop(source);
    cp.stop()
}
