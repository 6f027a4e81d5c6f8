//! The CA's node authorization, as pure functions over a token review and a pod index (Istio's
//! `NodeAuthorizer`, `security/pkg/server/ca/node_auth.go`, with the same checks in the same
//! order). The server calls [`caller`] with the TokenReview's answer, then parses the CSR, then
//! [`identity`]; the first failed check refuses the request with its [`Refusal`].
//!
//! 1. The token is authenticated (TokenReview, for the CA's audience): not expired, not
//!    revoked, its bound pod still exists with the same UID.
//! 2. Its user is one of the trusted callers (the node agents' ServiceAccount).
//! 3. It is pod-bound: `authentication.kubernetes.io/pod-name` and `pod-uid` are present.
//! 4. That pod exists in the pod index with that UID, runs as the token's ServiceAccount, is
//!    scheduled (`spec.nodeName`) and not terminated; if the token names a node
//!    (`authentication.kubernetes.io/node-name`), it is the pod's node. That node is the
//!    caller's node.
//! 5. (the server) The CSR parses, its signature verifies, its only SAN is one URI.
//! 6. That URI is a SPIFFE ID in our trust domain.
//! 7. At least one pod of that namespace and ServiceAccount, not terminated, runs on the
//!    caller's node.

use std::collections::BTreeMap;

use crate::identity::SpiffeId;

/// Token extras set by the API server on pod-bound ServiceAccount tokens.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Why a request was refused. [`Refusal::reason`] is the metric label, stable across releases.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no bearer token in the `authorization` metadata (the agent sends its projected ServiceAccount token)"
    )]
    TokenMissing,
    #[error(
        "the token is not valid for audience {audience}: {error} (expired, revoked, for another audience, or its pod is gone)"
    )]
    TokenInvalid { audience: String, error: String },
    #[error(
        "the token belongs to `{user}`, which may not request certificates (allowed: {allowed})"
    )]
    CallerNotAllowed { user: String, allowed: String },
    #[error(
        "the token of `{user}` is not bound to a pod (no `{EXTRA_POD_NAME}`/`{EXTRA_POD_UID}`): the agent must use a projected token"
    )]
    TokenNotPodBound { user: String },
    #[error("the caller's pod {namespace}/{name} does not exist")]
    CallerPodMissing { namespace: String, name: String },
    #[error(
        "the caller's pod {namespace}/{name} has UID {actual}, the token names {token} (the pod was recreated)"
    )]
    CallerPodUidMismatch {
        namespace: String,
        name: String,
        token: String,
        actual: String,
    },
    #[error(
        "the caller's pod {namespace}/{name} runs as ServiceAccount `{actual}`, not the token's `{token}`"
    )]
    CallerPodWrongAccount {
        namespace: String,
        name: String,
        token: String,
        actual: String,
    },
    #[error("the caller's pod {namespace}/{name} is not on a node (unscheduled or terminated)")]
    CallerPodNotRunning { namespace: String, name: String },
    #[error(
        "the token names node `{token}` but the caller's pod {namespace}/{name} runs on `{actual}`"
    )]
    CallerNodeMismatch {
        namespace: String,
        name: String,
        token: String,
        actual: String,
    },
    #[error("the CSR is invalid: {0}")]
    CsrInvalid(String),
    #[error("the CSR's identity is invalid: {0}")]
    IdentityInvalid(String),
    #[error("identity {identity} is outside the trust domain `{trust_domain}`")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error(
        "no running pod of ServiceAccount {namespace}/{service_account} on node `{node}`, the caller's node"
    )]
    NoPodOnNode {
        namespace: String,
        service_account: String,
        node: String,
    },
}

