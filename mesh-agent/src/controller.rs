//! `mesh-agent controller`: the cluster's control plane (a Deployment, usually 2 replicas).
//!
//! Every replica watches the policy CRDs (so a new leader starts with synced caches) and serves
//! `/metrics`, `/healthz` and `/readyz` ([`DEFAULT_METRICS_ADDR`], istiod's monitoring port).
//! One replica, elected through a `coordination.k8s.io/v1` Lease ([`leader`]), writes each
//! `AuthorizationPolicy`'s and `PeerAuthentication`'s `status.conditions` `Accepted`
//! ([`status`]: the verdict of the node agents' own policy code, with `observedGeneration`),
//! by server-side apply on the status subresource with field manager [`FIELD_MANAGER`].
//! Non-leaders never write; a leader that loses the Lease stops at once, and on SIGTERM it stops
//! writing and then releases the Lease.
//!
//! Readiness gates: `authorizationpolicies-synced`, `peerauthentications-synced` (each kind's
//! first list done: the client works and may list) and `leader-election` (the Lease could be
//! read or created). Non-leaders are ready: they are the stand-by.
//!
//! # Adding a component (the CA)
//!
//! [`Controller`] is built before it runs, so a component takes what it needs first. Its
//! metrics are registered before its future is made (the future must be `'static`, so it cannot
//! hold the registry):
//!
//! ```no_run
//! # use prometheus_client::{metrics::counter::Counter, registry::Registry};
//! # use mesh_agent::{controller::{Controller, ControllerOptions, Shutdown}, readiness::Gate};
//! # async fn serve_ca(_: kube::Client, _: Counter, _: Gate, _: Shutdown) -> anyhow::Result<()> { Ok(()) }
//! # async fn example(client: kube::Client, opts: ControllerOptions) -> anyhow::Result<()> {
//! let mut controller = Controller::new(client, opts)?;
//! let signed = Counter::<u64>::default();
//! controller.registry().register("ca_certificates_signed", "Certificates signed", signed.clone());
//! let gate = controller.readiness().register("ca-serving"); // dropped once the CA serves
//! let shutdown = controller.shutdown(); // resolves at SIGTERM
//! let ca = serve_ca(controller.client().clone(), signed, gate, shutdown);
//! controller.add_component("ca", ca); // an error from it ends the controller
//! let running = controller.start().await?;
//! running.run_until(async { /* SIGTERM */ }).await
//! # }
//! ```
//!
//! [`Controller::registry`] is a `nodemesh_`-prefixed sub-registry of the process's registry
//! (served at `/metrics`); [`Controller::leadership`] tells a component whether this replica is
//! the leader, should it have leader-only work (e.g. root rotation).

pub mod leader;
pub mod metrics;
mod policies;
pub mod status;

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use kube::Client;
use prometheus_client::registry::Registry;
use tokio::{sync::watch, task::JoinSet};
use tracing::{error, info, warn};

use self::{
    leader::{Election, Leadership, LeaseOptions, LeaseOptionsError},
    metrics::ControllerMetrics,
    policies::StatusLoop,
};
use crate::{
    admin::{StatsState, serve_stats},
    metrics::{BuildInfo, MetricsRegistry, SharedRegistry, runtime::RuntimeCollector},
    readiness::Readiness,
};

/// The stats server's default address (istiod's monitoring port).
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15014);
/// The field manager of the controller's status writes.
pub const FIELD_MANAGER: &str = "nodemesh-controller";
/// Every policy is judged again this often even without a change (a write that was lost).
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);
/// How long components get to stop after shutdown starts.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub lease: LeaseOptions,
    /// Where mesh-wide policies live (the agents' `--root-namespace`).
    pub root_namespace: String,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    pub resync: Duration,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("bad leader-election settings: {0}")]
    Lease(#[from] LeaseOptionsError),
    #[error(
        "cannot listen on {addr} for /metrics, /healthz and /readyz: {source} (is another \
         process using the port? choose another with --metrics-addr)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Resolves once shutdown has started; clones share it.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Completes when shutdown starts (at once if it has).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    pub fn started(&self) -> bool {
        *self.0.borrow()
    }
}

