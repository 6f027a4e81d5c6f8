//! The policy compiler: YAML documents into `AuthorizationPolicy` and `PeerAuthentication`
//! (the local file's and the CRDs' spec types), `PolicySet::compile`, then decisions for a few
//! connections to workloads the policies select. Checks, besides "no panic": decisions are
//! deterministic, and every error finding has a path and a message.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use mesh_agent::policy::{
    ConnectionAttrs, DEFAULT_ROOT_NAMESPACE, PeerIdentity, PolicySet, WorkloadMeta,
    spec::{AuthorizationPolicy, PeerAuthentication},
};
use serde::Deserialize;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let Ok(value) = serde_norway::Value::deserialize(document) else {
            break;
        };
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("PeerAuthentication") => {
                if let Ok(p) = PeerAuthentication::deserialize(value) {
                    peer.push(p);
                }
            }
            _ => {
                if let Ok(p) = AuthorizationPolicy::deserialize(value) {
                    authz.push(p);
                }
            }
        }
    }
    let (set, findings) = PolicySet::compile(DEFAULT_ROOT_NAMESPACE, &authz, &peer);
    for f in &findings {
        assert!(!f.problem.to_string().is_empty(), "{f:?}");
    }

    // Workloads: each policy's namespace with its selector's labels, and one plain workload.
    let mut workloads = vec![WorkloadMeta {
        namespace: "default".into(),
        labels: [("app".to_owned(), "web".to_owned())].into(),
    }];
    for p in &authz {
        workloads.push(WorkloadMeta {
            namespace: p.metadata.namespace.clone(),
            labels: p
                .spec
                .selector
                .clone()
                .map(|s| s.match_labels)
                .unwrap_or_default(),
        });
    }
    workloads.truncate(8);
    let client = PeerIdentity::from_spiffe_uri("spiffe://cluster.local/ns/default/sa/client");
    let mut ports: Vec<u16> = set.named_ports().into_iter().take(4).collect();
    ports.extend([80, 8080]);
    let sources: [(Option<PeerIdentity>, IpAddr); 3] = [
        (client, "10.0.0.1".parse().expect("ip")),
        (None, "192.168.1.10".parse().expect("ip")),
        (None, "fd00::1".parse().expect("ip")),
    ];
    for w in &workloads {
        let _ = set.selects_any(w);
        for &port in &ports {
            let _ = set.mtls_mode(w, port);
            for (src_identity, src_ip) in &sources {
                let conn = ConnectionAttrs {
                    src_identity: src_identity.clone(),
                    src_ip: *src_ip,
                    dst_ip: "10.0.0.2".parse().expect("ip"),
                    dst_port: port,
                };
                let first = set.authorize(w, &conn);
                assert_eq!(
                    set.authorize(w, &conn),
                    first,
                    "decisions are deterministic"
                );
            }
        }
    }
    let _ = set.mtls_port_overrides(&workloads[0]);
});
