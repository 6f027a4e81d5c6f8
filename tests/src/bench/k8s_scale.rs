//! The Kubernetes scale benchmark (`nm-bench k8s-scale`, issue 12): one node's model source
//! (`mesh_agent::k8s::source`, the real reflectors and recompute) against a real kube-apiserver
//! holding thousands of pods and hundreds of Services.
//!
//! Method (docs/performance.md, "Kubernetes scale"):
//! 1. A [`ControlPlane`] in a fresh network namespace; the chart's CRDs and RBAC (`helm
//!    template`) applied as in the e2e cluster.
//! 2. Populated through a kube-rs admin client, many requests in flight (how long that takes is
//!    not measured): `nodes` Nodes with an InternalIP, one enrolled namespace per 100 pods,
//!    `pods` Pods spread round-robin over the nodes with `spec.nodeName` and then
//!    `status.podIP(s)` written through the status subresource (there is no kubelet), and
//!    `services` Services (ClusterIPs allocated by the apiserver) with one EndpointSlice each
//!    naming 10 of the namespace's pods.
//! 3. The source runs alone in a child process (`nm-bench k8s-source-probe`), in the control
//!    plane's namespace, with the `nodemesh-system/nodemesh-agent` ServiceAccount's own token,
//!    as node `node-0`, its pods' network namespaces "found" at a fixed path (what is measured
//!    is the control-plane side; nothing is attached). So the RSS read from `/proc/PID/status`
//!    is the source's own (plus a tokio runtime and a TLS client), not the benchmark's.
//! 4. Initial sync: the child's time from before it builds its client until `source::start`
//!    returns with the first model. RSS: `VmRSS` 2 s after that, and `VmHWM` (the peak) at the
//!    end.
//! 5. Pod to enrolled: `probe_pods` more pods created one at a time on `node-0` (create, then
//!    the status write with the pod's IP, as a kubelet would); the delay from the create
//!    call's return to the child printing the first published model that holds the pod as a
//!    local workload (the child's line timestamped on arrival, a pipe's latency added).
//!
//! SIGINT and SIGTERM stop the run at its next wait (at the latest once the API server is up)
//! and the drop guards kill the probe, etcd and kube-apiserver and remove the namespace and
//! the temporary directory.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use mesh_agent::k8s::{
    ENROLL_ENABLED, ENROLL_LABEL, NetnsFinder,
    convert::Settings,
    source::{SourceOptions, start},
};
use serde_json::json;

use super::{catch_interrupts, interrupted, report::K8sScale};
use crate::k8s::{ControlPlane, Network, Options, kube_client};

/// The namespace of the chart's ServiceAccounts.
const SYSTEM_NS: &str = "nodemesh-system";
/// The node whose source is measured.
const THIS_NODE: &str = "node-0";
/// Pods per enrolled namespace.
const PODS_PER_NS: usize = 100;
/// Pods behind each Service (the label `app: svc-K` of the namespace's pods).
const PODS_PER_SERVICE: usize = 10;
/// Requests in flight while populating.
const CONCURRENCY: usize = 24;
/// How long one probe pod may take to appear before the run fails.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the initial sync may take before the run fails.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a wait looks at the interrupt flag.
const INTERRUPT_POLL: Duration = Duration::from_millis(100);

/// The size of the run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub nodes: usize,
    pub pods: usize,
    pub services: usize,
    pub probe_pods: usize,
}

impl Default for Scale {
    /// Issue 12's figures: 5,000 pods and 500 Services (on 50 nodes), 100 probe pods.
    fn default() -> Self {
        Self {
            nodes: 50,
            pods: 5000,
            services: 500,
            probe_pods: 100,
        }
    }
}

/// Pod `g`'s address: 10.64.0.0/12 holds 1M, plenty.
fn pod_ip(g: usize) -> IpAddr {
    let g = u32::try_from(g + 1).unwrap_or(u32::MAX);
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + g))
}

fn node_name(n: usize) -> String {
    format!("node-{n}")
}

fn ns_name(k: usize) -> String {
    format!("scale-{k}")
}

