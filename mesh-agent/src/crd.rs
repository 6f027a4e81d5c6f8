//! The Kubernetes custom resources `security.nodemesh.io/v1alpha1` `AuthorizationPolicy` and
//! `PeerAuthentication`, and the CustomResourceDefinitions generated from them into
//! `charts/nodemesh/files/crds/` (`cargo xtask codegen`; a test fails on drift). The chart
//! renders them through `templates/crds.yaml` (not Helm's `crds/` directory, which Helm installs
//! once and never upgrades), adding `helm.sh/resource-policy: keep` so that `helm uninstall`
//! leaves them, and the users' policies, in place.
//!
//! One source of truth: a resource's `spec` is the policy engine's own spec type
//! ([`crate::policy::spec`]), the one the local-mode file is parsed into, so the CRD schema has
//! exactly the fields local mode accepts, in Istio's shape (an Istio `security.istio.io/v1`
//! policy applies after changing only `apiVersion`). What the schema refuses and why:
//! [`crate::policy::schema`] and `docs/policy.md`.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::policy::spec;

/// The API group of nodemesh's policy resources.
pub const GROUP: &str = "security.nodemesh.io";
/// The version served and stored.
pub const VERSION: &str = "v1alpha1";

/// The condition type a controller sets once it has checked a policy: `True` when the agents
/// enforce it, `False` (with the reasons in `message`) when they refuse it.
pub const CONDITION_ACCEPTED: &str = "Accepted";

/// Which workloads the policy selects (`selector`, else the whole namespace, or the whole
/// mesh in the root namespace), what it does (`action`) and when (`rules`), as in Istio.
/// (In Rust: the policy engine's spec type, unchanged.)
#[derive(CustomResource, Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.nodemesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    status = "PolicyStatus",
    shortname = "nmap",
    category = "nodemesh",
    doc = "Istio's L4 AuthorizationPolicy, enforced by nodemesh's node agents. HTTP (L7) fields, \
           action CUSTOM and waypoint attachment (targetRef/targetRefs) are refused.",
    // JSON forms: clippy's `duplicated_attributes` takes repeated `type_ = ".."` for duplicates.
    printcolumn = r#"{"name": "Action", "type": "string", "jsonPath": ".spec.action"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct AuthorizationPolicySpec(pub spec::AuthorizationPolicySpec);

/// The mTLS mode of the selected workloads (`selector`, else the whole namespace, or the whole
/// mesh in the root namespace), and per workload port (`portLevelMtls`), as in Istio.
/// (In Rust: the policy engine's spec type, unchanged.)
#[derive(CustomResource, Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.nodemesh.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    namespaced,
    status = "PolicyStatus",
    shortname = "nmpa",
    category = "nodemesh",
    doc = "Istio's PeerAuthentication (mTLS mode per workload and port), enforced by nodemesh's \
           node agents. Mode DISABLE is refused.",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct PeerAuthenticationSpec(pub spec::PeerAuthenticationSpec);

/// `status` of both policy kinds, written by the controller through the status subresource.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: whether nodemesh enforces the policy (`True`) or refuses it (`False`, with
    /// the reasons in `message`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One generated CRD file of the chart.
pub struct CrdFile {
    /// File name under `charts/nodemesh/files/crds/`.
    pub file_name: &'static str,
    pub crd: CustomResourceDefinition,
}

/// Every CRD nodemesh defines, as it is written into the chart.
pub fn crds() -> Vec<CrdFile> {
    vec![
        CrdFile {
            file_name: "authorizationpolicies.security.nodemesh.io.yaml",
            crd: finish(AuthorizationPolicy::crd()),
        },
        CrdFile {
            file_name: "peerauthentications.security.nodemesh.io.yaml",
            crd: finish(PeerAuthentication::crd()),
        },
    ]
}

/// The header of every generated file.
pub const GENERATED_HEADER: &str =
    "# Generated from mesh-agent/src/crd.rs by `cargo xtask codegen`; do not edit.\n";

/// A CRD as the YAML text of its chart file.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_norway::Error> {
    let body = serde_norway::to_string(crd)?;
    let newline = if body.ends_with('\n') { "" } else { "\n" };
    Ok(format!("{GENERATED_HEADER}{body}{newline}"))
}

/// Post-processing the derive cannot express: drops the `default`s that schemars copies from
/// `#[serde(default)]` (the API server would write them into every stored object: empty lists
/// everywhere, `null` where nothing was written) but keeps real ones (`action: ALLOW`,
/// `mode: UNSET`, which Istio documents as the defaults).
fn finish(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let Ok(mut value) = serde_json::to_value(&*schema) else {
            continue;
        };
        strip_empty_defaults(&mut value);
        if let Ok(cleaned) = serde_json::from_value(value) {
            *schema = cleaned;
        }
    }
    crd
}

fn strip_empty_defaults(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let empty = match map.get("default") {
                Some(Value::Null) => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(Value::String(s)) => s.is_empty(),
                _ => false,
            };
            if empty {
                map.remove("default");
            }
            map.values_mut().for_each(strip_empty_defaults);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_empty_defaults),
        _ => {}
    }
}

/// Why the CRD files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("cannot render the CRD {file} as YAML: {source}")]
    Yaml {
        file: &'static str,
        source: serde_norway::Error,
    },
    #[error("cannot write {}: {source} (does the directory exist and is it writable?)", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes every CRD file into `dir` (the chart's `files/crds/`); returns the paths written.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, CrdError> {
    let mut written = Vec::new();
    for file in crds() {
        let yaml = to_yaml(&file.crd).map_err(|source| CrdError::Yaml {
            file: file.file_name,
            source,
        })?;
        let path = dir.join(file.file_name);
        std::fs::write(&path, yaml).map_err(|source| CrdError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
