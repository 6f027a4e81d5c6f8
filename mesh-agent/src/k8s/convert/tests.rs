use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

use serde_json::{Value, json};

use super::*;
use crate::{
    k8s::{FixedNetns, NoNetns},
    model::{ClusterModel, ObjectKey},
    policy::{ConnectionAttrs, PeerIdentity},
};

const THIS: &str = "node-a";

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).expect("a valid object"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP")
}

fn settings() -> Settings {
    Settings::new(THIS, ip("169.254.7.1"))
}

fn namespace(name: &str, label: Option<&str>) -> Arc<Namespace> {
    let labels = label.map_or(json!({}), |v| json!({ENROLL_LABEL: v}));
    typed(json!({"metadata": {"name": name, "labels": labels}}))
}

fn node(name: &str, addresses: &[(&str, &str)]) -> Arc<Node> {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    typed(json!({"metadata": {"name": name}, "status": {"addresses": addresses}}))
}

/// A running pod: `uid-<name>`, service account `sa-<name>`, label `app: <name>`.
fn pod_json(ns: &str, name: &str, node: &str, ips: &[&str]) -> Value {
    let ips: Vec<Value> = ips.iter().map(|i| json!({"ip": i})).collect();
    json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "labels": {"app": name},
            "creationTimestamp": "2026-12-01T00:00:00Z",
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": format!("sa-{name}"),
            "containers": [{"name": "main", "image": "x"}],
        },
        "status": {"phase": "Running", "podIPs": ips},
    })
}

fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> Arc<Pod> {
    typed(pod_json(ns, name, node, ips))
}

fn service(ns: &str, name: &str, vip: &str, ports: Value) -> Arc<Service> {
    typed(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": ports},
    }))
}

