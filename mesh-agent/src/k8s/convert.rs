//! The pure step: the reflectors' stores (a [`Snapshot`]) → a [`ClusterInput`].
//!
//! No I/O and no async; the one question that needs the node (where a local pod's network
//! namespace is) goes through [`NetnsFinder`]. The result is built so that
//! [`crate::model::ClusterModel::build`] accepts it whenever this node exists: every object the
//! model would refuse (a pod on a node without an address, two pods claiming one IP, a Service
//! whose VIP is a pod's) is left out here and reported in [`Converted::skipped`], so one odd
//! object never blocks every other change. Invalid policies are kept and enforced fail-closed
//! ([`InvalidPolicies::FailClosed`]).
//!
//! Rules (also in `docs/kubernetes-mode.md`):
//! - A pod is a workload when its namespace has [`ENROLL_LABEL`]`=`[`ENROLL_ENABLED`], the pod
//!   does not have [`ENROLL_LABEL`]`=`[`ENROLL_DISABLED`], it is not `hostNetwork`, its phase is
//!   `Pending` or `Running`, it has a node and at least one IP. Identity:
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccountName or "default">`.
//! - Probe ports: the `httpGet`/`tcpSocket`/`grpc` ports of every container's liveness,
//!   readiness and startup probes, named ports resolved in the container's own ports.
//! - A Service needs a ClusterIP (headless and ExternalName services are not in the mesh) and a
//!   TCP port; `targetPort` by number, or by name through the EndpointSlices' ports (which the
//!   EndpointSlice controller resolved), else through the endpoint pods' container ports.
//!   Endpoints: EndpointSlices labelled `kubernetes.io/service-name`, endpoints not marked
//!   `ready: false`, whose `targetRef` is a pod that is a workload.
//! - Nodes: the first IPv4 InternalIP (else the first InternalIP) is the HBONE address.
//! - Objects whose names the model would refuse ([`crate::model`]'s DNS-name rule: Node names,
//!   pod names, namespaces and service accounts, Service names), and a second object of one
//!   kind with the same name (Nodes, pods, Services, policies), are left out and reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{ResourceExt, api::DynamicObject};

use super::{
    ENROLL_DISABLED, ENROLL_ENABLED, ENROLL_LABEL, NetnsFinder,
    projected::{Container, EndpointSlice, Namespace, Node, Pod, Probe, Service},
};
use crate::{
    model::{
        ClusterInput, FailMode, InvalidPolicies, Origin, Protocol, Sourced, name_problem,
        spec::{NodeSpec, ServicePortSpec, ServiceSpec, WorkloadSpec},
    },
    policy::spec::{
        API_VERSION, Action, AuthorizationPolicy, AuthorizationPolicySpec, Labels, MtlsModeSpec,
        MutualTls, ObjectMeta, PeerAuthentication, PeerAuthenticationSpec, Rule, WorkloadSelector,
    },
};

/// The `netns` of workloads on other nodes: never opened (only this node's pods are enrolled),
/// but the model wants an absolute path.
pub const REMOTE_NETNS: &str = "/nonexistent/nodemesh/pod-on-another-node";
/// The `netns` of a pod of this node whose namespace was not found yet: opening it fails, so the
/// agent leaves the pod unenrolled (and says so) until a later model carries the real path.
pub const NETNS_NOT_FOUND: &str = "/nonexistent/nodemesh/netns-not-found-yet";
/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The contents of every store at one moment (the objects as [`super::projected`] keeps them).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<DynamicObject>>,
    pub peer_authentications: Vec<Arc<DynamicObject>>,
}

/// What the agent knows that the API server does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// This node's name (`spec.nodeName` of its pods; `NODE_NAME`).
    pub node_name: String,
    /// This node's tunnel address (the connect hook's redirect target). Other nodes' tunnel
    /// addresses are node-local and never dialled; the model gets the same value for them.
    pub tunnel_address: IpAddr,
    pub trust_domain: String,
    /// Root namespace of the policies; `None`: `nodemesh-system`.
    pub root_namespace: Option<String>,
    /// Ports of every node's agent (one DaemonSet, so the same on every node).
    pub hbone_port: u16,
    pub outbound_port: u16,
    pub metrics_port: u16,
    pub admin_port: u16,
    pub fail_mode: FailMode,
}

impl Settings {
    /// Defaults for everything but the node's name and tunnel address.
    pub fn new(node_name: impl Into<String>, tunnel_address: IpAddr) -> Self {
        use crate::model::spec::*;
        Settings {
            node_name: node_name.into(),
            tunnel_address,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: None,
            hbone_port: DEFAULT_HBONE_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            metrics_port: DEFAULT_METRICS_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            fail_mode: FailMode::default(),
        }
    }
}

/// An object left out of the model (or kept in a degraded form), and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `Pod shop/web-1`, `Service shop/web`, `Node n1`, `AuthorizationPolicy shop/deny`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// The result of [`convert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub input: ClusterInput,
    /// Sorted.
    pub skipped: Vec<Skipped>,
}

