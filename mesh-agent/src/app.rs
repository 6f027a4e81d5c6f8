//! The whole node agent wired together, fed by a [`ModelFeed`] (the local YAML file for
//! `mesh-agent local`, Kubernetes for `mesh-agent node`).
//!
//! [`build_with`] takes the first model (the first load must be valid), claims the instance
//! ([`Pins::lock`]: a second agent of the same `--instance` fails there, before touching anything
//! of the running one), opens the local CA, brings up the
//! datapath (pins under the instance, attach at the cgroup, tunnel interface and address), programs
//! the maps from the model ([`compute`] + [`crate::reconcile`]), binds and starts the tunnel
//! (inbound on the node address, outbound on the tunnel address) and returns the bound addresses
//! with a [`Running`] agent. [`Running::run`] follows the model: each new model is recomputed, the
//! map difference applied, the tunnel state replaced and live connections re-authorized. On
//! shutdown it drains the tunnel and exits, leaving the pins (a restarted agent adopts them).
//!
//! Layering: this is the top; it names the components, none of them names it.

pub mod compute;
pub mod decisions;
pub mod observability;

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, InstanceLock, LoadOptions, Pins},
    identity::{
        CertCache, LocalCa, SpiffeId,
        ca_client::{BundleWatch, CaClient, CaClientConfig, watch_bundle},
    },
    local_config::{DEFAULT_POLL_INTERVAL, LocalConfigSource},
    model::{ClusterModel, ObjectKey},
    policy::{ConnectionAttrs, PeerIdentity},
    reconcile,
    tunnel::{
        self, Authorizer, AuthzDecision, AuthzRequest, DatapathRedirects, IdentityIds, Seams,
        TunnelConfig, drain, listener::bind_reuseport, state::TunnelState,
    },
};

/// Name of the interface holding the tunnel address in the agent's network namespace.
pub const TUNNEL_IFACE: &str = "nm-tunnel";
/// Where state lives unless `--state-dir` says otherwise: `<this>/<instance>`.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/nodemesh";
/// The file created in the state directory once the agent serves (removed on exit).
pub const READY_FILE: &str = "ready";
/// The log line printed once the agent serves.
pub const READY_LINE: &str = "nodemesh agent ready";

/// Everything the agent is told on its command line, whatever feeds its model.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// CA, readiness file; default `/var/lib/nodemesh/<instance>`.
    pub state_dir: Option<PathBuf>,
    /// The local CA's directory; default `<state-dir>/ca`. Agents of one cluster share it.
    /// Unused when `ca_client` is set.
    pub ca_dir: Option<PathBuf>,
    /// Kubernetes mode with a CA address: certificates from the mesh CA instead of `ca_dir`.
    pub ca_client: Option<CaClientOptions>,
    /// Where to attach the programs; default the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub instance: String,
    pub bpffs: PathBuf,
    pub drain_deadline: Duration,
    /// How long a service endpoint that could not be reached is skipped.
    pub ejection_time: Duration,
    /// The trust domain of the CA and the node identity; `None`: this node's first workload's,
    /// else `cluster.local`.
    pub trust_domain: Option<String>,
    /// Stats/admin addresses and the `/logging` handle.
    pub observability: observability::ObservabilityOptions,
    /// How same-node connections are carried: `Auto` splices them in the kernel when the
    /// start-up self-test passes, `Copy` (the default for now) the user-space copy.
    pub same_node_path: tunnel::splice::PathChoice,
    /// Workload certificate lifetime from the local CA; `None`: 24 h. A test setting
    /// (`mesh-agent local --cert-ttl-secs`, hidden).
    pub cert_ttl: Option<Duration>,
    /// Fault injection (`mesh-agent local --ca-fault-file`, hidden): while this file exists the
    /// local CA refuses to issue, as an unreachable CA would (`identity::fault`).
    pub ca_fault_file: Option<PathBuf>,
    /// Capacity of the enrolled-pods map when this instance's pins are created; `None`: 4096.
    /// A test setting (`mesh-agent local --max-enrolled-pods`, hidden).
    pub max_enrolled_pods: Option<u32>,
    /// Threads that carry the tunnel's traffic, each with its own runtime and listeners
    /// (`tunnel::shards`); 1: the tunnel runs on the agent's runtime.
    pub tunnel_threads: usize,
}

