//! The chart's generated CRDs and RBAC against a real kube-apiserver (`nodemesh_tests::k8s`):
//! the CRDs are accepted (structural schema, CEL rules within the cost budget) and become
//! Established; the documented examples and an Istio L4 policy (only `apiVersion` changed) are
//! stored unchanged; L7 fields, CUSTOM, bad enums and bad ports are refused with messages that
//! say why; the status subresource takes conditions; and the ClusterRoles rendered by
//! `helm template` grant each component exactly `mesh_agent::rbac`'s list, as the apiserver's
//! own authorizer decides (SubjectAccessReview).
//!
//! Needs root (the control plane runs in its own network namespace) and the binaries of
//! `cargo xtask k8s build` (`cargo xtask test` builds them first).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, ensure};
use mesh_agent::{
    crd::GROUP,
    policy::spec::API_VERSION,
    rbac::{COMPONENTS, Permission},
};
use nodemesh_tests::{
    k8s::{ControlPlane, pinned_version},
    require_root, unique_prefix,
};
use serde_json::{Value, json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(workspace().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {dir}");
    files
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Applies the chart's CRDs and waits until both are Established.
fn install_crds(cp: &ControlPlane) -> Result<()> {
    for file in yaml_files("charts/nodemesh/files/crds") {
        let path = file.to_string_lossy().into_owned();
        cp.kubectl(&["apply", "--server-side", "-f", &path])
            .with_context(|| format!("the API server refuses the CRD {path}"))?;
    }
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        &format!("crd/authorizationpolicies.{GROUP}"),
        &format!("crd/peerauthentications.{GROUP}"),
    ])?;
    Ok(())
}

/// `kubectl apply` of `yaml`, expected to be refused; returns kubectl's error output.
fn refused(cp: &ControlPlane, yaml: &str) -> Result<String> {
    let out = cp.kubectl_output(cp.admin_kubeconfig(), &["apply", "-f", "-"], Some(yaml))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "the API server accepted what it must refuse:\n{yaml}"
    );
    Ok(stderr)
}

const ISTIO_L4_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        ports: ["8000", "8080"]
    when:
    - key: source.ip
      values: ["10.1.2.3/32", "10.2.0.0/16"]
"#;

fn ported(istio: &str) -> String {
    istio.replacen("security.istio.io/v1", API_VERSION, 1)
}

/// A DENY on one operation field: `methods: [POST]` would widen to every method if pruned.
fn deny_with(operation_field: &str) -> String {
    format!(
        "apiVersion: {API_VERSION}\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-l7\n  \
         namespace: foo\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        \
         ports: [\"8080\"]\n        {operation_field}\n"
    )
}