/// Converts the stores' contents (see the module comment for the rules).
pub fn convert(snap: &Snapshot, settings: &Settings, netns: &dyn NetnsFinder) -> Converted {
    let mut skipped = Vec::new();
    let mut input = ClusterInput {
        this_node: Some(settings.node_name.clone()),
        root_namespace: settings.root_namespace.clone(),
        invalid_policies: InvalidPolicies::FailClosed,
        ..Default::default()
    };
    input.nodes = nodes(snap, settings, &mut skipped);
    let node_names: BTreeSet<&str> = input.nodes.iter().map(|n| n.spec.name.as_str()).collect();
    let (workloads, pods_by_key) = workloads(snap, settings, netns, &node_names, &mut skipped);
    input.workloads = workloads;
    input.services = services(snap, &input.workloads, &pods_by_key, &mut skipped);
    input.authorization_policies = authorization_policies(snap, &mut skipped);
    input.peer_authentications = peer_authentications(snap, &mut skipped);
    skipped.sort();
    skipped.dedup();
    Converted { input, skipped }
}

/// The first of `fields` the model would refuse as a name, as a skip reason (the API server
/// validates names, so only a broken or hostile source sends such an object; it is left out
/// rather than blocking the model).
fn bad_names(fields: &[(&str, &str)]) -> Option<String> {
    fields.iter().find_map(|(field, value)| {
        name_problem(value).map(|why| format!("{field} `{value}` {why}; left out"))
    })
}

fn skip(skipped: &mut Vec<Skipped>, object: impl Into<String>, reason: impl Into<String>) {
    skipped.push(Skipped {
        object: object.into(),
        reason: reason.into(),
    });
}

/// Records `(namespace, name)` of an object of one kind; a second object with a name already seen
/// is left out (skipped, saying so) and this returns false.
fn first_of_its_name(
    seen: &mut BTreeSet<(String, String)>,
    namespace: &str,
    name: &str,
    kind: &str,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> bool {
    let first = seen.insert((namespace.to_owned(), name.to_owned()));
    if !first {
        skip(
            skipped,
            object,
            format!("another {kind} object has this name; left out"),
        );
    }
    first
}

fn key_of<K: kube::Resource>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn sorted<K: kube::Resource>(objs: &[Arc<K>]) -> Vec<&Arc<K>> {
    let mut v: Vec<&Arc<K>> = objs.iter().collect();
    v.sort_by_key(|o| key_of(o.as_ref()));
    v
}

fn nodes(
    snap: &Snapshot,
    settings: &Settings,
    skipped: &mut Vec<Skipped>,
) -> Vec<Sourced<NodeSpec>> {
    let mut out: Vec<Sourced<NodeSpec>> = Vec::new();
    for node in sorted(&snap.nodes) {
        let name = node.name_any();
        let object = format!("Node {name}");
        if let Some(why) = name_problem(&name) {
            skip(
                skipped,
                object,
                format!("the name `{name}` {why}; left out"),
            );
            continue;
        }
        if out.iter().any(|n| n.spec.name == name) {
            skip(
                skipped,
                object,
                "another Node object has this name; left out",
            );
            continue;
        }
        let internal: Vec<IpAddr> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        let Some(address) = internal
            .iter()
            .find(|ip| ip.is_ipv4())
            .or(internal.first())
            .copied()
        else {
            skip(
                skipped,
                object,
                "no InternalIP in status.addresses: peers cannot dial it, so its pods are left \
                 out until it has one",
            );
            continue;
        };
        if let Some(other) = out.iter().find(|n| n.spec.address == address) {
            skip(
                skipped,
                object,
                format!(
                    "InternalIP {address} is already node `{}`'s; its pods are left out",
                    other.spec.name
                ),
            );
            continue;
        }
        out.push(Sourced {
            origin: Origin::new(object, ""),
            spec: NodeSpec {
                name,
                address,
                tunnel_address: settings.tunnel_address,
                hbone_port: settings.hbone_port,
                outbound_port: settings.outbound_port,
                metrics_port: settings.metrics_port,
                admin_port: settings.admin_port,
            },
        });
    }
    out
}

/// A pod that passed the filters, before duplicate addresses are settled.
struct Candidate<'a> {
    pod: &'a Pod,
    spec: WorkloadSpec,
    /// Newer pods win an address (the kubelet reuses an IP only after the old sandbox is gone,
    /// so the older claimant is a pod whose status is stale).
    rank: (bool, Option<k8s_openapi::jiff::Timestamp>),
}

