//! Kubernetes as the source of the cluster model (`mesh-agent node`).
//!
//! Layering (STYLE.md 6a): [`convert`] is pure (Kubernetes objects → [`crate::model::ClusterInput`],
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

/// Finds the network namespace of a pod of this node from its UID.
///
/// The seam between the pure conversion and the node's `/proc`: the real finder (the kubelet's
/// cgroup names in `/proc/*/cgroup`, then `/proc/PID/ns/net`) lives in `crate::podns`; tests use
/// [`FixedNetns`]. An error means "not found yet": the pod is left unenrolled and looked up
/// again on the next recompute (at the latest after the source's re-scan interval).
pub trait NetnsFinder: Send + Sync {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String>;
}

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

/// A [`NetnsFinder`] that finds nothing: pods of this node are never enrolled. Used until the
/// real finder (`crate::podns`) is wired (see `cli::run_node`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNetns;

impl NetnsFinder for NoNetns {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        Err(format!(
            "no pod network-namespace finder is configured (pod UID {pod_uid})"
        ))
    }
}
