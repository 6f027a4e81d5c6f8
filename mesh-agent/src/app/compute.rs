//! Pure steps from the cluster model to what the agent programs: the kernel maps' desired state
//! ([`desired_state`], with the early-deny entries of [`early_denies`]) and the tunnel's
//! [`Snapshot`]. No I/O: the caller reads the pods' netns cookies and applies the results.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use crate::{
    identity::SpiffeId,
    map_model::{Action, Cidr, PeerIdentity, PodSpec, PolicyRule, Proto},
    maps::TunnelSettings,
    model::{self, ClusterModel, Enrollment, Workload},
    policy::{ConnectionAttrs, PolicySet},
    reconcile::DesiredState,
    tunnel::{Destination, Endpoint, LocalWorkload, Location, state::Snapshot},
};

/// The heartbeat staleness after which fail-closed pods are refused (the tunnel beats at a third).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Why the model cannot be programmed.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(
        "node {node}: tunnelAddress {addr} is not IPv4 (the datapath redirects IPv4 connects to an IPv4 tunnel address)"
    )]
    TunnelNotV4 { node: String, addr: IpAddr },
    #[error("identity {0} is not a valid SPIFFE ID: {1}")]
    BadIdentity(String, String),
}

/// The tunnel settings of this node.
pub fn tunnel_settings(model: &ClusterModel) -> Result<TunnelSettings, ComputeError> {
    let node = model.this_node();
    let IpAddr::V4(ip4) = node.tunnel_address else {
        return Err(ComputeError::TunnelNotV4 {
            node: node.name.clone(),
            addr: node.tunnel_address,
        });
    };
    Ok(TunnelSettings {
        ip4,
        ip6: None,
        port: node.outbound_port,
        stale_after: Some(STALE_AFTER),
    })
}

/// The enrollment record of one local workload.
pub fn pod_spec(e: &Enrollment) -> PodSpec {
    let ip4 = e.ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let ip6 = e.ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    let mtls = match e.mtls.mode {
        crate::policy::MtlsMode::Strict => mesh_common::MtlsMode::Strict,
        crate::policy::MtlsMode::Permissive => mesh_common::MtlsMode::Permissive,
    };
    let fail = match e.fail_mode {
        model::FailMode::Closed => mesh_common::FailMode::Closed,
        model::FailMode::Open => mesh_common::FailMode::Open,
    };
    PodSpec {
        workload_id: e.workload_id,
        identity_id: e.identity_id,
        ip4,
        ip6,
        mtls,
        fail,
        plaintext_ports: e.probe_ports.clone(),
    }
}

/// Everything the maps should say. `cookies` maps local workloads to the netns cookies read
/// for them; a workload without one (namespace not there yet) is left out until the next pass.
pub fn desired_state(
    model: &ClusterModel,
    cookies: &BTreeMap<model::ObjectKey, u64>,
) -> Result<DesiredState, ComputeError> {
    let mut d = DesiredState {
        tunnel: Some(tunnel_settings(model)?),
        ..Default::default()
    };
    for e in model.enrollments() {
        if let Some(&cookie) = cookies.get(&e.workload) {
            d.pods.insert(cookie, pod_spec(&e));
        }
    }
    for (ip, id) in model.address_identities() {
        d.identities.insert(Cidr::host(ip), id);
    }
    // What the tunnel can forward: every workload address (any node) and every VIP of a
    // service with a workload endpoint of the VIP's family. Enrolled pods' TCP connects to
    // anything else go out untouched in the kernel, including services whose endpoints are not
    // workloads (the kube API `kubernetes.default`, whose endpoints are the API servers; a
    // service of pods outside the mesh): as if the pod were not enrolled.
    for w in model.workloads() {
        d.mesh_destinations
            .extend(w.ips.iter().map(|&ip| Cidr::host(ip)));
    }
    for svc in model.services() {
        for &vip in &svc.vips {
            let served = model
                .endpoints(svc)
                .any(|(w, _)| w.ips.iter().any(|ip| ip.is_ipv4() == vip.is_ipv4()));
            if served {
                d.mesh_destinations.insert(Cidr::host(vip));
            }
        }
    }
    d.policy = early_denies(model);
    Ok(d)
}

