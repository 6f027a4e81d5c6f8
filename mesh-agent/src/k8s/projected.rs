//! The Kubernetes objects as the source stores them: only the fields [`super::convert`] reads.
//!
//! Why: the reflectors keep every pod, node, namespace, Service and EndpointSlice of the cluster.
//! k8s-openapi's types hold every field of the API (a `Pod` is about 2 KB inline and each
//! `Container` another 2 KB before any string), and the API server fills many of them
//! (volumes, tolerations, conditions, annotations, `managedFields`). With 5,000 pods those
//! stores were the largest share of the source's memory (docs/performance.md, "Kubernetes
//! scale"). These types are what the watch responses are deserialized into directly, so the
//! whole object never exists in memory: serde skips every field not named here.
//!
//! Invariants:
//! - Field names, nesting and types mirror k8s-openapi's (a subset), so `convert` reads them the
//!   same way and the tests can project a full object ([`From`] impls, test builds only) and
//!   check that deserializing the API's JSON gives the same projection.
//! - `metadata` is k8s-openapi's `ObjectMeta` (kube's `Resource` needs it) but filled only with
//!   name, namespace, UID, resourceVersion (the watcher resumes from it), labels and the
//!   creation and deletion timestamps; annotations and `managedFields` are skipped while parsing.
//! - A field that `convert` starts to read must be added here first: it would otherwise be
//!   always empty. The unit tests below pin what each kind keeps.

use std::collections::BTreeMap;

use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, Deserializer, Serialize};

/// Deserializes only the metadata fields the source uses (see the module comment).
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Slim {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        creation_timestamp: Option<Time>,
        deletion_timestamp: Option<Time>,
    }
    let s = Slim::deserialize(d)?;
    Ok(ObjectMeta {
        name: s.name,
        namespace: s.namespace,
        uid: s.uid,
        resource_version: s.resource_version,
        labels: s.labels,
        creation_timestamp: s.creation_timestamp,
        deletion_timestamp: s.deletion_timestamp,
        ..Default::default()
    })
}

