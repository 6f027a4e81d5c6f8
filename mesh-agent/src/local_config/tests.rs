use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::model::{Destination, FailMode, ObjectKey, Problem};
use crate::policy::MtlsMode;

fn lab_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/lab")
}

fn build(text: &str) -> Result<ClusterModel, ConfigErrors> {
    build_from_texts(&[("lab.yaml".to_owned(), text.to_owned())], None)
}

fn errors_of(text: &str) -> Vec<String> {
    match build(text) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

const HEADER: &str = "apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\n";

/// A small valid file; tests edit it.
fn small() -> String {
    format!(
        "{HEADER}thisNode: n1
nodes:
- {{name: n1, address: 10.0.0.1, tunnelAddress: 169.254.0.1}}
- {{name: n2, address: 10.0.0.2, tunnelAddress: 169.254.0.2, hbonePort: 15009}}
workloads:
- name: a
  namespace: ns
  serviceAccount: sa-a
  ips: [10.1.0.1, 'fd00::1']
  netns: /run/netns/a
  node: n1
- name: b
  namespace: ns
  serviceAccount: sa-b
  labels: {{app: b}}
  ips: [10.1.0.2]
  netns: /run/netns/b
  node: n2
  failMode: open
services:
- name: svc
  namespace: ns
  vips: [10.96.0.1]
  ports: [{{port: 80, targetPort: 8080}}]
  selector: {{matchLabels: {{app: b}}}}
"
    )
}

#[test]
fn lab_example_parses_into_the_expected_model() {
    let model = LocalConfigSource::new(lab_dir().join("lab.yaml"), None)
        .load()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.this_node().name, "node-a");
    assert_eq!(model.nodes().count(), 2);
    let peers: Vec<_> = model.peer_nodes().map(|n| n.name.as_str()).collect();
    assert_eq!(peers, ["node-b"]);
    let b = model.node("node-b").unwrap_or_else(|| panic!("node-b"));
    assert_eq!(b.address.to_string(), "10.200.0.2");
    assert_eq!(b.hbone_port, 15008);
    assert_eq!(b.metrics_port, 15020);
    let names: Vec<_> = model.workloads().map(|w| w.key.to_string()).collect();
    assert_eq!(
        names,
        [
            "demo/client-a",
            "demo/client-b",
            "demo/server-a",
            "demo/server-b"
        ]
    );
    let local: Vec<_> = model
        .local_workloads()
        .map(|w| w.key.name.as_str())
        .collect();
    assert_eq!(local, ["client-a", "server-a"]);
    let Some(Destination::Service { service, endpoints }) =
        model.lookup("10.96.0.10".parse().unwrap_or_else(|_| unreachable!()))
    else {
        panic!("VIP not found");
    };
    assert_eq!(service.target_port(80), Some(8080));
    let eps: Vec<_> = endpoints
        .map(|(w, n)| format!("{}@{}", w.key.name, n.name))
        .collect();
    assert_eq!(eps, ["server-a@node-a", "server-b@node-b"]);
    assert_eq!(model.identities().count(), 2);
    // policies.yaml came in through `include`: STRICT for the namespace, two AuthorizationPolicies.
    for e in model.enrollments() {
        assert_eq!(e.mtls.mode, MtlsMode::Strict, "{}", e.workload);
        assert_eq!(e.fail_mode, FailMode::Closed);
    }
    assert!(model.warnings().is_empty(), "{:?}", model.warnings());
    // The same file serves node-b's agent.
    let model_b = LocalConfigSource::new(lab_dir().join("lab.yaml"), Some("node-b".into()))
        .load()
        .unwrap_or_else(|e| panic!("{e}"));
    let local: Vec<_> = model_b
        .local_workloads()
        .map(|w| w.key.name.as_str())
        .collect();
    assert_eq!(local, ["client-b", "server-b"]);
}

#[test]
fn the_small_fixture_is_valid() {
    let model = build(&small()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.workloads().count(), 2);
    assert_eq!(model.node("n2").map(|n| n.hbone_port), Some(15009));
}

#[test]
fn a_bad_ip_is_reported_with_line_column_and_path() {
    let text = small().replace("ips: [10.1.0.2]", "ips: [10.0.0.300]");
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .starts_with("lab.yaml:18:9: workloads[1].ips[0]: invalid IP address \"10.0.0.300\""),
        "{}",
        errors[0]
    );
}