/// Cuts `next` (local workloads with their netns cookies) to `capacity` entries, the size of
/// the enrolled-pods map: workloads already in `previous` (enrolled by the last pass) keep
/// their place, then the others in key order. Returns the keys left out, in key order. A pod
/// is never unenrolled to make room for another.
pub fn fit_capacity<V, W>(
    next: &mut BTreeMap<model::ObjectKey, V>,
    previous: &BTreeMap<model::ObjectKey, W>,
    capacity: usize,
) -> Vec<model::ObjectKey> {
    if next.len() <= capacity {
        return Vec::new();
    }
    let kept_before = next.keys().filter(|k| previous.contains_key(*k)).count();
    let mut room_for_new = capacity.saturating_sub(kept_before);
    let mut room_for_old = capacity;
    let mut left_out = Vec::new();
    for key in next.keys() {
        let fits = if previous.contains_key(key) {
            let fits = room_for_old > 0;
            room_for_old = room_for_old.saturating_sub(1);
            fits
        } else {
            let fits = room_for_new > 0;
            room_for_new = room_for_new.saturating_sub(1);
            fits
        };
        if !fits {
            left_out.push(key.clone());
        }
    }
    for key in &left_out {
        next.remove(key);
    }
    left_out
}

/// The kernel's early-deny entries: for each (local source identity, destination identity), the
/// ports on which **every** local pod of the source identity is denied by the policies of
/// **every** workload of the destination identity (the kernel keys on identities, not pods).
/// Ports: one entry for "any port" from a port no policy names, and per named port where its
/// decision differs. Anything not denied everywhere is left to the destination's tunnel, which
/// always re-checks; an entry here only makes a certain refusal fast.
pub fn early_denies(model: &ClusterModel) -> BTreeSet<PolicyRule> {
    let policies: &PolicySet = model.policies();
    let named = policies.named_ports();
    let unnamed = (1..=u16::MAX).find(|p| !named.contains(p)).unwrap_or(1);
    let mut sources: BTreeMap<u32, Vec<&Workload>> = BTreeMap::new();
    for w in model.local_workloads() {
        sources.entry(w.identity_id).or_default().push(w);
    }
    let mut dests: BTreeMap<u32, Vec<&Workload>> = BTreeMap::new();
    for w in model.workloads() {
        dests.entry(w.identity_id).or_default().push(w);
    }
    // Per-workload inputs computed once, not per (source, destination, port) evaluation.
    let metas: HashMap<&model::ObjectKey, _> =
        model.workloads().map(|w| (&w.key, w.meta())).collect();
    let peers: HashMap<&model::ObjectKey, _> = model
        .local_workloads()
        .map(|w| (&w.key, w.identity.to_peer()))
        .collect();
    let denied = |srcs: &[&Workload], dsts: &[&Workload], port: u16| {
        for s in srcs {
            for &src_ip in &s.ips {
                let mut conn = ConnectionAttrs {
                    src_identity: Some(peers[&s.key].clone()),
                    src_ip,
                    dst_ip: src_ip,
                    dst_port: port,
                };
                for d in dsts {
                    for &dst_ip in &d.ips {
                        conn.dst_ip = dst_ip;
                        if policies.authorize(&metas[&d.key], &conn).is_allowed() {
                            return false;
                        }
                    }
                }
            }
        }
        true
    };
    // A destination identity with a workload no policy selects is never denied to anyone.
    dests.retain(|_, dsts| dsts.iter().all(|d| policies.selects_any(&metas[&d.key])));
    let mut out = BTreeSet::new();
    for (&src_id, srcs) in &sources {
        for (&dst_id, dsts) in &dests {
            let any = denied(srcs, dsts, unnamed);
            let rule = |port, action| PolicyRule {
                src_identity: src_id,
                dst: PeerIdentity::Id(dst_id),
                port,
                proto: Proto::Tcp,
                action,
            };
            if any {
                out.insert(rule(None, Action::Deny));
            }
            for &port in &named {
                let here = denied(srcs, dsts, port);
                if here != any {
                    let action = if here { Action::Deny } else { Action::Allow };
                    out.insert(rule(Some(port), action));
                }
            }
        }
    }
    out
}

fn spiffe(identity: &model::Identity) -> Result<SpiffeId, ComputeError> {
    identity
        .spiffe_id()
        .parse()
        .map_err(|e: crate::identity::SpiffeIdError| {
            ComputeError::BadIdentity(identity.spiffe_id(), e.to_string())
        })
}

