//! The policy status writer: reflectors over both policy kinds (every replica, so a new leader
//! starts with synced caches), and a level-triggered loop that judges every policy
//! ([`super::status`]) and, on the leader only, writes the statuses that differ.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        reflector::{Store, store::Writer},
        watcher,
    },
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, error, info, warn};

use super::{
    FIELD_MANAGER, Shutdown,
    leader::Leadership,
    metrics::{ControllerMetrics, code_of},
    status::{PolicyKind, desired_status, key, status_patch, up_to_date, verdict},
};
use crate::{k8s::source::policy_resource, readiness::Readiness};

/// How long changes are collected before a pass.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The first wait after a failed write; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The reflected policies of one kind.
#[derive(Clone)]
pub(super) struct Reflected {
    kind: PolicyKind,
    store: Store<DynamicObject>,
}

/// Starts one reflector per policy kind. Each registers the readiness gate `<plural>-synced`,
/// cleared by its first complete list; `changed` is notified on every change.
pub(super) fn reflect(
    client: &Client,
    metrics: &ControllerMetrics,
    readiness: &Readiness,
    changed: &Arc<Notify>,
) -> (Vec<Reflected>, Vec<JoinHandle<()>>) {
    let mut reflected = Vec::new();
    let mut tasks = Vec::new();
    for kind in PolicyKind::ALL {
        let ar = policy_resource(kind.kind(), kind.plural());
        let writer = Writer::<DynamicObject>::new(ar.clone());
        reflected.push(Reflected {
            kind,
            store: writer.as_reader(),
        });
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        let gate = readiness.register(format!("{}-synced", kind.plural()));
        tasks.push(tokio::spawn(run_reflector(
            kind,
            api,
            writer,
            gate,
            metrics.clone(),
            changed.clone(),
        )));
    }
    (reflected, tasks)
}

async fn run_reflector(
    kind: PolicyKind,
    api: Api<DynamicObject>,
    writer: Writer<DynamicObject>,
    gate: crate::readiness::Gate,
    metrics: ControllerMetrics,
    changed: Arc<Notify>,
) {
    let mut gate = Some(gate);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut DynamicObject| o.managed_fields_mut().clear())
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone) && gate.take().is_some() {
                    info!(kind = kind.kind(), "policies listed; watching for changes");
                }
                changed.notify_one();
            }
            Err(e) => report_watch_error(kind, &e, &metrics),
        }
    }
}

fn report_watch_error(kind: PolicyKind, e: &watcher::Error, metrics: &ControllerMetrics) {
    let (operation, code) = match e {
        watcher::Error::InitialListFailed(k) => ("list", code_of(k)),
        watcher::Error::WatchStartFailed(k) | watcher::Error::WatchFailed(k) => {
            ("watch", code_of(k))
        }
        watcher::Error::WatchError(s) => ("watch", s.code),
        _ => ("watch", 0),
    };
    metrics.api_error(operation, kind.plural(), code);
    let kind_name = kind.kind();
    match code {
        404 => error!(
            kind = kind_name,
            "the {kind_name} CRD ({}/{}) is not installed (the API server answers 404): install \
             the chart (its CRDs: charts/nodemesh/files/crds); retrying with backoff",
            crate::crd::GROUP,
            crate::crd::VERSION
        ),
        403 => error!(
            kind = kind_name,
            error = %e,
            "the controller may not {operation} {} (403): check the controller's ClusterRole \
             and binding (charts/nodemesh); retrying with backoff",
            kind.plural()
        ),
        _ => warn!(kind = kind_name, error = %e, "policy watch failed; retrying with backoff"),
    }
}

/// What the status loop needs.
pub(super) struct StatusLoop {
    pub client: Client,
    pub reflected: Vec<Reflected>,
    pub root_namespace: String,
    pub leadership: Leadership,
    pub metrics: ControllerMetrics,
    pub changed: Arc<Notify>,
    pub resync: Duration,
}

