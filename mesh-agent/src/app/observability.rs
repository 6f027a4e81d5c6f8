//! The agent's metrics, readiness and admin endpoints, wired for `mesh-agent local`.
//!
//! [`Observability::new`] builds the registry and the readiness gates (`bpf-attached`,
//! `certificates`, `config-synced`, `listeners-bound`, `workloads-enrolled`);
//! [`app::build`](super::build) starts the stats server (`<node address>:<metricsPort>`,
//! default 15020) right after loading the model ([`Observability::serve_stats_early`]: `/readyz`
//! 503 while gates are pending), clears each gate when its step is done and calls
//! [`Observability::serve`] once the tunnel is bound, which registers the tunnel, datapath and
//! certificate metrics, swaps the full registry into the stats server and binds and spawns the
//! admin server (`127.0.0.1:<adminPort>`, default 15000). `/quitquitquit` notifies [`Observability::quit`], which
//! [`Running::run`](super::Running::run) treats like SIGTERM. On shutdown the agent registers
//! a `draining` gate ([`Servers::draining`]: `/readyz` 503), drains the tunnel, then closes both
//! servers gracefully ([`Servers::shutdown`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use crate::{
    admin::{self, AdminState, LogHandle, StatsState},
    datapath::Datapath,
    identity::CertCache,
    metrics::{
        BuildInfo, MetricsRegistry, SharedRegistry,
        agent::{AgentMetrics, CertExpiry, CertificateExpiry},
        datapath::{self as dp_metrics, MapUsage},
        runtime::RuntimeCollector,
    },
    model::{ClusterModel, Node},
    readiness::{Gate, Readiness},
    tunnel::{
        self,
        metrics::{HandshakeMetrics, TunnelMetrics, WorkloadDirectory, WorkloadMeta},
    },
};

/// Readiness gates, cleared by [`super::build`] as each step completes.
pub struct Gates {
    pub bpf_attached: Gate,
    pub certificates: Gate,
    pub config_synced: Gate,
    pub listeners_bound: Gate,
    /// Cleared once every workload of this node has been enrolled (its network namespace was
    /// readable), which may take later reloads: see [`EnrollmentGate`].
    pub workloads_enrolled: EnrollmentGate,
}

/// The `workloads-enrolled` gate: pending until, for the first time, every workload the model
/// places on this node is captured by the datapath (ztunnel likewise waits for its initial pod
/// snapshot). Once cleared it stays cleared; later enrollment problems are logged, not unready.
#[derive(Debug)]
pub struct EnrollmentGate(Option<Gate>);

impl EnrollmentGate {
    /// Call after each map reconcile with the number of local workloads and how many of them
    /// are enrolled.
    pub fn observe(&mut self, local: usize, enrolled: usize) {
        if self.0.is_some() && enrolled >= local {
            self.0 = None;
            tracing::info!(workloads = local, "every workload of this node is enrolled");
        }
    }

    pub fn is_pending(&self) -> bool {
        self.0.is_some()
    }
}

/// Where the endpoints listen (`None`: from the model's node ports).
#[derive(Clone, Debug, Default)]
pub struct ObservabilityOptions {
    pub metrics_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// The reloadable log filter for `/logging` (`None`: it answers 503).
    pub logging: Option<LogHandle>,
}

/// The registry under construction, readiness and the agent's metric handles.
pub struct Observability {
    registry: MetricsRegistry,
    pub readiness: Readiness,
    pub agent: AgentMetrics,
    /// TLS handshake and connect metrics; the wiring puts it in `TunnelConfig::handshake_metrics`.
    pub handshake: HandshakeMetrics,
    /// Notified by `/quitquitquit`.
    pub quit: Arc<Notify>,
    /// Set to `true` to stop both servers.
    stop: watch::Sender<bool>,
    /// The stats server started by [`Observability::serve_stats_early`]: its address, the
    /// registry slot it reads, its task.
    early_stats: Option<(SocketAddr, SharedRegistry, tokio::task::JoinHandle<()>)>,
}

/// Where the endpoints ended up.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub stats: SocketAddr,
    pub admin: SocketAddr,
}