/// Runs the whole benchmark and returns its figures.
pub fn run(scale: Scale) -> Result<K8sScale> {
    ensure!(
        scale.nodes > 0 && scale.pods > 0,
        "k8s-scale needs at least one node and one pod"
    );
    catch_interrupts();
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!("k8s-scale: starting a control plane");
    let cp = ControlPlane::start_with(Options {
        network: Network::Fresh,
        ..Options::new("nm-bench")
    })?;
    check_interrupted()?;
    cp.install_chart(SYSTEM_NS)?;
    check_interrupted()?;
    let admin = cp.admin_kubeconfig().to_owned();
    let populate_started = Instant::now();
    eprintln!(
        "k8s-scale: creating {} nodes, {} pods, {} services",
        scale.nodes, scale.pods, scale.services
    );
    cp.block_on(|| async move {
        let client = kube_client(&admin).await?;
        tokio::select! {
            r = populate(&client, scale) => r,
            () = until_interrupted() => check_interrupted(),
        }
    })?;
    let populate_s = populate_started.elapsed().as_secs_f64();
    eprintln!("k8s-scale: populated in {populate_s:.1} s; starting the source");

    let kubeconfig = cp.service_account_kubeconfig(SYSTEM_NS, "nodemesh-agent", None)?;
    let mut probe = Probe::spawn(&cp, &kubeconfig)?;
    let synced = probe.wait_synced()?;
    eprintln!(
        "k8s-scale: first model after {:.2} s ({} workloads, {} local)",
        synced.secs, synced.workloads, synced.local
    );
    // Let the first recomputes after the sync and the allocator settle before reading RSS.
    pause(Duration::from_secs(2))?;
    let rss_after_sync_kb = proc_status_kb(probe.pid(), "VmRSS")?;

    let admin = cp.admin_kubeconfig().to_owned();
    let lines = probe.take_lines()?;
    let delays = cp.block_on(|| async move {
        let client = kube_client(&admin).await?;
        enroll_delays(&client, scale, lines).await
    })?;
    let rss_end_kb = proc_status_kb(probe.pid(), "VmRSS")?;
    let rss_peak_kb = proc_status_kb(probe.pid(), "VmHWM")?;
    drop(probe);
    cp.stop()?;
    Ok(K8sScale {
        nodes: scale.nodes,
        pods: scale.pods,
        services: scale.services,
        namespaces: scale.pods.div_ceil(PODS_PER_NS),
        probe_pods: scale.probe_pods,
        model_workloads: synced.workloads,
        populate_s,
        initial_sync_s: synced.secs,
        rss_after_sync_mb: rss_after_sync_kb as f64 / 1024.0,
        rss_end_mb: rss_end_kb as f64 / 1024.0,
        rss_peak_mb: rss_peak_kb as f64 / 1024.0,
        enroll_from_create_ms: delays.from_create,
        enroll_from_status_ms: delays.from_status,
        load_before,
        load_after: loadavg(),
        took_s: started.elapsed().as_secs_f64(),
    })
}

fn check_interrupted() -> Result<()> {
    ensure!(
        !interrupted(),
        "interrupted (the probe and the control plane are being stopped)"
    );
    Ok(())
}

/// Returns once SIGINT or SIGTERM has arrived (polls the flag the handler sets).
async fn until_interrupted() {
    while !interrupted() {
        tokio::time::sleep(INTERRUPT_POLL).await;
    }
}

/// Waits `d` unless interrupted.
fn pause(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(INTERRUPT_POLL));
    }
}

/// The probe's next line before `deadline`; `Ok(None)` on timeout, an error when interrupted
/// or when the probe's output ended (it died).
fn next_line(lines: &std::sync::mpsc::Receiver<Line>, deadline: Instant) -> Result<Option<Line>> {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match lines.recv_timeout(left.min(INTERRUPT_POLL)) {
            Ok(line) => return Ok(Some(line)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the probe's output ended: it died (its stderr is above)")
            }
        }
    }
}

fn from_json<T: k8s_openapi::serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    Ok(serde_json::from_value(v)?)
}

/// Runs `f` over `items` with [`CONCURRENCY`] in flight; the first error stops it.
async fn each<I, F, Fut>(items: I, f: F) -> Result<()>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn pod_object(ns: &str, name: &str, node: &str, app: &str, sa: &str) -> Result<Pod> {
    from_json(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "nodeName": node, "serviceAccountName": sa,
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10",
                            "ports": [{"name": "http", "containerPort": 8080}]}],
        },
    }))
}

fn pod_status(ip: IpAddr) -> serde_json::Value {
    json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}})
}

