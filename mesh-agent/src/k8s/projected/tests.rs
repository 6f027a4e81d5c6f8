//! The projections keep what `convert` reads: the API's JSON deserialized into a projection
//! equals the projection of the full k8s-openapi object, and converting projections of rich,
//! realistic objects gives the model the full objects describe.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;
use crate::{
    k8s::{
        ENROLL_ENABLED, ENROLL_LABEL, FixedNetns,
        convert::{Settings, Snapshot, convert},
    },
    model::{ClusterModel, ObjectKey},
};

const THIS: &str = "node-a";

fn parse<T: DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).expect("a valid object")
}

/// Deserializes `v` both ways and checks the projections agree; returns the projection.
fn projected<Full, Own>(v: &Value) -> Own
where
    Full: DeserializeOwned,
    Own: DeserializeOwned + for<'a> From<&'a Full> + PartialEq + std::fmt::Debug,
{
    let direct: Own = parse(v);
    let full: Full = parse(v);
    assert_eq!(
        direct,
        Own::from(&full),
        "the JSON path lost or renamed a field"
    );
    direct
}

/// Metadata as the API server returns it, with what the projection must drop.
fn metadata(name: &str, ns: Option<&str>, labels: Value) -> Value {
    let mut m = json!({
        "name": name,
        "uid": format!("uid-{name}"),
        "resourceVersion": "48213",
        "generation": 3,
        "creationTimestamp": "2026-12-01T10:00:00Z",
        "labels": labels,
        "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": "{\"a very\":\"long string\"}",
            "example.com/note": "x",
        },
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d4f",
                             "uid": "uid-rs", "controller": true, "blockOwnerDeletion": true}],
        "finalizers": ["example.com/keep"],
        "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                           "time": "2026-12-01T10:00:01Z", "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:status": {"f:phase": {}}}, "subresource": "status"}],
    });
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

/// A pod as a kubelet and the admission chain leave it: probes of every kind (by number and
/// by name, one with its own host), an init container with a probe, the service account
/// volume, tolerations, conditions, container statuses.
fn rich_pod(name: &str, node: &str, ips: &[&str]) -> Value {
    let ips: Vec<Value> = ips.iter().map(|i| json!({"ip": i})).collect();
    let first = ips.first().cloned().unwrap_or(json!({"ip": ""}));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(name, Some("shop"), json!({"app": name, "version": "v2",
                                                           "pod-template-hash": "5d4f"})),
        "spec": {
            "nodeName": node,
            "serviceAccountName": "web-sa",
            "serviceAccount": "web-sa",
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "securityContext": {"runAsNonRoot": true},
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access-x", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt",
                               "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
            "initContainers": [{
                "name": "init", "image": "busybox",
                "ports": [{"name": "init-admin", "containerPort": 9901, "protocol": "TCP"}],
                "startupProbe": {"tcpSocket": {"port": "init-admin"}},
            }],
            "containers": [
                {
                    "name": "main", "image": "example.com/web:2",
                    "args": ["--port", "8080"],
                    "env": [{"name": "MODE", "value": "prod"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                    "volumeMounts": [{"name": "kube-api-access-x",
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                                      "readOnly": true}],
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "health", "containerPort": 8081, "protocol": "TCP"},
                    ],
                    "livenessProbe": {"httpGet": {"path": "/live", "port": "health",
                                                  "scheme": "HTTP"},
                                      "periodSeconds": 10, "failureThreshold": 3},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8082}},
                    "startupProbe": {"httpGet": {"host": "10.9.9.9", "port": 8083}},
                    "terminationMessagePath": "/dev/termination-log",
                    "imagePullPolicy": "IfNotPresent",
                },
                {
                    "name": "sidecar", "image": "example.com/agent:1",
                    "readinessProbe": {"grpc": {"port": 9090}},
                    "livenessProbe": {"tcpSocket": {"port": 7070}},
                    "startupProbe": {"exec": {"command": ["true"]}},
                },
            ],
        },
        "status": {
            "phase": "Running",
            "qosClass": "Burstable",
            "hostIP": "10.0.0.1",
            "hostIPs": [{"ip": "10.0.0.1"}],
            "podIP": first["ip"],
            "podIPs": ips,
            "startTime": "2026-12-01T10:00:01Z",
            "conditions": [{"type": "Ready", "status": "True",
                            "lastTransitionTime": "2026-12-01T10:00:05Z"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0,
                                   "image": "example.com/web:2", "imageID": "sha256:ab",
                                   "containerID": "containerd://12",
                                   "state": {"running": {"startedAt": "2026-12-01T10:00:04Z"}}}],
        },
    })
}