impl Observability {
    pub fn new() -> (Self, Gates) {
        let mut registry = MetricsRegistry::new(&BuildInfo::default());
        let agent = AgentMetrics::new(registry.nodemesh());
        let handshake = HandshakeMetrics::new(registry.nodemesh());
        let readiness = Readiness::new();
        let gates = Gates {
            bpf_attached: readiness.register("bpf-attached"),
            certificates: readiness.register("certificates"),
            config_synced: readiness.register("config-synced"),
            listeners_bound: readiness.register("listeners-bound"),
            workloads_enrolled: EnrollmentGate(Some(readiness.register("workloads-enrolled"))),
        };
        let obs = Self {
            registry,
            readiness,
            agent,
            handshake,
            quit: Arc::new(Notify::new()),
            stop: watch::channel(false).0,
            early_stats: None,
        };
        (obs, gates)
    }

    /// One more readiness gate, pending until dropped or `ready()`.
    pub fn gate(&self, name: &str) -> Gate {
        self.readiness.register(name)
    }

    /// Completes when the servers are told to stop.
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.stop.subscribe();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    }

    fn stats_addr(opts: &ObservabilityOptions, node: &Node) -> SocketAddr {
        opts.metrics_addr
            .unwrap_or_else(|| SocketAddr::new(node.address, node.metrics_port))
    }

    /// Binds and starts the stats server now, before the components exist: `/healthz` answers
    /// and `/readyz` says 503 with the pending gates while the agent starts; `/metrics` has the
    /// build and process metrics until [`Observability::serve`] swaps in the full registry.
    pub async fn serve_stats_early(
        &mut self,
        opts: &ObservabilityOptions,
        node: &Node,
    ) -> Result<SocketAddr> {
        if let Some((addr, _, _)) = &self.early_stats {
            return Ok(*addr);
        }
        self.serve_stats_at(Self::stats_addr(opts, node)).await
    }

    /// [`Observability::serve_stats_early`] on `addr`, before any model exists (Kubernetes mode
    /// with `--metrics-addr`: `/readyz` says what the agent waits for while its source syncs).
    pub async fn serve_stats_at(&mut self, addr: SocketAddr) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (stats)"))?;
        let addr = listener.local_addr()?;
        let registry = SharedRegistry::new(MetricsRegistry::new(&BuildInfo::default()));
        let state = StatsState {
            registry: registry.clone(),
            readiness: self.readiness.clone(),
        };
        let task = tokio::spawn(admin::serve_stats(listener, state, self.stopped()));
        self.early_stats = Some((addr, registry, task));
        Ok(addr)
    }

    /// Registers the remaining metrics and puts the full registry behind the stats server
    /// (starting it first if [`Observability::serve_stats_early`] was not called), binds and
    /// spawns the admin server. Returns where they listen and the handle that stops them.
    pub async fn serve(
        mut self,
        opts: &ObservabilityOptions,
        tunnel: &tunnel::Running,
        datapath: Arc<Mutex<Datapath>>,
        certs: Arc<CertCache>,
        models: watch::Receiver<Arc<ClusterModel>>,
    ) -> Result<(Endpoints, Servers)> {
        let directory: Arc<dyn WorkloadDirectory> = Arc::new(ModelDirectory::new(models.clone()));
        tunnel.outbound.metrics().set_directory(directory.clone());
        tunnel.inbound.metrics().set_directory(directory);
        TunnelMetrics::register(
            self.registry.istio(),
            [
                tunnel.outbound.metrics().clone(),
                tunnel.inbound.metrics().clone(),
            ],
        );
        tunnel::pool::Pool::register(self.registry.nodemesh(), tunnel.outbound.pool().clone());
        tunnel
            .outbound
            .same_node_carrier()
            .metrics()
            .register(self.registry.nodemesh());
        register_datapath(self.registry.nodemesh(), datapath.clone());
        RuntimeCollector::register_agent(
            self.registry.nodemesh(),
            tokio::runtime::Handle::current(),
            tunnel.runtimes.clone(),
        );
        let expiry_certs = certs.clone();
        CertExpiry::register(
            self.registry.nodemesh(),
            Box::new(move || {
                expiry_certs
                    .snapshot()
                    .into_iter()
                    .filter_map(|c| {
                        Some(CertificateExpiry {
                            identity: c.identity.to_string(),
                            not_after_unix_seconds: unix_seconds(c.not_after()?),
                        })
                    })
                    .collect()
            }),
        );

        let node = models.borrow().this_node().clone();
        if self.early_stats.is_none() {
            self.serve_stats_early(opts, &node).await?;
        }
        let Some((stats_addr, shared, stats)) = self.early_stats.take() else {
            anyhow::bail!("the stats server did not start");
        };
        let admin_addr = opts
            .admin_addr
            .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), node.admin_port));
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot listen on {admin_addr} (admin)"))?;
        let endpoints = Endpoints {
            stats: stats_addr,
            admin: admin_listener.local_addr()?,
        };
        let admin_stopped = self.stopped();
        shared.replace(self.registry);
        let quit = self.quit.clone();
        let admin_state = AdminState {
            config_dump: Arc::new(move || {
                let maps = map_usage(&datapath.lock().unwrap_or_else(|p| p.into_inner()));
                config_dump(&models.borrow(), &certs, &maps)
            }),
            logging: opts.logging.clone(),
            quit: Arc::new(move || quit.notify_one()),
        };
        let admin = tokio::spawn(async move {
            if let Err(e) = admin::serve_admin(admin_listener, admin_state, admin_stopped).await {
                tracing::warn!(error = %e, "the admin server stopped");
            }
        });
        let servers = Servers {
            stop: self.stop,
            tasks: vec![stats, admin],
            readiness: self.readiness,
        };
        Ok((endpoints, servers))
    }
}

