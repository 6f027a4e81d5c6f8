//! The policy objects as users write them: Istio's `AuthorizationPolicy` and `PeerAuthentication`
//! specs under the group `security.nodemesh.io`, field for field, in Istio's camelCase YAML shape.
//!
//! These types only parse. Every field Istio defines is known here, so that an HTTP (L7) field,
//! a `CUSTOM` action or a waypoint attachment is reported by [`super::compile`] with a message
//! that names it and says why nodemesh rejects it, instead of a bare "unknown field". A field
//! that Istio does not define either is refused by the parser (`deny_unknown_fields`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::schema;

/// The `apiVersion` of nodemesh's policy objects. Istio users port a policy by replacing
/// `security.istio.io/v1` (or `v1beta1`) with this.
pub const API_VERSION: &str = "security.nodemesh.io/v1alpha1";

/// Label pairs, as in `matchLabels`.
pub type Labels = BTreeMap<String, String>;

/// The parts of Kubernetes object metadata the policy engine reads. Other metadata fields
/// (labels, annotations, resourceVersion…) are accepted and ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Defaults to `default`, as `kubectl apply` does without `-n`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// A whole `AuthorizationPolicy` object. Unknown top-level fields are refused (so that a misspelt
/// `spec` is an error, not an empty spec); `status` is accepted and ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Written by controllers; not read here.
    #[serde(default, skip_serializing)]
    pub status: Option<Unsupported>,
}

/// Istio's `AuthorizationPolicy` spec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::authorization_policy_spec)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// Absent or empty: the policy matches nothing. `rules: [{}]` (one empty rule) matches
    /// every connection to the selected workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
    /// Rejected: waypoint/gateway attachment.
    #[serde(default, skip_serializing)]
    pub target_ref: Option<Unsupported>,
    /// Rejected: waypoint/gateway attachment.
    #[serde(default, skip_serializing)]
    pub target_refs: Option<Unsupported>,
    /// Rejected: the external authorizer of a `CUSTOM` action.
    #[serde(default, skip_serializing)]
    pub provider: Option<Unsupported>,
}

/// `selector` of either policy kind.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// `action`. `AUDIT` never changes a decision; nodemesh reports the AUDIT policies that matched.
/// `CUSTOM` parses so that it can be rejected with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

/// One entry of `rules`: `from` entries are ORed, `to` entries are ORed, `when` conditions are
/// ANDed, and the three parts that are present are ANDed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::rule)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// `rules[].from[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// `rules[].to[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// `rules[].from[].source`: the fields present are ANDed, the values of one field ORed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::source)]
pub struct Source {
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub principals: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_principals: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub namespaces: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_namespaces: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_accounts: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_service_accounts: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_blocks: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_ip_blocks: Vec<String>,
    /// Rejected (L7: derived from `X-Forwarded-For`).
    #[serde(default, skip_serializing)]
    pub remote_ip_blocks: Option<Unsupported>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub not_remote_ip_blocks: Option<Unsupported>,
    /// Rejected (L7: JWT).
    #[serde(default, skip_serializing)]
    pub request_principals: Option<Unsupported>,
    /// Rejected (L7: JWT).
    #[serde(default, skip_serializing)]
    pub not_request_principals: Option<Unsupported>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::operation)]
pub struct Operation {
    /// Port numbers as strings, as in Istio (`ports: ["8080"]`).
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_ports: Vec<String>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub hosts: Option<Unsupported>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub not_hosts: Option<Unsupported>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub methods: Option<Unsupported>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub not_methods: Option<Unsupported>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub paths: Option<Unsupported>,
    /// Rejected (L7).
    #[serde(default, skip_serializing)]
    pub not_paths: Option<Unsupported>,
}

/// `rules[].when[]`: `values` ORed; `notValues` must all miss; both present are ANDed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::condition)]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_values: Vec<String>,
}

/// A whole `PeerAuthentication` object. Unknown top-level fields are refused (so that a misspelt
/// `spec` is an error, not an empty spec); `status` is accepted and ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    /// Written by controllers; not read here.
    #[serde(default, skip_serializing)]
    pub status: Option<Unsupported>,
}

/// Istio's `PeerAuthentication` spec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::peer_authentication_spec)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Keyed by the workload's (container) port. Needs a `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<u32, MutualTls>>,
}

/// `mtls` and the values of `portLevelMtls`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = schema::mutual_tls)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsModeSpec,
}

/// `mtls.mode` as written. `DISABLE` parses so that it can be rejected with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsModeSpec {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A field that nodemesh recognises only to reject it. Any value is accepted by the parser; the
/// compile step reports the field by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unsupported;

/// The generated schema of an [`Unsupported`] field accepts any value; the CRDs then declare
/// each such field with its Istio type and refuse it by a CEL rule of its parent (`schema::forbid`:
/// CEL sees only typed fields), so it is never pruned and always refused.
impl JsonSchema for Unsupported {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Unsupported".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
    }
}

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| Unsupported)
    }
}

/// A list written as `field:` with no value (YAML null) is an empty list, as the Kubernetes API
/// server would store it.
fn null_as_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(deserializer)?.unwrap_or_default())
}