#[test]
fn unknown_fields_and_bad_values_are_rejected_with_their_path() {
    let text = small().replace("  failMode: open", "  failMode: sometimes");
    let e = errors_of(&text);
    assert!(
        e[0].contains("workloads[1].failMode: unknown variant `sometimes`"),
        "{e:?}"
    );
    let text = small().replace("  node: n2", "  node: n2\n  nodeName: n2");
    let e = errors_of(&text);
    assert!(
        e[0].contains("workloads[1]: unknown field `nodeName`"),
        "{e:?}"
    );
    let text = small().replace("targetPort: 8080", "targetPort: 70000");
    let e = errors_of(&text);
    assert!(e[0].starts_with("lab.yaml:"), "{e:?}");
    assert!(
        e[0].contains("services[0].ports[0].targetPort: invalid value"),
        "{e:?}"
    );
    let text = small().replace("port: 80,", "port: 80, protocol: UDP,");
    let e = errors_of(&text);
    assert!(
        e[0].contains("services[0].ports[0].protocol: unknown variant `UDP`"),
        "{e:?}"
    );
}

#[test]
fn every_model_error_is_reported_at_once() {
    let text = format!(
        "{HEADER}thisNode: n1
nodes:
- {{name: n1, address: 10.0.0.1, tunnelAddress: 169.254.0.1, adminPort: 0}}
- {{name: n1, address: 10.0.0.1, tunnelAddress: 169.254.0.2}}
- {{name: N_2, address: 10.0.0.3, tunnelAddress: 169.254.0.2}}
workloads:
- {{name: a, namespace: ns, serviceAccount: sa, ips: [10.1.0.1], netns: /run/netns/a, node: n1}}
- {{name: a, namespace: ns, serviceAccount: sa, ips: [10.1.0.9], netns: /run/netns/a2, node: n1}}
- {{name: c, namespace: ns, serviceAccount: '', ips: [10.1.0.1], netns: run/netns/c, node: n9, probePorts: [0]}}
services:
- {{name: s, namespace: ns, vips: [10.1.0.1], ports: [{{port: 80}}, {{port: 80}}], endpoints: [a, ghost]}}
- {{name: t, namespace: ns, vips: [10.96.0.2], ports: [{{port: 0}}]}}
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: l7, namespace: ns}}
spec:
  rules:
  - to:
    - operation: {{methods: [GET]}}
"
    );
    let e = errors_of(&text);
    let expect = [
        "lab.yaml: nodes[0].adminPort: node `n1`: port 0 is not a port",
        "lab.yaml: nodes[1].name: node `n1` is defined twice (first at lab.yaml: nodes[0])",
        "lab.yaml: workloads[1].name: workload ns/a is defined twice (first at lab.yaml: workloads[0])",
        "lab.yaml: nodes[1].address: node `n1`: address 10.0.0.1 is already the address of node `n1`",
        "lab.yaml: nodes[2].name: node: name `N_2` may contain only lowercase letters",
        "lab.yaml: workloads[2].serviceAccount: workload ns/c: serviceAccount `` is empty",
        "lab.yaml: workloads[2].netns: workload ns/c: network namespace path `run/netns/c` must be absolute",
        "lab.yaml: workloads[2].node: workload ns/c runs on node `n9`, which is not among the nodes (N_2, n1)",
        "lab.yaml: workloads[2].probePorts[0]: workload ns/c: port 0",
        "lab.yaml: workloads[2].ips[0]: workload ns/c: address 10.1.0.1 is already used by workload ns/a (lab.yaml: workloads[0].ips[0])",
        "lab.yaml: services[0].ports[1].port: service ns/s: port 80 is listed twice",
        "lab.yaml: services[0].endpoints[1]: service ns/s: endpoint `ghost` is not a workload in namespace `ns`",
        "lab.yaml: services[0].vips[0]: service ns/s: address 10.1.0.1 is already used by workload ns/a",
        "lab.yaml: services[1].ports[0].port: service ns/t: port 0",
        "lab.yaml: services[1].ports[0].targetPort: service ns/t: port 0",
        "lab.yaml: services[1].endpoints: service ns/t: give `endpoints`",
        "lab.yaml (document 2): AuthorizationPolicy ns/l7: spec.rules[0].to[0].operation.methods: `methods` is an HTTP (L7) attribute",
    ];
    for want in expect {
        assert!(
            e.iter().any(|got| got.starts_with(want)),
            "missing {want:?} in\n{}",
            e.join("\n")
        );
    }
    assert_eq!(e.len(), expect.len(), "{}", e.join("\n"));
}