fn rich_node(name: &str, addresses: &[(&str, &str)]) -> Value {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": metadata(name, None, json!({"kubernetes.io/hostname": name})),
        "spec": {"podCIDR": "10.1.0.0/24", "providerID": "kind://x",
                 "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "addresses": addresses,
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "c",
                         "kernelVersion": "6", "kubeProxyVersion": "", "kubeletVersion": "v1.33",
                         "machineID": "m", "operatingSystem": "linux", "osImage": "Debian",
                         "systemUUID": "s"},
            "images": [{"names": ["example.com/web:2"], "sizeBytes": 1000}],
        },
    })
}

fn rich_namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": metadata(name, None, json!({ENROLL_LABEL: ENROLL_ENABLED,
                                                "kubernetes.io/metadata.name": name})),
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn rich_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata("web", Some("shop"), json!({"app": "web"})),
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd96::10"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "PreferDualStack",
            "selector": {"app": "web"},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "admin", "port": 81, "protocol": "TCP", "targetPort": 9000},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "plain", "port": 8443},
            ],
        },
        "status": {"loadBalancer": {}},
    })
}

fn rich_slice() -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": metadata("web-abc", Some("shop"),
                             json!({"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"})),
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.1.0.5"], "nodeName": THIS, "zone": "z1",
             "conditions": {"ready": true, "serving": true, "terminating": false},
             "targetRef": {"kind": "Pod", "name": "web", "namespace": "shop", "uid": "uid-web",
                           "resourceVersion": "1"}},
            {"addresses": ["10.2.0.7"], "nodeName": "node-b",
             "conditions": {"ready": false},
             "targetRef": {"kind": "Pod", "name": "web-old", "namespace": "shop"}},
            {"addresses": ["10.2.0.8"], "nodeName": "node-b",
             "targetRef": {"kind": "Pod", "name": "web-b", "namespace": "shop"}},
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
    })
}

fn rich_snapshot() -> Snapshot {
    Snapshot {
        pods: vec![
            Arc::new(projected::<core::Pod, Pod>(&rich_pod(
                "web",
                THIS,
                &["10.1.0.5", "fd01::5"],
            ))),
            Arc::new(projected::<core::Pod, Pod>(&rich_pod(
                "web-old",
                "node-b",
                &["10.2.0.7"],
            ))),
            Arc::new(projected::<core::Pod, Pod>(&rich_pod(
                "web-b",
                "node-b",
                &["10.2.0.8"],
            ))),
        ],
        nodes: vec![
            Arc::new(projected::<core::Node, Node>(&rich_node(
                THIS,
                &[("Hostname", "a"), ("InternalIP", "10.0.0.1")],
            ))),
            Arc::new(projected::<core::Node, Node>(&rich_node(
                "node-b",
                &[("ExternalIP", "192.0.2.2"), ("InternalIP", "10.0.0.2")],
            ))),
        ],
        namespaces: vec![Arc::new(projected::<core::Namespace, Namespace>(
            &rich_namespace("shop"),
        ))],
        services: vec![Arc::new(projected::<core::Service, Service>(
            &rich_service(),
        ))],
        endpoint_slices: vec![Arc::new(
            projected::<discovery::EndpointSlice, EndpointSlice>(&rich_slice()),
        )],
        ..Default::default()
    }
}

#[test]
fn metadata_keeps_identity_labels_and_times_only() {
    let pod: Pod = parse(&rich_pod("web", THIS, &["10.1.0.5"]));
    let m = &pod.metadata;
    assert_eq!(m.name.as_deref(), Some("web"));
    assert_eq!(m.namespace.as_deref(), Some("shop"));
    assert_eq!(m.uid.as_deref(), Some("uid-web"));
    assert_eq!(
        m.resource_version.as_deref(),
        Some("48213"),
        "the watcher resumes from it"
    );
    assert!(m.creation_timestamp.is_some());
    assert_eq!(
        m.labels
            .as_ref()
            .and_then(|l| l.get("version"))
            .map(String::as_str),
        Some("v2")
    );
    assert_eq!(
        *m,
        ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            labels: m.labels.clone(),
            creation_timestamp: m.creation_timestamp.clone(),
            ..Default::default()
        },
        "annotations, owners, finalizers and managedFields are not kept"
    );
    let deleting: Pod = parse(&json!({"metadata": {"name": "x",
        "deletionTimestamp": "2026-12-01T11:00:00Z"}}));
    assert!(deleting.metadata.deletion_timestamp.is_some());
}