type PodsByKey<'a> = BTreeMap<(String, String), &'a Pod>;

fn workloads<'a>(
    snap: &'a Snapshot,
    settings: &Settings,
    netns: &dyn NetnsFinder,
    node_names: &BTreeSet<&str>,
    skipped: &mut Vec<Skipped>,
) -> (Vec<Sourced<WorkloadSpec>>, PodsByKey<'a>) {
    let enrolled: BTreeSet<String> = snap
        .namespaces
        .iter()
        .filter(|ns| ns.labels().get(ENROLL_LABEL).map(String::as_str) == Some(ENROLL_ENABLED))
        .map(|ns| ns.name_any())
        .collect();
    let mut candidates: Vec<Candidate<'a>> = Vec::new();
    let mut seen = BTreeSet::new();
    for pod in sorted(&snap.pods) {
        let (namespace, name) = key_of(pod.as_ref());
        let object = format!("Pod {namespace}/{name}");
        if !enrolled.contains(&namespace)
            || pod.labels().get(ENROLL_LABEL).map(String::as_str) == Some(ENROLL_DISABLED)
        {
            continue;
        }
        let Some(spec) = &pod.spec else { continue };
        let status = pod.status.as_ref();
        if spec.host_network == Some(true) {
            continue;
        }
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        if phase != "Pending" && phase != "Running" {
            continue;
        }
        let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
            continue;
        };
        let mut texts: Vec<&str> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .collect();
        if texts.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
        {
            texts.push(ip);
        }
        let mut ips = Vec::new();
        for t in texts {
            match t.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip.to_canonical()) => ips.push(ip.to_canonical()),
                Ok(_) => {}
                Err(_) => skip(
                    skipped,
                    object.clone(),
                    format!("status.podIPs: `{t}` is not an IP address; ignored"),
                ),
            }
        }
        if ips.is_empty() {
            if phase == "Running" {
                skip(skipped, object, "running without an IP in status.podIPs");
            }
            continue;
        }
        if !node_names.contains(node.as_str()) {
            skip(
                skipped,
                object,
                format!(
                    "runs on node `{node}`, which is not known (no Node object with an \
                     InternalIP); left out until it is"
                ),
            );
            continue;
        }
        let netns = if node == settings.node_name {
            let uid = pod.uid().unwrap_or_default();
            match netns.netns_of(&uid) {
                Ok(path) => path,
                Err(why) => {
                    skip(
                        skipped,
                        object.clone(),
                        format!(
                            "not enrolled yet: its network namespace was not found ({why}); \
                             looked up again on the next recompute"
                        ),
                    );
                    PathBuf::from(NETNS_NOT_FOUND)
                }
            }
        } else {
            PathBuf::from(REMOTE_NETNS)
        };
        let service_account = spec
            .service_account_name
            .clone()
            .or_else(|| spec.service_account.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        if let Some(problem) = bad_names(&[
            ("name", &name),
            ("namespace", &namespace),
            ("serviceAccountName", &service_account),
        ]) {
            skip(skipped, object, problem);
            continue;
        }
        if !first_of_its_name(&mut seen, &namespace, &name, "Pod", &object, skipped) {
            continue;
        }
        let labels: Labels = pod.labels().clone();
        candidates.push(Candidate {
            pod,
            rank: (
                pod.metadata.deletion_timestamp.is_none(),
                pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            ),
            spec: WorkloadSpec {
                name,
                namespace,
                service_account,
                labels,
                ips,
                netns,
                node,
                trust_domain: settings.trust_domain.clone(),
                fail_mode: settings.fail_mode,
                probe_ports: probe_ports(
                    spec.containers
                        .iter()
                        .chain(spec.init_containers.iter().flatten()),
                ),
            },
        });
    }

    // Every address belongs to one workload: the best-ranked claimant keeps it.
    let mut owner: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        for ip in &c.spec.ips {
            match owner.get(ip) {
                Some(&j) if candidates[j].rank >= c.rank => {}
                _ => {
                    owner.insert(*ip, i);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut by_key = BTreeMap::new();
    for (i, c) in candidates.into_iter().enumerate() {
        let object = format!("Pod {}/{}", c.spec.namespace, c.spec.name);
        if let Some(ip) = c
            .spec
            .ips
            .iter()
            .find(|ip| owner.get(ip).is_some_and(|&j| j != i))
        {
            skip(
                skipped,
                object,
                format!(
                    "address {ip} is also claimed by a newer pod; left out (its status is \
                     probably stale)"
                ),
            );
            continue;
        }
        by_key.insert((c.spec.namespace.clone(), c.spec.name.clone()), c.pod);
        out.push(Sourced {
            origin: Origin::new(object, ""),
            spec: c.spec,
        });
    }
    (out, by_key)
}

/// The plaintext ports the kubelet probes (sorted, deduplicated).
fn probe_ports<'a>(containers: impl Iterator<Item = &'a Container>) -> Vec<u16> {
    let mut out = BTreeSet::new();
    for c in containers {
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            out.extend(probe_port(c, probe));
        }
    }
    out.into_iter().collect()
}