async fn populate(client: &Client, scale: Scale) -> Result<()> {
    let pp = PostParams::default();
    let nodes: Api<Node> = Api::all(client.clone());
    each(0..scale.nodes, |n| {
        let (nodes, pp) = (&nodes, &pp);
        async move {
            let name = node_name(n);
            nodes
                .create(pp, &from_json(json!({"metadata": {"name": name}}))?)
                .await?;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + n as u32);
            nodes
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"addresses": [
                        {"type": "InternalIP", "address": ip.to_string()}]}})),
                )
                .await?;
            Ok(())
        }
    })
    .await
    .context("creating the nodes")?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns_count = scale.pods.div_ceil(PODS_PER_NS);
    let mut enrolled = serde_json::Map::new();
    enrolled.insert(ENROLL_LABEL.into(), ENROLL_ENABLED.into());
    each(0..ns_count, |k| {
        let (namespaces, pp, enrolled) = (&namespaces, &pp, &enrolled);
        async move {
            namespaces
                .create(
                    pp,
                    &from_json(json!({"metadata": {"name": ns_name(k), "labels": enrolled}}))?,
                )
                .await?;
            Ok(())
        }
    })
    .await
    .context("creating the namespaces")?;

    // Pod g: namespace g / 100, node g % nodes, label app: svc-(j % 10) (j its index in the
    // namespace), service account sa-(j % 10).
    let services_per_ns = PODS_PER_NS / PODS_PER_SERVICE;
    each(0..scale.pods, |g| {
        let (client, pp) = (client, &pp);
        async move {
            let (ns, j) = (ns_name(g / PODS_PER_NS), g % PODS_PER_NS);
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let name = format!("pod-{j}");
            let app = format!("svc-{}", j % services_per_ns);
            let sa = format!("sa-{}", j % services_per_ns);
            api.create(
                pp,
                &pod_object(&ns, &name, &node_name(g % scale.nodes), &app, &sa)?,
            )
            .await?;
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(pod_status(pod_ip(g))),
            )
            .await?;
            Ok(())
        }
    })
    .await
    .context("creating the pods")?;

    // Service s: namespace s / 10 (wrapping over the namespaces), selector app: svc-(s % 10);
    // its EndpointSlice names those pods.
    each(0..scale.services, |s| {
        let (client, pp) = (client, &pp);
        async move {
            let k = (s / services_per_ns) % ns_count;
            let ns = ns_name(k);
            let app = format!("svc-{}", s % services_per_ns);
            let name = format!("svc-{s}");
            let services: Api<Service> = Api::namespaced(client.clone(), &ns);
            services
                .create(
                    pp,
                    &from_json(json!({
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {"selector": {"app": app},
                                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
                    }))?,
                )
                .await?;
            let endpoints: Vec<serde_json::Value> = (0..PODS_PER_NS)
                .filter(|j| j % services_per_ns == s % services_per_ns)
                .map(|j| (j, k * PODS_PER_NS + j))
                .filter(|(_, g)| *g < scale.pods)
                .map(|(j, g)| {
                    json!({"addresses": [pod_ip(g).to_string()], "conditions": {"ready": true},
                           "nodeName": node_name(g % scale.nodes),
                           "targetRef": {"kind": "Pod", "name": format!("pod-{j}"), "namespace": ns}})
                })
                .collect();
            let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
            slices
                .create(
                    pp,
                    &from_json(json!({
                        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": format!("{name}-1"), "namespace": ns,
                                     "labels": {"kubernetes.io/service-name": name}},
                        "addressType": "IPv4",
                        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                        "endpoints": endpoints,
                    }))?,
                )
                .await?;
            Ok(())
        }
    })
    .await
    .context("creating the services")?;
    Ok(())
}

/// A line of the probe's output and when it arrived.
type Line = (Instant, String);

struct Synced {
    secs: f64,
    workloads: usize,
    local: usize,
}

/// The child process running only the source.
struct Probe {
    child: Child,
    lines: Option<std::sync::mpsc::Receiver<Line>>,
}