impl Refusal {
    /// The `reason` label of `nodemesh_ca_certificates_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TokenMissing => "token_missing",
            Refusal::TokenInvalid { .. } => "token_invalid",
            Refusal::CallerNotAllowed { .. } => "caller_not_allowed",
            Refusal::TokenNotPodBound { .. } => "token_not_pod_bound",
            Refusal::CallerPodMissing { .. } => "caller_pod_missing",
            Refusal::CallerPodUidMismatch { .. } => "caller_pod_uid_mismatch",
            Refusal::CallerPodWrongAccount { .. } => "caller_pod_wrong_account",
            Refusal::CallerPodNotRunning { .. } => "caller_pod_not_running",
            Refusal::CallerNodeMismatch { .. } => "caller_node_mismatch",
            Refusal::CsrInvalid(_) => "csr_invalid",
            Refusal::IdentityInvalid(_) => "identity_invalid",
            Refusal::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Refusal::NoPodOnNode { .. } => "no_pod_on_node",
        }
    }

    /// Every reason label, so the counter family shows zeros before the first refusal.
    pub const REASONS: [&'static str; 13] = [
        "token_missing",
        "token_invalid",
        "caller_not_allowed",
        "token_not_pod_bound",
        "caller_pod_missing",
        "caller_pod_uid_mismatch",
        "caller_pod_wrong_account",
        "caller_pod_not_running",
        "caller_node_mismatch",
        "csr_invalid",
        "identity_invalid",
        "foreign_trust_domain",
        "no_pod_on_node",
    ];

    /// Whether the caller failed to authenticate (gRPC `UNAUTHENTICATED`) rather than being
    /// refused what it asked for (`PERMISSION_DENIED`, `INVALID_ARGUMENT`).
    pub fn is_authentication(&self) -> bool {
        matches!(self, Refusal::TokenMissing | Refusal::TokenInvalid { .. })
    }

    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Refusal::CsrInvalid(_)
                | Refusal::IdentityInvalid(_)
                | Refusal::ForeignTrustDomain { .. }
        )
    }
}

/// What a TokenReview answered (`status`), reduced to what the checks read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Review {
    pub authenticated: bool,
    pub error: String,
    pub username: String,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Review {
    fn extra(&self, key: &str) -> Option<&str> {
        self.extra
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// The facts about one pod the checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`; empty while unscheduled.
    pub node: String,
    /// `status.phase` is `Succeeded` or `Failed`.
    pub terminated: bool,
}

/// Read access to the pods (a reflector's store in the server, a map in tests).
pub trait PodIndex {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether a pod of `namespace`/`service_account`, not terminated, runs on `node`.
    fn has_running_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// What the CA is configured to accept.
#[derive(Clone, Debug)]
pub struct Policy {
    pub audience: String,
    /// Usernames allowed to call, `system:serviceaccount:<ns>:<name>`.
    pub allowed_callers: Vec<String>,
    pub trust_domain: String,
}

/// The authenticated, authorized caller: a node agent's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub username: String,
    pub namespace: String,
    pub pod: String,
    pub node: String,
}

/// Checks 1 to 4: who is calling, and from which node.
pub fn caller(review: &Review, pods: &impl PodIndex, policy: &Policy) -> Result<Caller, Refusal> {
    if !review.authenticated {
        return Err(Refusal::TokenInvalid {
            audience: policy.audience.clone(),
            error: if review.error.is_empty() {
                "not authenticated".into()
            } else {
                review.error.clone()
            },
        });
    }
    let user = &review.username;
    if !policy.allowed_callers.iter().any(|a| a == user) {
        return Err(Refusal::CallerNotAllowed {
            user: user.clone(),
            allowed: policy.allowed_callers.join(", "),
        });
    }
    // `system:serviceaccount:<ns>:<name>`: the pod's namespace and account must be these.
    let (namespace, account) = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| Refusal::CallerNotAllowed {
            user: user.clone(),
            allowed: policy.allowed_callers.join(", "),
        })?;
    let (Some(name), Some(uid)) = (review.extra(EXTRA_POD_NAME), review.extra(EXTRA_POD_UID))
    else {
        return Err(Refusal::TokenNotPodBound { user: user.clone() });
    };
    let pod = pods
        .pod(namespace, name)
        .ok_or_else(|| Refusal::CallerPodMissing {
            namespace: namespace.into(),
            name: name.into(),
        })?;
    if pod.uid != uid {
        return Err(Refusal::CallerPodUidMismatch {
            namespace: namespace.into(),
            name: name.into(),
            token: uid.into(),
            actual: pod.uid,
        });
    }
    if pod.service_account != account {
        return Err(Refusal::CallerPodWrongAccount {
            namespace: namespace.into(),
            name: name.into(),
            token: account.into(),
            actual: pod.service_account,
        });
    }
    if pod.node.is_empty() || pod.terminated {
        return Err(Refusal::CallerPodNotRunning {
            namespace: namespace.into(),
            name: name.into(),
        });
    }
    if let Some(node) = review.extra(EXTRA_NODE_NAME)
        && node != pod.node
    {
        return Err(Refusal::CallerNodeMismatch {
            namespace: namespace.into(),
            name: name.into(),
            token: node.into(),
            actual: pod.node,
        });
    }
    Ok(Caller {
        username: user.clone(),
        namespace: namespace.into(),
        pod: name.into(),
        node: pod.node,
    })
}