impl StatusLoop {
    /// Runs until `shutdown`: waits for every store's first list, then one pass on every
    /// change, leadership change, failed-write retry and resync interval.
    pub(super) async fn run(self, shutdown: Shutdown) {
        let stop = shutdown.clone().wait();
        let mut stop = std::pin::pin!(stop);
        for r in &self.reflected {
            tokio::select! {
                () = &mut stop => return,
                // Errs only when the writer is dropped, i.e. the reflector task ended.
                _ = r.store.wait_until_ready() => {}
            }
        }
        // One receiver for the whole loop: `changed` marks what it has seen (a fresh clone
        // would report the same change again and again).
        let mut leadership = self.leadership.clone();
        let mut retry = FIRST_RETRY;
        loop {
            let failed = tokio::select! {
                () = &mut stop => return,
                failed = self.pass() => failed,
            };
            let wait = if failed {
                let w = retry;
                retry = (retry * 2).min(MAX_RETRY);
                w
            } else {
                retry = FIRST_RETRY;
                self.resync
            };
            tokio::select! {
                () = &mut stop => return,
                () = self.changed.notified() => {}
                () = leadership.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
            // Changes arriving meanwhile are read by the pass anyway (level-triggered).
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(DEBOUNCE) => {}
            }
        }
    }

    /// Judges every policy, counts them, and on the leader writes the statuses that differ.
    /// Returns whether a write failed.
    async fn pass(&self) -> bool {
        let now = Timestamp::now();
        let mut todo = Vec::new();
        for r in &self.reflected {
            let (mut accepted, mut refused) = (0, 0);
            for obj in r.store.state() {
                let v = verdict(r.kind, &obj, &self.root_namespace);
                if v.accepted {
                    accepted += 1;
                } else {
                    refused += 1;
                }
                let desired = desired_status(&obj, &v, now);
                if !up_to_date(&obj, &desired) {
                    todo.push((r.kind, obj, desired));
                }
            }
            self.metrics.set_policies(r.kind, accepted, refused);
        }
        if todo.is_empty() || !self.leadership.is_leader() {
            return false;
        }
        let mut failed = false;
        for (kind, obj, desired) in todo {
            if !self.leadership.confirm().await {
                // Not sure of the Lease: try again soon (or stop, if it is lost).
                return true;
            }
            let mut lost = self.leadership.clone();
            tokio::select! {
                biased;
                // Stop at once: the request in flight is dropped.
                () = lost.lost() => return failed,
                ok = self.write(kind, &obj, &desired) => failed |= !ok,
            }
        }
        failed
    }

    async fn write(
        &self,
        kind: PolicyKind,
        obj: &DynamicObject,
        desired: &crate::crd::PolicyStatus,
    ) -> bool {
        let ar = policy_resource(kind.kind(), kind.plural());
        let namespace = obj.namespace().unwrap_or_default();
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &namespace, &ar);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let body = status_patch(kind, desired);
        let object = format!("{} {}", kind.kind(), key(obj));
        match api
            .patch_status(&obj.name_any(), &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                self.metrics.status_write(kind, true);
                let condition = desired.conditions.first();
                debug!(
                    %object,
                    accepted = condition.map(|c| c.status.as_str()).unwrap_or_default(),
                    generation = ?desired.observed_generation,
                    "status written"
                );
                true
            }
            // Deleted since it was read: nothing to write.
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(e) => {
                let code = code_of(&e);
                self.metrics.status_write(kind, false);
                self.metrics
                    .api_error("status-patch", &format!("{}/status", kind.plural()), code);
                if code == 403 {
                    error!(
                        %object,
                        error = %e,
                        "the controller may not patch {}/status (403): check the controller's \
                         ClusterRole (charts/nodemesh); retrying with backoff",
                        kind.plural()
                    );
                } else {
                    warn!(%object, error = %e, "cannot write the policy's status; retrying with backoff");
                }
                false
            }
        }
    }
}
