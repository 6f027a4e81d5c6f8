//! The chart's RBAC grants exactly [`COMPONENTS`]: read from the templates, with Helm's
//! `{{ ... }}` replaced by a placeholder (the rule blocks use no template expressions; the root
//! test `tests/tests/k8s_crds.rs` checks `helm template` output against a real apiserver).

use std::collections::BTreeSet;

use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
struct Object {
    kind: String,
    metadata: Meta,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default, rename = "roleRef")]
    role_ref: Option<RoleRef>,
    #[serde(default)]
    subjects: Vec<Subject>,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

#[derive(Deserialize)]
struct RoleRef {
    kind: String,
    name: String,
}

#[derive(Deserialize)]
struct Subject {
    kind: String,
    name: String,
}

/// Placeholders: the chart's fullname helper, the service account names and the namespace.
const FULLNAME: &str = "REL";

fn render(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .map(|e| start + e + 2)
            .expect("closed template action");
        let action = &rest[start..end];
        if action.contains("nodemesh.fullname") {
            out.push_str(FULLNAME);
        } else if action.contains("agent.serviceAccount.name") {
            out.push_str("nodemesh-agent");
        } else if action.contains("controller.serviceAccount.name") {
            out.push_str("nodemesh-controller");
        } else if action.contains(".Release.Namespace") {
            out.push_str("NS");
        }
        // Anything else (comments, label includes) renders to nothing here.
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn chart_objects(component: &str) -> Vec<Object> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../charts/nodemesh/templates/{component}-rbac.yaml"
    ));
    let text = std::fs::read_to_string(&path).expect("the chart's RBAC template");
    render(&text)
        .split("\n---")
        .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
        .map(|d| serde_norway::from_str(d).expect("a Kubernetes object"))
        .collect()
}

fn granted(objects: &[Object], kind: &str) -> BTreeSet<Permission> {
    let mut set = BTreeSet::new();
    for o in objects.iter().filter(|o| o.kind == kind) {
        for r in &o.rules {
            for g in &r.api_groups {
                for res in &r.resources {
                    for v in &r.verbs {
                        assert!(
                            g != "*" && res != "*" && v != "*",
                            "{} grants a wildcard",
                            o.metadata.name
                        );
                        set.insert((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
    }
    set
}

fn describe(set: &BTreeSet<Permission>) -> Vec<String> {
    set.iter().map(|(g, r, v)| format!("{v} {r}.{g}")).collect()
}

#[test]
fn chart_grants_each_component_exactly_what_rbac_rs_lists() {
    for p in COMPONENTS {
        let objects = chart_objects(p.component);
        for (kind, want) in [
            ("ClusterRole", p.cluster_set()),
            ("Role", p.release_namespace_set()),
        ] {
            let have = granted(&objects, kind);
            let missing: BTreeSet<_> = want.difference(&have).cloned().collect();
            let extra: BTreeSet<_> = have.difference(&want).cloned().collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{} {kind}: the chart lacks {:?} and grants beyond mesh-agent/src/rbac.rs {:?}; \
                 change both together",
                p.component,
                describe(&missing),
                describe(&extra)
            );
        }
    }
}

#[test]
fn each_role_is_bound_to_its_components_service_account_only() {
    for p in COMPONENTS {
        let objects = chart_objects(p.component);
        let role_name = format!("{FULLNAME}-{}", p.component);
        for (role_kind, binding_kind, needed) in [
            ("ClusterRole", "ClusterRoleBinding", !p.cluster.is_empty()),
            ("Role", "RoleBinding", !p.release_namespace.is_empty()),
        ] {
            let roles: Vec<_> = objects.iter().filter(|o| o.kind == role_kind).collect();
            let bindings: Vec<_> = objects.iter().filter(|o| o.kind == binding_kind).collect();
            if !needed {
                assert!(
                    roles.is_empty() && bindings.is_empty(),
                    "{role_kind} for nothing"
                );
                continue;
            }
            assert_eq!(roles.len(), 1, "{} {role_kind}", p.component);
            assert_eq!(roles[0].metadata.name, role_name);
            if role_kind == "Role" {
                assert_eq!(roles[0].metadata.namespace.as_deref(), Some("NS"));
            }
            assert_eq!(bindings.len(), 1, "{} {binding_kind}", p.component);
            let b = bindings[0];
            let role_ref = b.role_ref.as_ref().expect("roleRef");
            assert_eq!(
                (role_ref.kind.as_str(), role_ref.name.as_str()),
                (role_kind, role_name.as_str())
            );
            let subjects: Vec<_> = b
                .subjects
                .iter()
                .map(|s| (s.kind.as_str(), s.name.as_str()))
                .collect();
            assert_eq!(
                subjects,
                [(
                    "ServiceAccount",
                    format!("nodemesh-{}", p.component).as_str()
                )]
            );
        }
    }
}

#[test]
fn the_agent_only_reads() {
    for (_, _, verb) in AGENT.cluster_set() {
        assert!(verb == "list" || verb == "watch", "{verb}");
    }
}