/// Where the agent gets certificates in Kubernetes mode with `--ca-address`: the mesh CA
/// (`identity::ca_client`), its TLS verified with the trust bundle read from a ConfigMap.
#[derive(Clone, Debug)]
pub struct CaClientOptions {
    pub client: CaClientConfig,
    /// For the bundle ConfigMap watch (default: KUBECONFIG, else in-cluster).
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub bundle_configmap: String,
    /// How long to wait for a usable bundle at start before failing.
    pub bundle_timeout: Duration,
}

impl AgentOptions {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_STATE_ROOT).join(&self.instance))
    }
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            state_dir: None,
            ca_dir: None,
            ca_client: None,
            cgroup: None,
            instance: "default".into(),
            bpffs: PathBuf::from(Pins::DEFAULT_BPFFS),
            drain_deadline: Duration::from_secs(10),
            ejection_time: TunnelConfig::default().ejection_time,
            trust_domain: None,
            observability: Default::default(),
            same_node_path: Default::default(),
            cert_ttl: None,
            ca_fault_file: None,
            max_enrolled_pods: None,
            tunnel_threads: 1,
        }
    }
}

/// `mesh-agent local`: the agent's options and the cluster file.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub agent: AgentOptions,
    pub config: PathBuf,
    /// Overrides the file's `thisNode`.
    pub node: Option<String>,
    pub poll_interval: Duration,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            agent: AgentOptions::default(),
            config: PathBuf::new(),
            node: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// The seam between the agent and where its cluster model comes from (the local file or
/// Kubernetes). Everything below the model is the same for every source.
pub struct ModelFeed {
    /// The last good model; the first one is there when the feed is made.
    pub models: watch::Receiver<Arc<ClusterModel>>,
    /// How many recomputes or reloads the source rejected so far (counted in the metrics).
    pub rejected: watch::Receiver<u64>,
    /// For logs: `config /path/file.yaml`, `kubernetes`.
    pub describe: String,
    /// Keeps the source running for the agent's lifetime.
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

impl ModelFeed {
    /// The local file, polled every `poll_interval`. Fails when the first load fails.
    pub fn local(config: &Path, node: Option<String>, poll_interval: Duration) -> Result<Self> {
        let source = LocalConfigSource::new(config, node);
        let watch = source
            .watch(poll_interval)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot start from {}", config.display()))?;
        let models = watch.models.clone();
        let (rejected_tx, rejected) = watch::channel(0u64);
        let mut status = watch.status.clone();
        let forward = tokio::spawn(async move {
            while status.changed().await.is_ok() {
                if status.borrow_and_update().last_error.is_some() {
                    rejected_tx.send_modify(|n| *n += 1);
                }
            }
        });
        Ok(ModelFeed {
            models,
            rejected,
            describe: format!("config {}", config.display()),
            guard: Box::new(FeedGuard(Box::new(watch), forward)),
        })
    }

    /// The Kubernetes source, already started (first model there).
    pub fn kubernetes(watch: crate::k8s::source::K8sWatch) -> Self {
        let models = watch.models.clone();
        let (rejected_tx, rejected) = watch::channel(0u64);
        let mut status = watch.status.clone();
        let forward = tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let n = status.borrow_and_update().rejected;
                rejected_tx.send_if_modified(|old| std::mem::replace(old, n) != n);
            }
        });
        ModelFeed {
            models,
            rejected,
            describe: "kubernetes".to_owned(),
            guard: Box::new(FeedGuard(Box::new(watch), forward)),
        }
    }
}

/// Holds a source and the task forwarding its status; stops the task on drop.
struct FeedGuard(
    #[expect(dead_code, reason = "held for its lifetime only")]
    Box<dyn std::any::Any + Send + Sync>,
    tokio::task::JoinHandle<()>,
);

impl Drop for FeedGuard {
    fn drop(&mut self) {
        self.1.abort();
    }
}

/// Where the agent listens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub stats: SocketAddr,
    pub admin: SocketAddr,
}

/// [`Authorizer`] over the model's [`crate::policy::PolicySet`]; the model is swapped on reload.
/// Decisions are cached per model ([`decisions`]).
pub struct PolicyAuthorizer {
    current: RwLock<CurrentModel>,
    decisions: decisions::DecisionCache,
    metrics: crate::metrics::agent::AgentMetrics,
}

/// The model decisions are made on, its generation (the cache's key to it) and whether its
/// policies match source addresses (then the cache keys on them too).
struct CurrentModel {
    model: Arc<ClusterModel>,
    generation: u64,
    by_source_ip: bool,
}