impl Probe {
    fn spawn(cp: &ControlPlane, kubeconfig: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find nm-bench's own executable")?;
        let mut child = cp
            .command(exe)?
            .arg("k8s-source-probe")
            .arg(kubeconfig)
            .arg(THIS_NODE)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start `nm-bench k8s-source-probe`")?;
        let stdout = child.stdout.take().context("the probe's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines: Some(rx),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_synced(&mut self) -> Result<Synced> {
        let lines = self
            .lines
            .as_ref()
            .context("the probe's lines were taken")?;
        let Some((_, line)) = next_line(lines, Instant::now() + SYNC_TIMEOUT)? else {
            bail!("the source published no first model within {SYNC_TIMEOUT:?}");
        };
        let parse = || -> Option<Synced> {
            let mut it = line.strip_prefix("synced ")?.split(' ');
            Some(Synced {
                secs: it.next()?.parse().ok()?,
                workloads: it.next()?.parse().ok()?,
                local: it.next()?.parse().ok()?,
            })
        };
        parse().with_context(|| format!("unexpected first line from the probe: {line:?}"))
    }

    fn take_lines(&mut self) -> Result<std::sync::mpsc::Receiver<Line>> {
        self.lines.take().context("the probe's lines were taken")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Delays {
    from_create: Vec<f64>,
    from_status: Vec<f64>,
}

/// Creates the probe pods one at a time on [`THIS_NODE`] and times each until the probe
/// reports it as a local workload.
async fn enroll_delays(
    client: &Client,
    scale: Scale,
    lines: std::sync::mpsc::Receiver<Line>,
) -> Result<Delays> {
    let ns_count = scale.pods.div_ceil(PODS_PER_NS);
    let mut delays = Delays {
        from_create: Vec::new(),
        from_status: Vec::new(),
    };
    for i in 0..scale.probe_pods {
        check_interrupted()?;
        let ns = ns_name(i % ns_count);
        let name = format!("probe-{i}");
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        api.create(
            &PostParams::default(),
            &pod_object(&ns, &name, THIS_NODE, "probe", "probe")?,
        )
        .await?;
        let created = Instant::now();
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(pod_status(pod_ip(scale.pods + i))),
        )
        .await?;
        let status_written = Instant::now();
        let want = format!("local {ns}/{name}");
        let deadline = created + ENROLL_TIMEOUT;
        // Blocking here is fine: nothing else runs on this runtime meanwhile.
        let at = loop {
            let Some((at, line)) = next_line(&lines, deadline)? else {
                bail!("pod {ns}/{name} was not a local workload within {ENROLL_TIMEOUT:?}");
            };
            if line == want {
                break at;
            }
            // Another pod (a probe pod's only line is its own; nothing else changes).
        };
        delays
            .from_create
            .push(at.duration_since(created).as_secs_f64() * 1e3);
        delays
            .from_status
            .push(at.saturating_duration_since(status_written).as_secs_f64() * 1e3);
    }
    Ok(delays)
}

/// Every pod of this node is "found" in `/run/netns/<uid>` (the path is only recorded).
struct FixedPath;

impl NetnsFinder for FixedPath {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        Ok(PathBuf::from(format!("/run/netns/{pod_uid}")))
    }
}

/// `nm-bench k8s-source-probe KUBECONFIG NODE` (already in the control plane's namespace):
/// runs the source as node NODE on a current-thread runtime (the agent's control-plane
/// runtime), prints `synced SECS WORKLOADS LOCAL` when the first model is there, then
/// `local NS/NAME` for each local workload that appears in a published model, until killed.
pub fn source_probe(kubeconfig: &Path, node: &str) -> Result<()> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build a tokio runtime")?;
    rt.block_on(async {
        let client = kube_client(kubeconfig).await?;
        let client_for_diag = client.clone();
        let settings = Settings::new(node, IpAddr::V4(Ipv4Addr::new(169, 254, 7, 1)));
        let watch = start(client, SourceOptions::new(settings), Arc::new(FixedPath)).await;
        let secs = started.elapsed().as_secs_f64();
        if std::env::var_os(DIAG_ENV).is_some() {
            // Not a borrow across the await: the source's task writes the channel meanwhile.
            let model = watch.models.borrow().clone();
            diagnose(&model, &client_for_diag, node).await?;
        }
        let mut models = watch.models.clone();
        let mut local: BTreeSet<String> = {
            let m = models.borrow_and_update();
            println!(
                "synced {secs} {} {}",
                m.workloads().count(),
                m.local_workloads().count()
            );
            m.local_workloads().map(|w| w.key.to_string()).collect()
        };
        while models.changed().await.is_ok() {
            let now: BTreeSet<String> = models
                .borrow_and_update()
                .local_workloads()
                .map(|w| w.key.to_string())
                .collect();
            for k in now.difference(&local) {
                println!("local {k}");
            }
            local = now;
        }
        drop(watch);
        Ok(())
    })
}