#[test]
fn this_node_must_name_one_node() {
    let text = small().replace("thisNode: n1\n", "");
    assert!(errors_of(&text)[0].contains("thisNode: no node is this node"));
    let text = small().replace("thisNode: n1", "thisNode: n7");
    assert!(errors_of(&text)[0].contains("this node `n7` is not among the nodes (n1, n2)"));
    // The override wins over the file.
    let model =
        build_from_texts(&[("f".into(), small())], Some("n2")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.this_node().name, "n2");
    // Two documents that disagree.
    let text = format!("{}---\n{HEADER}thisNode: n2\n", small());
    assert!(errors_of(&text)[0].contains("thisNode: `n2` contradicts `n1`"));
}

#[test]
fn documents_are_checked_by_kind_and_lines_count_from_the_stream_start() {
    let text = format!(
        "{}---\nkind: Workload\n---\n- a list\n---\n{HEADER}nodes: [{{name: x, address: 1.2.3.4, tunnelAddress: nope}}]\n",
        small()
    );
    let e = errors_of(&text);
    assert!(
        e[0].contains("(document 2): kind: `Workload` is not one of LocalCluster"),
        "{e:?}"
    );
    assert!(
        e[1].contains("(document 3): a document must be a mapping"),
        "{e:?}"
    );
    let line = small().lines().count() + 8;
    assert!(
        e[2].starts_with(&format!("lab.yaml:{line}:"))
            && e[2].contains("nodes[0].tunnelAddress: invalid IP address \"nope\""),
        "{e:?}"
    );
    let text = small().replace("local.nodemesh.io/v1alpha1", "local.nodemesh.io/v2");
    assert!(
        errors_of(&text)[0].contains("apiVersion: `local.nodemesh.io/v2` is not the local file's")
    );
    let e = errors_of("a: [unclosed\n");
    assert!(e[0].starts_with("lab.yaml:"), "{e:?}");
}

#[test]
fn mangled_and_truncated_files_never_panic() {
    let lab = std::fs::read_to_string(lab_dir().join("lab.yaml")).unwrap_or_default();
    let policies = std::fs::read_to_string(lab_dir().join("policies.yaml")).unwrap_or_default();
    let texts = [lab, policies, small()];
    let replacements = [b' ', b':', b'-', b'[', b'{', b'\n', b'0', b'"', b'*', b'&'];
    for text in &texts {
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            let mut mangled = bytes.to_vec();
            mangled[i] = replacements[i % replacements.len()];
            let _ = build(&String::from_utf8_lossy(&mangled));
            if text.is_char_boundary(i) {
                let _ = build(&text[..i]);
            }
        }
    }
}

#[test]
fn includes_are_read_relative_to_the_main_file_and_only_one_level_deep() {
    let dir = temp_dir();
    let main = dir.join("main.yaml");
    std::fs::write(&main, format!("{}include: [more.yaml]\n", small())).unwrap_or_default();
    std::fs::write(
        dir.join("more.yaml"),
        format!("{HEADER}include: [x.yaml]\n"),
    )
    .unwrap_or_default();
    let e = LocalConfigSource::new(&main, None)
        .load()
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref()
            .unwrap_or_default()
            .contains("only the main file may include files"),
        "{e:?}"
    );
    std::fs::remove_file(dir.join("more.yaml")).unwrap_or_default();
    let e = LocalConfigSource::new(&main, None)
        .load()
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref()
            .unwrap_or_default()
            .contains("more.yaml: cannot read"),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nodemesh-local-config-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Replaces a file as editors do (write a new file, rename it over the old one), so the