impl CurrentModel {
    fn new(model: Arc<ClusterModel>, generation: u64) -> Self {
        Self {
            by_source_ip: model.policies().matches_source_addresses(),
            model,
            generation,
        }
    }
}

impl PolicyAuthorizer {
    pub fn new(model: Arc<ClusterModel>) -> Arc<Self> {
        Self::with_metrics(model, Default::default())
    }

    /// Counts each decision in `metrics`.
    pub fn with_metrics(
        model: Arc<ClusterModel>,
        metrics: crate::metrics::agent::AgentMetrics,
    ) -> Arc<Self> {
        Self::with_cache(model, metrics, decisions::DEFAULT_CAPACITY)
    }

    /// Caches up to `capacity` decisions per model (0: none, every connection is evaluated).
    pub fn with_cache(
        model: Arc<ClusterModel>,
        metrics: crate::metrics::agent::AgentMetrics,
        capacity: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(CurrentModel::new(model, 0)),
            decisions: decisions::DecisionCache::new(capacity),
            metrics,
        })
    }

    /// Decides on `model` from now on; every cached decision is dropped.
    pub fn replace(&self, model: Arc<ClusterModel>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.generation + 1;
        *current = CurrentModel::new(model, generation);
    }

    fn model(&self) -> Arc<ClusterModel> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .model
            .clone()
    }
}

impl Authorizer for PolicyAuthorizer {
    fn authorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        let decision = self.decide(req);
        self.metrics.policy_decision(match decision {
            AuthzDecision::Allow => crate::metrics::agent::PolicyAction::Allow,
            _ => crate::metrics::agent::PolicyAction::Deny,
        });
        decision
    }

    /// A live connection whose destination is no longer a workload of this node (its pod left
    /// the mesh: namespace label removed, pod opted out) stays open: mesh policy no longer
    /// applies to it, new connections to it go around the mesh, and un-enrolling must not reset
    /// what the application already has open, as enrolling does not. Every other change is
    /// decided as a new connection would be.
    fn reauthorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        let model = self.model();
        if model.workload_by_ip(req.destination_workload.ip).is_none() {
            return AuthzDecision::Allow;
        }
        self.authorize(req)
    }
}

impl PolicyAuthorizer {
    fn decide(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        let (model, generation, by_source_ip) = {
            let c = self.current.read().unwrap_or_else(|p| p.into_inner());
            (c.model.clone(), c.generation, c.by_source_ip)
        };
        let key = decisions::DecisionKey {
            source_identity: req.source_identity.cloned(),
            source_ip: by_source_ip.then(|| req.source_addr.ip()),
            destination: req.destination,
            destination_workload: req.destination_workload.ip,
        };
        if let Some(decision) = self.decisions.get(generation, &key) {
            return decision;
        }
        let decision = evaluate(&model, req);
        self.decisions.insert(generation, key, decision.clone());
        decision
    }
}

/// The policy engine's decision for `req` on `model`, what [`decisions`] caches: it depends on
/// nothing of `req` but what [`decisions::DecisionKey`] holds (the source address matters only
/// when a policy matches source addresses, and then the key holds it).
fn evaluate(model: &ClusterModel, req: &AuthzRequest<'_>) -> AuthzDecision {
    let Some(workload) = model.workload_by_ip(req.destination_workload.ip) else {
        return AuthzDecision::Deny {
            reason: format!(
                "{} is no longer a workload of this node",
                req.destination_workload.ip
            ),
        };
    };
    let attrs = ConnectionAttrs {
        src_identity: req
            .source_identity
            .and_then(|id| PeerIdentity::from_spiffe_uri(&id.to_string())),
        src_ip: req.source_addr.ip(),
        dst_ip: req.destination.ip(),
        dst_port: req.destination.port(),
    };
    let decision = model.policies().authorize(&workload.meta(), &attrs);
    if decision.is_allowed() {
        AuthzDecision::Allow
    } else {
        AuthzDecision::Deny {
            reason: match decision.policy() {
                Some(p) => format!("{p}: {:?}", decision.reason),
                None => format!("{:?}", decision.reason),
            },
        }
    }
}

/// [`IdentityIds`] of the shared tunnel state.
struct StateIds(Arc<TunnelState>);

