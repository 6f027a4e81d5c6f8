//! Text to [`ParsedFile`]: a YAML stream whose documents are `LocalCluster` objects and policy
//! objects in their CRD shape. Pure: the loader reads the files.

use serde::Deserialize;
use serde_norway::Value;

use super::{ConfigError, LOCAL_API_VERSION, LOCAL_KIND};
use crate::model::spec::{NodeSpec, Origin, ServiceSpec, Sourced, WorkloadSpec};
use crate::policy::spec::{API_VERSION, AuthorizationPolicy, PeerAuthentication};

/// A `LocalCluster` document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalClusterDoc {
    api_version: String,
    kind: String,
    #[serde(default)]
    this_node: Option<String>,
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    nodes: Vec<NodeSpec>,
    #[serde(default)]
    workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
}

/// What one file holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedFile {
    /// `thisNode` values with the document that set them.
    pub this_node: Vec<(String, Origin)>,
    pub root_namespace: Vec<(String, Origin)>,
    /// `include` entries, as written, with the document that listed them.
    pub include: Vec<(String, Origin)>,
    pub nodes: Vec<Sourced<NodeSpec>>,
    pub workloads: Vec<Sourced<WorkloadSpec>>,
    pub services: Vec<Sourced<ServiceSpec>>,
    pub authorization_policies: Vec<Sourced<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Sourced<PeerAuthentication>>,
}

fn doc_label(file: &str, index: usize) -> String {
    if index == 0 {
        file.to_owned()
    } else {
        format!("{file} (document {})", index + 1)
    }
}

fn sourced<T>(label: &str, list: &str, items: Vec<T>) -> impl Iterator<Item = Sourced<T>> {
    items.into_iter().enumerate().map(move |(i, spec)| Sourced {
        origin: Origin::new(label, format!("{list}[{i}]")),
        spec,
    })
}

/// Policies are whole CRD objects here, `apiVersion` included (the policy engine checks its
/// value), so that the file works with `kubectl apply` unchanged.
fn require_api_version(errors: &mut Vec<ConfigError>, label: &str, present: bool) {
    if !present {
        errors.push(ConfigError::Document {
            file: label.to_owned(),
            message: format!("apiVersion: missing; policies need `apiVersion: {API_VERSION}`"),
        });
    }
}

/// Turns a parser error into `file:line:column: path: message`.
pub(crate) fn syntax_error(file: &str, error: &serde_norway::Error) -> ConfigError {
    let text = error.to_string();
    match error.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            // The position leads the line already; a second one (libyaml's context, "while
            // parsing a flow sequence at line …") stays.
            let message = text.replacen(&suffix, "", 1);
            ConfigError::Syntax {
                file: file.to_owned(),
                line: loc.line(),
                column: loc.column(),
                message,
            }
        }
        None => ConfigError::Document {
            file: file.to_owned(),
            message: text,
        },
    }
}

/// Parses one file's text. `file` names it in errors. Every document is parsed; all errors are
/// returned together.
pub fn parse_str(file: &str, text: &str) -> Result<ParsedFile, Vec<ConfigError>> {
    let mut out = ParsedFile::default();
    let mut errors = Vec::new();
    // First pass: each document's kind (without types, so any mapping parses).
    let mut kinds = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        match Value::deserialize(document) {
            Ok(value) => kinds.push(value),
            Err(e) => {
                // A syntax error ends the stream: the parser cannot resynchronise.
                errors.push(syntax_error(file, &e));
                return Err(errors);
            }
        }
    }
    // Second pass: each document into its type, so errors carry line, column and path.
    for (index, (value, document)) in kinds
        .iter()
        .zip(serde_norway::Deserializer::from_str(text))
        .enumerate()
    {
        let label = doc_label(file, index);
        let mapping = match value {
            Value::Null => continue,
            Value::Mapping(m) => m,
            _ => {
                errors.push(ConfigError::Document {
                    file: label,
                    message: format!(
                        "a document must be a mapping with `apiVersion` and `kind` \
                         ({LOCAL_KIND}, AuthorizationPolicy or PeerAuthentication)"
                    ),
                });
                continue;
            }
        };
        let kind = mapping.get("kind").and_then(Value::as_str);
        let result = match kind {
            Some(LOCAL_KIND) => LocalClusterDoc::deserialize(document).map(|doc| {
                let at = |path: String| Origin::new(label.clone(), path);
                if doc.api_version != LOCAL_API_VERSION {
                    errors.push(ConfigError::Document {
                        file: label.clone(),
                        message: format!(
                            "apiVersion: `{}` is not the local file's; use `{LOCAL_API_VERSION}`",
                            doc.api_version
                        ),
                    });
                }
                debug_assert_eq!(doc.kind, LOCAL_KIND);
                out.this_node
                    .extend(doc.this_node.map(|n| (n, at("thisNode".into()))));
                out.root_namespace
                    .extend(doc.root_namespace.map(|n| (n, at("rootNamespace".into()))));
                out.include.extend(
                    doc.include
                        .into_iter()
                        .enumerate()
                        .map(|(i, f)| (f, at(format!("include[{i}]")))),
                );
                out.nodes.extend(sourced(&label, "nodes", doc.nodes));
                out.workloads
                    .extend(sourced(&label, "workloads", doc.workloads));
                out.services
                    .extend(sourced(&label, "services", doc.services));
            }),
            Some("AuthorizationPolicy") => AuthorizationPolicy::deserialize(document).map(|p| {
                require_api_version(&mut errors, &label, p.api_version.is_some());
                out.authorization_policies.push(Sourced {
                    origin: Origin::new(label.clone(), ""),
                    spec: p,
                })
            }),
            Some("PeerAuthentication") => PeerAuthentication::deserialize(document).map(|p| {
                require_api_version(&mut errors, &label, p.api_version.is_some());
                out.peer_authentications.push(Sourced {
                    origin: Origin::new(label.clone(), ""),
                    spec: p,
                })
            }),
            Some(other) => {
                errors.push(ConfigError::Document {
                    file: label,
                    message: format!(
                        "kind: `{other}` is not one of {LOCAL_KIND}, AuthorizationPolicy, \
                         PeerAuthentication"
                    ),
                });
                continue;
            }
            None => {
                errors.push(ConfigError::Document {
                    file: label,
                    message: format!(
                        "kind: missing; every document needs `apiVersion` and `kind` \
                         ({LOCAL_KIND}, AuthorizationPolicy or PeerAuthentication)"
                    ),
                });
                continue;
            }
        };
        if let Err(e) = result {
            errors.push(syntax_error(file, &e));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}
