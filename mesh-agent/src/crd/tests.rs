//! The generated CRDs: no drift from the chart, and their schemas checked without an API server
//! against good and bad objects (OpenAPI parts with the `jsonschema` crate, our CEL rules with a
//! small evaluator of the rule shapes `policy::schema` writes). The root test
//! `tests/tests/k8s_crds.rs` checks the same against a real kube-apiserver.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use super::*;
use crate::policy::{
    compile_authorization_policy, compile_peer_authentication,
    spec::{self, API_VERSION},
};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("mesh-agent is inside the workspace")
        .to_path_buf()
}

#[test]
fn chart_crds_are_generated_from_the_rust_types() {
    let dir = workspace().join("charts/nodemesh/files/crds");
    let mut expected = Vec::new();
    for file in crds() {
        let path = dir.join(file.file_name);
        let want = to_yaml(&file.crd).expect("renders");
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is missing or out of date with mesh-agent/src/crd.rs: run `cargo xtask codegen` \
             and commit the result",
            path.display()
        );
        expected.push(file.file_name.to_owned());
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("charts/nodemesh/files/crds exists")
        .map(|e| {
            e.expect("readable")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(
        present, expected,
        "charts/nodemesh/files/crds holds a file `cargo xtask codegen` does not write: remove it"
    );
}

/// YAML → JSON as kubectl converts it (integer map keys such as `portLevelMtls` ports become
/// strings).
fn yaml_to_json(text: &str) -> Value {
    fn convert(v: serde_norway::Value) -> Value {
        match v {
            serde_norway::Value::Null => Value::Null,
            serde_norway::Value::Bool(b) => Value::Bool(b),
            serde_norway::Value::Number(n) => {
                serde_json::to_value(&n).expect("a YAML number is a JSON number")
            }
            serde_norway::Value::String(s) => Value::String(s),
            serde_norway::Value::Sequence(s) => Value::Array(s.into_iter().map(convert).collect()),
            serde_norway::Value::Mapping(m) => Value::Object(
                m.into_iter()
                    .map(|(k, v)| {
                        let key = match k {
                            serde_norway::Value::String(s) => s,
                            other => serde_norway::to_string(&other)
                                .expect("a scalar key")
                                .trim()
                                .to_owned(),
                        };
                        (key, convert(v))
                    })
                    .collect(),
            ),
            serde_norway::Value::Tagged(t) => convert(t.value),
        }
    }
    convert(serde_norway::from_str(text).expect("valid YAML"))
}

fn schema_of(kind: &str) -> Value {
    let file = crds()
        .into_iter()
        .find(|f| f.crd.spec.names.kind == kind)
        .expect("a CRD of that kind");
    let version = &file.crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a schema"),
    )
    .expect("serialises")
}

/// The OpenAPI v3 schema as a JSON Schema with the API server's behaviour: `nullable` allows
/// null, and an object with `properties` refuses unknown fields (kubectl's default strict field
/// validation) unless `x-kubernetes-preserve-unknown-fields` says otherwise.
fn to_json_schema(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut out: Map<String, Value> = map
                .iter()
                .map(|(k, v)| (k.clone(), to_json_schema(v)))
                .collect();
            if out.get("nullable") == Some(&json!(true)) {
                out.remove("nullable");
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert("type".into(), json!([t, "null"]));
                }
            }
            if out.contains_key("properties")
                && out.get("x-kubernetes-preserve-unknown-fields") != Some(&json!(true))
            {
                out.insert("additionalProperties".into(), json!(false));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

/// Every failure the API server would report for `object` against the CRD of its kind, from
/// the OpenAPI schema and the CEL rules: empty when it would accept it.
fn apiserver_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().expect("kind");
    let crd_schema = schema_of(kind);
    let mut schema = to_json_schema(&crd_schema);
    // Validated by the API server itself, outside the CRD's schema.
    for field in ["apiVersion", "kind"] {
        schema["properties"][field] = json!({ "type": "string" });
    }
    schema["properties"]["metadata"] = json!({ "type": "object" });
    let validator = jsonschema::draft4::new(&schema).expect("the generated schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    cel_errors(&crd_schema, object, "", &mut errors);
    errors
}

/// Evaluates the `x-kubernetes-validations` of `schema` and its subschemas on `value`.
fn cel_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let expr = rule["rule"].as_str().expect("rule");
        if !eval_rule(expr, value) {
            let message = match rule["messageExpression"].as_str() {
                Some(m) => eval_string(m, value),
                None => rule["message"].as_str().expect("message").to_owned(),
            };
            errors.push(format!("{path}: {message}"));
        }
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let Some(sub) = schema["properties"].get(k) {
                    cel_errors(sub, v, &format!("{path}.{k}"), errors);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                cel_errors(&schema["items"], v, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

/// The rule shapes `policy::schema` writes: terms ORed with `||`, each `!has(self.F)`,
/// `self.F != 'V'` or `self.F in ['A', 'B']`. Any other shape fails the test, so a new kind of
/// rule gets an evaluator here (and a real-apiserver case in tests/tests/k8s_crds.rs).
fn eval_rule(expr: &str, value: &Value) -> bool {
    expr.split(" || ").any(|term| {
        let field = |s: &str| value.get(s.trim_start_matches("self.")).cloned();
        if let Some(f) = term
            .strip_prefix("!has(self.")
            .and_then(|t| t.strip_suffix(')'))
        {
            value.get(f).is_none()
        } else if let Some((f, v)) = term.split_once(" != ") {
            field(f) != Some(json!(v.trim_matches('\'')))
        } else if let Some((f, list)) = term.split_once(" in ") {
            let list = list.trim_start_matches('[').trim_end_matches(']');
            let have = field(f);
            list.split(", ")
                .any(|v| have == Some(json!(v.trim_matches('\''))))
        } else {
            panic!("the test's CEL evaluator does not know the rule `{expr}`")
        }
    })
}

/// `'a' + self.F + 'b'`.
fn eval_string(expr: &str, value: &Value) -> String {
    expr.split(" + ")
        .map(|part| match part.strip_prefix("self.") {
            Some(f) => value[f].as_str().unwrap_or_default().to_owned(),
            None => part
                .trim_matches('\'')
                .replace("\\'", "'")
                .replace("\\\\", "\\"),
        })
        .collect()
}

/// The local-mode parser and compile step on the same object: `Ok` if the agent enforces it.
fn agent_verdict(object: &Value) -> Result<(), String> {
    // As the Kubernetes source reads a stored object: from JSON, where `portLevelMtls` keys are
    // strings.
    match object["kind"].as_str() {
        Some("AuthorizationPolicy") => {
            serde_json::from_value::<spec::AuthorizationPolicy>(object.clone())
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    compile_authorization_policy(&p)
                        .map(drop)
                        .map_err(|e| format!("{e:?}"))
                })
        }
        Some("PeerAuthentication") => {
            serde_json::from_value::<spec::PeerAuthentication>(object.clone())
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    compile_peer_authentication(&p)
                        .map(drop)
                        .map_err(|e| format!("{e:?}"))
                })
        }
        other => panic!("unexpected kind {other:?}"),
    }
}

