use std::net::IpAddr;

use super::*;
use crate::local_config::build_from_texts;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad test IP {s}"))
}

const FILE: &str = "apiVersion: local.nodemesh.io/v1alpha1
kind: LocalCluster
thisNode: n1
nodes:
- {name: n1, address: 10.0.0.1, tunnelAddress: 169.254.0.1}
- {name: n2, address: 10.0.0.2, tunnelAddress: 169.254.0.2}
workloads:
- {name: web, namespace: shop, serviceAccount: web, labels: {app: web}, ips: [10.1.0.1, 'fd00::1'], netns: /run/netns/web, node: n1, probePorts: [8081, 8081, 15021]}
- {name: web2, namespace: shop, serviceAccount: web, labels: {app: web}, ips: [10.1.0.2], netns: /run/netns/web2, node: n2}
- {name: db, namespace: shop, serviceAccount: db, ips: [10.1.0.3], netns: /run/netns/db, node: n1, trustDomain: example.org, failMode: open}
services:
- {name: web, namespace: shop, vips: [10.96.0.1, 'fd00:96::1'], ports: [{port: 80, targetPort: 8080}, {port: 443}], selector: {matchLabels: {app: web}}}
---
apiVersion: security.nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    9090: {mode: PERMISSIVE}
";

fn model() -> ClusterModel {
    build_from_texts(&[("f.yaml".into(), FILE.into())], None).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_workload_address_resolves_to_workload_node_and_identity() {
    let m = model();
    let Some(Destination::Workload { workload, node }) = m.lookup(ip("fd00::1")) else {
        panic!("not found");
    };
    assert_eq!(workload.key, ObjectKey::new("shop", "web"));
    assert_eq!(node.name, "n1");
    assert_eq!(
        workload.identity.spiffe_id(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let db = m
        .workload_by_ip(ip("10.1.0.3"))
        .map(|w| w.identity.to_string());
    assert_eq!(db.as_deref(), Some("spiffe://example.org/ns/shop/sa/db"));
    // IPv4-mapped IPv6 is the IPv4 address.
    assert!(m.workload_by_ip(ip("::ffff:10.1.0.2")).is_some());
    assert!(m.lookup(ip("10.9.9.9")).is_none());
}

#[test]
fn a_vip_resolves_to_the_service_and_its_endpoints_with_nodes() {
    let m = model();
    let Some(Destination::Service { service, endpoints }) = m.lookup(ip("fd00:96::1")) else {
        panic!("not found");
    };
    assert_eq!(service.key.to_string(), "shop/web");
    assert_eq!(service.target_port(80), Some(8080));
    assert_eq!(service.target_port(443), Some(443));
    assert_eq!(service.target_port(81), None);
    let eps: Vec<_> = endpoints
        .map(|(w, n)| (w.key.name.clone(), n.name.clone()))
        .collect();
    assert_eq!(
        eps,
        [("web".into(), "n1".into()), ("web2".into(), "n2".into())]
    );
    assert!(m.workload_by_ip(ip("10.96.0.1")).is_none());
}

#[test]
fn enrollments_cover_this_nodes_workloads_with_their_modes() {
    let m = model();
    let e = m.enrollments();
    let names: Vec<_> = e.iter().map(|e| e.workload.name.as_str()).collect();
    assert_eq!(names, ["db", "web"]);
    let (db, web) = (&e[0], &e[1]);
    assert_eq!(db.fail_mode, FailMode::Open);
    assert_eq!(db.mtls.mode, MtlsMode::Permissive);
    assert!(db.mtls_ports.is_empty());
    assert_eq!(web.netns, PathBuf::from("/run/netns/web"));
    assert_eq!(web.mtls.mode, MtlsMode::Strict);
    assert_eq!(web.mtls_ports.get(&9090), Some(&MtlsMode::Permissive));
    assert_eq!(web.probe_ports, [8081, 15021]);
    assert_eq!(
        web.identity_id,
        m.identity_id(&web.identity).unwrap_or_default()
    );
    assert_eq!(web.ips, [ip("10.1.0.1"), ip("fd00::1")]);
}

#[test]
fn numbering_is_per_identity_and_stable_across_reloads() {
    let a = model();
    let b = model();
    assert_eq!(a, b);
    let web = a
        .workload(&ObjectKey::new("shop", "web"))
        .map(|w| (w.id, w.identity_id));
    let web2 = a
        .workload(&ObjectKey::new("shop", "web2"))
        .map(|w| (w.id, w.identity_id));
    let (Some(web), Some(web2)) = (web, web2) else {
        panic!("missing")
    };
    assert_ne!(web.0, web2.0);
    assert_eq!(web.1, web2.1, "same service account, same identity");
    assert_eq!(a.identities().count(), 2);
    assert!(a.identities().all(|(_, id)| id != 0));
    // Removing a workload of another identity does not renumber the others.
    let fewer = FILE.replace(
        "- {name: db, namespace: shop, serviceAccount: db, ips: [10.1.0.3], netns: /run/netns/db, node: n1, trustDomain: example.org, failMode: open}\n",
        "",
    );
    let c = build_from_texts(&[("f.yaml".into(), fewer)], None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.identities().count(), 1);
    let w = c
        .workload(&ObjectKey::new("shop", "web"))
        .map(|w| (w.id, w.identity_id));
    assert_eq!(w, Some(web));
}

#[test]
fn this_node_and_peers() {
    let m = model();
    assert_eq!(m.this_node().name, "n1");
    assert_eq!(m.this_node().hbone_port, 15008);
    assert_eq!(m.this_node().outbound_port, 15001);
    assert_eq!(
        m.peer_nodes().map(|n| n.name.clone()).collect::<Vec<_>>(),
        ["n2"]
    );
    let local: Vec<_> = m.local_workloads().map(|w| w.key.name.clone()).collect();
    assert_eq!(local, ["db", "web"]);
}

#[test]
fn every_workload_address_maps_to_its_identity_number() {
    let m = model();
    let map: Vec<_> = m.address_identities().collect();
    let id = |name: &str| {
        m.workload(&ObjectKey::new("shop", name))
            .map(|w| w.identity_id)
            .unwrap_or_default()
    };
    assert_eq!(
        map,
        [
            (ip("10.1.0.1"), id("web")),
            (ip("10.1.0.2"), id("web2")),
            (ip("10.1.0.3"), id("db")),
            (ip("fd00::1"), id("web")),
        ]
    );
}
