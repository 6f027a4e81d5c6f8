//! The cluster as a source writes it: nodes, workloads and services, field for field as in the
//! local file (`docs/local-mode.md`), before any cross-object check. Values with a type (IP
//! addresses, ports, modes) are checked by the parser, so a bad value is reported with its line
//! and column; everything that needs more than one object is checked by [`super::ClusterModel::build`].

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, de};

use crate::policy::spec::{AuthorizationPolicy, Labels, PeerAuthentication, WorkloadSelector};

/// Default trust domain of a workload's SPIFFE identity.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default HBONE (inbound mTLS) port.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// Default outbound capture port on the tunnel address.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default metrics and health port.
pub const DEFAULT_METRICS_PORT: u16 = 15020;
/// Default admin port (localhost).
pub const DEFAULT_ADMIN_PORT: u16 = 15000;

/// Where an object was written, for error messages: `lab.yaml: workloads[2]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// The file, with the document number when it is not the first (`lab.yaml (document 2)`).
    pub file: String,
    /// The object's path in its document (`workloads[2]`), empty for a whole document.
    pub path: String,
}

impl Origin {
    pub fn new(file: impl Into<String>, path: impl Into<String>) -> Self {
        Origin {
            file: file.into(),
            path: path.into(),
        }
    }
}

/// An object with the place it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub origin: Origin,
    pub spec: T,
}

/// Everything a source provides, merged: the input of [`super::ClusterModel::build`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterInput {
    /// The node this agent runs on. Several sources may name it, as long as they agree
    /// (checked by the source); `None` is an error.
    pub this_node: Option<String>,
    /// Root namespace of the policies; `None`: `nodemesh-system`.
    pub root_namespace: Option<String>,
    pub nodes: Vec<Sourced<NodeSpec>>,
    pub workloads: Vec<Sourced<WorkloadSpec>>,
    pub services: Vec<Sourced<ServiceSpec>>,
    pub authorization_policies: Vec<Sourced<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Sourced<PeerAuthentication>>,
    /// What an invalid policy does to the model.
    pub invalid_policies: InvalidPolicies,
}

/// What [`super::ClusterModel::build`] does with a policy that does not validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InvalidPolicies {
    /// The whole input is rejected (the local file: its author is at the keyboard, and the
    /// last good model keeps serving).
    #[default]
    Reject,
    /// The model is built; the policy engine enforces the invalid policy fail-closed (an
    /// invalid ALLOW, DENY or CUSTOM policy denies every connection to the workloads it
    /// selects, an invalid PeerAuthentication counts as STRICT, see `docs/policy.md`), and its
    /// findings are kept with the warnings. For sources where one object's author must not
    /// block everybody else's changes (Kubernetes).
    FailClosed,
}

/// A node: where its tunnel listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// The address other nodes dial for HBONE.
    #[serde(deserialize_with = "ip_one")]
    pub address: IpAddr,
    /// The node-local address the connect hook redirects enrolled pods to.
    #[serde(deserialize_with = "ip_one")]
    pub tunnel_address: IpAddr,
    #[serde(default = "default_hbone_port")]
    pub hbone_port: u16,
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    #[serde(default = "default_metrics_port")]
    pub metrics_port: u16,
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
}

fn default_hbone_port() -> u16 {
    DEFAULT_HBONE_PORT
}
fn default_outbound_port() -> u16 {
    DEFAULT_OUTBOUND_PORT
}
fn default_metrics_port() -> u16 {
    DEFAULT_METRICS_PORT
}
fn default_admin_port() -> u16 {
    DEFAULT_ADMIN_PORT
}
fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

/// What the connect hook does for an enrolled workload when the tunnel is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Connections are refused (ECONNREFUSED): never a silent plaintext bypass. The default.
    #[default]
    Closed,
    /// Connections go out unmodified (plaintext, unauthorized).
    Open,
}

/// A workload (a pod).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: Labels,
    /// IPv4 and/or IPv6 addresses.
    #[serde(deserialize_with = "ip_list")]
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace (`/run/netns/NAME`); must be absolute.
    pub netns: PathBuf,
    /// The node the workload runs on.
    pub node: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Ports reachable in plaintext even under STRICT mTLS (kubelet probes).
    #[serde(default)]
    pub probe_ports: Vec<u16>,
}

/// Service protocol; only TCP is carried by the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

/// One service port: connections to `VIP:port` go to `endpoint:targetPort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

/// A service: virtual IPs in front of endpoints, named (`endpoints`) or selected by label
/// (`selector`), both in the service's namespace. Exactly one of the two is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    #[serde(deserialize_with = "ip_list")]
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// Workload names in the service's namespace.
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
}

/// Parses a list of addresses with a message that quotes the bad one (the parser adds the line,
/// column and path): `invalid IP address "10.0.0.300"`.
fn ip_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpAddr>, D::Error> {
    Vec::<IpText>::deserialize(deserializer).map(|v| v.into_iter().map(|i| i.0).collect())
}

fn ip_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
    IpText::deserialize(deserializer).map(|i| i.0)
}

/// An IP address written as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpText(pub IpAddr);

impl<'de> Deserialize<'de> for IpText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The check runs inside the visitor, so the parser attaches the scalar's own line,
        // column and path to the error (not the enclosing list's).
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = IpText;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an IP address")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<IpText, E> {
                text.parse().map(IpText).map_err(|_| {
                    E::custom(format_args!(
                        "invalid IP address {text:?} (expected IPv4 like 10.0.0.1 or IPv6 like \
                         fd00::1)"
                    ))
                })
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}