#[test]
fn generated_crds_are_served_and_refuse_what_the_agent_refuses() -> Result<()> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    install_crds(&cp)?;
    cp.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: foo\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n")?;

    // The documented examples apply and are stored as written (nothing pruned).
    for file in yaml_files("docs/examples") {
        let text = std::fs::read_to_string(&file)?;
        cp.apply(&text)
            .with_context(|| format!("{} is refused", file.display()))?;
    }

    // Istio's L4 policy with only apiVersion changed: accepted, stored unchanged.
    cp.apply(&ported(ISTIO_L4_POLICY))?;
    let stored = json(&cp.kubectl(&[
        "get",
        &format!("authorizationpolicies.{GROUP}"),
        "-n",
        "foo",
        "httpbin",
        "-o",
        "json",
    ])?);
    assert_eq!(
        stored["spec"]["rules"][0]["to"][0]["operation"]["ports"],
        json!(["8000", "8080"])
    );
    assert_eq!(
        stored["spec"]["rules"][0]["when"][0]["values"],
        json!(["10.1.2.3/32", "10.2.0.0/16"])
    );
    assert_eq!(
        stored["spec"]["rules"][0]["from"][1]["source"]["namespaces"],
        json!(["dev"])
    );

    // L7 operation fields: refused, with the reason, never pruned into a broader DENY.
    for field in [
        "methods: [\"POST\"]",
        "paths: [\"/admin\"]",
        "hosts: [\"a.example\"]",
    ] {
        let err = refused(&cp, &deny_with(field))?;
        let name = field.split(':').next().expect("a field");
        assert!(
            err.contains(&format!("`{name}` is an HTTP (L7) attribute"))
                && err.contains("nodemesh enforces L4 only"),
            "{field}: {err}"
        );
    }
    // An L7 source field.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace(
            "namespaces: [\"dev\"]",
            "requestPrincipals: [\"issuer/subject\"]",
        ),
    )?;
    assert!(
        err.contains("`requestPrincipals` is an HTTP (L7) attribute"),
        "{err}"
    );
    // An L7 condition key.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace("key: source.ip", "key: request.headers[x-user]"),
    )?;
    assert!(
        err.contains("condition key `request.headers[x-user]` is not an L4 attribute"),
        "{err}"
    );
    // CUSTOM and its provider.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace(
            "action: ALLOW",
            "action: CUSTOM\n  provider:\n    name: ext-authz",
        ),
    )?;
    assert!(
        err.contains("action CUSTOM") && err.contains("`provider` belongs to action CUSTOM"),
        "{err}"
    );
    // Waypoint attachment.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace(
            "  selector:\n    matchLabels:\n      app: httpbin\n      version: v1\n",
            "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: httpbin\n",
        ),
    )?;
    assert!(err.contains("waypoint or gateway"), "{err}");
    // A bad enum.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace("action: ALLOW", "action: REJECT"),
    )?;
    assert!(
        err.contains("REJECT") && err.contains("spec.action"),
        "{err}"
    );
    // A port out of range.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace("\"8000\"", "\"70000\""),
    )?;
    assert!(err.contains("70000") && err.contains("ports[0]"), "{err}");
    // mTLS DISABLE, and a mode that does not exist.
    let pa =
        std::fs::read_to_string(workspace().join("docs/examples/peerauthentication-strict.yaml"))?;
    let err = refused(&cp, &pa.replace("mode: STRICT", "mode: DISABLE"))?;
    assert!(err.contains("mode DISABLE is not supported"), "{err}");
    let err = refused(&cp, &pa.replace("mode: STRICT", "mode: STRICTEST"))?;
    assert!(err.contains("STRICTEST"), "{err}");
    // A misspelt field: kubectl's strict field validation refuses it.
    let err = refused(
        &cp,
        &ported(ISTIO_L4_POLICY).replace("    to:\n", "    too:\n"),
    )?;
    assert!(err.contains("too"), "{err}");

    // The status subresource takes conditions and observedGeneration; the printer column shows
    // Accepted.
    let status = json!({ "status": {
        "observedGeneration": stored["metadata"]["generation"],
        "conditions": [{
            "type": "Accepted",
            "status": "True",
            "reason": "Accepted",
            "message": "enforced by every agent",
            "lastTransitionTime": "2026-12-06T20:00:00Z",
        }],
    }});
    cp.kubectl(&[
        "patch",
        &format!("authorizationpolicies.{GROUP}"),
        "-n",
        "foo",
        "httpbin",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;
    let table = cp.kubectl(&["get", "nmap", "-n", "foo", "httpbin"])?;
    assert!(
        table.contains("ACCEPTED") && table.contains("True") && table.contains("ALLOW"),
        "{table}"
    );
    // A spec write through the main resource does not touch status, and vice versa.
    let stored = json(&cp.kubectl(&[
        "get",
        &format!("authorizationpolicies.{GROUP}"),
        "-n",
        "foo",
        "httpbin",
        "-o",
        "json",
    ])?);
    assert_eq!(stored["status"]["conditions"][0]["type"], json!("Accepted"));
    Ok(())
}

/// Every permission `component` could plausibly be given: the union of all components' grants
/// plus some nobody has, each with every common verb.
fn candidate_permissions() -> BTreeSet<(String, String)> {
    let mut resources: BTreeSet<(String, String)> = COMPONENTS
        .iter()
        .flat_map(|c| c.cluster_set().into_iter().chain(c.release_namespace_set()))
        .map(|(g, r, _)| (g, r))
        .collect();
    resources.insert((String::new(), "secrets".into()));
    resources.insert((String::new(), "configmaps".into()));
    resources.insert(("apps".into(), "daemonsets".into()));
    resources
}

const VERBS: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// What the API server's authorizer allows ServiceAccount `ns/sa`, out of the candidates, in
/// namespace `in_ns` (`None`: cluster-wide).
fn allowed(
    cp: &ControlPlane,
    ns: &str,
    sa: &str,
    in_ns: Option<&str>,
) -> Result<BTreeSet<Permission>> {
    let mut reviews = String::new();
    let mut asked = Vec::new();
    for (group, resource) in candidate_permissions() {
        let (resource_name, subresource) = resource.split_once('/').unwrap_or((&resource, ""));
        for verb in VERBS {
            let mut attrs = json!({
                "group": group, "resource": resource_name, "verb": verb,
            });
            if !subresource.is_empty() {
                attrs["subresource"] = json!(subresource);
            }
            if let Some(n) = in_ns {
                attrs["namespace"] = json!(n);
            }
            let review = json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": format!("system:serviceaccount:{ns}:{sa}"),
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "resourceAttributes": attrs,
                },
            });
            reviews.push_str(&review.to_string());
            reviews.push('\n');
            asked.push((group.clone(), resource.clone(), verb.to_owned()));
        }
    }
    let out = cp.kubectl_output(
        cp.admin_kubeconfig(),
        &["create", "-f", "-", "-o", "json"],
        Some(&reviews),
    )?;
    ensure!(
        out.status.success(),
        "SubjectAccessReviews failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut answers = Vec::new();
    for v in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
        let v = v?;
        match v["items"].as_array() {
            Some(items) => answers.extend(items.iter().cloned()),
            None => answers.push(v),
        }
    }
    ensure!(
        answers.len() == asked.len(),
        "{} answers for {} reviews",
        answers.len(),
        asked.len()
    );
    Ok(asked
        .into_iter()
        .zip(answers)
        .filter(|(_, a)| a["status"]["allowed"] == json!(true))
        .map(|(p, _)| p)
        .collect())
}