type Component = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// The controller before it runs: components plug in here (see the module docs).
pub struct Controller {
    opts: ControllerOptions,
    client: Client,
    registry: MetricsRegistry,
    readiness: Readiness,
    metrics: ControllerMetrics,
    election: Election,
    stop: watch::Sender<bool>,
    components: Vec<(&'static str, Component)>,
}

impl Controller {
    pub fn new(client: Client, opts: ControllerOptions) -> Result<Self, ControllerError> {
        opts.lease.validate()?;
        let mut registry = MetricsRegistry::new(&BuildInfo::default());
        let metrics = ControllerMetrics::new(registry.nodemesh());
        let election = Election::new(client.clone(), opts.lease.clone());
        let (stop, _) = watch::channel(false);
        Ok(Controller {
            opts,
            client,
            registry,
            readiness: Readiness::new(),
            metrics,
            election,
            stop,
            components: Vec::new(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A new `nodemesh_`-prefixed sub-registry for one component's metrics.
    pub fn registry(&mut self) -> &mut Registry {
        self.registry.nodemesh()
    }

    /// Register gates here; `/readyz` is 200 once none is pending.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    pub fn leadership(&self) -> Leadership {
        self.election.leadership()
    }

    pub fn metrics(&self) -> &ControllerMetrics {
        &self.metrics
    }

    pub fn shutdown(&self) -> Shutdown {
        Shutdown(self.stop.subscribe())
    }

    /// Runs `component` with the controller; it should end soon after [`Controller::shutdown`]
    /// resolves. An error (or an early end) stops the whole controller with that error.
    pub fn add_component(
        &mut self,
        name: &'static str,
        component: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.components.push((name, Box::pin(component)));
    }

    /// Binds the stats server and starts everything.
    pub async fn start(self) -> Result<Running, ControllerError> {
        let Controller {
            opts,
            client,
            mut registry,
            readiness,
            metrics,
            election,
            stop,
            components,
        } = self;
        let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
            .await
            .map_err(|source| ControllerError::Bind {
                addr: opts.metrics_addr,
                source,
            })?;
        let metrics_addr = listener
            .local_addr()
            .map_err(|source| ControllerError::Bind {
                addr: opts.metrics_addr,
                source,
            })?;
        RuntimeCollector::register(registry.nodemesh(), tokio::runtime::Handle::current());
        let shutdown = Shutdown(stop.subscribe());
        let (stats_stop, stats_stopped) = watch::channel(false);
        let stats = tokio::spawn(serve_stats(
            listener,
            StatsState {
                registry: SharedRegistry::new(registry),
                readiness: readiness.clone(),
            },
            Shutdown(stats_stopped).wait(),
        ));

        let changed = Arc::new(tokio::sync::Notify::new());
        let (reflected, reflectors) = policies::reflect(&client, &metrics, &readiness, &changed);
        let status_loop = StatusLoop {
            client: client.clone(),
            reflected,
            root_namespace: opts.root_namespace.clone(),
            leadership: election.leadership(),
            metrics: metrics.clone(),
            changed,
            resync: opts.resync,
        };
        let mut core = JoinSet::new();
        core.spawn(status_loop.run(shutdown.clone()));
        let gate = readiness.register("leader-election");
        core.spawn(election.run(metrics.clone(), gate, shutdown.clone().wait()));

        let mut parts = JoinSet::new();
        for (name, component) in components {
            parts.spawn(async move { (name, component.await) });
        }
        info!(%metrics_addr, lease = %opts.lease.name, identity = %opts.lease.identity, "controller started");
        Ok(Running {
            metrics_addr,
            stop,
            stats_stop,
            stats,
            core,
            reflectors,
            parts,
        })
    }
}

/// A started controller.
pub struct Running {
    metrics_addr: SocketAddr,
    stop: watch::Sender<bool>,
    stats_stop: watch::Sender<bool>,
    stats: tokio::task::JoinHandle<()>,
    core: JoinSet<()>,
    reflectors: Vec<tokio::task::JoinHandle<()>>,
    parts: JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Running {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Runs until `signal` completes (or a component fails), then shuts down: writers stop,
    /// the Lease is released, components get [`STOP_GRACE`] to finish, the stats server stops
    /// last.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut result = Ok(());
        tokio::select! {
            () = signal => info!("shutting down"),
            Some(ended) = self.core.join_next() => {
                let e = anyhow::anyhow!(
                    "a controller task (status writer or leader election) ended unexpectedly: {ended:?}"
                );
                error!("{e:#}; shutting down");
                result = Err(e);
            }
            Some(ended) = self.parts.join_next(), if !self.parts.is_empty() => {
                result = match ended {
                    Ok((name, Ok(()))) => Err(anyhow::anyhow!("the {name} component stopped unexpectedly")),
                    Ok((name, Err(e))) => Err(e.context(format!("the {name} component failed"))),
                    Err(e) => Err(anyhow::anyhow!("a component panicked: {e}")),
                };
                if let Err(e) = &result {
                    error!("{e:#}; shutting down");
                }
            }
        }
        let _ = self.stop.send(true);
        let stopping = async {
            while let Some(r) = self.core.join_next().await {
                if let Err(e) = r {
                    warn!("a controller task ended abnormally: {e}");
                }
            }
            while let Some(r) = self.parts.join_next().await {
                match r {
                    Ok((name, Err(e))) => {
                        warn!("the {name} component failed while stopping: {e:#}")
                    }
                    Err(e) => warn!("a component ended abnormally: {e}"),
                    Ok(_) => {}
                }
            }
        };
        if tokio::time::timeout(STOP_GRACE, stopping).await.is_err() {
            warn!(grace = ?STOP_GRACE, "components still running after the grace period are dropped");
        }
        for r in &self.reflectors {
            r.abort();
        }
        let _ = self.stats_stop.send(true);
        let _ = self.stats.await;
        info!("controller stopped");
        result
    }
}

#[cfg(test)]
mod tests;