fn examples() -> Vec<(String, Value)> {
    let dir = workspace().join("docs/examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("docs/examples exists") {
        let path = entry.expect("readable").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            out.push((path.display().to_string(), yaml_to_json(&text)));
        }
    }
    assert!(!out.is_empty(), "no examples in {}", dir.display());
    out
}

#[test]
fn documented_examples_are_accepted_by_the_schema_and_the_agent() {
    for (path, object) in examples() {
        assert_eq!(object["apiVersion"], json!(API_VERSION), "{path}");
        let errors = apiserver_errors(&object);
        assert!(errors.is_empty(), "{path}: {errors:#?}");
        if let Err(e) = agent_verdict(&object) {
            panic!("{path}: the agent refuses it: {e}");
        }
    }
}

/// An L4 policy from Istio's documentation, as an Istio user has it.
const ISTIO_L4_POLICY: &str = r#"
apiVersion: security.istio.io/v1
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

pub(crate) fn istio_policy_ported() -> Value {
    let mut object = yaml_to_json(ISTIO_L4_POLICY);
    object["apiVersion"] = json!(API_VERSION);
    object
}

#[test]
fn an_istio_l4_policy_is_accepted_after_changing_only_api_version() {
    let object = istio_policy_ported();
    assert_eq!(apiserver_errors(&object), Vec::<String>::new());
    agent_verdict(&object).expect("the agent enforces it");
}

