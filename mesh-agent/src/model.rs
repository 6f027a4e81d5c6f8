//! The cluster model: nodes, workloads, services and compiled policies, validated and indexed,
//! and the queries the node agent and the tunnel ask of it.
//!
//! Pure bottom layer (no I/O, no async). A source (the local file today, Kubernetes later) fills
//! a [`spec::ClusterInput`]; [`ClusterModel::build`] checks it as a whole and reports every
//! problem at once, each naming the file, the object and the field; a valid model is immutable
//! and shared as `Arc<ClusterModel>`. A change means building a new model (level-triggered).
//!
//! Invariants of a built model: workload keys (namespace/name) are unique, every IP (workload
//! address or service VIP) belongs to exactly one object, every workload's node exists, every
//! service endpoint is an existing workload, `this_node` is one of `nodes`.

mod ids;
pub mod spec;
mod validate;

pub(crate) use validate::name_problem;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::policy::spec::Labels;
use crate::policy::{
    MtlsMode, MtlsResolution, PeerIdentity, PolicySet, ValidationError, WorkloadMeta,
};

pub use spec::{ClusterInput, FailMode, InvalidPolicies, Origin, Protocol, Sourced};

/// Names a workload or a service: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// The SPIFFE ID, as in the workload certificate's URI SAN.
    pub fn spiffe_id(&self) -> String {
        self.to_string()
    }

    /// The form the policy engine compares.
    pub fn to_peer(&self) -> PeerIdentity {
        PeerIdentity {
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A node and where its tunnel listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Other nodes dial `address:hbone_port`.
    pub address: IpAddr,
    pub tunnel_address: IpAddr,
    pub hbone_port: u16,
    pub outbound_port: u16,
    pub metrics_port: u16,
    pub admin_port: u16,
}

/// A validated workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub key: ObjectKey,
    pub service_account: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub node: String,
    pub identity: Identity,
    pub fail_mode: FailMode,
    /// Sorted, deduplicated.
    pub probe_ports: Vec<u16>,
    /// Stable number of this workload (see [`ClusterModel`] on numbering).
    pub id: u32,
    /// Stable number of its identity.
    pub identity_id: u32,
}

impl Workload {
    /// What the policy engine needs to know about the workload as a destination.
    pub fn meta(&self) -> WorkloadMeta {
        WorkloadMeta {
            namespace: self.key.namespace.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// One service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
}

/// A validated service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub vips: Vec<IpAddr>,
    /// Sorted by `port`.
    pub ports: Vec<ServicePort>,
    /// Resolved endpoints, sorted; may be empty when a selector matches nothing.
    pub endpoints: Vec<ObjectKey>,
}

impl Service {
    /// The target port for connections to `port` of a VIP.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
    }
}

/// What an IP address is in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A workload address: the workload, the node it runs on, its identity.
    Workload {
        workload: &'a Workload,
        node: &'a Node,
    },
    /// A service VIP with its endpoints (each with its node).
    Service {
        service: &'a Service,
        endpoints: EndpointIter<'a>,
    },
}

/// The endpoints of a service, each with the node it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointIter<'a> {
    model: &'a ClusterModel,
    keys: &'a [ObjectKey],
}

impl<'a> Iterator for EndpointIter<'a> {
    type Item = (&'a Workload, &'a Node);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some((first, rest)) = self.keys.split_first() {
            self.keys = rest;
            if let Some(w) = self.model.workloads.get(first)
                && let Some(n) = self.model.nodes.get(&w.node)
            {
                return Some((w, n));
            }
        }
        None
    }
}

/// The inputs for enrolling one workload of this node (enrollment, identity and mTLS maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub workload: ObjectKey,
    pub workload_id: u32,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    pub identity_id: u32,
    pub fail_mode: FailMode,
    /// The workload-wide mTLS mode (without port-level overrides) and the policy that set it.
    pub mtls: MtlsResolution,
    /// `portLevelMtls` overrides of the workload's PeerAuthentication.
    pub mtls_ports: BTreeMap<u16, MtlsMode>,
    pub probe_ports: Vec<u16>,
}

