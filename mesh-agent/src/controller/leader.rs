//! Leader election over a `coordination.k8s.io/v1` Lease, with `kube-lease-manager`.
//!
//! Timing follows client-go's defaults: the Lease is valid for [`DEFAULT_LEASE_DURATION`]
//! (15 s) after each renewal, and the holder renews when [`DEFAULT_RENEW_DEADLINE`] (10 s) of it
//! are left, i.e. about every 5 s. A replica that is not the leader sleeps until the Lease
//! would expire, then takes it if it was not renewed (after a random wait of up to 1 s, so two
//! candidates rarely collide); so a killed leader is replaced within the Lease duration of its
//! last renewal, plus that second.
//!
//! Invariant: a replica writes only while it is sure it holds the Lease. [`Leadership`] is the
//! election's view (`true` from the moment the Lease is taken until a renewal finds another
//! holder or shutdown starts, when it turns `false` before the Lease is released), and
//! [`Leadership::confirm`] checks the Lease itself before writes: the library keeps saying
//! "leader" while renewals fail (the API server unreachable, or the Lease's RBAC removed), so a
//! write also needs the Lease to be held by us with [`SAFETY_MARGIN`] of validity left by its
//! own `renewTime`.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::metrics::{ControllerMetrics, code_of};
use crate::readiness::Gate;

/// How long a Lease is valid after its last renewal (client-go's `LeaseDuration`).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// The holder renews when this much validity is left (client-go's `RenewDeadline`).
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// A leader stops writing this long before its Lease would expire by its own `renewTime`
/// (covers the clock skew between replicas and a write in flight).
pub const SAFETY_MARGIN: Duration = Duration::from_secs(3);
/// The Lease's default name.
pub const DEFAULT_LEASE_NAME: &str = "nodemesh-controller";

/// Where and as whom to elect.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub name: String,
    pub namespace: String,
    /// This replica's identity in `holderIdentity` (the pod's name in a Deployment).
    pub identity: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
}

/// Why the election options are unusable.
#[derive(Debug, thiserror::Error)]
pub enum LeaseOptionsError {
    #[error(
        "the lease duration ({duration:?}) must be longer than the renew deadline \
         ({renew_deadline:?}), and both at least 1 s"
    )]
    Timing {
        duration: Duration,
        renew_deadline: Duration,
    },
    #[error("the lease name, namespace and identity must not be empty")]
    Empty,
}