/// Implements k8s-openapi's `Resource` and `Metadata` (and so kube's `Resource`) for a
/// projection, with the API coordinates of the full type.
macro_rules! resource {
    ($own:ty, $full:ty) => {
        impl k8s_openapi::Resource for $own {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $own {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Pod

/// `v1/Pod`: identity, node, phase, addresses and the ports its probes use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
    #[serde(default)]
    pub status: Option<PodStatus>,
}
resource!(Pod, k8s_openapi::api::core::v1::Pod);
const _: () = assert_namespaced::<Pod>();

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`, still read when that is empty.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Option<Vec<Container>>,
}

/// A container: its named ports and its probes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub ports: Option<Vec<ContainerPort>>,
    /// Boxed: most containers have no probe, and three inline probes would triple the size.
    #[serde(default)]
    pub liveness_probe: Option<Box<Probe>>,
    #[serde(default)]
    pub readiness_probe: Option<Box<Probe>>,
    #[serde(default)]
    pub startup_probe: Option<Box<Probe>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub http_get: Option<PortAction>,
    #[serde(default)]
    pub tcp_socket: Option<PortAction>,
    #[serde(default)]
    pub grpc: Option<GrpcAction>,
}

/// `httpGet` and `tcpSocket` of a probe: where it connects.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PortAction {
    #[serde(default)]
    pub host: Option<String>,
    pub port: IntOrString,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct GrpcAction {
    pub port: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct PodIp {
    pub ip: String,
}

// ---------------------------------------------------------------------------------------------
// Node and Namespace

/// `v1/Node`: its addresses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Node {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<NodeStatus>,
}
resource!(Node, k8s_openapi::api::core::v1::Node);

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub addresses: Option<Vec<NodeAddress>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct NodeAddress {
    pub address: String,
    #[serde(rename = "type")]
    pub type_: String,
}

/// `v1/Namespace`: its labels (the enrollment label).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Namespace {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
}
resource!(Namespace, k8s_openapi::api::core::v1::Namespace);

// ---------------------------------------------------------------------------------------------
// Service and EndpointSlice

/// `v1/Service`: type, cluster IPs and ports.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Service {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceSpec>,
}
resource!(Service, k8s_openapi::api::core::v1::Service);
const _: () = assert_namespaced::<Service>();

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
}

/// `discovery.k8s.io/v1/EndpointSlice`: which pods are ready behind a Service, and its ports.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}
resource!(
    EndpointSlice,
    k8s_openapi::api::discovery::v1::EndpointSlice
);
const _: () = assert_namespaced::<EndpointSlice>();

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
}

/// The `targetRef` of an endpoint (an `ObjectReference` cut to what names a pod).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct TargetRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Compile-time check that a projection keeps its full type's scope (a namespaced kind must
/// stay namespaced, or `Api::namespaced` would not exist for it).
const fn assert_namespaced<K: k8s_openapi::Resource<Scope = NamespaceResourceScope>>() {}

// ---------------------------------------------------------------------------------------------
// Projections of full objects (tests: they check that the JSON path keeps the same fields).

#[cfg(test)]
mod from_full {
    use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};

    use super::*;

    fn meta(m: &ObjectMeta) -> ObjectMeta {
        ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            labels: m.labels.clone(),
            creation_timestamp: m.creation_timestamp.clone(),
            deletion_timestamp: m.deletion_timestamp.clone(),
            ..Default::default()
        }
    }

    fn port_action(host: &Option<String>, port: &IntOrString) -> PortAction {
        PortAction {
            host: host.clone(),
            port: port.clone(),
        }
    }

    fn probe(p: &core::Probe) -> Box<Probe> {
        Box::new(Probe {
            http_get: p.http_get.as_ref().map(|h| port_action(&h.host, &h.port)),
            tcp_socket: p.tcp_socket.as_ref().map(|t| port_action(&t.host, &t.port)),
            grpc: p.grpc.as_ref().map(|g| GrpcAction { port: g.port }),
        })
    }

    fn container(c: &core::Container) -> Container {
        Container {
            ports: c.ports.as_ref().map(|ps| {
                ps.iter()
                    .map(|p| ContainerPort {
                        name: p.name.clone(),
                        container_port: p.container_port,
                    })
                    .collect()
            }),
            liveness_probe: c.liveness_probe.as_ref().map(probe),
            readiness_probe: c.readiness_probe.as_ref().map(probe),
            startup_probe: c.startup_probe.as_ref().map(probe),
        }
    }

    impl From<&core::Pod> for Pod {
        fn from(p: &core::Pod) -> Self {
            Pod {
                metadata: meta(&p.metadata),
                spec: p.spec.as_ref().map(|s| PodSpec {
                    node_name: s.node_name.clone(),
                    host_network: s.host_network,
                    service_account_name: s.service_account_name.clone(),
                    service_account: s.service_account.clone(),
                    containers: s.containers.iter().map(container).collect(),
                    init_containers: s
                        .init_containers
                        .as_ref()
                        .map(|cs| cs.iter().map(container).collect()),
                }),
                status: p.status.as_ref().map(|s| PodStatus {
                    phase: s.phase.clone(),
                    pod_ip: s.pod_ip.clone(),
                    pod_ips: s
                        .pod_ips
                        .as_ref()
                        .map(|ips| ips.iter().map(|i| PodIp { ip: i.ip.clone() }).collect()),
                }),
            }
        }
    }

    impl From<&core::Node> for Node {
        fn from(n: &core::Node) -> Self {
            Node {
                metadata: meta(&n.metadata),
                status: n.status.as_ref().map(|s| NodeStatus {
                    addresses: s.addresses.as_ref().map(|a| {
                        a.iter()
                            .map(|a| NodeAddress {
                                address: a.address.clone(),
                                type_: a.type_.clone(),
                            })
                            .collect()
                    }),
                }),
            }
        }
    }

    impl From<&core::Namespace> for Namespace {
        fn from(n: &core::Namespace) -> Self {
            Namespace {
                metadata: meta(&n.metadata),
            }
        }
    }

    impl From<&core::Service> for Service {
        fn from(s: &core::Service) -> Self {
            Service {
                metadata: meta(&s.metadata),
                spec: s.spec.as_ref().map(|s| ServiceSpec {
                    type_: s.type_.clone(),
                    cluster_ip: s.cluster_ip.clone(),
                    cluster_ips: s.cluster_ips.clone(),
                    ports: s.ports.as_ref().map(|ps| {
                        ps.iter()
                            .map(|p| ServicePort {
                                name: p.name.clone(),
                                port: p.port,
                                protocol: p.protocol.clone(),
                                target_port: p.target_port.clone(),
                            })
                            .collect()
                    }),
                }),
            }
        }
    }

    impl From<&discovery::EndpointSlice> for EndpointSlice {
        fn from(s: &discovery::EndpointSlice) -> Self {
            EndpointSlice {
                metadata: meta(&s.metadata),
                address_type: s.address_type.clone(),
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| Endpoint {
                        conditions: e
                            .conditions
                            .as_ref()
                            .map(|c| EndpointConditions { ready: c.ready }),
                        target_ref: e.target_ref.as_ref().map(|t| TargetRef {
                            kind: t.kind.clone(),
                            name: t.name.clone(),
                            namespace: t.namespace.clone(),
                        }),
                    })
                    .collect(),
                ports: s.ports.as_ref().map(|ps| {
                    ps.iter()
                        .map(|p| EndpointPort {
                            name: p.name.clone(),
                            port: p.port,
                            protocol: p.protocol.clone(),
                        })
                        .collect()
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests;