impl IdentityIds for StateIds {
    fn identity(&self, identity_id: u32) -> Option<SpiffeId> {
        self.0.identity(identity_id)
    }
}

/// A built agent, serving.
pub struct Running {
    pub bound: Bound,
    opts: AgentOptions,
    datapath: Arc<Mutex<Datapath>>,
    models: watch::Receiver<Arc<ClusterModel>>,
    /// Enrolled local workloads: the namespace path read and its cookie.
    cookies: BTreeMap<ObjectKey, (PathBuf, u64)>,
    state: Arc<TunnelState>,
    authorizer: Arc<PolicyAuthorizer>,
    tunnel: tunnel::Running,
    drain: drain::Trigger,
    background: Vec<tokio::task::JoinHandle<()>>,
    ready: ReadyFile,
    /// Held while the agent runs (after `ready` drops: fields drop in declaration order).
    _instance_lock: InstanceLock,
    agent_metrics: crate::metrics::agent::AgentMetrics,
    quit: Arc<tokio::sync::Notify>,
    servers: observability::Servers,
    enrollment: observability::EnrollmentGate,
    /// The trust bundle ConfigMap's watch (certificates from the mesh CA only).
    _bundle_watch: Option<BundleWatch>,
}

/// `mesh-agent local`: the agent fed from the local file (see the module comment).
pub async fn build(opts: LocalOptions) -> Result<Running> {
    let (config, node, poll) = (opts.config.clone(), opts.node.clone(), opts.poll_interval);
    build_with(
        opts.agent,
        async move { ModelFeed::local(&config, node, poll) },
    )
    .await
}