/// What is wrong with the input, where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ModelError {
    /// The file (and document) the object came from.
    pub file: String,
    /// Path of the field (`workloads[2].ips[0]`); empty for policy findings, whose own message
    /// carries the path.
    pub path: String,
    pub problem: Problem,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.file.is_empty(), self.path.is_empty()) {
            (false, false) => write!(f, "{}: {}: {}", self.file, self.path, self.problem),
            (false, true) => write!(f, "{}: {}", self.file, self.problem),
            (true, false) => write!(f, "{}: {}", self.path, self.problem),
            (true, true) => write!(f, "{}", self.problem),
        }
    }
}

/// The problems [`ClusterModel::build`] finds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no node is this node: set `thisNode` to one of the nodes' names (or pass --node)")]
    NoThisNode,
    #[error(
        "this node `{name}` is not among the nodes ({known}); add it to `nodes` or fix the name"
    )]
    UnknownThisNode { name: String, known: String },
    #[error("{what} is empty")]
    Empty { what: String },
    #[error("{owner}: {field} `{value}` {why}")]
    BadName {
        owner: String,
        field: String,
        value: String,
        why: &'static str,
    },
    #[error(
        "node `{name}`: address {ip} is already the address of node `{other}`; peers dial nodes by address"
    )]
    DuplicateNodeAddress {
        name: String,
        other: String,
        ip: IpAddr,
    },
    #[error("node `{name}` is defined twice (first at {first})")]
    DuplicateNode { name: String, first: String },
    #[error("workload {key} is defined twice (first at {first}); names are unique per namespace")]
    DuplicateWorkload { key: ObjectKey, first: String },
    #[error("service {key} is defined twice (first at {first}); names are unique per namespace")]
    DuplicateService { key: ObjectKey, first: String },
    #[error(
        "{owner}: address {ip} is already used by {other} ({first}); every address belongs to one workload or service"
    )]
    DuplicateAddress {
        owner: String,
        ip: IpAddr,
        other: String,
        first: String,
    },
    #[error("workload {workload} runs on node `{node}`, which is not among the nodes ({known})")]
    UnknownNode {
        workload: ObjectKey,
        node: String,
        known: String,
    },
    #[error(
        "workload {workload}: network namespace path `{path}` must be absolute (like /run/netns/NAME)"
    )]
    RelativeNetns { workload: ObjectKey, path: String },
    #[error("{owner}: port 0 is not a port; use 1 to 65535")]
    PortZero { owner: String },
    #[error("service {service}: port {port} is listed twice")]
    DuplicatePort { service: ObjectKey, port: u16 },
    #[error("service {service}: give `endpoints` (workload names) or `selector`, not both")]
    EndpointsAndSelector { service: ObjectKey },
    #[error("service {service}: give `endpoints` (workload names) or `selector` (matchLabels)")]
    NoEndpoints { service: ObjectKey },
    #[error("service {service}: endpoint `{name}` is not a workload in namespace `{namespace}`")]
    UnknownEndpoint {
        service: ObjectKey,
        namespace: String,
        name: String,
    },
    #[error(
        "service {service}: the selector matches no workload in namespace `{namespace}` (warning)"
    )]
    SelectorMatchesNothing {
        service: ObjectKey,
        namespace: String,
    },
    #[error("{policy} is defined twice; names are unique per kind and namespace")]
    DuplicatePolicy { policy: String },
    #[error("{0}")]
    Policy(ValidationError),
}

impl Problem {
    /// Whether the model can be used despite this problem.
    pub fn is_warning(&self) -> bool {
        match self {
            Problem::SelectorMatchesNothing { .. } => true,
            Problem::Policy(e) => e.severity == crate::policy::Severity::Warning,
            _ => false,
        }
    }
}