impl LeaseOptions {
    pub fn validate(&self) -> Result<(), LeaseOptionsError> {
        if self.name.is_empty() || self.namespace.is_empty() || self.identity.is_empty() {
            return Err(LeaseOptionsError::Empty);
        }
        let (d, r) = (self.duration.as_secs(), self.renew_deadline.as_secs());
        if r == 0 || d <= r {
            return Err(LeaseOptionsError::Timing {
                duration: self.duration,
                renew_deadline: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// The default identity: `POD_NAME` (the downward API in the Deployment), else
/// `<hostname>-<pid>`.
pub fn default_identity(pod_name: Option<String>) -> String {
    if let Some(p) = pod_name.filter(|p| !p.is_empty()) {
        return p;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "nodemesh-controller".to_owned());
    format!("{host}-{}", std::process::id())
}

/// This replica's leadership, as seen by the election; clones share it.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    fence: Arc<Fence>,
}

#[derive(Debug)]
struct Fence {
    api: Api<Lease>,
    opts: LeaseOptions,
    /// Until when the last check of the Lease itself says we hold it.
    valid_until: Mutex<Option<Instant>>,
}

impl Leadership {
    /// The election's view: `true` while this replica is the leader.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when the election's view changes (or never, once the election has ended).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once this replica is the leader.
    pub async fn became_leader(&mut self) {
        if self.rx.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once this replica is no longer the leader.
    pub async fn lost(&mut self) {
        if self.rx.wait_for(|l| !*l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether this replica may write now: the election says leader, and the Lease itself
    /// (read again when the last read's validity has run out) is held by this replica with more
    /// than [`SAFETY_MARGIN`] left.
    pub async fn confirm(&self) -> bool {
        if !self.is_leader() {
            return false;
        }
        let now = Instant::now();
        if let Some(until) = *self
            .fence
            .valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            && now < until
        {
            return true;
        }
        let lease = match self.fence.api.get(&self.fence.opts.name).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot read the leader Lease; not writing until it can be read");
                return false;
            }
        };
        let left = held_for(&lease, &self.fence.opts.identity, SystemTime::now());
        match left.and_then(|l| l.checked_sub(SAFETY_MARGIN)) {
            Some(left) if !left.is_zero() && self.is_leader() => {
                *self
                    .fence
                    .valid_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(now + left);
                true
            }
            _ => {
                warn!(
                    lease = %self.fence.opts.name,
                    "the leader Lease was not renewed in time (or has another holder); not writing"
                );
                false
            }
        }
    }
}

/// How much longer `lease` is held by `identity` at `now`, by its own `renewTime` and duration.
pub fn held_for(lease: &Lease, identity: &str, now: SystemTime) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renew: SystemTime = spec.renew_time.as_ref()?.0.into();
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    (renew + duration).duration_since(now).ok()
}

/// The election's handles before it runs: [`Election::leadership`] can be given to components
/// first.
pub struct Election {
    client: Client,
    opts: LeaseOptions,
    tx: watch::Sender<bool>,
    leadership: Leadership,
}

impl Election {
    pub fn new(client: Client, opts: LeaseOptions) -> Self {
        let (tx, rx) = watch::channel(false);
        let fence = Arc::new(Fence {
            api: Api::namespaced(client.clone(), &opts.namespace),
            opts: opts.clone(),
            valid_until: Mutex::new(None),
        });
        Election {
            client,
            opts,
            tx,
            leadership: Leadership { rx, fence },
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Campaigns until `shutdown`: makes the Lease if it is missing (retrying with backoff;
    /// `gate` clears once the Lease could be read or made), then takes and renews it. On
    /// shutdown, stops being the leader (writers stop) and then releases the Lease.
    pub async fn run(
        self,
        metrics: ControllerMetrics,
        gate: Gate,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::new();
        let manager = loop {
            let build = LeaseManagerBuilder::new(self.client.clone(), &self.opts.name)
                .with_namespace(&self.opts.namespace)
                .with_identity(&self.opts.identity)
                // Unique per replica: the library detects a competing take-over as a
                // server-side-apply conflict between two field managers.
                .with_field_manager(format!("nodemesh-controller-{}", self.opts.identity))
                .with_duration(self.opts.duration.as_secs())
                .with_grace(self.opts.renew_deadline.as_secs())
                .build();
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                built = build => match built {
                    Ok(m) => break m,
                    Err(e) => {
                        self.report(&metrics, &e);
                        tokio::select! {
                            () = &mut shutdown => return,
                            () = backoff.sleep() => {}
                        }
                    }
                },
            }
        };
        gate.ready();
        info!(
            lease = %format!("{}/{}", self.opts.namespace, self.opts.name),
            identity = %self.opts.identity,
            "leader election started"
        );
        backoff = Backoff::new();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = manager.changed() => match changed {
                    Ok(leader) => {
                        backoff = Backoff::new();
                        self.publish(&metrics, leader);
                    }
                    Err(e) => {
                        self.report(&metrics, &e);
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = backoff.sleep() => {}
                        }
                    }
                },
            }
        }
        let was_leader = self.leadership.is_leader();
        self.publish(&metrics, false);
        if was_leader {
            release(&manager, &self.opts).await;
        }
    }

    fn publish(&self, metrics: &ControllerMetrics, leader: bool) {
        let was = self.tx.send_replace(leader);
        metrics.set_leader(leader);
        if was != leader {
            if leader {
                info!(identity = %self.opts.identity, "became the leader: writing policy status");
            } else {
                *self
                    .leadership
                    .fence
                    .valid_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                info!(identity = %self.opts.identity, "no longer the leader: stopped writing");
            }
        }
    }

    fn report(&self, metrics: &ControllerMetrics, e: &kube_lease_manager::LeaseManagerError) {
        let code = match e {
            kube_lease_manager::LeaseManagerError::KubeError(k) => code_of(k),
            _ => 0,
        };
        metrics.api_error("lease", "leases", code);
        let lease = format!("{}/{}", self.opts.namespace, self.opts.name);
        if code == 403 {
            error!(
                %lease,
                error = %e,
                "the controller may not use its leader Lease (403): it needs get, create and patch \
                 on leases.coordination.k8s.io in its namespace (the chart's controller Role); \
                 retrying with backoff"
            );
        } else {
            warn!(%lease, error = %e, "leader election failed; retrying with backoff");
        }
    }
}

/// Gives the Lease up so another replica need not wait for it to expire by the clock alone.
async fn release(manager: &LeaseManager, opts: &LeaseOptions) {
    match tokio::time::timeout(Duration::from_secs(5), manager.release()).await {
        Ok(Ok(())) => info!(lease = %opts.name, "released the leader Lease"),
        Ok(Err(e)) => {
            warn!(lease = %opts.name, error = %e, "cannot release the leader Lease; it expires by itself")
        }
        Err(_) => {
            warn!(lease = %opts.name, "releasing the leader Lease timed out; it expires by itself")
        }
    }
}

/// 1 s doubling to 30 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_secs(1))
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
    }
}
