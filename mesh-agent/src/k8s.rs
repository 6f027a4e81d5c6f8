//! Kubernetes as the source of the cluster model (`mesh-agent node`).
//!
//! Layering (STYLE.md 6a): [`projected`] holds the objects as the stores keep them (only the
//! fields the conversion reads, deserialized straight from the API's JSON); [`convert`] is pure (Kubernetes objects → [`crate::model::ClusterInput`],
//! no I/O, no async) and sits just above the model; [`source`] runs the kube-runtime reflectors
//! and publishes models on the same `tokio::sync::watch` channel the local file's source uses;
//! `app` wires it. Nothing here names the app, the tunnel or the data path.
//!
//! What the reflectors watch, and why (every kind cluster-wide):
//! - Pods: every pod's IPs and service account (the IP → identity map, routing to the right
//!   node); this node's pods are enrolled.
//! - Nodes: InternalIP → the node's HBONE address.
//! - Namespaces: the enrollment label [`ENROLL_LABEL`]`=`[`ENROLL_ENABLED`].
//! - Services and EndpointSlices (`discovery.k8s.io/v1`): VIPs, ports, ready endpoints.
//! - `security.nodemesh.io/v1alpha1` AuthorizationPolicy and PeerAuthentication, read as
//!   `DynamicObject`s and deserialized into [`crate::policy::spec`]'s types.
//!
//! Enrollment rules, skipped objects and invalid policies: `docs/kubernetes-mode.md`.

pub mod convert;
pub mod projected;
pub mod source;

use std::path::PathBuf;

/// Namespace label that enrolls the namespace's pods (value [`ENROLL_ENABLED`]); the same label
/// on a pod with value [`ENROLL_DISABLED`] opts that pod out.
pub const ENROLL_LABEL: &str = "nodemesh.io/dataplane";
/// Value of [`ENROLL_LABEL`] on a namespace that enrolls its pods.
pub const ENROLL_ENABLED: &str = "enabled";
/// Value of [`ENROLL_LABEL`] on a pod that opts out of an enrolled namespace.
pub const ENROLL_DISABLED: &str = "disabled";
/// The API group of nodemesh's policy CRDs.
pub const POLICY_GROUP: &str = "security.nodemesh.io";
/// The version of nodemesh's policy CRDs.
pub const POLICY_VERSION: &str = "v1alpha1";

/// Finds the network namespace of a pod of this node from its UID: the seam between the pure
/// conversion and the node's `/proc` ([`crate::podns::ProcScanner`] on a real node; tests use
/// [`FixedNetns`]). An error means "not found yet": the pod is left unenrolled and looked up
/// again on the next recompute (at the latest after the source's re-scan interval).
pub use crate::podns::NetnsFinder;

/// A [`NetnsFinder`] with a fixed table (tests, and setups where a pod's namespace is known
/// beforehand, such as the lab's `/run/netns/NAME`).
#[derive(Debug, Clone, Default)]
pub struct FixedNetns(pub std::collections::BTreeMap<String, PathBuf>);

impl NetnsFinder for FixedNetns {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        self.0
            .get(pod_uid)
            .cloned()
            .ok_or_else(|| format!("no network namespace known for pod UID {pod_uid}"))
    }
}

/// A [`NetnsFinder`] that finds nothing: pods of this node are never enrolled (a node that only
/// routes, and tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNetns;

impl NetnsFinder for NoNetns {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        Err(format!(
            "no pod network-namespace finder is configured (pod UID {pod_uid})"
        ))
    }
}

/// A [`NetnsFinder`] reading `<dir>/<pod UID>` (a namespace file bind-mounted there, as
/// `ip netns` does under `/run/netns`). Checks only that the file exists; opening it is the
/// agent's job (and a failure there is retried too).
#[derive(Debug, Clone)]
pub struct DirNetns(pub PathBuf);

impl NetnsFinder for DirNetns {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        // A UID is a UUID; anything with a path separator is not one.
        if pod_uid.is_empty() || pod_uid.contains('/') || pod_uid.starts_with('.') {
            return Err(format!("`{pod_uid}` is not a pod UID"));
        }
        let path = self.0.join(pod_uid);
        if path.exists() {
            Ok(path)
        } else {
            Err(format!("{} does not exist", path.display()))
        }
    }
}

/// Why the API client cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes client configuration: pass --kubeconfig, set KUBECONFIG, or run in a pod \
         with a service account"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// The API client: from `kubeconfig` when given, else kube's inference (KUBECONFIG,
/// `~/.kube/config`, the in-cluster service account).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClientError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Client)
}