#[test]
fn kube_sees_the_full_types_api_coordinates() {
    use kube::Resource;
    assert_eq!(
        Pod::url_path(&(), Some("shop")),
        "/api/v1/namespaces/shop/pods"
    );
    assert_eq!(Node::url_path(&(), None), "/api/v1/nodes");
    assert_eq!(Namespace::url_path(&(), None), "/api/v1/namespaces");
    assert_eq!(Service::url_path(&(), None), "/api/v1/services");
    assert_eq!(
        EndpointSlice::url_path(&(), None),
        "/apis/discovery.k8s.io/v1/endpointslices"
    );
    assert_eq!(EndpointSlice::kind(&()), "EndpointSlice");
}

/// Objects of every kind with sparse fields (as tests and minimal clients write them) still
/// deserialize, and agree with the full types' projection.
#[test]
fn sparse_objects_deserialize() {
    projected::<core::Pod, Pod>(&json!({"metadata": {"name": "p"}}));
    projected::<core::Pod, Pod>(&json!({"metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c"}]}, "status": {}}));
    projected::<core::Node, Node>(&json!({"metadata": {"name": "n"}}));
    projected::<core::Namespace, Namespace>(&json!({"metadata": {"name": "n"}}));
    projected::<core::Service, Service>(&json!({"metadata": {"name": "s"}, "spec": {}}));
    projected::<discovery::EndpointSlice, EndpointSlice>(
        &json!({"metadata": {"name": "e"}, "addressType": "IPv4", "endpoints": [{"addresses": []}]}),
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP")
}

/// What the full objects describe, built from their projections: every field `convert` reads
/// reaches the model.
#[test]
fn convert_of_projected_rich_objects_keeps_every_read_field() {
    let snap = rich_snapshot();
    let netns = FixedNetns(
        [("uid-web".to_owned(), PathBuf::from("/run/netns/web"))]
            .into_iter()
            .collect(),
    );
    let settings = Settings::new(THIS, ip("169.254.7.1"));
    let converted = convert(&snap, &settings, &netns);
    let model = ClusterModel::build(&converted.input).expect("a valid model");

    let web = model.workload(&ObjectKey::new("shop", "web")).expect("web");
    assert_eq!(web.node, THIS);
    assert_eq!(web.ips, [ip("10.1.0.5"), ip("fd01::5")]);
    assert_eq!(web.netns, PathBuf::from("/run/netns/web"));
    assert_eq!(
        web.identity.spiffe_id(),
        "spiffe://cluster.local/ns/shop/sa/web-sa"
    );
    assert_eq!(web.labels.get("version").map(String::as_str), Some("v2"));
    // liveness by name (health → 8081), readiness 8082, startup with its own host (left out),
    // gRPC 9090, tcpSocket 7070, the init container's startup probe by name (9901).
    assert_eq!(web.probe_ports, [7070, 8081, 8082, 9090, 9901]);
    assert_eq!(
        model.node("node-b").expect("node-b").address,
        ip("10.0.0.2")
    );

    let web_svc = model
        .services()
        .find(|s| s.key == ObjectKey::new("shop", "web"))
        .expect("the service");
    assert_eq!(web_svc.vips, [ip("10.96.0.10"), ip("fd96::10")]);
    let ports: Vec<(u16, u16)> = web_svc
        .ports
        .iter()
        .map(|p| (p.port, p.target_port))
        .collect();
    // http → the slice's 8080 (by name), admin → 9000, dns (UDP) left out, plain → 8443.
    assert_eq!(ports, [(80, 8080), (81, 9000), (8443, 8443)]);
    // web-old is not ready.
    assert_eq!(
        web_svc.endpoints,
        [
            ObjectKey::new("shop", "web"),
            ObjectKey::new("shop", "web-b")
        ]
    );
}