/// Applies `edit` to the ported Istio policy and returns what the API server would say.
fn errors_after(edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut object = istio_policy_ported();
    edit(&mut object);
    let errors = apiserver_errors(&object);
    assert!(
        agent_verdict(&object).is_err(),
        "the agent must refuse what the schema refuses"
    );
    errors
}

#[test]
fn l7_fields_are_refused_with_a_message_saying_why() {
    let operation = "/spec/rules/0/to/0/operation";
    let source = "/spec/rules/0/from/0/source";
    for (at, field) in spec_l7_fields(operation, source) {
        let errors = errors_after(|o| {
            o.pointer_mut(at).expect("present")[field] = json!(["x"]);
        });
        assert!(
            errors.len() == 1
                && errors[0].contains(&format!("`{field}` is an HTTP (L7) attribute"))
                && errors[0].contains("nodemesh enforces L4 only"),
            "{field}: {errors:#?}"
        );
    }
}

fn spec_l7_fields<'a>(operation: &'a str, source: &'a str) -> Vec<(&'a str, &'static str)> {
    let mut v: Vec<_> = crate::policy::schema::OPERATION_L7_FIELDS
        .iter()
        .map(|f| (operation, *f))
        .collect();
    v.extend(
        crate::policy::schema::SOURCE_L7_FIELDS
            .iter()
            .map(|f| (source, *f)),
    );
    v
}

#[test]
fn a_refused_field_is_refused_in_any_shape_not_pruned() {
    // A pruned field would widen a DENY. An empty list still carries the reason; another shape
    // gets a type error, but is refused all the same.
    let errors = errors_after(|o| {
        o["spec"]["rules"][0]["to"][0]["operation"]["methods"] = json!([]);
    });
    assert!(
        errors.len() == 1 && errors[0].contains("`methods` is an HTTP (L7) attribute"),
        "{errors:#?}"
    );
    for value in [json!("GET"), json!({ "a": 1 })] {
        let errors = errors_after(|o| {
            o["spec"]["rules"][0]["to"][0]["operation"]["methods"] = value.clone();
        });
        assert!(!errors.is_empty(), "{value}: accepted");
    }
}

#[test]
fn custom_action_provider_and_waypoint_attachment_are_refused_with_reasons() {
    let cases: [(&str, Value, &str); 4] = [
        ("action", json!("CUSTOM"), "action CUSTOM"),
        (
            "provider",
            json!({ "name": "ext-authz" }),
            "`provider` belongs to action CUSTOM",
        ),
        (
            "targetRef",
            json!({ "kind": "Gateway", "name": "gw" }),
            "waypoint or gateway",
        ),
        (
            "targetRefs",
            json!([{ "kind": "Service", "name": "s" }]),
            "waypoint or gateway",
        ),
    ];
    for (field, value, expected) in cases {
        let errors = errors_after(|o| o["spec"][field] = value.clone());
        assert!(
            errors.len() == 1 && errors[0].contains(expected),
            "{field}: {errors:#?}"
        );
    }
}

#[test]
fn l7_condition_keys_are_refused_naming_the_key() {
    let errors = errors_after(|o| {
        o["spec"]["rules"][0]["when"][0]["key"] = json!("request.headers[x-user]");
    });
    assert!(
        errors.len() == 1
            && errors[0].contains("condition key `request.headers[x-user]` is not an L4 attribute"),
        "{errors:#?}"
    );
}

#[test]
fn bad_enums_are_refused() {
    let errors = errors_after(|o| o["spec"]["action"] = json!("REJECT"));
    assert!(
        errors.len() == 1 && errors[0].contains("REJECT"),
        "{errors:#?}"
    );
    let mut pa = yaml_to_json(
        &std::fs::read_to_string(workspace().join("docs/examples/peerauthentication-strict.yaml"))
            .expect("example"),
    );
    pa["spec"]["mtls"]["mode"] = json!("STRICTEST");
    let errors = apiserver_errors(&pa);
    assert!(
        errors.len() == 1 && errors[0].contains("STRICTEST"),
        "{errors:#?}"
    );
    pa["spec"]["mtls"]["mode"] = json!("DISABLE");
    let errors = apiserver_errors(&pa);
    assert!(
        errors.len() == 1 && errors[0].contains("mode DISABLE is not supported"),
        "{errors:#?}"
    );
}