/// watcher never reads a half-written file.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Waits (with a deadline, never a fixed sleep) until `status` satisfies `done`.
async fn wait_status(
    status: &mut tokio::sync::watch::Receiver<ReloadStatus>,
    done: impl Fn(&ReloadStatus) -> bool,
) -> ReloadStatus {
    let result = {
        let wait = status.wait_for(|s| done(s));
        match tokio::time::timeout(Duration::from_secs(20), wait).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    };
    result.unwrap_or_else(|| panic!("the watcher did not get there: {:?}", *status.borrow()))
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_last_good_model() {
    let dir = temp_dir();
    let main = dir.join("mesh.yaml");
    std::fs::write(&main, small()).unwrap_or_else(|e| panic!("{e}"));
    let watch = LocalConfigSource::new(&main, None)
        .watch(Duration::from_millis(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut models = watch.models.clone();
    let mut status = watch.status.clone();
    let first = models.borrow_and_update().clone();
    assert_eq!(first.workloads().count(), 2);

    // Invalid: a duplicate address. Rejected; the model stays.
    replace_file(&main, &small().replace("10.1.0.2", "10.1.0.1"));
    let s = wait_status(&mut status, |s| s.attempts >= 1).await;
    let error = s.last_error.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.contains("address 10.1.0.1 is already used"),
        "{error}"
    );
    assert!(!models.has_changed().unwrap_or(true));
    assert_eq!(*models.borrow(), first);

    // Valid again, with a change: published.
    replace_file(&main, &small().replace("10.1.0.2", "10.1.0.3"));
    let changed = tokio::time::timeout(Duration::from_secs(20), models.changed()).await;
    assert!(matches!(changed, Ok(Ok(()))), "no new model published");
    let model = models.borrow_and_update().clone();
    let b = model
        .workload(&ObjectKey::new("ns", "b"))
        .map(|w| w.ips.clone());
    assert_eq!(
        b,
        Some(vec!["10.1.0.3".parse().unwrap_or_else(|_| unreachable!())])
    );
    let s = wait_status(&mut status, |s| s.published >= 1).await;
    assert!(s.last_error.is_none());
    // Numbering is stable: the same workloads keep their ids.
    for w in model.workloads() {
        assert_eq!(
            first.workload(&w.key).map(|f| (f.id, f.identity_id)),
            Some((w.id, w.identity_id))
        );
    }
    // An edit that changes nothing in the model (a comment) is read but publishes nothing.
    let attempts = s.attempts;
    replace_file(
        &main,
        &format!("# a comment\n{}", small().replace("10.1.0.2", "10.1.0.3")),
    );
    let s = wait_status(&mut status, |s| s.attempts > attempts).await;
    assert_eq!(s.published, 1);
    assert!(s.last_error.is_none());
    assert!(!models.has_changed().unwrap_or(true));
    drop(watch);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn selector_matching_nothing_is_a_warning() {
    let text = small().replace("matchLabels: {app: b}", "matchLabels: {app: z}");
    let model = build(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        model.warnings()[0].problem,
        Problem::SelectorMatchesNothing { .. }
    ));
    assert_eq!(model.warnings()[0].path, "services[0].selector");
}

#[test]
fn the_example_in_the_docs_is_valid() {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/local-mode.md"),
    )
    .unwrap_or_else(|e| panic!("docs/local-mode.md: {e}"));
    let example = doc
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("no yaml block in docs/local-mode.md"));
    let model = build(example).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.this_node().name, "node-a");
    assert_eq!(model.enrollments().len(), 1);
}

#[test]
fn a_policy_defined_twice_is_an_error() {
    let policy = "---\napiVersion: security.nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\nspec: {mtls: {mode: STRICT}}\n";
    let e = errors_of(&format!("{}{policy}{policy}", small()));
    assert!(
        e[0].contains("(document 3): metadata.name: PeerAuthentication ns/p is defined twice"),
        "{e:?}"
    );
}

#[test]
fn syntax_errors_have_a_position_once() {
    let text = small().replace("ips: [10.1.0.2]", "ips: [10.1.0.2");
    let e = errors_of(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("lab.yaml:19:"), "{e:?}");
    assert!(!e[0].contains(" at line 19 column"), "{e:?}");
    assert!(
        e[0].contains("while parsing a flow sequence at line 18"),
        "{e:?}"
    );
}

#[test]
fn errors_in_an_included_file_name_that_file() {
    let dir = temp_dir();
    let main = dir.join("main.yaml");
    std::fs::write(&main, format!("{}include: [more.yaml]\n", small())).unwrap_or_default();
    std::fs::write(
        dir.join("more.yaml"),
        format!("{HEADER}workloads:\n- {{name: x, namespace: ns, serviceAccount: s, ips: [1.2.3], netns: /x, node: n1}}\n"),
    )
    .unwrap_or_default();
    let e = LocalConfigSource::new(&main, None)
        .load()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let want = format!("{}:4:", dir.join("more.yaml").display());
    assert!(
        e.contains(&want) && e.contains("workloads[0].ips[0]: invalid IP address \"1.2.3\""),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn policies_need_their_api_version() {
    let policy = "---\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\n";
    let e = errors_of(&format!("{}{policy}", small()));
    assert_eq!(
        e,
        [
            "lab.yaml (document 2): apiVersion: missing; policies need `apiVersion: security.nodemesh.io/v1alpha1`"
        ]
    );
    let policy = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\n";
    let e = errors_of(&format!("{}{policy}", small()));
    assert!(
        e[0].contains("apiVersion `security.istio.io/v1` is not nodemesh's"),
        "{e:?}"
    );
}