fn probe_port(c: &Container, probe: &Probe) -> Option<u16> {
    if let Some(h) = &probe.http_get {
        // A probe with its own host goes elsewhere, not to the pod.
        if h.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        return container_port(c, &h.port);
    }
    if let Some(t) = &probe.tcp_socket {
        if t.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        return container_port(c, &t.port);
    }
    probe
        .grpc
        .as_ref()
        .and_then(|g| u16::try_from(g.port).ok())
        .filter(|p| *p != 0)
}

/// A port number, or a port name resolved in the container's ports.
fn container_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0),
    }
}

fn services(
    snap: &Snapshot,
    workloads: &[Sourced<WorkloadSpec>],
    pods: &PodsByKey<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<Sourced<ServiceSpec>> {
    let mut taken: BTreeMap<IpAddr, String> = workloads
        .iter()
        .flat_map(|w| {
            w.spec
                .ips
                .iter()
                .map(|ip| (*ip, format!("Pod {}/{}", w.spec.namespace, w.spec.name)))
        })
        .collect();
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in sorted(&snap.endpoint_slices) {
        if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
            slices
                .entry((s.namespace().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(s);
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    'services: for svc in sorted(&snap.services) {
        let (namespace, name) = key_of(svc.as_ref());
        let object = format!("Service {namespace}/{name}");
        if let Some(problem) = bad_names(&[("name", &name), ("namespace", &namespace)]) {
            skip(skipped, object, problem);
            continue;
        }
        if !first_of_its_name(&mut seen, &namespace, &name, "Service", &object, skipped) {
            continue;
        }
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let texts: Vec<&str> = match &spec.cluster_ips {
            Some(v) if !v.is_empty() => v.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        let mut vips = Vec::new();
        for t in texts {
            if t.is_empty() || t == "None" {
                continue;
            }
            match t.parse::<IpAddr>() {
                Ok(ip) => vips.push(ip.to_canonical()),
                Err(_) => skip(
                    skipped,
                    object.clone(),
                    format!("spec.clusterIPs: `{t}` is not an IP address; ignored"),
                ),
            }
        }
        if vips.is_empty() {
            // Headless: clients connect to pod addresses, which are in the mesh already.
            continue;
        }
        for ip in &vips {
            if let Some(other) = taken.get(ip) {
                skip(
                    skipped,
                    object,
                    format!("ClusterIP {ip} is also {other}'s address; the service is left out"),
                );
                continue 'services;
            }
        }

        // Ready endpoints that are workloads.
        let own_slices = slices
            .get(&(namespace.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut endpoints = BTreeSet::new();
        for slice in own_slices {
            if slice.address_type == "FQDN" {
                continue;
            }
            for ep in &slice.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                let Some(target) = &ep.target_ref else {
                    continue;
                };
                if target.kind.as_deref().is_some_and(|k| k != "Pod") {
                    continue;
                }
                let Some(pod) = &target.name else { continue };
                let pod_ns = target
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone());
                if pod_ns == namespace && pods.contains_key(&(pod_ns, pod.clone())) {
                    endpoints.insert(pod.clone());
                }
            }
        }

        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let target_port = match &p.target_port {
                None => Some(port),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(target)) => named_target_port(
                    p.name.as_deref(),
                    target,
                    own_slices,
                    &endpoints,
                    &namespace,
                    pods,
                ),
            };
            match target_port.filter(|t| *t != 0) {
                Some(t) if port != 0 => ports.push(ServicePortSpec {
                    port,
                    target_port: Some(t),
                    protocol: Protocol::Tcp,
                }),
                _ => skip(
                    skipped,
                    object.clone(),
                    format!(
                        "spec.ports[{i}]: target port {:?} cannot be resolved yet (no endpoint \
                         names it); the port is left out",
                        p.target_port
                    ),
                ),
            }
        }
        if ports.is_empty() {
            continue;
        }
        for ip in &vips {
            taken.insert(*ip, object.clone());
        }
        out.push(Sourced {
            origin: Origin::new(object, ""),
            spec: ServiceSpec {
                name,
                namespace,
                vips,
                ports,
                endpoints: Some(endpoints.into_iter().collect()),
                selector: None,
            },
        });
    }
    out
}

/// A named `targetPort`: the number the EndpointSlice controller wrote for the service port's
/// name, else the number of the first endpoint pod that has a container port of that name.
fn named_target_port(
    service_port_name: Option<&str>,
    target: &str,
    slices: &[&EndpointSlice],
    endpoints: &BTreeSet<String>,
    namespace: &str,
    pods: &PodsByKey<'_>,
) -> Option<u16> {
    let from_slices = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.name.as_deref().unwrap_or("") == service_port_name.unwrap_or(""))
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .find_map(|p| p.port.and_then(|n| u16::try_from(n).ok()));
    from_slices.or_else(|| {
        endpoints.iter().find_map(|pod| {
            let pod = pods.get(&(namespace.to_owned(), pod.clone()))?;
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(target))
                .and_then(|p| u16::try_from(p.container_port).ok())
        })
    })
}