#[test]
fn ports_must_be_numbers_from_1_to_65535() {
    for bad in ["70000", "0", "00000", "65536", "000080", "http", "", "-1"] {
        let errors = errors_after(|o| {
            o["spec"]["rules"][0]["to"][0]["operation"]["ports"] = json!(["8080", bad]);
        });
        assert!(
            errors.len() == 1 && errors[0].contains("/spec/rules/0/to/0/operation/ports/1"),
            "{bad}: {errors:#?}"
        );
    }
    for good in ["1", "80", "080", "08080", "65535"] {
        let mut object = istio_policy_ported();
        object["spec"]["rules"][0]["to"][0]["operation"]["notPorts"] = json!([good]);
        assert_eq!(apiserver_errors(&object), Vec::<String>::new(), "{good}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let errors = errors_after(|o| o["spec"]["rules"][0]["form"] = json!([]));
    assert!(
        errors.len() == 1 && errors[0].contains("form"),
        "{errors:#?}"
    );
}

#[test]
fn status_holds_conditions_and_observed_generation() {
    let mut object = istio_policy_ported();
    object["status"] = json!({
        "observedGeneration": 3,
        "conditions": [{
            "type": CONDITION_ACCEPTED,
            "status": "True",
            "reason": "Accepted",
            "message": "",
            "lastTransitionTime": "2026-12-06T20:00:00Z",
            "observedGeneration": 3,
        }],
    });
    assert_eq!(apiserver_errors(&object), Vec::<String>::new());
    let typed: AuthorizationPolicy = serde_json::from_value(object).expect("typed");
    let status = typed.status.expect("status");
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(status.conditions[0].type_, CONDITION_ACCEPTED);
}

#[test]
fn the_resource_spec_is_the_local_mode_spec() {
    let object = istio_policy_ported();
    let resource: AuthorizationPolicy = serde_json::from_value(object.clone()).expect("typed");
    let local: spec::AuthorizationPolicy =
        serde_json::from_value(object).expect("local-mode shape");
    assert_eq!(resource.spec.0, local.spec);
}

#[test]
fn crds_have_status_subresource_short_names_and_printer_columns() {
    for file in crds() {
        let crd = &file.crd;
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            file.file_name,
            format!("{}.{GROUP}.yaml", crd.spec.names.plural)
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        assert!(
            !crd.spec
                .names
                .short_names
                .clone()
                .unwrap_or_default()
                .is_empty()
        );
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.contains(&"Accepted"), "{columns:?}");
    }
}

/// Every CEL rule sits under lists with `maxItems`, and the product of those bounds stays
/// within what `policy::schema` budgets for: an unbounded list above a rule makes the API
/// server's cost estimate explode and the CRD is refused.
#[test]
fn cel_rules_sit_under_bounded_lists() {
    fn walk(schema: &Value, runs: u64, path: &str, found: &mut Vec<(String, u64)>) {
        if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
            found.push((path.to_owned(), runs));
            // The API server compiles a rule only if every field it names is typed.
            for rule in rules {
                let expr = rule["rule"].as_str().expect("rule");
                for (name, sub) in schema["properties"].as_object().expect("an object") {
                    if expr.contains(&format!("self.{name}")) {
                        assert!(
                            sub.get("type").is_some(),
                            "{path}.{name} is named by `{expr}` but has no type"
                        );
                    }
                }
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, sub) in props {
                walk(sub, runs, &format!("{path}.{k}"), found);
            }
        }
        if let Some(items) = schema.get("items") {
            let max = schema["maxItems"].as_u64().unwrap_or_else(|| {
                // Only a list with no rule below it may be unbounded.
                let mut below = Vec::new();
                walk(items, 1, path, &mut below);
                assert!(below.is_empty(), "{path} is unbounded above CEL rules");
                1
            });
            walk(items, runs * max, &format!("{path}[]"), found);
        }
    }
    for kind in ["AuthorizationPolicy", "PeerAuthentication"] {
        let mut found = Vec::new();
        walk(&schema_of(kind), 1, "", &mut found);
        assert!(!found.is_empty(), "{kind} has CEL rules");
        for (path, runs) in found {
            assert!(
                runs <= 256 * 128,
                "{kind} {path}: a rule may run {runs} times"
            );
        }
    }
}