/// The running stats and admin servers.
pub struct Servers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    readiness: Readiness,
}

impl Servers {
    /// Marks the agent not ready (gate `draining`: `/readyz` answers 503 while the tunnel
    /// drains, so probes and load balancers stop sending). Keep the gate until the agent exits.
    pub fn draining(&self) -> Gate {
        self.readiness.register("draining")
    }

    /// Stops both servers: no new connections, in-flight requests finish within
    /// [`admin::http::SHUTDOWN_GRACE`]; returns when both have stopped.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The stats server of `mesh-agent node --metrics-addr`: `/metrics` with the build, process,
/// runtime and datapath metrics (events, map entries and capacity), `/healthz`, and `/readyz`
/// (200: it starts once the data path is up). Stops gracefully when `stop` completes.
pub fn serve_node_stats(
    listener: std::net::TcpListener,
    datapath: Arc<Mutex<Datapath>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    register_datapath(registry.nodemesh(), datapath);
    RuntimeCollector::register(registry.nodemesh(), tokio::runtime::Handle::current());
    listener
        .set_nonblocking(true)
        .context("cannot make the stats listener non-blocking")?;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("cannot use the stats listener")?;
    let state = StatsState {
        registry: SharedRegistry::new(registry),
        readiness: Readiness::new(),
    };
    Ok(tokio::spawn(admin::serve_stats(listener, state, stop)))
}

/// Registers `nodemesh_datapath_events_total` and the map entries/capacity gauges over the
/// shared datapath (also used by `mesh-agent node`).
pub fn register_datapath(
    registry: &mut prometheus_client::registry::Registry,
    dp: Arc<Mutex<Datapath>>,
) {
    let for_maps = dp.clone();
    dp_metrics::register(
        registry,
        Box::new(move || {
            dp.lock()
                .unwrap_or_else(|p| p.into_inner())
                .counters()
                .unwrap_or_default()
        }),
        Some(Box::new(move || {
            map_usage(&for_maps.lock().unwrap_or_else(|p| p.into_inner()))
        })),
    );
}

/// The datapath's map usage in the metrics layer's type; empty (and logged) if the kernel
/// refuses to tell.
pub fn map_usage(dp: &Datapath) -> BTreeMap<&'static str, MapUsage> {
    match dp.map_usage() {
        Ok(maps) => maps
            .into_iter()
            .map(|(name, u)| {
                let u = MapUsage {
                    entries: u.entries,
                    capacity: u.capacity,
                };
                (name, u)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the eBPF map sizes");
            BTreeMap::new()
        }
    }
}

/// The traffic labels' view of the model: workloads by address and service hostnames, indexed
/// once per model version (a reload swaps the `Arc`), so a connection costs two hash lookups.
struct ModelDirectory {
    models: watch::Receiver<Arc<ClusterModel>>,
    index: Mutex<Option<(Arc<ClusterModel>, Arc<DirectoryIndex>)>>,
}

#[derive(Default)]
struct DirectoryIndex {
    workloads: HashMap<IpAddr, Arc<WorkloadMeta>>,
    services: HashSet<String>,
}

impl ModelDirectory {
    fn new(models: watch::Receiver<Arc<ClusterModel>>) -> Self {
        Self {
            models,
            index: Mutex::new(None),
        }
    }

