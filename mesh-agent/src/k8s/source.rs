//! The Kubernetes source at run time: one kube-runtime reflector per kind, a debounced,
//! level-triggered recompute ([`super::convert::convert`] + [`ClusterModel::build`]) and the
//! models published on a `tokio::sync::watch` channel, like the local file's source.
//!
//! Invariants:
//! - Nothing is published before **every** store has synced (its first list completed), so a
//!   half-synced view never programs the maps. [`start`] returns with the first valid model.
//! - A watch error never clears anything: the watcher retries with kube's default backoff, and a
//!   relist (410 Gone, an apiserver restart) fills a side buffer that replaces the store's
//!   contents in one step at `InitDone` (kube-runtime 5's `Writer::apply_watcher_event`), so a
//!   recompute during a relist sees the old contents, never a half-empty store.
//! - An invalid model (only this node missing can make one) is logged with every error, counted
//!   as rejected, and the last good model stays published.
//! - A missing CRD (the list answers 404) is logged at every retry with what to install, and
//!   keeps the source unsynced (so the agent does not start and `/readyz` would say why).

use std::{
    collections::BTreeSet,
    fmt::Debug,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use super::{
    NetnsFinder, POLICY_GROUP, POLICY_VERSION,
    convert::{Settings, Snapshot, convert},
};
use crate::model::ClusterModel;

/// How long changes are collected before a recompute.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the model is recomputed without a change (local pods whose network namespace was
/// not found yet are looked up again).
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(5);
/// How often the kinds that have not synced yet are logged while [`start`] waits.
const PENDING_LOG_EVERY: Duration = Duration::from_secs(10);

/// How the source runs.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub settings: Settings,
    pub debounce: Duration,
    pub rescan: Duration,
}

impl SourceOptions {
    pub fn new(settings: Settings) -> Self {
        SourceOptions {
            settings,
            debounce: DEFAULT_DEBOUNCE,
            rescan: DEFAULT_RESCAN,
        }
    }
}

/// The source's progress, for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// Models computed (after the first).
    pub recomputes: u64,
    /// Models published after the first (a recompute that changes nothing publishes nothing).
    pub published: u64,
    /// Recomputes whose model was invalid (the last good one stayed).
    pub rejected: u64,
    /// The errors of the last recompute, `None` if it was valid.
    pub last_errors: Option<Arc<Vec<String>>>,
    /// Objects left out of (or degraded in) the last model, as `Kind ns/name: why`.
    pub skipped: Arc<Vec<String>>,
}

/// A running source. `models` always holds the last good model. Dropping it stops the
/// reflectors.
#[derive(Debug)]
pub struct K8sWatch {
    pub models: watch::Receiver<Arc<ClusterModel>>,
    pub status: watch::Receiver<SourceStatus>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for K8sWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The stores, readable while the reflectors write them.
#[derive(Clone)]
struct Stores {
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    authorization_policies: Store<DynamicObject>,
    peer_authentications: Store<DynamicObject>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            pods: self.pods.state(),
            nodes: self.nodes.state(),
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            authorization_policies: self.authorization_policies.state(),
            peer_authentications: self.peer_authentications.state(),
        }
    }
}

/// The `ApiResource` of one of nodemesh's policy CRDs.
pub fn policy_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(POLICY_GROUP, POLICY_VERSION, kind),
        plural,
    )
}

/// Kinds whose first list has not completed yet.
type Pending = Arc<Mutex<BTreeSet<&'static str>>>;