/// Brings the agent up on the models of the feed `source` resolves to (see the module comment).
/// Returns once it serves. With an explicit stats address the stats server is up while the
/// source is still starting, `/readyz` 503 naming the gate `model-synced`.
pub async fn build_with(
    opts: AgentOptions,
    source: impl Future<Output = Result<ModelFeed>>,
) -> Result<Running> {
    raise_fd_limit();
    let (mut obs, gates) = observability::Observability::new();
    let model_synced = obs.gate("model-synced");
    if let Some(addr) = opts.observability.metrics_addr {
        let addr = obs.serve_stats_at(addr).await?;
        info!(stats = %addr, "stats server up; waiting for the first model");
    }
    let feed = source.await?;
    model_synced.ready();
    let models = feed.models.clone();
    let model = models.borrow().clone();
    let node = model.this_node().clone();
    info!(node = %node.name, address = %node.address, tunnel = %node.tunnel_address, source = %feed.describe, "starting the agent");
    // One agent per instance, claimed before anything is touched: a second one started by
    // mistake fails here and leaves the running one's pins, state, ready file and interface alone.
    let pins = Pins::new(&opts.bpffs, &opts.instance)?;
    let instance_lock = pins.lock()?;
    obs.serve_stats_early(&opts.observability, &node).await?;

    let state_dir = opts.state_dir();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    // A ready file left by a killed predecessor must not announce this process before it serves.
    match std::fs::remove_file(state_dir.join(READY_FILE)) {
        Ok(()) => info!("removed the ready file of a previous run that did not stop cleanly"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot remove the stale ready file in {}",
                    state_dir.display()
                )
            });
        }
    }
    let trust_domain = opts.trust_domain.clone().unwrap_or_else(|| {
        model.local_workloads().next().map_or_else(
            || "cluster.local".to_owned(),
            |w| w.identity.trust_domain.clone(),
        )
    });
    let (certs, bundle_watch) = match &opts.ca_client {
        Some(c) => {
            let client = crate::k8s::client(c.kubeconfig.as_deref()).await?;
            let watch = watch_bundle(
                client,
                &c.namespace,
                &c.bundle_configmap,
                &trust_domain,
                c.bundle_timeout,
            )
            .await?;
            info!(ca = %c.client.address, server_name = %c.client.server_name,
                bundle = %format!("{}/{}", c.namespace, c.bundle_configmap),
                "certificates from the mesh CA");
            let provider = CaClient::new(c.client.clone(), watch.bundle.clone());
            (Arc::new(CertCache::new(Arc::new(provider))), Some(watch))
        }
        None => {
            let ca_dir = opts.ca_dir.clone().unwrap_or_else(|| state_dir.join("ca"));
            let mut ca = LocalCa::open(&ca_dir, &trust_domain)
                .with_context(|| format!("cannot open the local CA in {}", ca_dir.display()))?;
            if let Some(ttl) = opts.cert_ttl {
                ca = ca.with_ttl(ttl);
            }
            let certs = match &opts.ca_fault_file {
                Some(file) => {
                    warn!(file = %file.display(), "fault injection: the local CA refuses to issue while this file exists");
                    CertCache::new(Arc::new(
                        crate::identity::fault::RefuseWhileFileExists::new(ca, file.clone()),
                    ))
                }
                None => CertCache::new(Arc::new(ca)),
            };
            (Arc::new(certs), None)
        }
    };

    // Data path.
    crate::tunnel_iface::ensure_tunnel_iface(TUNNEL_IFACE, &[node.tunnel_address])
        .context("cannot create the tunnel interface")?;
    let cgroup = match &opts.cgroup {
        Some(p) => p.clone(),
        None => crate::cgroup::cgroup2_mount().context("cannot find the cgroup v2 hierarchy")?,
    };
    let load = LoadOptions {
        max_enrolled_pods: opts.max_enrolled_pods,
        ..Default::default()
    };
    let mut datapath = Datapath::load_with(Some(&pins), &load)?;
    datapath.attach(&cgroup)?;
    if let Some(own) = own_cgroup()
        && !own.starts_with(&cgroup)
    {
        datapath.attach_tunnel(&own)?;
    }
    gates.bpf_attached.ready();

    // Tunnel state and the maps.
    let state = TunnelState::new(compute::snapshot(&model)?);
    let authorizer = PolicyAuthorizer::with_metrics(model.clone(), obs.agent.clone());
    let mut cookies = BTreeMap::new();
    let not_enrolled = program(&mut datapath, &model, &mut cookies)?;
    obs.agent.workloads_enrolled(cookies.len() as u64);
    obs.agent.workloads_not_enrolled(&not_enrolled);
    let mut enrollment = gates.workloads_enrolled;
    enrollment.observe(model.local_workloads().count(), cookies.len());
    gates.config_synced.ready();
    let local_ids: Vec<SpiffeId> = state
        .snapshot()
        .local_workloads
        .values()
        .map(|w| w.identity.clone())
        .collect();
    certs.prefetch(&local_ids).await;
    gates.certificates.ready();

    // Tunnel.
    let config = TunnelConfig {
        delivery_source: Some(node.tunnel_address),
        drain_deadline: opts.drain_deadline,
        ejection_time: opts.ejection_time,
        handshake_metrics: obs.handshake.clone(),
        node_identity: Some(node_identity(&trust_domain)?),
        shards: opts.tunnel_threads.max(1),
        ..TunnelConfig::default()
    };
    let inbound_addr = SocketAddr::new(node.address, node.hbone_port);
    let outbound_addr = SocketAddr::new(node.tunnel_address, node.outbound_port);
    let inbound = bind_reuseport(inbound_addr, config.listen_backlog)
        .with_context(|| format!("cannot listen on {inbound_addr} (inbound HBONE)"))?;
    let outbound = bind_reuseport(outbound_addr, config.listen_backlog)
        .with_context(|| format!("cannot listen on {outbound_addr} (outbound)"))?;
    let seams = Seams {
        redirects: Arc::new(DatapathRedirects {
            reader: datapath.orig_dst_reader(),
            identities: StateIds(state.clone()),
        }),
        resolver: state.clone(),
        workloads: state.clone(),
        authorizer: authorizer.clone(),
    };
    let (trigger, drain_watch) = drain::channel();
    let tunnel = tunnel::start(config, certs.clone(), seams, inbound, outbound, drain_watch)?;
    let splicer = datapath
        .splicer()
        .map(|s| Arc::new(s) as Arc<dyn tunnel::splice::Splicer>);
    tunnel
        .outbound
        .same_node_carrier()
        .choose(opts.same_node_path, splicer)
        .await;
    let datapath = Arc::new(Mutex::new(datapath));
    let agent_metrics = obs.agent.clone();
    let quit = obs.quit.clone();
    let (endpoints, servers) = obs
        .serve(
            &opts.observability,
            &tunnel,
            datapath.clone(),
            certs.clone(),
            models.clone(),
        )
        .await?;
    gates.listeners_bound.ready();
    let bound = Bound {
        inbound: tunnel.inbound_addr,
        outbound: tunnel.outbound_addr,
        stats: endpoints.stats,
        admin: endpoints.admin,
    };

    // The tunnel owns the heartbeat: it beats while this process serves.
    let heartbeat = datapath
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .heartbeat();
    heartbeat.beat()?;
    let beat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(compute::STALE_AFTER / 5);
        loop {
            tick.tick().await;
            if let Err(e) = heartbeat.beat() {
                warn!(error = %e, "tunnel heartbeat failed");
            }
        }
    });
    // Often enough that an idle identity's certificate is renewed before it expires.
    let refresh_every = opts.cert_ttl.map_or(Duration::from_secs(60), |ttl| {
        (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    });
    let refresher = certs.spawn_refresher(refresh_every);
    let reloads = agent_metrics.clone();
    let keep_feed = tokio::spawn(async move {
        // Holds the source for the agent's lifetime; counts the reloads it rejects (valid ones
        // are counted when applied).
        let mut rejected = feed.rejected.clone();
        let _guard = feed.guard;
        let mut seen = *rejected.borrow_and_update();
        while rejected.changed().await.is_ok() {
            let now = *rejected.borrow_and_update();
            for _ in seen..now {
                reloads.config_reload(false);
            }
            seen = now;
        }
        std::future::pending::<()>().await;
    });

    let ready = state_dir.join(READY_FILE);
    // The pid lets a supervisor tell this process's file from a predecessor's.
    std::fs::write(&ready, format!("ready\npid={}\n", std::process::id()))
        .with_context(|| format!("cannot write {}", ready.display()))?;
    let ready = ReadyFile(ready);
    info!(inbound = %bound.inbound, outbound = %bound.outbound, stats = %bound.stats, admin = %bound.admin, "{READY_LINE}");
    let background = vec![beat, refresher, keep_feed];
    Ok(Running {
        bound,
        opts,
        datapath,
        models,
        cookies,
        state,
        authorizer,
        tunnel,
        drain: trigger,
        background,
        ready,
        _instance_lock: instance_lock,
        agent_metrics,
        quit,
        servers,
        enrollment,
        _bundle_watch: bundle_watch,
    })
}