/// Set (to anything) for the probe to print where its memory goes to stderr after the sync
/// (`NM_BENCH_K8S_DIAG=1 nm-bench k8s-scale`; it then trims the heap, so the RSS figures of
/// that run are not the benchmark's).
pub const DIAG_ENV: &str = "NM_BENCH_K8S_DIAG";

async fn diagnose(
    model: &mesh_agent::model::ClusterModel,
    client: &Client,
    node: &str,
) -> Result<()> {
    use std::mem::size_of;

    use mesh_agent::{
        k8s::{
            convert::{Snapshot, convert},
            projected,
            source::policy_resource,
        },
        model::ClusterModel,
    };
    let rss = || proc_status_kb(std::process::id(), "VmRSS").unwrap_or(0);
    eprintln!(
        "probe: size_of (as stored) Pod {} PodSpec {} PodStatus {} Container {} ObjectMeta {} \
         Service {} EndpointSlice {}; model: {} workloads, {} services",
        size_of::<projected::Pod>(),
        size_of::<projected::PodSpec>(),
        size_of::<projected::PodStatus>(),
        size_of::<projected::Container>(),
        size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(),
        size_of::<projected::Service>(),
        size_of::<projected::EndpointSlice>(),
        model.workloads().count(),
        model.services().count(),
    );
    let before = rss();
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
    let trimmed = rss();
    eprintln!("probe: RSS after sync {before} kB, after malloc_trim {trimmed} kB");

    // A second copy of everything the stores hold, listed here, then the recompute on it
    // timed (what every change costs) and the memory each stage adds.
    async fn all<K>(api: Api<K>) -> Result<Vec<Arc<K>>>
    where
        K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    {
        use kube::ResourceExt as _;
        // In pages of 500, as the reflectors list; stored as they store them (projected).
        let mut out = Vec::new();
        let mut params = kube::api::ListParams::default().limit(500);
        loop {
            let list = api.list(&params).await?;
            out.extend(list.items.into_iter().map(|mut o| {
                o.managed_fields_mut().clear();
                Arc::new(o)
            }));
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => params = params.continue_token(&c),
                None => return Ok(out),
            }
        }
    }
    let dynamic = |kind, plural| {
        let ar = policy_resource(kind, plural);
        Api::<kube::api::DynamicObject>::all_with(client.clone(), &ar)
    };
    let snap = Snapshot {
        pods: all(Api::<projected::Pod>::all(client.clone())).await?,
        nodes: all(Api::<projected::Node>::all(client.clone())).await?,
        namespaces: all(Api::<projected::Namespace>::all(client.clone())).await?,
        services: all(Api::<projected::Service>::all(client.clone())).await?,
        endpoint_slices: all(Api::<projected::EndpointSlice>::all(client.clone())).await?,
        authorization_policies: all(dynamic("AuthorizationPolicy", "authorizationpolicies"))
            .await?,
        peer_authentications: all(dynamic("PeerAuthentication", "peerauthentications")).await?,
    };
    let listed = rss();
    let settings = Settings::new(node, IpAddr::V4(Ipv4Addr::new(169, 254, 7, 1)));
    let mut times = Vec::new();
    let mut kept = None;
    for _ in 0..5 {
        let t = Instant::now();
        let converted = convert(&snap, &settings, &FixedPath);
        let built = ClusterModel::build(&converted.input)
            .map_err(|e| anyhow::anyhow!("the diagnostic model is invalid: {} errors", e.len()))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        kept = Some((converted, built));
    }
    let with_model = rss();
    drop(kept);
    let after_drop = rss();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "probe: recompute (convert + build) {:.1} ms median of 5 ({:.1}..{:.1}); RSS {trimmed} \
         → {listed} kB with a second copy of the objects (+{} kB), → {with_model} kB with a \
         converted input and model (+{} kB), {after_drop} kB after dropping them",
        times[2],
        times[0],
        times[4],
        listed.saturating_sub(trimmed),
        with_model.saturating_sub(listed),
    );
    Ok(())
}

/// A `/proc/PID/status` field in kB.
fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (did the probe die?)"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The 1-minute load average (the machine is shared; the report says how loaded it was).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