#[test]
fn chart_rbac_grants_each_component_exactly_its_list() -> Result<()> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    install_crds(&cp)?;
    let release_ns = "nodemesh-system";
    cp.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {release_ns}\n"
    ))?;
    let chart = workspace().join("charts/nodemesh");
    let rendered = std::process::Command::new(cp.binaries().helm())
        .args(["template", "nodemesh"])
        .arg(&chart)
        .args(["--namespace", release_ns])
        // Offline, Helm 3 assumes Kubernetes 1.20, below the chart's kubeVersion.
        .args(["--kube-version", &pinned_version("KUBERNETES_VERSION")?])
        .output()
        .context("cannot run helm")?;
    ensure!(
        rendered.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    cp.apply(&String::from_utf8_lossy(&rendered.stdout))?;

    for component in COMPONENTS {
        let sa = format!("nodemesh-{}", component.component);
        // Cluster-wide: exactly the ClusterRole's grants (a namespaced request elsewhere sees
        // the same, and nothing more).
        let cluster = allowed(&cp, release_ns, &sa, None)?;
        let want = component.cluster_set();
        assert_eq!(
            cluster, want,
            "{sa}: the API server allows cluster-wide {cluster:?}, mesh-agent/src/rbac.rs lists {want:?}"
        );
        let elsewhere = allowed(&cp, release_ns, &sa, Some("default"))?;
        assert_eq!(elsewhere, want, "{sa} in namespace default");
        // In the release namespace: the ClusterRole's plus the Role's.
        let here = allowed(&cp, release_ns, &sa, Some(release_ns))?;
        let mut want_here = want.clone();
        want_here.extend(component.release_namespace_set());
        assert_eq!(
            here, want_here,
            "{sa} in the release namespace {release_ns}"
        );
    }
    Ok(())
}