/// Reads the netns cookies of local workloads (keeping known ones while their namespace path
/// stays the same: a Kubernetes pod whose sandbox was recreated gets a new path) and reconciles
/// the maps. Workloads beyond the enrolled-pods map's capacity are left out (those enrolled
/// before keep their place), each logged as an error; returns how many were left out and why.
fn program(
    datapath: &mut Datapath,
    model: &ClusterModel,
    cookies: &mut BTreeMap<ObjectKey, (PathBuf, u64)>,
) -> Result<crate::metrics::agent::NotEnrolled> {
    let mut not_enrolled = crate::metrics::agent::NotEnrolled::default();
    let mut next = BTreeMap::new();
    for w in model.local_workloads() {
        if let Some((path, c)) = cookies.get(&w.key)
            && *path == w.netns
        {
            next.insert(w.key.clone(), (path.clone(), *c));
            continue;
        }
        match crate::netns::netns_cookie(&w.netns) {
            Ok(c) => {
                next.insert(w.key.clone(), (w.netns.clone(), c));
            }
            Err(e) => {
                not_enrolled.netns_unreadable += 1;
                warn!(workload = %w.key, netns = %w.netns.display(), error = %e,
                    "cannot enroll the workload yet (its network namespace is not readable); retrying on the next change")
            }
        }
    }
    let capacity = datapath.enrolled_capacity()?;
    let left_out = if next.len() > capacity as usize {
        // Pods enrolled before keep their place: those of the last pass and, right after a
        // restart (no last pass), those in the adopted map.
        let in_kernel: std::collections::BTreeSet<u64> =
            crate::maps::KernelMaps::read_entries(datapath)?
                .enrolled
                .into_keys()
                .collect();
        let previous: BTreeMap<ObjectKey, ()> = next
            .iter()
            .filter(|(k, (_, c))| cookies.contains_key(*k) || in_kernel.contains(c))
            .map(|(k, _)| (k.clone(), ()))
            .collect();
        compute::fit_capacity(&mut next, &previous, capacity as usize)
    } else {
        Vec::new()
    };
    for key in &left_out {
        tracing::error!(workload = %key, capacity, map = mesh_common::maps::ENROLLED,
            "cannot enroll the workload: the eBPF map of enrolled pods is full. Its connections \
             are not captured by the mesh (as for a pod outside it: STRICT destinations drop \
             its plaintext) until a place frees up; this node runs more mesh workloads than \
             the data path holds");
    }
    not_enrolled.map_full = left_out.len();
    *cookies = next;
    let by_key: BTreeMap<ObjectKey, u64> =
        cookies.iter().map(|(k, (_, c))| (k.clone(), *c)).collect();
    let desired = compute::desired_state(model, &by_key)?;
    let entries = reconcile::compile(&desired)?;
    let report = reconcile::reconcile(datapath, &entries)?;
    info!(
        written = report.written,
        deleted = report.deleted,
        pods = cookies.len(),
        "maps reconciled"
    );
    Ok(not_enrolled)
}