/// The validated cluster, indexed for the agent's and the tunnel's questions.
///
/// **Numbering**: workloads and identities get `u32` ids for eBPF maps. An id is derived from a
/// hash of the name (`namespace/name`, the SPIFFE ID); on a collision the later name in sorted
/// order takes the next free number. So ids are the same for the same set on every reload, and
/// in practice stay the same when other objects come and go. 0 is never used (it means
/// "unknown" in the maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterModel {
    this_node: Node,
    nodes: BTreeMap<String, Node>,
    workloads: BTreeMap<ObjectKey, Workload>,
    services: BTreeMap<ObjectKey, Service>,
    policies: PolicySet,
    addresses: BTreeMap<IpAddr, Owner>,
    identities: BTreeMap<Identity, u32>,
    warnings: Vec<ModelError>,
}

/// Who owns an address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Workload(ObjectKey),
    Service(ObjectKey),
}

impl ClusterModel {
    /// Validates the input as a whole. On failure, every error is returned (warnings are kept
    /// in the model on success, see [`ClusterModel::warnings`]).
    pub fn build(input: &ClusterInput) -> Result<ClusterModel, Vec<ModelError>> {
        validate::build(input)
    }

    /// The node this agent runs on.
    pub fn this_node(&self) -> &Node {
        &self.this_node
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// The other nodes (HBONE peers).
    pub fn peer_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .values()
            .filter(|n| n.name != self.this_node.name)
    }

    /// All workloads, by (namespace, name).
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    pub fn workload(&self, key: &ObjectKey) -> Option<&Workload> {
        self.workloads.get(key)
    }

    /// The workloads on this node, by (namespace, name).
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads
            .values()
            .filter(|w| w.node == self.this_node.name)
    }

    /// All services, by (namespace, name).
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key)
    }

    /// The compiled policies.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Findings that did not stop the model (policy warnings, selectors that match nothing).
    pub fn warnings(&self) -> &[ModelError] {
        &self.warnings
    }

    /// What `ip` is: a workload (with its node and identity) or a service VIP (with its
    /// endpoints). `None`: not in the mesh. IPv4-mapped IPv6 addresses are looked up as IPv4.
    pub fn lookup(&self, ip: IpAddr) -> Option<Destination<'_>> {
        let ip = ip.to_canonical();
        match self.addresses.get(&ip)? {
            Owner::Workload(key) => {
                let workload = self.workloads.get(key)?;
                let node = self.nodes.get(&workload.node)?;
                Some(Destination::Workload { workload, node })
            }
            Owner::Service(key) => {
                let service = self.services.get(key)?;
                Some(Destination::Service {
                    service,
                    endpoints: self.endpoints(service),
                })
            }
        }
    }

    /// The endpoints of `service`, each with its node.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> EndpointIter<'a> {
        EndpointIter {
            model: self,
            keys: &service.endpoints,
        }
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        match self.lookup(ip)? {
            Destination::Workload { workload, .. } => Some(workload),
            Destination::Service { .. } => None,
        }
    }

    /// Every workload address in the mesh with the number of its workload's identity (the
    /// contents of the kernel's IP → identity map), sorted by address.
    pub fn address_identities(&self) -> impl Iterator<Item = (IpAddr, u32)> + '_ {
        self.addresses.iter().filter_map(|(ip, owner)| match owner {
            Owner::Workload(key) => self.workloads.get(key).map(|w| (*ip, w.identity_id)),
            Owner::Service(_) => None,
        })
    }

    /// Every identity in the mesh with its stable number, sorted by identity.
    pub fn identities(&self) -> impl Iterator<Item = (&Identity, u32)> {
        self.identities.iter().map(|(i, id)| (i, *id))
    }

    pub fn identity_id(&self, identity: &Identity) -> Option<u32> {
        self.identities.get(identity).copied()
    }

    /// The enrollment inputs of this node's workloads, by (namespace, name).
    pub fn enrollments(&self) -> Vec<Enrollment> {
        self.local_workloads()
            .map(|w| {
                let meta = w.meta();
                Enrollment {
                    workload: w.key.clone(),
                    workload_id: w.id,
                    netns: w.netns.clone(),
                    ips: w.ips.clone(),
                    identity: w.identity.clone(),
                    identity_id: w.identity_id,
                    fail_mode: w.fail_mode,
                    mtls: self.policies.mtls_mode(&meta, 0),
                    mtls_ports: self.policies.mtls_port_overrides(&meta),
                    probe_ports: w.probe_ports.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