fn location(model: &ClusterModel, node: &model::Node) -> Location {
    if node.name == model.this_node().name {
        Location::SameNode
    } else {
        Location::Remote {
            hbone: SocketAddr::new(node.address, node.hbone_port),
        }
    }
}

/// The tunnel's view: local workloads, every workload address, service VIP ports, identity ids.
pub fn snapshot(model: &ClusterModel) -> Result<Snapshot, ComputeError> {
    let mut s = Snapshot::default();
    for w in model.local_workloads() {
        let identity = spiffe(&w.identity)?;
        for &ip in &w.ips {
            s.local_workloads.insert(
                ip,
                Arc::new(LocalWorkload {
                    name: w.key.name.clone(),
                    namespace: w.key.namespace.clone(),
                    identity: identity.clone(),
                    ip,
                }),
            );
        }
    }
    let mut workload_addresses = HashMap::new();
    for w in model.workloads() {
        let identity = spiffe(&w.identity)?;
        let Some(node) = model.node(&w.node) else {
            continue;
        };
        let loc = location(model, node);
        for &ip in &w.ips {
            workload_addresses.insert(ip, (identity.clone(), loc.clone()));
        }
    }
    for svc in model.services() {
        let hostname = format!("{}.{}.svc.cluster.local", svc.key.name, svc.key.namespace);
        for port in &svc.ports {
            let target = svc.target_port(port.port).unwrap_or(port.port);
            let mut endpoints = Vec::new();
            for (w, node) in model.endpoints(svc) {
                let identity = spiffe(&w.identity)?;
                for &ip in &w.ips {
                    endpoints.push(Endpoint {
                        addr: SocketAddr::new(ip, target),
                        identity: identity.clone(),
                        location: location(model, node),
                    });
                }
            }
            for &vip in &svc.vips {
                s.destinations.insert(
                    SocketAddr::new(vip, port.port),
                    Destination::Service {
                        hostname: hostname.clone(),
                        endpoints: endpoints
                            .iter()
                            .filter(|e| e.addr.is_ipv4() == vip.is_ipv4())
                            .cloned()
                            .collect(),
                    },
                );
            }
        }
    }
    s.workload_addresses = workload_addresses;
    for (identity, id) in model.identities() {
        s.identity_ids.insert(id, spiffe(identity)?);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_config::build_from_texts;

    const CLUSTER: &str = r#"
apiVersion: local.nodemesh.io/v1alpha1
kind: LocalCluster
thisNode: a
nodes:
- {name: a, address: 10.0.0.1, tunnelAddress: 169.254.7.1}
- {name: b, address: 10.0.0.2, tunnelAddress: 169.254.7.2}
workloads:
- {name: client, namespace: demo, serviceAccount: client, ips: [10.1.0.2], netns: /run/netns/c, node: a}
- {name: server, namespace: demo, serviceAccount: server, labels: {app: server}, ips: [10.2.0.2], netns: /run/netns/s, node: b}
services:
- {name: echo, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], endpoints: [server]}
"#;

    const DENY_8080: &str = r#"
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

    fn model(text: &str) -> ClusterModel {
        let m = build_from_texts(&[("c.yaml".into(), text.to_owned())], None);
        match m {
            Ok(m) => m,
            Err(e) => panic!("test config is valid: {e}"),
        }
    }

    #[test]
    fn snapshot_resolves_pods_on_any_port_and_services_on_their_ports() {
        use crate::tunnel::Resolver;
        let m = model(CLUSTER);
        let state = crate::tunnel::state::TunnelState::new(snapshot(&m).expect("valid"));
        let Some(Destination::Workload(ep)) = state.resolve("10.2.0.2:9999".parse().expect("a"))
        else {
            panic!("pod address resolves on any port");
        };
        assert_eq!(
            ep.location,
            Location::Remote {
                hbone: "10.0.0.2:15008".parse().expect("a")
            }
        );
        let Some(Destination::Service { endpoints, .. }) =
            state.resolve("10.96.0.1:80".parse().expect("a"))
        else {
            panic!("VIP resolves on its port");
        };
        assert_eq!(endpoints[0].addr, "10.2.0.2:8080".parse().expect("a"));
        assert!(state.resolve("10.96.0.1:81".parse().expect("a")).is_none());
    }

    #[test]
    fn mesh_destinations_are_every_workload_and_served_vip_and_removed_ones_leave() {
        use crate::{maps::FakeMaps, reconcile};
        // The kube API: a service whose endpoints are not workloads.
        let m = model(&format!(
            "{CLUSTER}- {{name: kubernetes, namespace: default, vips: [10.96.0.10], ports: [{{port: 443, targetPort: 6443}}], endpoints: []}}\n"
        ));
        let client = m
            .workloads()
            .find(|w| w.key.name == "client")
            .expect("client")
            .key
            .clone();
        let cookies = BTreeMap::from([(client, 7u64)]);
        let d = desired_state(&m, &cookies).expect("valid");
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid");
        let hosts: BTreeSet<Cidr> = ["10.1.0.2", "10.2.0.2", "10.96.0.1"]
            .iter()
            .map(|s| Cidr::host(ip(s)))
            .collect();
        assert_eq!(d.mesh_destinations, hosts);
        let mut maps = FakeMaps::default();
        reconcile::reconcile(&mut maps, &reconcile::compile(&d).expect("valid")).expect("fake");
        // The local pod, a remote pod, a VIP: captured. The kube API, the internet: not.
        for inside in ["10.1.0.2", "10.2.0.2", "10.96.0.1", "::ffff:10.96.0.1"] {
            assert!(!maps.is_outside_mesh(ip(inside)), "{inside}");
        }
        for outside in ["10.96.0.10", "10.2.0.3", "8.8.8.8", "fd00::1"] {
            assert!(maps.is_outside_mesh(ip(outside)), "{outside}");
        }
        // The server and the service leave the model: their addresses leave the map on diff.
        let text = CLUSTER
            .split("- {name: server")
            .next()
            .expect("the client part");
        let d = desired_state(&model(text), &cookies).expect("valid");
        let want = reconcile::compile(&d).expect("valid");
        let r = reconcile::reconcile(&mut maps, &want).expect("fake");
        assert_eq!(maps.entries(), want);
        assert!(r.deleted >= 2, "{r:?}");
        assert!(maps.is_outside_mesh(ip("10.2.0.2")));
        assert!(maps.is_outside_mesh(ip("10.96.0.1")));
        assert!(!maps.is_outside_mesh(ip("10.1.0.2")), "the local pod stays");
    }

    #[test]
    fn early_denies_cover_exactly_the_denied_port() {
        let m = model(&format!("{CLUSTER}{DENY_8080}"));
        let rules = early_denies(&m);
        let client = m
            .workloads()
            .find(|w| w.key.name == "client")
            .expect("client");
        let server = m
            .workloads()
            .find(|w| w.key.name == "server")
            .expect("server");
        assert_eq!(
            rules.into_iter().collect::<Vec<_>>(),
            vec![PolicyRule {
                src_identity: client.identity_id,
                dst: PeerIdentity::Id(server.identity_id),
                port: Some(8080),
                proto: Proto::Tcp,
                action: Action::Deny,
            }]
        );
        assert!(early_denies(&model(CLUSTER)).is_empty());
    }

    #[test]
    fn fit_capacity_keeps_enrolled_pods_and_leaves_out_the_newest() {
        let key = |n: &str| model::ObjectKey::new("demo", n);
        let map = |names: &[&str]| -> BTreeMap<model::ObjectKey, u64> {
            names.iter().map(|n| (key(n), 1)).collect()
        };
        // Under the capacity: nothing left out.
        let mut next = map(&["a", "b"]);
        assert!(fit_capacity(&mut next, &BTreeMap::<model::ObjectKey, ()>::new(), 2).is_empty());
        assert_eq!(next.len(), 2);
        // First pass: key order decides.
        let mut next = map(&["a", "b", "c"]);
        assert_eq!(
            fit_capacity(&mut next, &BTreeMap::<model::ObjectKey, ()>::new(), 2),
            [key("c")]
        );
        assert_eq!(next, map(&["a", "b"]));
        // Later: enrolled pods keep their place even when a new one sorts first.
        let mut next = map(&["a", "b", "c"]);
        assert_eq!(fit_capacity(&mut next, &map(&["b", "c"]), 2), [key("a")]);
        assert_eq!(next, map(&["b", "c"]));
        // A pod that left frees its place for a waiting one.
        let mut next = map(&["a", "c"]);
        assert!(fit_capacity(&mut next, &map(&["b", "c"]), 2).is_empty());
    }
}