/// Starts the reflectors, waits until every store has synced and a valid model exists, and
/// returns the running source. Waits as long as that takes (a missing CRD or an unknown node
/// is logged repeatedly); the caller races it against its shutdown signal.
pub async fn start(client: Client, opts: SourceOptions, netns: Arc<dyn NetnsFinder>) -> K8sWatch {
    let changed = Arc::new(Notify::new());
    let pending: Pending = Arc::new(Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    macro_rules! typed {
        ($t:ty, $kind:literal) => {{
            let (store, writer) = reflector::store::<$t>();
            tasks.push(spawn_reflector(
                Api::<$t>::all(client.clone()),
                writer,
                $kind,
                changed.clone(),
                pending.clone(),
            ));
            store
        }};
    }
    let pods = typed!(Pod, "Pod");
    let nodes = typed!(Node, "Node");
    let namespaces = typed!(Namespace, "Namespace");
    let services = typed!(Service, "Service");
    let endpoint_slices = typed!(EndpointSlice, "EndpointSlice");
    let mut dynamic = |kind: &'static str, plural: &str| {
        let ar = policy_resource(kind, plural);
        let writer = Writer::<DynamicObject>::new(ar.clone());
        let store = writer.as_reader();
        tasks.push(spawn_reflector(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            writer,
            kind,
            changed.clone(),
            pending.clone(),
        ));
        store
    };
    let authorization_policies = dynamic("AuthorizationPolicy", "authorizationpolicies");
    let peer_authentications = dynamic("PeerAuthentication", "peerauthentications");
    let stores = Stores {
        pods,
        nodes,
        namespaces,
        services,
        endpoint_slices,
        authorization_policies,
        peer_authentications,
    };

    wait_synced(&stores, &pending).await;
    info!("every Kubernetes store has synced; computing the first model");

    let (status_tx, status) = watch::channel(SourceStatus::default());
    let netns2 = netns.clone();
    let first = loop {
        let outcome = recompute(&stores, &opts.settings, &netns2).await;
        report_skipped(&status_tx, &outcome.skipped);
        match outcome.model {
            Ok(model) => break model,
            Err(errors) => {
                for e in errors.iter() {
                    error!("Kubernetes model rejected: {e}");
                }
                error!(
                    "no valid model from Kubernetes yet; waiting for a change (is node `{}` in the cluster with an InternalIP?)",
                    opts.settings.node_name
                );
                status_tx.send_modify(|s| {
                    s.rejected += 1;
                    s.last_errors = Some(errors);
                });
                tokio::select! {
                    () = changed.notified() => {}
                    () = tokio::time::sleep(opts.rescan) => {}
                }
                tokio::time::sleep(opts.debounce).await;
            }
        }
    };
    for w in first.warnings() {
        warn!("Kubernetes model: {w}");
    }
    let (models_tx, models) = watch::channel(first);
    tasks.push(tokio::spawn(follow(
        stores, opts, netns, changed, models_tx, status_tx,
    )));
    K8sWatch {
        models,
        status,
        tasks,
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    writer: Writer<K>,
    kind: &'static str,
    changed: Arc<Notify>,
    pending: Pending,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(kind);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut K| o.managed_fields_mut().clear())
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if let watcher::Event::InitDone = event {
                        pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(kind);
                        if failing {
                            info!(kind, "Kubernetes watch recovered (relisted)");
                            failing = false;
                        }
                    }
                    // Init and InitApply change nothing readable (the store swaps at InitDone),
                    // so a recompute then would only repeat the last model.
                    if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        changed.notify_one();
                    }
                }
                Err(e) => {
                    failing = true;
                    log_watch_error(kind, &e);
                }
            }
        }
    })
}

fn log_watch_error(kind: &'static str, e: &watcher::Error) {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    match status {
        Some(404) if kind == "AuthorizationPolicy" || kind == "PeerAuthentication" => error!(
            kind,
            "the {kind} CRD ({POLICY_GROUP}/{POLICY_VERSION}) is not installed (the API server \
             answers 404): install the chart (its CRDs: charts/nodemesh/files/crds); the agent \
             waits for it and retries with backoff"
        ),
        Some(403) => error!(
            kind,
            error = %e,
            "the agent may not list/watch {kind} (403): check the agent's ClusterRole and \
             binding (charts/nodemesh); retrying with backoff"
        ),
        _ => {
            warn!(kind, error = %e, "Kubernetes watch failed; retrying with backoff (the current model stays)")
        }
    }
}

async fn wait_synced(stores: &Stores, pending: &Pending) {
    let all = async {
        // `wait_until_ready` errs only when the writer is dropped, i.e. never while the
        // reflector task runs.
        let _ = tokio::join!(
            stores.pods.wait_until_ready(),
            stores.nodes.wait_until_ready(),
            stores.namespaces.wait_until_ready(),
            stores.services.wait_until_ready(),
            stores.endpoint_slices.wait_until_ready(),
            stores.authorization_policies.wait_until_ready(),
            stores.peer_authentications.wait_until_ready(),
        );
    };
    let mut all = std::pin::pin!(all);
    loop {
        tokio::select! {
            () = &mut all => return,
            () = tokio::time::sleep(PENDING_LOG_EVERY) => {
                let kinds: Vec<&str> = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied()
                    .collect();
                warn!(?kinds, "waiting for the first list of these kinds before programming anything");
            }
        }
    }
}

struct Outcome {
    model: Result<Arc<ClusterModel>, Arc<Vec<String>>>,
    skipped: Vec<String>,
}

