//! The agent's metrics, readiness and admin endpoints, wired for `mesh-agent local`.
//!
//! [`Observability::new`] builds the registry and the readiness gates (`bpf-attached`,
//! `certificates`, `config-synced`, `listeners-bound`); [`app::build`](super::build) clears each
//! gate when its step is done and calls [`Observability::serve`] once the tunnel is bound, which
//! registers the tunnel, datapath and certificate metrics, binds the stats server
//! (`<node address>:<metricsPort>`, default 15020) and the admin server (`127.0.0.1:<adminPort>`,
//! default 15000) and spawns both. `/quitquitquit` notifies [`Observability::quit`], which
//! [`Running::run`](super::Running::run) treats like SIGTERM.

use std::{
    collections::BTreeMap,
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
        BuildInfo, MetricsRegistry,
        agent::{AgentMetrics, CertExpiry, CertificateExpiry},
        datapath::{self as dp_metrics, MapUsage},
        runtime::RuntimeCollector,
    },
    model::ClusterModel,
    readiness::{Gate, Readiness},
    tunnel::{
        self,
        metrics::{HandshakeMetrics, TunnelMetrics},
    },
};

/// Readiness gates, cleared by [`super::build`] as each step completes.
pub struct Gates {
    pub bpf_attached: Gate,
    pub certificates: Gate,
    pub config_synced: Gate,
    pub listeners_bound: Gate,
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
        };
        let obs = Self {
            registry,
            readiness,
            agent,
            handshake,
            quit: Arc::new(Notify::new()),
        };
        (obs, gates)
    }

    /// Registers the remaining metrics, binds and spawns both servers. Returns the tasks.
    pub async fn serve(
        mut self,
        opts: &ObservabilityOptions,
        tunnel: &tunnel::Running,
        datapath: Arc<Mutex<Datapath>>,
        certs: Arc<CertCache>,
        models: watch::Receiver<Arc<ClusterModel>>,
    ) -> Result<(Endpoints, Vec<tokio::task::JoinHandle<()>>)> {
        TunnelMetrics::register(
            self.registry.istio(),
            [
                tunnel.outbound.metrics().clone(),
                tunnel.inbound.metrics().clone(),
            ],
        );
        tunnel::pool::Pool::register(self.registry.nodemesh(), tunnel.outbound.pool().clone());
        register_datapath(self.registry.nodemesh(), datapath.clone());
        RuntimeCollector::register(self.registry.nodemesh(), tokio::runtime::Handle::current());
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
        let stats_addr = opts
            .metrics_addr
            .unwrap_or_else(|| SocketAddr::new(node.address, node.metrics_port));
        let admin_addr = opts
            .admin_addr
            .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), node.admin_port));
        let stats_listener = tokio::net::TcpListener::bind(stats_addr)
            .await
            .with_context(|| format!("cannot listen on {stats_addr} (stats)"))?;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot listen on {admin_addr} (admin)"))?;
        let endpoints = Endpoints {
            stats: stats_listener.local_addr()?,
            admin: admin_listener.local_addr()?,
        };

        let stats_state = StatsState {
            registry: Arc::new(self.registry),
            readiness: self.readiness.clone(),
        };
        let quit = self.quit.clone();
        let admin_state = AdminState {
            config_dump: Arc::new(move || {
                let maps = map_usage(&datapath.lock().unwrap_or_else(|p| p.into_inner()));
                config_dump(&models.borrow(), &certs, &maps)
            }),
            logging: opts.logging.clone(),
            quit: Arc::new(move || quit.notify_one()),
        };
        let stats = tokio::spawn(admin::serve_stats(
            stats_listener,
            stats_state,
            std::future::pending(),
        ));
        let admin = tokio::spawn(async move {
            if let Err(e) =
                admin::serve_admin(admin_listener, admin_state, std::future::pending()).await
            {
                tracing::warn!(error = %e, "the admin server stopped");
            }
        });
        Ok((endpoints, vec![stats, admin]))
    }
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