/// An EndpointSlice of `svc`: `(pod, ready)` endpoints, and `ports`.
fn slice(
    ns: &str,
    svc: &str,
    endpoints: &[(&str, Option<bool>)],
    ports: Value,
) -> Arc<EndpointSlice> {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (pod, ready))| {
            let mut e = json!({
                "addresses": [format!("10.9.9.{i}")],
                "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
            });
            if let Some(r) = ready {
                e["conditions"] = json!({"ready": r});
            }
            e
        })
        .collect();
    typed(json!({
        "metadata": {"name": format!("{svc}-abc"), "namespace": ns,
                     "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

fn policy(kind: &str, ns: &str, name: &str, spec: Value) -> Arc<DynamicObject> {
    typed(json!({
        "apiVersion": "security.nodemesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
}

fn netns(uids: &[&str]) -> FixedNetns {
    FixedNetns(
        uids.iter()
            .map(|u| (format!("uid-{u}"), PathBuf::from(format!("/run/netns/{u}"))))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// Two nodes, namespace `shop` enrolled, `web` on this node and `db` on the other.
fn base() -> Snapshot {
    Snapshot {
        nodes: vec![
            node(
                THIS,
                &[
                    ("Hostname", "a"),
                    ("InternalIP", "fd00::a"),
                    ("InternalIP", "10.0.0.1"),
                ],
            ),
            node("node-b", &[("InternalIP", "10.0.0.2")]),
        ],
        namespaces: vec![
            namespace("shop", Some(ENROLL_ENABLED)),
            namespace("other", None),
        ],
        pods: vec![
            pod("shop", "web", THIS, &["10.1.0.5", "fd01::5"]),
            pod("shop", "db", "node-b", &["10.2.0.7"]),
        ],
        ..Default::default()
    }
}

fn build(snap: &Snapshot, finder: &dyn NetnsFinder) -> (ClusterModel, Vec<String>) {
    let c = convert(snap, &settings(), finder);
    let skipped = c.skipped.iter().map(ToString::to_string).collect();
    let model = ClusterModel::build(&c.input).expect("a valid model");
    (model, skipped)
}

fn names(model: &ClusterModel) -> Vec<String> {
    model.workloads().map(|w| w.key.to_string()).collect()
}

#[test]
fn enrolled_pods_become_workloads_with_identity_node_and_netns() {
    let (model, skipped) = build(&base(), &netns(&["web"]));
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(names(&model), ["shop/db", "shop/web"]);

    let web = model.workload(&ObjectKey::new("shop", "web")).expect("web");
    assert_eq!(web.node, THIS);
    assert_eq!(web.ips, [ip("10.1.0.5"), ip("fd01::5")]);
    assert_eq!(web.netns, PathBuf::from("/run/netns/web"));
    assert_eq!(
        web.identity.spiffe_id(),
        "spiffe://cluster.local/ns/shop/sa/sa-web"
    );
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

    let db = model.workload(&ObjectKey::new("shop", "db")).expect("db");
    assert_eq!(db.netns, PathBuf::from(REMOTE_NETNS));
    assert_eq!(
        model.enrollments().len(),
        1,
        "only this node's pods are enrolled"
    );

    // Nodes: the IPv4 InternalIP wins; this node's tunnel address from the settings.
    assert_eq!(model.this_node().address, ip("10.0.0.1"));
    assert_eq!(model.this_node().tunnel_address, ip("169.254.7.1"));
    assert_eq!(model.node("node-b").expect("b").address, ip("10.0.0.2"));
    assert_eq!(model.node("node-b").expect("b").hbone_port, 15008);
}

#[test]
fn trust_domain_and_default_service_account() {
    let mut snap = base();
    let mut p = pod_json("shop", "web", THIS, &["10.1.0.5"]);
    p["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("serviceAccountName");
    snap.pods = vec![typed(p)];
    let mut s = settings();
    s.trust_domain = "example.org".into();
    let c = convert(&snap, &s, &netns(&["web"]));
    let model = ClusterModel::build(&c.input).expect("valid");
    let web = model.workload(&ObjectKey::new("shop", "web")).expect("web");
    assert_eq!(
        web.identity.spiffe_id(),
        "spiffe://example.org/ns/shop/sa/default"
    );
}

#[test]
fn pods_outside_the_mesh_are_left_out_quietly() {
    let mut snap = base();
    let mut opted_out = pod_json("shop", "opted-out", THIS, &["10.1.0.10"]);
    opted_out["metadata"]["labels"][ENROLL_LABEL] = json!(ENROLL_DISABLED);
    let mut host = pod_json("shop", "host", THIS, &["10.0.0.1"]);
    host["spec"]["hostNetwork"] = json!(true);
    let mut done = pod_json("shop", "done", THIS, &["10.1.0.11"]);
    done["status"]["phase"] = json!("Succeeded");
    let mut failed = pod_json("shop", "failed", THIS, &["10.1.0.12"]);
    failed["status"]["phase"] = json!("Failed");
    let mut starting = pod_json("shop", "starting", THIS, &[]);
    starting["status"]["phase"] = json!("Pending");
    let mut unscheduled = pod_json("shop", "unscheduled", "", &[]);
    unscheduled["status"]["phase"] = json!("Pending");
    snap.pods.extend([
        typed(opted_out),
        typed(host),
        typed(done),
        typed(failed),
        typed(starting),
        typed(unscheduled),
        pod("other", "not-enrolled", THIS, &["10.1.0.13"]),
        pod("missing-ns", "no-namespace", THIS, &["10.1.0.14"]),
    ]);
    // A namespace with the label set to something else is not enrolled either.
    snap.namespaces.push(namespace("maybe", Some("yes")));
    snap.pods.push(pod("maybe", "maybe", THIS, &["10.1.0.15"]));
    let (model, skipped) = build(&snap, &netns(&["web"]));
    assert_eq!(names(&model), ["shop/db", "shop/web"]);
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[test]
fn a_pending_pod_with_an_address_is_enrolled() {
    let mut snap = base();
    let mut p = pod_json("shop", "early", THIS, &["10.1.0.20"]);
    p["status"]["phase"] = json!("Pending");
    snap.pods.push(typed(p));
    let (model, _) = build(&snap, &netns(&["web", "early"]));
    assert!(model.workload(&ObjectKey::new("shop", "early")).is_some());
}

#[test]
fn a_running_pod_without_an_address_is_reported() {
    let mut snap = base();
    snap.pods.push(pod("shop", "no-ip", THIS, &[]));
    let (model, skipped) = build(&snap, &netns(&["web"]));
    assert_eq!(names(&model), ["shop/db", "shop/web"]);
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].starts_with("Pod shop/no-ip: running without an IP"),
        "{skipped:?}"
    );
}

#[test]
fn the_legacy_pod_ip_field_is_read_when_pod_ips_is_absent() {
    let mut snap = base();
    let mut p = pod_json("shop", "old", "node-b", &[]);
    p["status"]["podIP"] = json!("10.2.0.9");
    snap.pods.push(typed(p));
    let (model, _) = build(&snap, &netns(&["web"]));
    let old = model.workload(&ObjectKey::new("shop", "old")).expect("old");
    assert_eq!(old.ips, [ip("10.2.0.9")]);
}

#[test]
fn probe_ports_come_from_every_probe_kind_and_named_ports() {
    let mut snap = base();
    let mut p = pod_json("shop", "probed", THIS, &["10.1.0.30"]);
    p["spec"]["containers"] = json!([
        {
            "name": "app", "image": "x",
            "ports": [{"name": "http-health", "containerPort": 8081}, {"containerPort": 9000}],
            "livenessProbe": {"httpGet": {"port": "http-health", "path": "/"}},
            "readinessProbe": {"tcpSocket": {"port": 9000}},
            "startupProbe": {"grpc": {"port": 7000}},
        },
        {
            "name": "other", "image": "x",
            // A probe to another host does not reach the pod; exec has no port; a name that
            // no port of this container has resolves to nothing.
            "livenessProbe": {"httpGet": {"port": 8443, "host": "10.9.9.9"}},
            "readinessProbe": {"exec": {"command": ["true"]}},
            "startupProbe": {"tcpSocket": {"port": "http-health"}},
        },
    ]);
    p["spec"]["initContainers"] = json!([{
        "name": "sidecar", "image": "x", "restartPolicy": "Always",
        "readinessProbe": {"httpGet": {"port": 6000}},
    }]);
    snap.pods.push(typed(p));
    let (model, _) = build(&snap, &netns(&["web", "probed"]));
    let w = model
        .workload(&ObjectKey::new("shop", "probed"))
        .expect("probed");
    assert_eq!(w.probe_ports, [6000, 7000, 8081, 9000]);
}

#[test]
fn a_local_pod_whose_netns_is_not_found_is_kept_but_not_enrollable() {
    let mut snap = base();
    snap.pods.push(pod("shop", "found", THIS, &["10.1.0.40"]));
    let (model, skipped) = build(&snap, &netns(&["found"]));
    let web = model.workload(&ObjectKey::new("shop", "web")).expect("web");
    assert_eq!(web.netns, PathBuf::from(NETNS_NOT_FOUND));
    let found = model
        .workload(&ObjectKey::new("shop", "found"))
        .expect("found");
    assert_eq!(found.netns, PathBuf::from("/run/netns/found"));
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0].starts_with("Pod shop/web: not enrolled yet"),
        "{skipped:?}"
    );
    // Without any finder, every local pod is reported and remote ones are unaffected.
    let (model, skipped) = build(&snap, &NoNetns);
    assert_eq!(model.workloads().count(), 3);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
}

#[test]
fn pods_on_unknown_nodes_and_nodes_without_an_address_are_left_out() {
    let mut snap = base();
    snap.nodes.push(node("node-c", &[("Hostname", "c")]));
    snap.nodes
        .push(node("node-d", &[("InternalIP", "10.0.0.2")]));
    snap.pods.push(pod("shop", "on-c", "node-c", &["10.3.0.1"]));
    snap.pods.push(pod("shop", "on-d", "node-d", &["10.3.0.2"]));
    snap.pods.push(pod("shop", "on-e", "node-e", &["10.3.0.3"]));
    let (model, skipped) = build(&snap, &netns(&["web"]));
    assert_eq!(names(&model), ["shop/db", "shop/web"]);
    assert_eq!(model.nodes().count(), 2);
    let joined = skipped.join("\n");
    for s in [
        "Node node-c: no InternalIP",
        "Node node-d: InternalIP 10.0.0.2 is already node `node-b`'s",
        "Pod shop/on-c: runs on node `node-c`",
        "Pod shop/on-d: runs on node `node-d`",
        "Pod shop/on-e: runs on node `node-e`",
    ] {
        assert!(joined.contains(s), "{s} missing in:\n{joined}");
    }
}

#[test]
fn two_pods_claiming_one_address_leave_it_to_the_newer() {
    let mut snap = base();
    let mut old = pod_json("shop", "old", "node-b", &["10.2.0.50"]);
    old["metadata"]["creationTimestamp"] = json!("2026-11-01T00:00:00Z");
    let mut new = pod_json("shop", "new", "node-b", &["10.2.0.50"]);
    new["metadata"]["creationTimestamp"] = json!("2026-12-05T00:00:00Z");
    // Order in the store must not matter.
    snap.pods.extend([typed(new), typed(old)]);
    let (model, skipped) = build(&snap, &netns(&["web"]));
    assert_eq!(
        model
            .workload_by_ip(ip("10.2.0.50"))
            .map(|w| w.key.to_string()),
        Some("shop/new".to_owned())
    );
    assert!(model.workload(&ObjectKey::new("shop", "old")).is_none());
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with("Pod shop/old: address 10.2.0.50"))
    );
}

#[test]
fn a_terminating_pod_loses_its_address_to_a_live_one() {
    let mut snap = base();
    let mut dying = pod_json("shop", "dying", "node-b", &["10.2.0.60"]);
    dying["metadata"]["creationTimestamp"] = json!("2026-12-06T00:00:00Z");
    dying["metadata"]["deletionTimestamp"] = json!("2026-12-06T01:00:00Z");
    snap.pods.push(typed(dying));
    snap.pods
        .push(pod("shop", "alive", "node-b", &["10.2.0.60"]));
    let (model, _) = build(&snap, &netns(&["web"]));
    assert_eq!(
        model
            .workload_by_ip(ip("10.2.0.60"))
            .map(|w| w.key.name.clone()),
        Some("alive".to_owned())
    );
}

fn service_snapshot() -> Snapshot {
    let mut snap = base();
    let mut db2 = pod_json("shop", "db2", THIS, &["10.1.0.8"]);
    db2["spec"]["containers"][0]["ports"] = json!([{"name": "pg", "containerPort": 5433}]);
    snap.pods.push(typed(db2));
    snap.pods
        .push(pod("other", "outsider", "node-b", &["10.2.0.99"]));
    snap.services = vec![service(
        "shop",
        "db",
        "10.96.0.10",
        json!([
            {"name": "sql", "port": 5432, "targetPort": "pg"},
            {"name": "admin", "port": 80, "targetPort": 8080},
            {"name": "plain", "port": 81},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]),
    )];
    snap.endpoint_slices = vec![slice(
        "shop",
        "db",
        &[
            ("db", Some(true)),
            ("db2", None),
            ("web", Some(false)),
            ("gone", Some(true)),
        ],
        json!([{"name": "sql", "port": 5432, "protocol": "TCP"}, {"name": "admin", "port": 8080}]),
    )];
    snap
}

#[test]
fn services_take_cluster_ips_tcp_ports_and_ready_workload_endpoints() {
    let snap = service_snapshot();
    let (model, skipped) = build(&snap, &netns(&["web", "db2"]));
    assert!(skipped.is_empty(), "{skipped:?}");
    let svc = model
        .service(&ObjectKey::new("shop", "db"))
        .expect("service");
    assert_eq!(svc.vips, [ip("10.96.0.10")]);
    let ports: Vec<(u16, u16)> = svc.ports.iter().map(|p| (p.port, p.target_port)).collect();
    // UDP is not carried; the named port takes the EndpointSlice's number.
    assert_eq!(ports, [(80, 8080), (81, 81), (5432, 5432)]);
    // Not ready (web) and unknown pods (gone) are not endpoints; unset `ready` counts as ready.
    let eps: Vec<String> = svc.endpoints.iter().map(ToString::to_string).collect();
    assert_eq!(eps, ["shop/db", "shop/db2"]);
}

#[test]
fn a_named_target_port_without_slice_ports_resolves_through_the_pods() {
    let mut snap = service_snapshot();
    snap.endpoint_slices = vec![slice("shop", "db", &[("db2", Some(true))], json!([]))];
    let (model, _) = build(&snap, &netns(&["web", "db2"]));
    let svc = model
        .service(&ObjectKey::new("shop", "db"))
        .expect("service");
    assert_eq!(svc.target_port(5432), Some(5433));
}

#[test]
fn an_unresolvable_named_target_port_is_left_out_and_reported() {
    let mut snap = service_snapshot();
    snap.endpoint_slices.clear();
    let (model, skipped) = build(&snap, &netns(&["web", "db2"]));
    let svc = model
        .service(&ObjectKey::new("shop", "db"))
        .expect("service");
    assert_eq!(svc.target_port(5432), None);
    assert_eq!(svc.target_port(80), Some(8080));
    assert!(svc.endpoints.is_empty());
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with("Service shop/db: spec.ports[0]")),
        "{skipped:?}"
    );
}

#[test]
fn headless_external_name_and_udp_only_services_are_not_in_the_mesh() {
    let mut snap = base();
    snap.services = vec![
        service("shop", "headless", "None", json!([{"port": 80}])),
        typed(json!({"metadata": {"name": "ext", "namespace": "shop"},
                     "spec": {"type": "ExternalName", "externalName": "example.org"}})),
        service(
            "shop",
            "dns",
            "10.96.0.53",
            json!([{"port": 53, "protocol": "UDP"}]),
        ),
    ];
    let (model, skipped) = build(&snap, &netns(&["web"]));
    assert_eq!(model.services().count(), 0);
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[test]
fn a_service_whose_vip_is_a_pod_address_is_left_out() {
    let mut snap = base();
    snap.services = vec![
        service("shop", "clash", "10.2.0.7", json!([{"port": 80}])),
        service("shop", "fine", "10.96.0.1", json!([{"port": 80}])),
    ];
    let (model, skipped) = build(&snap, &netns(&["web"]));
    assert!(model.service(&ObjectKey::new("shop", "clash")).is_none());
    assert!(model.service(&ObjectKey::new("shop", "fine")).is_some());
    assert!(skipped[0].starts_with("Service shop/clash: ClusterIP 10.2.0.7 is also Pod shop/db's"));
}

fn conn(src_sa: &str, dst: &str, port: u16) -> ConnectionAttrs {
    ConnectionAttrs {
        src_identity: Some(PeerIdentity {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: src_sa.into(),
        }),
        src_ip: ip("10.2.0.7"),
        dst_ip: ip(dst),
        dst_port: port,
    }
}

fn allowed(model: &ClusterModel, to: &str, c: &ConnectionAttrs) -> bool {
    let w = model
        .workload(&ObjectKey::new("shop", to))
        .expect("workload");
    model.policies().authorize(&w.meta(), c).is_allowed()
}

#[test]
fn a_deny_policy_applies_and_names_its_object() {
    let mut snap = base();
    snap.pods.push(pod("shop", "api", THIS, &["10.1.0.6"]));
    snap.authorization_policies = vec![policy(
        "AuthorizationPolicy",
        "shop",
        "deny-db",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/sa-db"]}}]}]}),
    )];
    let c = convert(&snap, &settings(), &netns(&["web", "api"]));
    assert_eq!(
        c.input.authorization_policies[0].origin.file,
        "AuthorizationPolicy shop/deny-db"
    );
    let model = ClusterModel::build(&c.input).expect("valid");
    assert!(!allowed(&model, "web", &conn("sa-db", "10.1.0.5", 80)));
    assert!(allowed(&model, "api", &conn("sa-db", "10.1.0.6", 80)));
    assert!(allowed(&model, "web", &conn("sa-api", "10.1.0.5", 80)));
}

#[test]
fn an_invalid_policy_does_not_block_the_model_and_fails_closed() {
    let mut snap = base();
    snap.pods.push(pod("shop", "api", THIS, &["10.1.0.6"]));
    snap.authorization_policies = vec![policy(
        "AuthorizationPolicy",
        "shop",
        "l7",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    )];
    let (model, _) = build(&snap, &netns(&["web", "api"]));
    // The selected workload refuses everything; the rest is untouched.
    assert!(!allowed(&model, "web", &conn("sa-db", "10.1.0.5", 80)));
    assert!(allowed(&model, "api", &conn("sa-db", "10.1.0.6", 80)));
    let warnings: Vec<String> = model.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("AuthorizationPolicy shop/l7: spec.rules[0]"),
        "the finding names the object once: {warnings:?}"
    );
    // The local file's semantics are unchanged: the same input is rejected there.
    let mut strict = convert(&snap, &settings(), &netns(&["web", "api"])).input;
    strict.invalid_policies = InvalidPolicies::Reject;
    assert!(ClusterModel::build(&strict).is_err());
}

#[test]
fn an_unreadable_deny_policy_denies_what_it_selects() {
    let mut snap = base();
    snap.pods.push(pod("shop", "api", THIS, &["10.1.0.6"]));
    snap.authorization_policies = vec![
        policy(
            "AuthorizationPolicy",
            "shop",
            "garbled",
            json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"principals": "not-a-list"}}]}]}),
        ),
        policy(
            "AuthorizationPolicy",
            "shop",
            "garbled-audit",
            json!({"action": "AUDIT", "rules": "nope"}),
        ),
    ];
    let c = convert(&snap, &settings(), &netns(&["web", "api"]));
    assert_eq!(
        c.input.authorization_policies.len(),
        1,
        "the AUDIT one is dropped"
    );
    let joined = c
        .skipped
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        joined.contains("AuthorizationPolicy shop/garbled: cannot be read"),
        "{joined}"
    );
    assert!(
        joined.contains("AuthorizationPolicy shop/garbled-audit: cannot be read"),
        "{joined}"
    );
    let model = ClusterModel::build(&c.input).expect("valid");
    assert!(!allowed(&model, "web", &conn("sa-api", "10.1.0.5", 80)));
    assert!(allowed(&model, "api", &conn("sa-web", "10.1.0.6", 80)));
}

