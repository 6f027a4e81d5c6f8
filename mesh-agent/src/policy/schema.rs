//! The OpenAPI schema of the policy specs, as the Kubernetes API server checks them: the CRDs
//! (`crate::crd`) are derived from the [`super::spec`] types, and the functions here add what a
//! derive cannot say.
//!
//! Invariant: every field the local-mode parser refuses with a *reason* (an L7 field, `CUSTOM`,
//! a waypoint attachment, mTLS `DISABLE`, a non-L4 `when` key) is declared in the schema, so the
//! API server never prunes it, and refused by a CEL rule (`x-kubernetes-validations`) whose
//! message is the parser's own ([`Problem`]). A pruned field would silently widen a policy: a
//! DENY with `methods: [POST]` would deny every method, an ALLOW with `paths` would allow every
//! path. Values the parser checks in detail (CIDRs, principals, wildcards) stay the agent's job;
//! the schema checks only what is cheap to say in OpenAPI (enums, port numbers).
//!
//! The API server estimates the cost of every CEL rule times how often it can run, and refuses a
//! CRD whose total is too high; unbounded nested lists make that count astronomical. So the lists
//! that CEL rules sit under carry `maxItems` bounds (far above anything written by hand) and the
//! strings a rule reads carry `maxLength`.

use schemars::Schema;
use serde_json::{Value, json};

use super::{L4_CONDITION_KEYS, Problem};

/// Bounds on the lists CEL rules sit under (see the module comment). The API server multiplies
/// a rule's cost by how many times it can run (the product of the bounds of the lists above
/// it) and refuses a rule over 10^7 (and a CRD over 10^8 in total): the `when` key rule costs
/// about 160 per run at [`MAX_CONDITION_KEY_LENGTH`], times 256 × 64 runs. Far above what a
/// hand-written policy holds.
pub const MAX_RULES: u64 = 256;
/// `from` and `to` entries of one rule.
pub const MAX_FROM_TO: u64 = 128;
/// `when` conditions of one rule.
pub const MAX_CONDITIONS: u64 = 64;

/// Entries of `portLevelMtls` (a workload's ports).
pub const MAX_PORT_LEVEL_MTLS: u64 = 128;

/// Bound on a `when` key's length (the rule compares it with each L4 key): the longest L4 key
/// has 18 characters, Istio's L7 keys (`request.auth.claims[groups]`) stay well below.
pub const MAX_CONDITION_KEY_LENGTH: u64 = 256;

/// A port number from 1 to 65535 written as a string, as Istio writes `ports`; leading zeros
/// are accepted as the agent accepts them (with [`PORT_MAX_LENGTH`]: at most five digits).
pub const PORT_PATTERN: &str =
    "^0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// The agent's limit on a port string's length.
pub const PORT_MAX_LENGTH: u64 = 5;

