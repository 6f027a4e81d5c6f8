//! What a policy's `status` should say (pure: no I/O, no clock of its own).
//!
//! The verdict comes from the node agents' own code, so the controller and the agents never
//! disagree: the object is read with [`k8s::convert`]'s readers (what the agents' source does)
//! and compiled alone by [`PolicySet::compile`] (what the agents' model does). Findings of
//! severity error make `Accepted=False`; warnings keep it `True` and are named in the message.
//! The message also says what the agents do with a refused policy (fail closed, see
//! `docs/kubernetes-mode.md`), so whoever reads `kubectl describe` knows its effect.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{ResourceExt, api::DynamicObject};

use crate::{
    crd::{CONDITION_ACCEPTED, PolicyStatus},
    k8s::convert::{read_authorization_policy, read_peer_authentication},
    policy::{PolicySet, Problem, Severity, ValidationError, spec::Action},
};

/// The two policy kinds the controller judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 2] = [
        PolicyKind::AuthorizationPolicy,
        PolicyKind::PeerAuthentication,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
        }
    }

    /// The resource's plural (its RBAC name; `<plural>/status` is the status subresource).
    pub fn plural(self) -> &'static str {
        match self {
            PolicyKind::AuthorizationPolicy => "authorizationpolicies",
            PolicyKind::PeerAuthentication => "peerauthentications",
        }
    }
}

/// `reason` of `Accepted=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// `reason` of `Accepted=False` for a policy the engine refuses.
pub const REASON_INVALID: &str = "Invalid";
/// `reason` of `Accepted=False` for an object that does not even read as the policy type.
pub const REASON_UNREADABLE: &str = "Unreadable";
/// The API server refuses condition messages longer than this.
pub const MAX_MESSAGE: usize = 32 * 1024;

/// Whether the agents enforce a policy as written, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Judges one policy object as the node agents would, with `root_namespace` their
/// `--root-namespace`.
pub fn verdict(kind: PolicyKind, obj: &DynamicObject, root_namespace: &str) -> Verdict {
    let findings = match kind {
        PolicyKind::AuthorizationPolicy => match read_authorization_policy(obj) {
            Ok(p) => {
                let audit = p.spec.action == Action::Audit;
                let findings = PolicySet::compile(root_namespace, &[p], &[]).1;
                let effect = if audit {
                    "the agents leave this AUDIT policy out until it is fixed"
                } else {
                    "the agents deny every connection to the workloads it selects until it is \
                     fixed (fail closed)"
                };
                (findings, effect)
            }
            Err(e) => {
                let audit = obj
                    .data
                    .get("spec")
                    .and_then(|s| s.get("action"))
                    .and_then(|a| a.as_str())
                    == Some("AUDIT");
                let effect = if audit {
                    "the agents leave this AUDIT policy out until it is fixed"
                } else {
                    "the agents enforce it as DENY of every connection to the workloads it \
                     selects until it is fixed (fail closed)"
                };
                return unreadable(&e, effect);
            }
        },
        PolicyKind::PeerAuthentication => match read_peer_authentication(obj) {
            Ok(p) => {
                let findings = PolicySet::compile(root_namespace, &[], &[p]).1;
                let ignored = findings.iter().any(|f| {
                    f.severity == Severity::Error
                        && matches!(f.problem, Problem::SelectorInRootNamespace { .. })
                });
                let effect = if ignored {
                    "the agents ignore it"
                } else {
                    "the agents enforce STRICT mTLS for the workloads it selects until it is \
                     fixed (fail closed)"
                };
                (findings, effect)
            }
            Err(e) => {
                return unreadable(
                    &e,
                    "the agents enforce STRICT mTLS for the workloads it selects until it is \
                     fixed (fail closed)",
                );
            }
        },
    };
    let (findings, effect) = findings;
    let list = |severity: Severity| -> Vec<String> {
        findings
            .iter()
            .filter(|f| f.severity == severity)
            .map(describe)
            .collect()
    };
    let errors = list(Severity::Error);
    let warnings = list(Severity::Warning);
    if errors.is_empty() {
        let message = if warnings.is_empty() {
            "enforced by the node agents".to_owned()
        } else {
            format!(
                "enforced by the node agents, with warnings: {}",
                warnings.join("; ")
            )
        };
        return Verdict {
            accepted: true,
            reason: REASON_ACCEPTED,
            message: truncate(message),
        };
    }
    Verdict {
        accepted: false,
        reason: REASON_INVALID,
        message: truncate(format!("{}; {effect}", errors.join("; "))),
    }
}

fn unreadable(e: &serde_json::Error, effect: &str) -> Verdict {
    Verdict {
        accepted: false,
        reason: REASON_UNREADABLE,
        message: truncate(format!("cannot be read as the policy type ({e}); {effect}")),
    }
}

fn describe(f: &ValidationError) -> String {
    format!("{}: {}", f.path, f.problem)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// The object's current `status`, read leniently (anything unreadable counts as none).
pub fn current_status(obj: &DynamicObject) -> Option<PolicyStatus> {
    serde_json::from_value(obj.data.get("status")?.clone()).ok()
}

/// The `status` to write for `verdict` on `obj` at `now`. `lastTransitionTime` moves only when
/// the condition's `status` changes (as the API conventions ask).
pub fn desired_status(obj: &DynamicObject, verdict: &Verdict, now: Timestamp) -> PolicyStatus {
    let generation = obj.metadata.generation;
    let status = if verdict.accepted { "True" } else { "False" };
    let previous = current_status(obj).and_then(|s| {
        s.conditions
            .into_iter()
            .find(|c| c.type_ == CONDITION_ACCEPTED)
    });
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time,
        _ => Time(now),
    };
    PolicyStatus {
        conditions: vec![Condition {
            type_: CONDITION_ACCEPTED.to_owned(),
            status: status.to_owned(),
            reason: verdict.reason.to_owned(),
            message: verdict.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }],
        observed_generation: generation,
    }
}

/// Whether `obj`'s status already says what `desired` says (then nothing is written).
pub fn up_to_date(obj: &DynamicObject, desired: &PolicyStatus) -> bool {
    let Some(current) = current_status(obj) else {
        return false;
    };
    if current.observed_generation != desired.observed_generation {
        return false;
    }
    desired.conditions.iter().all(|want| {
        current.conditions.iter().any(|have| {
            have.type_ == want.type_
                && have.status == want.status
                && have.reason == want.reason
                && have.message == want.message
                && have.observed_generation == want.observed_generation
        })
    })
}

/// The server-side-apply body of the status subresource: only `status`, owned by the
/// controller's field manager.
pub fn status_patch(kind: PolicyKind, status: &PolicyStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        "kind": kind.kind(),
        "status": status,
    })
}

/// `namespace/name` of an object, for logs.
pub fn key(obj: &DynamicObject) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}