#[test]
fn peer_authentications_apply_and_an_unreadable_one_counts_as_strict() {
    let mut snap = base();
    snap.pods.push(pod("shop", "api", THIS, &["10.1.0.6"]));
    snap.peer_authentications = vec![
        policy(
            "PeerAuthentication",
            "shop",
            "garbled",
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": "STRICT"}),
        ),
        policy(
            "PeerAuthentication",
            "shop",
            "api-permissive",
            json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "PERMISSIVE"}}),
        ),
    ];
    let (model, skipped) = build(&snap, &netns(&["web", "api"]));
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with("PeerAuthentication shop/garbled: cannot be read"))
    );
    let modes: BTreeMap<String, crate::policy::MtlsMode> = model
        .enrollments()
        .into_iter()
        .map(|e| (e.workload.name, e.mtls.mode))
        .collect();
    assert_eq!(modes["web"], crate::policy::MtlsMode::Strict);
    assert_eq!(modes["api"], crate::policy::MtlsMode::Permissive);
}

#[test]
fn without_this_node_the_model_is_invalid() {
    let mut snap = base();
    snap.nodes.retain(|n| n.name_any() != THIS);
    let c = convert(&snap, &settings(), &netns(&["web"]));
    let errors = ClusterModel::build(&c.input).expect_err("no this node");
    assert!(
        errors.iter().any(|e| e
            .to_string()
            .contains("this node `node-a` is not among the nodes")),
        "{errors:?}"
    );
}