/// The fields of `rules[].from[].source` that are L7 (and so refused), in Istio's spelling.
pub const SOURCE_L7_FIELDS: [&str; 4] = [
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

/// The fields of `rules[].to[].operation` that are L7 (and so refused), in Istio's spelling.
pub const OPERATION_L7_FIELDS: [&str; 6] = [
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

pub(super) fn authorization_policy_spec(schema: &mut Schema) {
    forbid(
        schema,
        "targetRef",
        Shape::Object,
        &Problem::TargetRef { field: "targetRef" },
    );
    forbid(
        schema,
        "targetRefs",
        Shape::ObjectList,
        &Problem::TargetRef {
            field: "targetRefs",
        },
    );
    forbid(schema, "provider", Shape::Object, &Problem::Provider);
    add_rule(
        schema,
        "!has(self.action) || self.action != 'CUSTOM'",
        &Problem::CustomAction.to_string(),
        Some("action"),
    );
    bound_list(schema, "rules", MAX_RULES);
}

pub(super) fn rule(schema: &mut Schema) {
    bound_list(schema, "from", MAX_FROM_TO);
    bound_list(schema, "to", MAX_FROM_TO);
    bound_list(schema, "when", MAX_CONDITIONS);
}

pub(super) fn source(schema: &mut Schema) {
    for field in SOURCE_L7_FIELDS {
        forbid(
            schema,
            field,
            Shape::StringList,
            &Problem::L7Field { field },
        );
    }
}

pub(super) fn operation(schema: &mut Schema) {
    for field in OPERATION_L7_FIELDS {
        forbid(
            schema,
            field,
            Shape::StringList,
            &Problem::L7Field { field },
        );
    }
    for list in ["ports", "notPorts"] {
        if let Some(items) = property(schema, list).and_then(|p| p.get_mut("items")) {
            items["pattern"] = json!(PORT_PATTERN);
            items["maxLength"] = json!(PORT_MAX_LENGTH);
        }
    }
}

pub(super) fn condition(schema: &mut Schema) {
    if let Some(key) = property(schema, "key") {
        key["maxLength"] = json!(MAX_CONDITION_KEY_LENGTH);
    }
    if let Some(obj) = schema.as_object_mut() {
        let required = obj.entry("required").or_insert_with(|| json!([]));
        if let Some(list) = required.as_array_mut()
            && !list.contains(&json!("key"))
        {
            list.push(json!("key"));
        }
    }
    let keys = L4_CONDITION_KEYS
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // The parser's message, with the key spliced in by CEL.
    let message = Problem::NonL4ConditionKey {
        key: "KEY".to_owned(),
    }
    .to_string();
    let (head, tail) = message.split_once("KEY").unwrap_or((&message, ""));
    let message_expression = format!("{} + self.key + {}", cel_string(head), cel_string(tail));
    push_validation(
        schema,
        json!({
            "rule": format!("self.key in [{keys}]"),
            "messageExpression": message_expression,
            "fieldPath": ".key",
            "reason": "FieldValueInvalid",
        }),
    );
}

/// `portLevelMtls` is a map keyed by port: schemars writes `patternProperties` for integer
/// keys, which CRD schemas do not support; the keys become plain strings (the agent checks that
/// they are ports), the values keep their schema.
pub(super) fn peer_authentication_spec(schema: &mut Schema) {
    let Some(p) = property(schema, "portLevelMtls").and_then(Value::as_object_mut) else {
        return;
    };
    let value_schema = p
        .remove("patternProperties")
        .and_then(|pp| pp.as_object().and_then(|m| m.values().next().cloned()));
    if let Some(v) = value_schema {
        p.insert("additionalProperties".into(), v);
    }
    p.insert("maxProperties".into(), json!(MAX_PORT_LEVEL_MTLS));
}

pub(super) fn mutual_tls(schema: &mut Schema) {
    add_rule(
        schema,
        "!has(self.mode) || self.mode != 'DISABLE'",
        &Problem::MtlsDisable.to_string(),
        Some("mode"),
    );
}

/// The shape Istio gives a refused field. CEL sees only typed fields (a rule naming an
/// untyped `x-kubernetes-preserve-unknown-fields` property does not compile), so each refused
/// field is declared with its Istio type: a value of another shape is refused by the type check
/// instead of the reason, but refused all the same, never pruned.
#[derive(Clone, Copy)]
enum Shape {
    StringList,
    Object,
    ObjectList,
}

/// Declares `field` with `shape` and refuses it, when present, with the parser's reason.
fn forbid(schema: &mut Schema, field: &str, shape: Shape, problem: &Problem) {
    let any_object = json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true });
    let typed = match shape {
        Shape::StringList => json!({ "type": "array", "items": { "type": "string" } }),
        Shape::Object => any_object,
        Shape::ObjectList => json!({ "type": "array", "items": any_object }),
    };
    let Some(p) = property(schema, field) else {
        debug_assert!(false, "{field} must be declared so that it is not pruned");
        return;
    };
    let description = p.get("description").cloned();
    *p = typed;
    if let Some(d) = description {
        p["description"] = d;
    }
    add_rule(
        schema,
        &format!("!has(self.{field})"),
        &problem.to_string(),
        Some(field),
    );
}

fn add_rule(schema: &mut Schema, rule: &str, message: &str, field: Option<&str>) {
    let mut v = json!({ "rule": rule, "message": message });
    if let Some(field) = field {
        v["fieldPath"] = json!(format!(".{field}"));
        v["reason"] = json!("FieldValueForbidden");
    }
    push_validation(schema, v);
}

fn push_validation(schema: &mut Schema, rule: Value) {
    if let Some(obj) = schema.as_object_mut() {
        let rules = obj
            .entry("x-kubernetes-validations")
            .or_insert_with(|| json!([]));
        if let Some(list) = rules.as_array_mut() {
            list.push(rule);
        }
    }
}

fn bound_list(schema: &mut Schema, field: &str, max: u64) {
    if let Some(p) = property(schema, field) {
        p["maxItems"] = json!(max);
    }
}

fn property<'a>(schema: &'a mut Schema, field: &str) -> Option<&'a mut Value> {
    schema
        .as_object_mut()?
        .get_mut("properties")?
        .get_mut(field)
}

/// `s` as a CEL string literal.
fn cel_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}
