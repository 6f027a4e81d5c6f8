//! [`ClusterModel::build`]: every cross-object check, all problems collected at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::spec::{ClusterInput, InvalidPolicies, Origin, Sourced};
use super::{
    ClusterModel, Identity, ModelError, Node, ObjectKey, Owner, Problem, Service, ServicePort,
    Workload, ids,
};
use crate::policy::spec::{AuthorizationPolicy, PeerAuthentication};
use crate::policy::{DEFAULT_ROOT_NAMESPACE, PolicyKind, PolicyRef, PolicySet};

struct Errors(Vec<ModelError>);

impl Errors {
    fn push(&mut self, origin: &Origin, field: &str, problem: Problem) {
        let path = match (origin.path.is_empty(), field.is_empty()) {
            (true, _) => field.to_owned(),
            (false, true) => origin.path.clone(),
            (false, false) => format!("{}.{field}", origin.path),
        };
        self.0.push(ModelError {
            file: origin.file.clone(),
            path,
            problem,
        });
    }
}

fn at(origin: &Origin) -> String {
    match (origin.file.is_empty(), origin.path.is_empty()) {
        (false, false) => format!("{}: {}", origin.file, origin.path),
        (false, true) => origin.file.clone(),
        _ => origin.path.clone(),
    }
}

fn known(names: &BTreeMap<String, Node>) -> String {
    if names.is_empty() {
        return "none defined".to_owned();
    }
    names
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why `value` is not a name the model accepts, or `None` when it is. Names, namespaces,
/// service accounts and trust domains go into SPIFFE IDs, paths and logs: they follow
/// Kubernetes' DNS-name rule (a `/` or a space would make an identity ambiguous). The
/// Kubernetes conversion uses it to leave out objects the model would refuse.
pub(crate) fn name_problem(value: &str) -> Option<&'static str> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if value.is_empty() {
        Some("is empty")
    } else if value.len() > 253 {
        Some("is longer than 253 characters")
    } else if !value.bytes().all(|b| alnum(b) || b == b'-' || b == b'.') {
        Some("may contain only lowercase letters, digits, `-` and `.` (Kubernetes' name rule)")
    } else if !value.bytes().next().is_some_and(alnum) || !value.bytes().last().is_some_and(alnum) {
        Some("must start and end with a lowercase letter or digit")
    } else {
        None
    }
}

fn check_name(errors: &mut Errors, origin: &Origin, field: &str, value: &str, owner: &str) {
    let Some(why) = name_problem(value) else {
        return;
    };
    errors.push(
        origin,
        field,
        Problem::BadName {
            owner: owner.to_owned(),
            field: field.to_owned(),
            value: value.to_owned(),
            why,
        },
    );
}