#[test]
fn the_result_does_not_depend_on_store_order() {
    let snap = service_snapshot();
    let mut reversed = snap.clone();
    reversed.pods.reverse();
    reversed.nodes.reverse();
    reversed.namespaces.reverse();
    let f = netns(&["web", "db2"]);
    assert_eq!(
        convert(&snap, &settings(), &f),
        convert(&reversed, &settings(), &f)
    );
}

/// Objects whose names the model refuses are left out and reported, never passed on: one such
/// object used to make `ClusterModel::build` refuse the whole model (found by the `k8s_objects`
/// fuzz target: a Node without a name).
#[test]
fn objects_with_names_the_model_refuses_are_left_out() {
    let mut snap = service_snapshot();
    let nameless: Arc<Node> = typed(json!({"metadata": {},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.9"}]}}));
    snap.nodes.push(nameless);
    snap.nodes
        .push(node("Node_C", &[("InternalIP", "10.0.0.10")]));
    let mut bad_sa = pod_json("shop", "bad-sa", THIS, &["10.1.0.99"]);
    bad_sa["spec"]["serviceAccountName"] = json!("Not A Name");
    snap.pods.push(typed(bad_sa));
    snap.pods.push(pod("shop", "-dash", THIS, &["10.1.0.98"]));
    snap.services
        .push(service("shop", "web.", "10.96.0.99", json!([{"port": 80}])));
    let (model, skipped) = build(&snap, &netns(&["web", "db2", "bad-sa", "-dash"]));
    assert!(
        !names(&model)
            .iter()
            .any(|n| n.contains("bad-sa") || n.contains("-dash"))
    );
    assert_eq!(model.nodes().count(), 2, "only the two valid nodes");
    let joined = skipped.join("\n");
    for s in [
        "Node : the name `` is empty; left out",
        "Node Node_C: the name `Node_C` may contain only",
        "Pod shop/bad-sa: serviceAccountName `Not A Name` may contain only",
        "Pod shop/-dash: name `-dash` must start and end",
        "Service shop/web.: name `web.` must start and end",
    ] {
        assert!(joined.contains(s), "{s} missing in:\n{joined}");
    }
}

/// Objects from YAML documents as the `k8s_objects` fuzz target reads them.
fn snapshot_of_yaml(text: &str) -> Snapshot {
    use serde::Deserialize;
    let mut snap = Snapshot::default();
    for document in serde_norway::Deserializer::from_str(text) {
        let Ok(v) = serde_norway::Value::deserialize(document) else {
            break;
        };
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        macro_rules! push {
            ($field:ident, $ty:ty) => {
                if let Ok(o) = <$ty>::deserialize(v) {
                    snap.$field.push(Arc::new(o));
                }
            };
        }
        match kind.as_str() {
            "Pod" => push!(pods, Pod),
            "Node" => push!(nodes, Node),
            "Namespace" => push!(namespaces, Namespace),
            "Service" => push!(services, Service),
            "EndpointSlice" => push!(endpoint_slices, EndpointSlice),
            "AuthorizationPolicy" => push!(authorization_policies, DynamicObject),
            "PeerAuthentication" => push!(peer_authentications, DynamicObject),
            _ => {}
        }
    }
    snap
}

/// The `k8s_objects` fuzz target's inputs as they found the bugs: the model builds.
#[test]
fn fuzz_regressions_build_a_model() {
    for (name, text) in [
        (
            "node-without-a-name",
            include_str!("fuzz/node-without-a-name.yaml"),
        ),
        (
            "two-nodes-named-alike",
            include_str!("fuzz/two-nodes-named-alike.yaml"),
        ),
    ] {
        let snap = snapshot_of_yaml(text);
        let c = convert(&snap, &Settings::new("n1", ip("10.0.0.1")), &NoNetns);
        assert!(c.input.nodes.iter().any(|n| n.spec.name == "n1"), "{name}");
        if let Err(e) = ClusterModel::build(&c.input) {
            panic!("{name}: convert's output was refused: {e:?}");
        }
    }
}

/// A second Node, Pod or Service object with a name already seen is left out (the API server
/// keeps names unique; a broken source may not): the model refused duplicates as a whole
/// (found by the `k8s_objects` fuzz target: two Nodes named alike).
#[test]
fn a_second_object_with_the_same_name_is_left_out() {
    let mut snap = service_snapshot();
    snap.nodes
        .push(node("node-b", &[("InternalIP", "10.0.0.77")]));
    snap.pods.push(pod("shop", "web", THIS, &["10.1.0.77"]));
    snap.services.extend(snap.services.clone());
    let deny = policy(
        "AuthorizationPolicy",
        "shop",
        "deny",
        json!({"action": "DENY", "rules": [{}]}),
    );
    snap.authorization_policies = vec![deny.clone(), deny];
    let (model, skipped) = build(&snap, &netns(&["web", "db2"]));
    assert_eq!(model.nodes().count(), 2);
    let joined = skipped.join("\n");
    for s in [
        "Node node-b: another Node object has this name",
        "Pod shop/web: another Pod object has this name",
        "Service shop/",
        "AuthorizationPolicy shop/deny: another AuthorizationPolicy object has this name",
    ] {
        assert!(joined.contains(s), "{s} missing in:\n{joined}");
    }
}