    fn index(&self) -> Arc<DirectoryIndex> {
        let model = self.models.borrow().clone();
        let mut cached = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, index)) = cached.as_ref()
            && Arc::ptr_eq(m, &model)
        {
            return index.clone();
        }
        let index = Arc::new(DirectoryIndex::of(&model));
        *cached = Some((model, index.clone()));
        index
    }
}

impl DirectoryIndex {
    fn of(model: &ClusterModel) -> Self {
        let mut index = Self::default();
        for w in model.workloads() {
            let meta = Arc::new(WorkloadMeta::from_labels(
                w.identity.spiffe_id(),
                w.key.name.clone(),
                w.key.namespace.clone(),
                &w.labels,
            ));
            for ip in &w.ips {
                index.workloads.insert(ip.to_canonical(), meta.clone());
            }
        }
        for s in model.services() {
            // The hostname form the tunnel state uses (`app::compute`).
            index.services.insert(format!(
                "{}.{}.svc.cluster.local",
                s.key.name, s.key.namespace
            ));
        }
        index
    }
}

impl WorkloadDirectory for ModelDirectory {
    fn workload(&self, ip: IpAddr) -> Option<Arc<WorkloadMeta>> {
        self.index().workloads.get(&ip.to_canonical()).cloned()
    }

    fn is_service(&self, hostname: &str) -> bool {
        self.index().services.contains(hostname)
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// `/config_dump`: the model this agent follows, its certificates and its eBPF maps' fill.
fn config_dump(
    model: &ClusterModel,
    certs: &CertCache,
    maps: &BTreeMap<&'static str, MapUsage>,
) -> Value {
    let node = model.this_node();
    let workloads: Vec<Value> = model
        .workloads()
        .map(|w| {
            json!({
                "key": w.key.to_string(),
                "identity": w.identity.spiffe_id(),
                "debug": format!("{w:?}"),
            })
        })
        .collect();
    let services: Vec<Value> = model
        .services()
        .map(|s| json!({ "key": s.key.to_string(), "debug": format!("{s:?}") }))
        .collect();
    let certificates: Vec<Value> = certs
        .snapshot()
        .into_iter()
        .map(|c| {
            let cert = c.cert.as_deref();
            json!({
                "identity": c.identity.to_string(),
                "serial": cert.and_then(|c| c.serial_hex()),
                "not_before_unix_seconds": cert.map(|c| unix_seconds(c.not_before)),
                "not_after_unix_seconds": cert.map(|c| unix_seconds(c.not_after)),
                "expires_in_seconds": cert.map(|c| {
                    unix_seconds(c.not_after) - unix_seconds(SystemTime::now())
                }),
            })
        })
        .collect();
    let maps: BTreeMap<&str, Value> = maps
        .iter()
        .map(|(name, u)| {
            (
                *name,
                json!({ "entries": u.entries, "capacity": u.capacity }),
            )
        })
        .collect();
    let warnings: Vec<String> = model.warnings().iter().map(ToString::to_string).collect();
    let mut dump = BTreeMap::new();
    dump.insert(
        "node",
        json!({
            "name": node.name,
            "address": node.address.to_string(),
            "tunnel_address": node.tunnel_address.to_string(),
            "hbone_port": node.hbone_port,
            "outbound_port": node.outbound_port,
            "metrics_port": node.metrics_port,
            "admin_port": node.admin_port,
        }),
    );
    dump.insert("workloads", Value::from(workloads));
    dump.insert("services", Value::from(services));
    dump.insert("policies", Value::from(format!("{:?}", model.policies())));
    dump.insert("certificates", Value::from(certificates));
    dump.insert("maps", json!(maps));
    dump.insert("warnings", Value::from(warnings));
    json!(dump)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_config::build_from_texts;

    const FILE: &str = "apiVersion: local.nodemesh.io/v1alpha1
kind: LocalCluster
thisNode: n1
nodes:
- {name: n1, address: 10.0.0.1, tunnelAddress: 169.254.0.1}
workloads:
- {name: web, namespace: shop, serviceAccount: web, labels: {app: web, version: v2}, ips: [10.1.0.1, 'fd00::1'], netns: /run/netns/web, node: n1}
- {name: db, namespace: shop, serviceAccount: db, ips: [10.1.0.3], netns: /run/netns/db, node: n1}
services:
- {name: web, namespace: shop, vips: [10.96.0.1], ports: [{port: 80}], selector: {matchLabels: {app: web}}}
";

    fn models(text: &str) -> (watch::Sender<Arc<ClusterModel>>, ModelDirectory) {
        let model = build_from_texts(&[("f.yaml".into(), text.into())], None)
            .unwrap_or_else(|e| panic!("{e}"));
        let (tx, rx) = watch::channel(Arc::new(model));
        (tx, ModelDirectory::new(rx))
    }

    #[test]
    fn the_enrollment_gate_clears_once_every_local_workload_is_enrolled() {
        let (obs, gates) = Observability::new();
        let Gates {
            bpf_attached,
            certificates,
            config_synced,
            listeners_bound,
            mut workloads_enrolled,
        } = gates;
        drop((bpf_attached, certificates, config_synced, listeners_bound));
        workloads_enrolled.observe(3, 2);
        assert_eq!(obs.readiness.pending(), ["workloads-enrolled"]);
        workloads_enrolled.observe(3, 3);
        assert!(obs.readiness.is_ready());
        // Once ready, a later shortfall does not make the agent unready again.
        workloads_enrolled.observe(4, 3);
        assert!(obs.readiness.is_ready());
        assert!(!workloads_enrolled.is_pending());
    }

    #[test]
    fn the_directory_follows_the_model() {
        let (tx, dir) = models(FILE);
        let web = dir.workload("10.1.0.1".parse().expect("ip")).expect("web");
        assert_eq!(web.identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((web.name.as_str(), web.namespace.as_str()), ("web", "shop"));
        assert_eq!(
            (
                web.canonical_service.as_str(),
                web.canonical_revision.as_str()
            ),
            ("web", "v2")
        );
        let mapped = dir
            .workload("::ffff:10.1.0.1".parse().expect("ip"))
            .expect("v4-mapped");
        assert!(Arc::ptr_eq(&web, &mapped));
        assert!(dir.workload("fd00::1".parse().expect("ip")).is_some());
        let db = dir.workload("10.1.0.3".parse().expect("ip")).expect("db");
        assert_eq!(
            (
                db.canonical_service.as_str(),
                db.canonical_revision.as_str()
            ),
            ("db", "latest"),
            "no app label: the workload name, as Istio"
        );
        assert!(
            dir.workload("10.96.0.1".parse().expect("ip")).is_none(),
            "a VIP is no workload"
        );
        assert!(dir.is_service("web.shop.svc.cluster.local"));
        assert!(!dir.is_service("db.shop.svc.cluster.local"));

        // A reload that removes db is seen at the next lookup.
        let without_db = FILE.replace(
            "- {name: db, namespace: shop, serviceAccount: db, ips: [10.1.0.3], netns: /run/netns/db, node: n1}\n",
            "",
        );
        let model = build_from_texts(&[("f.yaml".into(), without_db)], None)
            .unwrap_or_else(|e| panic!("{e}"));
        tx.send(Arc::new(model)).expect("send");
        assert!(dir.workload("10.1.0.3".parse().expect("ip")).is_none());
    }

    #[test]
    fn config_dump_has_maps_and_certificates_with_serials() {
        let (_tx, dir) = models(FILE);
        let model = dir.models.borrow().clone();
        let ca_dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::identity::LocalCa::open(ca_dir.path(), "cluster.local").expect("ca");
        let certs = CertCache::new(Arc::new(ca));
        let id: crate::identity::SpiffeId =
            "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let cert = rt.block_on(certs.get(&id)).expect("issue");
        let maps = BTreeMap::from([(
            "NM_POLICY",
            MapUsage {
                entries: 3,
                capacity: 65536,
            },
        )]);
        let dump = config_dump(&model, &certs, &maps);
        assert_eq!(dump["maps"]["NM_POLICY"]["entries"], 3);
        assert_eq!(dump["maps"]["NM_POLICY"]["capacity"], 65536);
        let c = &dump["certificates"][0];
        assert_eq!(c["identity"], id.to_string());
        assert_eq!(c["serial"].as_str(), cert.serial_hex().as_deref());
        assert!(c["serial"].as_str().is_some_and(|s| s.len() >= 2));
        assert_eq!(
            c["not_after_unix_seconds"].as_i64(),
            Some(unix_seconds(cert.not_after))
        );
        let left = c["expires_in_seconds"].as_i64().expect("time left");
        assert!(
            left > 0 && left <= crate::identity::DEFAULT_CERT_TTL.as_secs() as i64,
            "{left}"
        );
    }
}