pub(super) fn build(input: &ClusterInput) -> Result<ClusterModel, Vec<ModelError>> {
    let mut errors = Errors(Vec::new());
    let mut warnings = Errors(Vec::new());
    let top = Origin::default();

    // Nodes.
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut node_origin: BTreeMap<String, &Origin> = BTreeMap::new();
    for Sourced { origin, spec } in &input.nodes {
        check_name(&mut errors, origin, "name", &spec.name, "node");
        for (field, port) in [
            ("hbonePort", spec.hbone_port),
            ("outboundPort", spec.outbound_port),
            ("metricsPort", spec.metrics_port),
            ("adminPort", spec.admin_port),
        ] {
            if port == 0 {
                errors.push(
                    origin,
                    field,
                    Problem::PortZero {
                        owner: format!("node `{}`", spec.name),
                    },
                );
            }
        }
        if let Some(other) = nodes
            .values()
            .find(|n| n.address == spec.address.to_canonical())
        {
            errors.push(
                origin,
                "address",
                Problem::DuplicateNodeAddress {
                    name: spec.name.clone(),
                    other: other.name.clone(),
                    ip: other.address,
                },
            );
        }
        if let Some(first) = node_origin.get(&spec.name) {
            errors.push(
                origin,
                "name",
                Problem::DuplicateNode {
                    name: spec.name.clone(),
                    first: at(first),
                },
            );
            continue;
        }
        node_origin.insert(spec.name.clone(), origin);
        nodes.insert(
            spec.name.clone(),
            Node {
                name: spec.name.clone(),
                address: spec.address.to_canonical(),
                tunnel_address: spec.tunnel_address.to_canonical(),
                hbone_port: spec.hbone_port,
                outbound_port: spec.outbound_port,
                metrics_port: spec.metrics_port,
                admin_port: spec.admin_port,
            },
        );
    }
    let this_node = match &input.this_node {
        None => {
            errors.push(&top, "thisNode", Problem::NoThisNode);
            None
        }
        Some(name) => match nodes.get(name) {
            Some(n) => Some(n.clone()),
            None => {
                errors.push(
                    &top,
                    "thisNode",
                    Problem::UnknownThisNode {
                        name: name.clone(),
                        known: known(&nodes),
                    },
                );
                None
            }
        },
    };

    // Workloads.
    let mut addresses: BTreeMap<IpAddr, (Owner, String, String)> = BTreeMap::new();
    let mut workloads: BTreeMap<ObjectKey, Workload> = BTreeMap::new();
    let mut workload_origin: BTreeMap<ObjectKey, &Origin> = BTreeMap::new();
    for Sourced { origin, spec } in &input.workloads {
        let key = ObjectKey::new(&spec.namespace, &spec.name);
        let owner = format!("workload {key}");
        check_name(&mut errors, origin, "name", &spec.name, &owner);
        check_name(&mut errors, origin, "namespace", &spec.namespace, &owner);
        check_name(
            &mut errors,
            origin,
            "serviceAccount",
            &spec.service_account,
            &owner,
        );
        check_name(
            &mut errors,
            origin,
            "trustDomain",
            &spec.trust_domain,
            &owner,
        );
        if spec.ips.is_empty() {
            errors.push(
                origin,
                "ips",
                Problem::Empty {
                    what: format!("{owner}: the list of IPs"),
                },
            );
        }
        if !spec.netns.is_absolute() {
            errors.push(
                origin,
                "netns",
                Problem::RelativeNetns {
                    workload: key.clone(),
                    path: spec.netns.display().to_string(),
                },
            );
        }
        if !nodes.contains_key(&spec.node) {
            errors.push(
                origin,
                "node",
                Problem::UnknownNode {
                    workload: key.clone(),
                    node: spec.node.clone(),
                    known: known(&nodes),
                },
            );
        }
        for (i, port) in spec.probe_ports.iter().enumerate() {
            if *port == 0 {
                errors.push(
                    origin,
                    &format!("probePorts[{i}]"),
                    Problem::PortZero {
                        owner: owner.clone(),
                    },
                );
            }
        }
        if let Some(first) = workload_origin.get(&key) {
            errors.push(
                origin,
                "name",
                Problem::DuplicateWorkload {
                    key,
                    first: at(first),
                },
            );
            continue;
        }
        let mut ips = Vec::new();
        for (i, ip) in spec.ips.iter().enumerate() {
            let ip = ip.to_canonical();
            claim(
                &mut errors,
                &mut addresses,
                origin,
                &format!("ips[{i}]"),
                ip,
                Owner::Workload(key.clone()),
                &owner,
            );
            ips.push(ip);
        }
        let mut probe_ports = spec.probe_ports.clone();
        probe_ports.sort_unstable();
        probe_ports.dedup();
        workload_origin.insert(key.clone(), origin);
        workloads.insert(
            key.clone(),
            Workload {
                identity: Identity {
                    trust_domain: spec.trust_domain.clone(),
                    namespace: spec.namespace.clone(),
                    service_account: spec.service_account.clone(),
                },
                key,
                service_account: spec.service_account.clone(),
                labels: spec.labels.clone(),
                ips,
                netns: spec.netns.clone(),
                node: spec.node.clone(),
                fail_mode: spec.fail_mode,
                probe_ports,
                id: 0,
                identity_id: 0,
            },
        );
    }

    // Services.
    let mut services: BTreeMap<ObjectKey, Service> = BTreeMap::new();
    let mut service_origin: BTreeMap<ObjectKey, &Origin> = BTreeMap::new();
    for Sourced { origin, spec } in &input.services {
        let key = ObjectKey::new(&spec.namespace, &spec.name);
        let owner = format!("service {key}");
        check_name(&mut errors, origin, "name", &spec.name, &owner);
        check_name(&mut errors, origin, "namespace", &spec.namespace, &owner);
        if spec.vips.is_empty() {
            errors.push(
                origin,
                "vips",
                Problem::Empty {
                    what: format!("{owner}: the list of VIPs"),
                },
            );
        }
        if spec.ports.is_empty() {
            errors.push(
                origin,
                "ports",
                Problem::Empty {
                    what: format!("{owner}: the list of ports"),
                },
            );
        }
        let mut ports: Vec<ServicePort> = Vec::new();
        for (i, p) in spec.ports.iter().enumerate() {
            let target_port = p.target_port.unwrap_or(p.port);
            if p.port == 0 {
                errors.push(
                    origin,
                    &format!("ports[{i}].port"),
                    Problem::PortZero {
                        owner: owner.clone(),
                    },
                );
            }
            if target_port == 0 {
                errors.push(
                    origin,
                    &format!("ports[{i}].targetPort"),
                    Problem::PortZero {
                        owner: owner.clone(),
                    },
                );
            }
            if ports.iter().any(|q| q.port == p.port) {
                errors.push(
                    origin,
                    &format!("ports[{i}].port"),
                    Problem::DuplicatePort {
                        service: key.clone(),
                        port: p.port,
                    },
                );
                continue;
            }
            ports.push(ServicePort {
                port: p.port,
                target_port,
                protocol: p.protocol,
            });
        }
        ports.sort_by_key(|p| p.port);
        let mut endpoints = BTreeSet::new();
        match (&spec.endpoints, &spec.selector) {
            (Some(_), Some(_)) => errors.push(
                origin,
                "selector",
                Problem::EndpointsAndSelector {
                    service: key.clone(),
                },
            ),
            (None, None) => errors.push(
                origin,
                "endpoints",
                Problem::NoEndpoints {
                    service: key.clone(),
                },
            ),
            (Some(names), None) => {
                for (i, name) in names.iter().enumerate() {
                    let endpoint = ObjectKey::new(&spec.namespace, name);
                    if workloads.contains_key(&endpoint) {
                        endpoints.insert(endpoint);
                    } else {
                        errors.push(
                            origin,
                            &format!("endpoints[{i}]"),
                            Problem::UnknownEndpoint {
                                service: key.clone(),
                                namespace: spec.namespace.clone(),
                                name: name.clone(),
                            },
                        );
                    }
                }
            }
            (None, Some(selector)) => {
                endpoints.extend(
                    workloads
                        .values()
                        .filter(|w| {
                            w.key.namespace == spec.namespace
                                && selector
                                    .match_labels
                                    .iter()
                                    .all(|(k, v)| w.labels.get(k) == Some(v))
                        })
                        .map(|w| w.key.clone()),
                );
                if endpoints.is_empty() {
                    warnings.push(
                        origin,
                        "selector",
                        Problem::SelectorMatchesNothing {
                            service: key.clone(),
                            namespace: spec.namespace.clone(),
                        },
                    );
                }
            }
        }
        if let Some(first) = service_origin.get(&key) {
            errors.push(
                origin,
                "name",
                Problem::DuplicateService {
                    key,
                    first: at(first),
                },
            );
            continue;
        }
        let mut vips = Vec::new();
        for (i, ip) in spec.vips.iter().enumerate() {
            let ip = ip.to_canonical();
            claim(
                &mut errors,
                &mut addresses,
                origin,
                &format!("vips[{i}]"),
                ip,
                Owner::Service(key.clone()),
                &owner,
            );
            vips.push(ip);
        }
        service_origin.insert(key.clone(), origin);
        services.insert(
            key.clone(),
            Service {
                key,
                vips,
                ports,
                endpoints: endpoints.into_iter().collect(),
            },
        );
    }

    // Policies.
    let root = input
        .root_namespace
        .as_deref()
        .unwrap_or(DEFAULT_ROOT_NAMESPACE);
    let authz: Vec<AuthorizationPolicy> = input
        .authorization_policies
        .iter()
        .map(|p| p.spec.clone())
        .collect();
    let peer: Vec<PeerAuthentication> = input
        .peer_authentications
        .iter()
        .map(|p| p.spec.clone())
        .collect();
    let mut policy_origin: BTreeMap<PolicyRef, &Origin> = BTreeMap::new();
    for p in &input.authorization_policies {
        policy_origin
            .entry(policy_ref(
                PolicyKind::AuthorizationPolicy,
                &p.spec.metadata,
            ))
            .or_insert(&p.origin);
    }
    for p in &input.peer_authentications {
        policy_origin
            .entry(policy_ref(PolicyKind::PeerAuthentication, &p.spec.metadata))
            .or_insert(&p.origin);
    }
    let (policies, findings) = PolicySet::compile(root, &authz, &peer);
    for finding in findings {
        let file = policy_origin
            .get(&finding.policy)
            .map(|o| o.file.clone())
            .unwrap_or_default();
        // A source that names objects like the policy engine does (`AuthorizationPolicy ns/name`)
        // would otherwise print the name twice.
        let file = if file == finding.policy.to_string() {
            String::new()
        } else {
            file
        };
        let error = ModelError {
            file,
            path: String::new(),
            problem: Problem::Policy(finding),
        };
        if error.problem.is_warning() || input.invalid_policies == InvalidPolicies::FailClosed {
            warnings.0.push(error);
        } else {
            errors.0.push(error);
        }
    }
    let mut seen_policies: BTreeSet<PolicyRef> = BTreeSet::new();
    for (kind, origin, meta) in input
        .authorization_policies
        .iter()
        .map(|p| (PolicyKind::AuthorizationPolicy, &p.origin, &p.spec.metadata))
        .chain(
            input
                .peer_authentications
                .iter()
                .map(|p| (PolicyKind::PeerAuthentication, &p.origin, &p.spec.metadata)),
        )
    {
        let r = policy_ref(kind, meta);
        if !seen_policies.insert(r.clone()) {
            errors.push(
                origin,
                "metadata.name",
                Problem::DuplicatePolicy {
                    policy: r.to_string(),
                },
            );
        }
    }

    let Some(this_node) = this_node else {
        return Err(errors.0);
    };
    if !errors.0.is_empty() {
        return Err(errors.0);
    }

    // Numbering.
    let workload_ids = ids::number(&workloads.keys().cloned().collect(), ToString::to_string);
    let identity_ids = ids::number(
        &workloads.values().map(|w| w.identity.clone()).collect(),
        Identity::spiffe_id,
    );
    for w in workloads.values_mut() {
        w.id = workload_ids.get(&w.key).copied().unwrap_or_default();
        w.identity_id = identity_ids.get(&w.identity).copied().unwrap_or_default();
    }

    Ok(ClusterModel {
        this_node,
        nodes,
        workloads,
        services,
        policies,
        addresses: addresses
            .into_iter()
            .map(|(ip, (owner, _, _))| (ip, owner))
            .collect(),
        identities: identity_ids,
        warnings: warnings.0,
    })
}

fn policy_ref(kind: PolicyKind, meta: &crate::policy::spec::ObjectMeta) -> PolicyRef {
    PolicyRef {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
    }
}

/// Records that `owner` uses `ip`, or reports who already does.
fn claim(
    errors: &mut Errors,
    addresses: &mut BTreeMap<IpAddr, (Owner, String, String)>,
    origin: &Origin,
    field: &str,
    ip: IpAddr,
    key: Owner,
    owner: &str,
) {
    let here = format!("{}.{field}", at(origin));
    if let Some((_, other, first)) = addresses.get(&ip) {
        errors.push(
            origin,
            field,
            Problem::DuplicateAddress {
                owner: owner.to_owned(),
                ip,
                other: other.clone(),
                first: first.clone(),
            },
        );
        return;
    }
    addresses.insert(ip, (key, owner.to_owned(), here));
}