/// Checks 6 and 7: the requested identity (the CSR's only URI SAN) may be issued to `caller`.
pub fn identity(
    caller: &Caller,
    requested: &str,
    pods: &impl PodIndex,
    policy: &Policy,
) -> Result<SpiffeId, Refusal> {
    let id: SpiffeId = requested
        .parse()
        .map_err(|e: crate::identity::SpiffeIdError| Refusal::IdentityInvalid(e.to_string()))?;
    if id.trust_domain() != policy.trust_domain {
        return Err(Refusal::ForeignTrustDomain {
            identity: id.to_string(),
            trust_domain: policy.trust_domain.clone(),
        });
    }
    if !pods.has_running_pod(&caller.node, id.namespace(), id.service_account()) {
        return Err(Refusal::NoPodOnNode {
            namespace: id.namespace().into(),
            service_account: id.service_account().into(),
            node: caller.node.clone(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pods keyed by (namespace, name).
    #[derive(Default)]
    struct Pods(BTreeMap<(String, String), PodFacts>);

    impl Pods {
        fn with(mut self, ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> Self {
            self.0.insert(
                (ns.into(), name.into()),
                PodFacts {
                    uid: uid.into(),
                    service_account: sa.into(),
                    node: node.into(),
                    terminated: false,
                },
            );
            self
        }
    }

    impl PodIndex for Pods {
        fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
            self.0.get(&(namespace.into(), name.into())).cloned()
        }
        fn has_running_pod(&self, node: &str, namespace: &str, sa: &str) -> bool {
            self.0.iter().any(|((ns, _), p)| {
                ns == namespace && p.service_account == sa && p.node == node && !p.terminated
            })
        }
    }

    const AGENT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";

    fn policy() -> Policy {
        Policy {
            audience: "nodemesh-ca".into(),
            allowed_callers: vec![AGENT.into()],
            trust_domain: "cluster.local".into(),
        }
    }

    fn pods() -> Pods {
        Pods::default()
            .with(
                "nodemesh-system",
                "agent-a",
                "uid-a",
                "nodemesh-agent",
                "node-a",
            )
            .with(
                "nodemesh-system",
                "agent-b",
                "uid-b",
                "nodemesh-agent",
                "node-b",
            )
            .with("shop", "web-1", "uid-w", "web", "node-a")
            .with("shop", "db-1", "uid-d", "db", "node-b")
    }

    fn review(user: &str, pod: Option<(&str, &str)>, node: Option<&str>) -> Review {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(EXTRA_POD_NAME.into(), vec![name.into()]);
            extra.insert(EXTRA_POD_UID.into(), vec![uid.into()]);
        }
        if let Some(n) = node {
            extra.insert(EXTRA_NODE_NAME.into(), vec![n.into()]);
        }
        Review {
            authenticated: true,
            error: String::new(),
            username: user.into(),
            extra,
        }
    }

    #[test]
    fn an_agent_gets_identities_of_pods_on_its_own_node_only() {
        let r = review(AGENT, Some(("agent-a", "uid-a")), Some("node-a"));
        let caller = caller(&r, &pods(), &policy()).expect("authorized");
        assert_eq!(caller.node, "node-a");
        let id = identity(
            &caller,
            "spiffe://cluster.local/ns/shop/sa/web",
            &pods(),
            &policy(),
        )
        .expect("web runs on node-a");
        assert_eq!(id.service_account(), "web");
        let refused = identity(
            &caller,
            "spiffe://cluster.local/ns/shop/sa/db",
            &pods(),
            &policy(),
        )
        .expect_err("db runs on node-b only");
        assert_eq!(refused.reason(), "no_pod_on_node");
        assert!(refused.to_string().contains("node-a"), "{refused}");
    }

    #[test]
    fn each_caller_check_refuses_with_its_reason() {
        let p = policy();
        let cases: Vec<(Review, &str)> = vec![
            (
                Review {
                    authenticated: false,
                    error: "token has expired".into(),
                    ..Review::default()
                },
                "token_invalid",
            ),
            (
                review(
                    "system:serviceaccount:shop:web",
                    Some(("web-1", "uid-w")),
                    None,
                ),
                "caller_not_allowed",
            ),
            (review(AGENT, None, None), "token_not_pod_bound"),
            (
                review(AGENT, Some(("agent-gone", "uid-x")), None),
                "caller_pod_missing",
            ),
            (
                review(AGENT, Some(("agent-a", "uid-old")), None),
                "caller_pod_uid_mismatch",
            ),
            (
                review(AGENT, Some(("agent-a", "uid-a")), Some("node-b")),
                "caller_node_mismatch",
            ),
        ];
        for (r, reason) in cases {
            let err = caller(&r, &pods(), &p).expect_err(reason);
            assert_eq!(err.reason(), reason, "{err}");
            assert!(Refusal::REASONS.contains(&err.reason()));
        }
        // The pod named by the token runs as another account.
        let other = Pods::default().with("nodemesh-system", "agent-a", "uid-a", "other", "node-a");
        let err = caller(&review(AGENT, Some(("agent-a", "uid-a")), None), &other, &p)
            .expect_err("wrong account");
        assert_eq!(err.reason(), "caller_pod_wrong_account");
        // An unscheduled or terminated agent pod has no node to vouch for.
        let mut gone = pods();
        if let Some(pod) = gone
            .0
            .get_mut(&("nodemesh-system".to_string(), "agent-a".to_string()))
        {
            pod.terminated = true;
        }
        let err = caller(&review(AGENT, Some(("agent-a", "uid-a")), None), &gone, &p)
            .expect_err("terminated");
        assert_eq!(err.reason(), "caller_pod_not_running");
    }

    #[test]
    fn identity_checks_refuse_foreign_and_malformed_ids_and_terminated_pods() {
        let p = policy();
        let c = caller(
            &review(AGENT, Some(("agent-a", "uid-a")), None),
            &pods(),
            &p,
        )
        .expect("caller");
        for (id, reason) in [
            ("spiffe://other.td/ns/shop/sa/web", "foreign_trust_domain"),
            ("spiffe://cluster.local/ns/shop", "identity_invalid"),
            ("https://cluster.local/ns/shop/sa/web", "identity_invalid"),
        ] {
            let err = identity(&c, id, &pods(), &p).expect_err(id);
            assert_eq!(err.reason(), reason, "{id}: {err}");
        }
        let mut done = pods();
        if let Some(pod) = done.0.get_mut(&("shop".to_string(), "web-1".to_string())) {
            pod.terminated = true;
        }
        let err = identity(&c, "spiffe://cluster.local/ns/shop/sa/web", &done, &p)
            .expect_err("only a terminated pod");
        assert_eq!(err.reason(), "no_pod_on_node");
    }
}