/// The object as the policy types expect it: typed header, name and namespace, spec.
fn policy_json(obj: &DynamicObject, kind: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": obj.name_any(),
            "namespace": obj.namespace().unwrap_or_default(),
        },
        "spec": obj.data.get("spec").cloned().unwrap_or(serde_json::json!({})),
    })
}

/// An `AuthorizationPolicy` object as the policy engine reads it (also the controller's
/// validation, so both judge a policy the same way). An error: the object does not fit the
/// policy types (the agents then enforce a stand-in, see `authorization_policies`).
pub fn read_authorization_policy(
    obj: &DynamicObject,
) -> Result<AuthorizationPolicy, serde_json::Error> {
    serde_json::from_value(policy_json(obj, "AuthorizationPolicy"))
}

/// A `PeerAuthentication` object as the policy engine reads it (see
/// [`read_authorization_policy`]).
pub fn read_peer_authentication(
    obj: &DynamicObject,
) -> Result<PeerAuthentication, serde_json::Error> {
    serde_json::from_value(policy_json(obj, "PeerAuthentication"))
}

/// `spec.selector.matchLabels` read leniently (for a stand-in): `None` when absent or unreadable,
/// which widens the stand-in to the whole namespace (fail closed).
fn lenient_selector(obj: &DynamicObject) -> Option<WorkloadSelector> {
    let labels = obj.data.get("spec")?.get("selector")?.get("matchLabels")?;
    serde_json::from_value::<Labels>(labels.clone())
        .ok()
        .map(|match_labels| WorkloadSelector { match_labels })
}

