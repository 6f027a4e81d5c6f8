//! Validation errors: which policy, where in it, and why, in the operator's words.

use std::fmt;

/// The two policy kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
        })
    }
}

/// Names one policy object: `AuthorizationPolicy shop/allow-frontend`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Whether a finding stops the policy from being used as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The policy is not used as written (see `docs/policy.md`, "Invalid policies").
    Error,
    /// The policy is used as written, but probably does not do what its author meant.
    Warning,
}

/// One finding about one policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {path}: {problem}")]
pub struct ValidationError {
    pub policy: PolicyRef,
    pub severity: Severity,
    /// Where in the object, e.g. `spec.rules[0].from[1].source.ipBlocks[2]`.
    pub path: String,
    pub problem: Problem,
}

const L4_WHEN_KEYS: &str =
    "source.ip, source.namespace, source.principal, destination.ip, destination.port";

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "`{field}` is an HTTP (L7) attribute and nodemesh enforces L4 only, so the policy is \
         rejected rather than enforced partially (Istio ambient needs a waypoint proxy for it, and \
         its ztunnel denies traffic it cannot check); remove the field or express the rule with \
         L4 fields (principals, namespaces, serviceAccounts, ipBlocks, ports and their not* forms)"
    )]
    L7Field { field: &'static str },
    #[error(
        "condition key `{key}` is not an L4 attribute and nodemesh enforces L4 only; supported \
         keys: {L4_WHEN_KEYS}"
    )]
    NonL4ConditionKey { key: String },
    #[error(
        "action CUSTOM (an external authorizer) is not supported: nodemesh enforces L4 policy in \
         the node agent; use ALLOW, DENY or AUDIT"
    )]
    CustomAction,
    #[error(
        "`{field}` attaches a policy to a waypoint or gateway, and nodemesh has none; scope the \
         policy with `selector` (or none, for the whole namespace)"
    )]
    TargetRef { field: &'static str },
    #[error("`provider` belongs to action CUSTOM, which nodemesh does not support")]
    Provider,
    #[error("`{value}` is not an IP address or CIDR: {why}")]
    BadCidr { value: String, why: &'static str },
    #[error("`{value}` is not a port: expected a number from 1 to 65535")]
    BadPort { value: String },
    #[error("empty value")]
    EmptyValue,
    #[error("`{value}`: `*` may stand only alone, at the end (`abc*`) or at the start (`*abc`)")]
    BadWildcard { value: String },
    #[error(
        "principal `{value}` starts with `spiffe://`; principals are written without it \
         (`cluster.local/ns/NAMESPACE/sa/SERVICE_ACCOUNT`), as in Istio, and would never match"
    )]
    SpiffeScheme { value: String },
    #[error(
        "service account `{value}` must be `NAME` (in the policy's namespace) or `NAMESPACE/NAME`, \
         without wildcards"
    )]
    BadServiceAccount { value: String },
    #[error(
        "`serviceAccounts`/`notServiceAccounts` cannot be combined with principals or namespaces in one source (as in Istio)"
    )]
    ServiceAccountsWithPrincipals,
    #[error("`{0}` is present but empty; remove it or give it at least one entry")]
    EmptyList(&'static str),
    #[error("`source` is missing or sets no field; a source must set at least one")]
    EmptySource,
    #[error("`operation` is missing or sets no field; an operation must set `ports` or `notPorts`")]
    EmptyOperation,
    #[error("condition `key` is empty")]
    EmptyConditionKey,
    #[error("condition `{key}` needs `values` or `notValues`")]
    EmptyCondition { key: String },
    #[error(
        "a DENY policy without `rules` never matches anything (Istio rejects it); add \
         `rules: [{{}}]` to deny every connection it selects"
    )]
    DenyWithoutRules,
    #[error(
        "mode DISABLE is not supported: nodemesh never downgrades an enrolled workload to \
         plaintext (Istio ambient ignores DISABLE too); use PERMISSIVE to also accept plaintext \
         from outside the mesh, or opt the pod out of the mesh"
    )]
    MtlsDisable,
    #[error(
        "`portLevelMtls` needs a `selector`: namespace- and mesh-wide policies cannot set it (as in Istio)"
    )]
    PortLevelWithoutSelector,
    #[error("`{value}` is not a port: expected a number from 1 to 65535")]
    BadPortKey { value: u32 },
    #[error(
        "a PeerAuthentication with a selector in the root namespace `{root}` applies to nothing \
         (Istio ignores it too); put it in the workload's namespace"
    )]
    SelectorInRootNamespace { root: String },
    #[error("`metadata.name` is empty")]
    MissingName,
    #[error("apiVersion `{found}` is not nodemesh's; use `{expected}`")]
    ApiVersion {
        found: String,
        expected: &'static str,
    },
    #[error("kind `{found}` where `{expected}` was expected")]
    Kind {
        found: String,
        expected: &'static str,
    },
}

/// Collects the findings about one policy.
pub(crate) struct Findings {
    policy: PolicyRef,
    pub(crate) list: Vec<ValidationError>,
}

impl Findings {
    pub(crate) fn new(policy: PolicyRef) -> Self {
        Findings {
            policy,
            list: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, path: impl Into<String>, problem: Problem) {
        self.push(Severity::Error, path.into(), problem);
    }

    pub(crate) fn warn(&mut self, path: impl Into<String>, problem: Problem) {
        self.push(Severity::Warning, path.into(), problem);
    }

    fn push(&mut self, severity: Severity, path: String, problem: Problem) {
        self.list.push(ValidationError {
            policy: self.policy.clone(),
            severity,
            path,
            problem,
        });
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.list.iter().any(|e| e.severity == Severity::Error)
    }
}