/// Raises the soft limit of open descriptors to the hard limit. Each proxied connection holds
/// two sockets (the app's and the pod's or a stream on a pooled one; a bulk same-node direction
/// also a pipe, at most `tunnel::copy`'s 4,096 at once), and the listeners accept
/// up to `max_inbound_connections` + `max_outbound_connections`: the usual soft limit of 1024
/// would refuse connections long before those bounds. The hard limit is the operator's (the
/// container runtime's `LimitNOFILE`), never raised; the bounds stay enforced by the listeners.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct we pass, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        info!(limit = lim.rlim_cur, "open-file limit");
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads only the struct we pass; raising the soft limit up to the hard
    // limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        info!(
            from = before,
            to = lim.rlim_cur,
            "raised the open-file limit to the hard limit"
        );
    } else {
        warn!(error = %std::io::Error::last_os_error(), limit = before,
            "cannot raise the open-file limit; connections past it will be refused");
    }
}

/// The identity the inbound presents to clients that name none (see
/// `TunnelConfig::node_identity`): the agent's own service account in the mesh's namespace.
fn node_identity(trust_domain: &str) -> Result<SpiffeId> {
    format!("spiffe://{trust_domain}/ns/{NODE_NAMESPACE}/sa/{NODE_SERVICE_ACCOUNT}")
        .parse()
        .map_err(|e| anyhow::anyhow!("trust domain `{trust_domain}`: {e}"))
}

/// Namespace and service account of the node agent's own identity.
pub const NODE_NAMESPACE: &str = "nodemesh-system";
pub const NODE_SERVICE_ACCOUNT: &str = "nodemesh-agent";

/// This process's cgroup v2 directory.
fn own_cgroup() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(
        crate::cgroup::cgroup2_mount()
            .ok()?
            .join(rel.trim_start_matches('/')),
    )
}

impl Running {
    /// Follows the model until `shutdown`, then drains and returns (pins stay).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = self.quit.notified() => break,
                changed = self.models.changed() => {
                    if changed.is_err() {
                        bail!("the model source stopped");
                    }
                    let model = self.models.borrow_and_update().clone();
                    let applied = self.apply(model);
                    self.agent_metrics.config_reload(applied.is_ok());
                    if let Err(e) = applied {
                        warn!(error = format!("{e:#}"), "cannot apply the new configuration; the previous state stays");
                    }
                }
            }
        }
        info!("draining the tunnel");
        let _draining = self.servers.draining();
        drop(self.ready);
        let outcome = self.drain.drain(self.opts.drain_deadline).await;
        for t in self.tunnel.tasks.drain(..) {
            let _ = t.await;
        }
        self.servers.shutdown().await;
        for t in &self.background {
            t.abort();
        }
        info!(
            ?outcome,
            "stopped; the eBPF programs stay attached (pinned)"
        );
        Ok(())
    }

    fn apply(&mut self, model: Arc<ClusterModel>) -> Result<()> {
        let snapshot = compute::snapshot(&model)?;
        let not_enrolled = program(
            &mut self.datapath.lock().unwrap_or_else(|p| p.into_inner()),
            &model,
            &mut self.cookies,
        )?;
        self.agent_metrics
            .workloads_enrolled(self.cookies.len() as u64);
        self.agent_metrics.workloads_not_enrolled(&not_enrolled);
        self.enrollment
            .observe(model.local_workloads().count(), self.cookies.len());
        self.state.replace(snapshot);
        self.authorizer.replace(model);
        let closed = self.tunnel.inbound.reauthorize() + self.tunnel.outbound.reauthorize();
        info!(closed, "configuration applied");
        Ok(())
    }
}

/// The readiness file; removed when the agent stops, also on an error return.
struct ReadyFile(PathBuf);

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