/// One recompute, off the async threads (the netns finder may scan `/proc`).
async fn recompute(stores: &Stores, settings: &Settings, netns: &Arc<dyn NetnsFinder>) -> Outcome {
    let stores = stores.clone();
    let settings = settings.clone();
    let netns = netns.clone();
    let run = move || {
        let converted = convert(&stores.snapshot(), &settings, netns.as_ref());
        let skipped = converted.skipped.iter().map(ToString::to_string).collect();
        let model = ClusterModel::build(&converted.input)
            .map(Arc::new)
            .map_err(|errors| Arc::new(errors.iter().map(ToString::to_string).collect()));
        Outcome { model, skipped }
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome {
            model: Err(Arc::new(vec![format!("the model computation failed: {e}")])),
            skipped: Vec::new(),
        },
    }
}

/// Logs the skipped objects when the list changes.
fn report_skipped(status: &watch::Sender<SourceStatus>, skipped: &[String]) {
    if status.borrow().skipped.as_slice() == skipped {
        return;
    }
    for s in skipped {
        warn!("Kubernetes object not (fully) in the model: {s}");
    }
    let skipped = Arc::new(skipped.to_vec());
    status.send_modify(|s| s.skipped = skipped);
}

async fn follow(
    stores: Stores,
    opts: SourceOptions,
    netns: Arc<dyn NetnsFinder>,
    changed: Arc<Notify>,
    models: watch::Sender<Arc<ClusterModel>>,
    status: watch::Sender<SourceStatus>,
) {
    let mut rescan = tokio::time::interval(opts.rescan);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await;
    loop {
        tokio::select! {
            () = changed.notified() => {}
            _ = rescan.tick() => {}
        }
        // Debounce: changes arriving meanwhile leave a permit in `changed`, and the state read
        // below includes them anyway (level-triggered).
        tokio::time::sleep(opts.debounce).await;
        if models.is_closed() {
            return;
        }
        let outcome = recompute(&stores, &opts.settings, &netns).await;
        report_skipped(&status, &outcome.skipped);
        match outcome.model {
            Ok(model) => {
                let was_rejected = status.borrow().last_errors.is_some();
                let changed = models.send_if_modified(|current| {
                    if **current == *model {
                        false
                    } else {
                        for w in model.warnings() {
                            if !current.warnings().contains(w) {
                                warn!("Kubernetes model: {w}");
                            }
                        }
                        *current = model;
                        true
                    }
                });
                if was_rejected {
                    info!("the Kubernetes model is valid again");
                }
                status.send_modify(|s| {
                    s.recomputes += 1;
                    s.published += u64::from(changed);
                    s.last_errors = None;
                });
            }
            Err(errors) => {
                let repeated = status
                    .borrow()
                    .last_errors
                    .as_ref()
                    .is_some_and(|last| *last == errors);
                if !repeated {
                    for e in errors.iter() {
                        error!("Kubernetes model rejected, keeping the last good one: {e}");
                    }
                }
                status.send_modify(|s| {
                    s.recomputes += 1;
                    s.rejected += 1;
                    s.last_errors = Some(errors);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{reflector, watcher::Event};

    fn pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
        }))
        .expect("a pod")
    }

    fn names(store: &reflector::Store<Pod>) -> Vec<String> {
        let mut v: Vec<String> = store
            .state()
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        v.sort();
        v
    }

    /// What the source relies on (kube-runtime 5): a relist (410 Gone, an API server restart)
    /// never shows a reader a partly filled store. The old contents stay readable until
    /// `InitDone` swaps the new list in whole, and then objects that disappeared meanwhile are
    /// gone.
    #[test]
    fn a_relist_replaces_the_store_in_one_step() {
        let (store, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&Event::Init);
        for p in ["a", "b", "c"] {
            writer.apply_watcher_event(&Event::InitApply(pod(p)));
        }
        assert!(
            names(&store).is_empty(),
            "nothing before the first InitDone"
        );
        writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(names(&store), ["a", "b", "c"]);

        // Relist: "b" was deleted while the watch was down, "d" created.
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(pod("a")));
        assert_eq!(
            names(&store),
            ["a", "b", "c"],
            "the old view during the relist"
        );
        writer.apply_watcher_event(&Event::InitApply(pod("c")));
        writer.apply_watcher_event(&Event::InitApply(pod("d")));
        assert_eq!(
            names(&store),
            ["a", "b", "c"],
            "the old view during the relist"
        );
        writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(names(&store), ["a", "c", "d"]);
    }
}