fn meta(obj: &DynamicObject) -> ObjectMeta {
    ObjectMeta {
        name: obj.name_any(),
        namespace: obj.namespace().unwrap_or_default(),
    }
}

fn authorization_policies(
    snap: &Snapshot,
    skipped: &mut Vec<Skipped>,
) -> Vec<Sourced<AuthorizationPolicy>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for obj in sorted(&snap.authorization_policies) {
        let (namespace, name) = key_of(obj.as_ref());
        let object = format!("AuthorizationPolicy {namespace}/{name}");
        if !first_of_its_name(
            &mut seen,
            &namespace,
            &name,
            "AuthorizationPolicy",
            &object,
            skipped,
        ) {
            continue;
        }
        let spec = match read_authorization_policy(obj) {
            Ok(p) => p,
            Err(e) => {
                let action = obj
                    .data
                    .get("spec")
                    .and_then(|s| s.get("action"))
                    .and_then(|a| a.as_str());
                if action == Some("AUDIT") {
                    skip(
                        skipped,
                        object,
                        format!(
                            "cannot be read ({e}); an AUDIT policy never changes a decision, so it is left out"
                        ),
                    );
                    continue;
                }
                skip(
                    skipped,
                    object.clone(),
                    format!(
                        "cannot be read ({e}); enforced as DENY of every connection to the \
                         workloads it selects until it is fixed"
                    ),
                );
                AuthorizationPolicy {
                    api_version: Some(API_VERSION.to_owned()),
                    kind: Some("AuthorizationPolicy".to_owned()),
                    metadata: meta(obj),
                    spec: AuthorizationPolicySpec {
                        selector: lenient_selector(obj),
                        action: Action::Deny,
                        rules: Some(vec![Rule::default()]),
                        ..Default::default()
                    },
                    status: None,
                }
            }
        };
        out.push(Sourced {
            origin: Origin::new(object, ""),
            spec,
        });
    }
    out
}

fn peer_authentications(
    snap: &Snapshot,
    skipped: &mut Vec<Skipped>,
) -> Vec<Sourced<PeerAuthentication>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for obj in sorted(&snap.peer_authentications) {
        let (namespace, name) = key_of(obj.as_ref());
        let object = format!("PeerAuthentication {namespace}/{name}");
        if !first_of_its_name(
            &mut seen,
            &namespace,
            &name,
            "PeerAuthentication",
            &object,
            skipped,
        ) {
            continue;
        }
        let spec = match read_peer_authentication(obj) {
            Ok(p) => p,
            Err(e) => {
                skip(
                    skipped,
                    object.clone(),
                    format!(
                        "cannot be read ({e}); enforced as STRICT for the workloads it selects \
                         until it is fixed"
                    ),
                );
                PeerAuthentication {
                    api_version: Some(API_VERSION.to_owned()),
                    kind: Some("PeerAuthentication".to_owned()),
                    metadata: meta(obj),
                    spec: PeerAuthenticationSpec {
                        selector: lenient_selector(obj),
                        mtls: Some(MutualTls {
                            mode: MtlsModeSpec::Strict,
                        }),
                        port_level_mtls: None,
                    },
                    status: None,
                }
            }
        };
        out.push(Sourced {
            origin: Origin::new(object, ""),
            spec,
        });
    }
    out
}

#[cfg(test)]
mod tests;
