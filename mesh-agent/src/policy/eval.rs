//! Evaluation: which policies apply to a workload, and Istio's decision order over them.

use std::fmt;
use std::net::IpAddr;

use super::compile::{
    CompiledAuthorizationPolicy, CompiledRule, Effect, Match, compile_authorization_policy,
    policy_ref, selector_labels,
};
use super::error::{PolicyKind, PolicyRef, Problem, Severity, ValidationError};
use super::peer::{
    CompiledPeerAuthentication, MtlsLevel, MtlsMode, MtlsResolution, compile_peer_authentication,
    strict_stand_in,
};
use super::spec::{AuthorizationPolicy, Labels, PeerAuthentication};

/// nodemesh's default root namespace: policies there apply mesh-wide (Istio's is
/// `istio-system`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "nodemesh-system";

/// A verified peer identity, from the client certificate's SPIFFE ID
/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl PeerIdentity {
    /// The principal as policies write it: the SPIFFE ID without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else is `None`.
    pub fn from_spiffe_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (td, ns_tag, ns, sa_tag, sa) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if parts.next().is_some()
            || ns_tag != "ns"
            || sa_tag != "sa"
            || [td, ns, sa].iter().any(|s| s.is_empty())
        {
            return None;
        }
        Some(PeerIdentity {
            trust_domain: td.to_owned(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }
}

/// What the policy engine knows about one inbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionAttrs {
    /// `None` for plaintext (no verified client certificate).
    pub src_identity: Option<PeerIdentity>,
    pub src_ip: IpAddr,
    /// The original destination: the workload's address and port.
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The destination workload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadMeta {
    pub namespace: String,
    pub labels: Labels,
}

/// A policy and the index of its first matching rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    pub policy: PolicyRef,
    pub rule: usize,
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Step 0: a plaintext connection (no verified identity) to a port whose effective
    /// PeerAuthentication mode is STRICT.
    PlaintextUnderStrictMtls(MtlsResolution),
    /// Step 1: a DENY policy matched.
    DeniedByPolicy(RuleMatch),
    /// Step 1 (fail-closed): an invalid ALLOW/DENY/CUSTOM policy selects the workload.
    InvalidPolicy { policy: PolicyRef, error: String },
    /// Step 2: no ALLOW policy applies to the workload.
    NoAllowPolicy,
    /// Step 3: an ALLOW policy matched.
    AllowedByPolicy(RuleMatch),
    /// Step 4: ALLOW policies apply, none matched.
    NoAllowPolicyMatched { policies: Vec<PolicyRef> },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::PlaintextUnderStrictMtls(m) => {
                write!(f, "denied: plaintext connection, but mTLS is STRICT")?;
                match &m.policy {
                    Some(p) => write!(f, " ({p})"),
                    None => Ok(()),
                }
            }
            Reason::DeniedByPolicy(m) => {
                write!(f, "denied by DENY {} (rule {})", m.policy, m.rule)
            }
            Reason::InvalidPolicy { policy, error } => write!(
                f,
                "denied: {policy} selects this workload but is invalid ({error}); nodemesh denies \
                 rather than guess"
            ),
            Reason::NoAllowPolicy => write!(f, "allowed: no ALLOW policy applies to the workload"),
            Reason::AllowedByPolicy(m) => {
                write!(f, "allowed by ALLOW {} (rule {})", m.policy, m.rule)
            }
            Reason::NoAllowPolicyMatched { policies } => {
                write!(
                    f,
                    "denied: no rule of the ALLOW policies that apply matched ("
                )?;
                for (i, p) in policies.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}/{}", p.namespace, p.name)?;
                }
                f.write_str(")")
            }
        }
    }
}

/// The outcome of [`PolicySet::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// AUDIT policies whose rules matched. They never change the decision.
    pub audits: Vec<RuleMatch>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(
            self.reason,
            Reason::NoAllowPolicy | Reason::AllowedByPolicy(_)
        )
    }

    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<&PolicyRef> {
        match &self.reason {
            Reason::DeniedByPolicy(m) | Reason::AllowedByPolicy(m) => Some(&m.policy),
            Reason::InvalidPolicy { policy, .. } => Some(policy),
            Reason::PlaintextUnderStrictMtls(m) => m.policy.as_ref(),
            Reason::NoAllowPolicy | Reason::NoAllowPolicyMatched { .. } => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        for a in &self.audits {
            write!(f, "; audited by {} (rule {})", a.policy, a.rule)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthzBody {
    Valid(CompiledAuthorizationPolicy),
    /// An invalid policy that would have allowed or denied: it denies everything it selects.
    Invalid {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AuthzEntry {
    policy: PolicyRef,
    selector: Option<Labels>,
    body: AuthzBody,
}

/// Every policy object in force, compiled, with the root namespace. Pure: build a new one when
/// the objects change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    root_namespace: String,
    /// Sorted by (namespace, name): the first matching policy is the one reported.
    authz: Vec<AuthzEntry>,
    peer: Vec<CompiledPeerAuthentication>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::compile(DEFAULT_ROOT_NAMESPACE, &[], &[]).0
    }
}

/// Per-connection values computed once.
struct Facts<'a> {
    conn: &'a ConnectionAttrs,
    principal: Option<String>,
}

impl Facts<'_> {
    fn namespace(&self) -> Option<&str> {
        self.conn
            .src_identity
            .as_ref()
            .map(|i| i.namespace.as_str())
    }

    fn service_account_is(&self, (ns, sa): &(String, String)) -> bool {
        self.conn
            .src_identity
            .as_ref()
            .is_some_and(|i| &i.namespace == ns && &i.service_account == sa)
    }
}

/// A positive list matches if empty or any value matches; a `not*` list matches if no value does.
fn field<T>(positive: &[T], negative: &[T], mut pred: impl FnMut(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&mut pred)) && !negative.iter().any(pred)
}

impl Match {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let c = facts.conn;
        let principal = facts.principal.as_deref();
        field(&self.principals, &self.not_principals, |m| {
            m.matches(principal)
        }) && field(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(facts.namespace())
        }) && field(&self.service_accounts, &self.not_service_accounts, |sa| {
            facts.service_account_is(sa)
        }) && field(&self.source_ips, &self.not_source_ips, |b| {
            b.contains(c.src_ip)
        }) && field(&self.destination_ips, &self.not_destination_ips, |b| {
            b.contains(c.dst_ip)
        }) && field(&self.ports, &self.not_ports, |p| *p == c.dst_port)
    }
}

impl CompiledRule {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|m| m.matches(facts)))
            && (self.to.is_empty() || self.to.iter().any(|m| m.matches(facts)))
            && self.when.iter().all(|m| m.matches(facts))
    }
}

/// Index of the first matching rule; a policy without rules matches nothing.
fn first_match(policy: &CompiledAuthorizationPolicy, facts: &Facts<'_>) -> Option<RuleMatch> {
    policy
        .rules
        .iter()
        .position(|r| r.matches(facts))
        .map(|rule| RuleMatch {
            policy: policy.policy.clone(),
            rule,
        })
}

fn selects(selector: &Option<Labels>, workload: &WorkloadMeta) -> bool {
    selector.as_ref().is_none_or(|want| {
        want.iter()
            .all(|(k, v)| workload.labels.get(k).is_some_and(|have| have == v))
    })
}

fn summary(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .filter(|e| e.severity == Severity::Error)
        .map(|e| format!("{}: {}", e.path, e.problem))
        .collect::<Vec<_>>()
        .join("; ")
}

impl PolicySet {
    /// Compiles every object. Returns the set and every finding (errors and warnings).
    ///
    /// An invalid `AuthorizationPolicy` with action ALLOW, DENY or CUSTOM still selects the
    /// workloads its namespace and selector name, and denies every connection to them (Istio
    /// ambient's ztunnel does the same for policies it cannot enforce). An invalid AUDIT
    /// policy is left out. An invalid `PeerAuthentication` counts as STRICT at its level.
    pub fn compile(
        root_namespace: &str,
        authorization: &[AuthorizationPolicy],
        peer_authentication: &[PeerAuthentication],
    ) -> (PolicySet, Vec<ValidationError>) {
        let mut findings = Vec::new();
        let mut authz = Vec::new();
        for p in authorization {
            match compile_authorization_policy(p) {
                Ok(mut c) => {
                    findings.append(&mut c.warnings);
                    authz.push(AuthzEntry {
                        policy: c.policy.clone(),
                        selector: c.selector.clone(),
                        body: AuthzBody::Valid(c),
                    });
                }
                Err(mut errors) => {
                    if p.spec.action != super::spec::Action::Audit {
                        authz.push(AuthzEntry {
                            policy: policy_ref(PolicyKind::AuthorizationPolicy, &p.metadata),
                            selector: selector_labels(&p.spec.selector),
                            body: AuthzBody::Invalid {
                                error: summary(&errors),
                            },
                        });
                    }
                    findings.append(&mut errors);
                }
            }
        }
        authz.sort_by(|a, b| a.policy.cmp(&b.policy));

        let mut peer = Vec::new();
        for p in peer_authentication {
            let compiled = match compile_peer_authentication(p) {
                Ok(c) => c,
                Err(mut errors) => {
                    findings.append(&mut errors);
                    strict_stand_in(p)
                }
            };
            if compiled.policy.namespace == root_namespace && compiled.selector.is_some() {
                findings.push(ValidationError {
                    policy: compiled.policy.clone(),
                    severity: Severity::Error,
                    path: "spec.selector".to_owned(),
                    problem: Problem::SelectorInRootNamespace {
                        root: root_namespace.to_owned(),
                    },
                });
                continue;
            }
            peer.push(compiled);
        }
        peer.sort_by(|a, b| a.policy.cmp(&b.policy));
        (
            PolicySet {
                root_namespace: root_namespace.to_owned(),
                authz,
                peer,
            },
            findings,
        )
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Every port a valid AuthorizationPolicy names (`ports`, `notPorts`, port conditions).
    /// A decision can only differ between a named port and the others, so evaluating each named
    /// port plus one unnamed port covers every port (how the kernel's early-deny entries are
    /// computed).
    pub fn named_ports(&self) -> std::collections::BTreeSet<u16> {
        let mut out = std::collections::BTreeSet::new();
        for entry in &self.authz {
            if let AuthzBody::Valid(p) = &entry.body {
                for rule in &p.rules {
                    for m in rule.from.iter().chain(&rule.to).chain(&rule.when) {
                        out.extend(m.ports.iter().chain(&m.not_ports).copied());
                    }
                }
            }
        }
        out
    }

    /// Whether a policy in `namespace` with `selector` applies to `workload`: it is in the root
    /// namespace or the workload's, and its selector (if any) matches the workload's labels.
    fn in_scope(
        &self,
        namespace: &str,
        selector: &Option<Labels>,
        workload: &WorkloadMeta,
    ) -> bool {
        (namespace == self.root_namespace || namespace == workload.namespace)
            && selects(selector, workload)
    }

    /// Whether some AuthorizationPolicy matches on the client's address (`ipBlocks`,
    /// `notIpBlocks`, a `source.ip` condition): only then can two connections of one source
    /// identity to one destination port get different decisions.
    pub fn matches_source_addresses(&self) -> bool {
        self.authz.iter().any(|e| match &e.body {
            AuthzBody::Valid(p) => p.rules.iter().any(|r| {
                r.from
                    .iter()
                    .chain(&r.to)
                    .chain(&r.when)
                    .any(|m| !m.source_ips.is_empty() || !m.not_source_ips.is_empty())
            }),
            AuthzBody::Invalid { .. } => false,
        })
    }

    /// Whether any AuthorizationPolicy applies to `workload`. When none does, every connection
    /// with a verified identity is allowed (plaintext may still meet STRICT).
    pub fn selects_any(&self, workload: &WorkloadMeta) -> bool {
        self.candidates(&workload.namespace)
            .any(|e| self.in_scope(&e.policy.namespace, &e.selector, workload))
    }

    /// The AuthorizationPolicies that can apply to a workload of `namespace`, in `authz` order:
    /// the root namespace's and the workload's. `authz` is sorted by namespace, so each is one
    /// contiguous run found by binary search: a decision costs the policies of two namespaces,
    /// not of the cluster (10,000 policies in 100 namespaces: 255 µs → see `benches/`).
    fn candidates<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a AuthzEntry> + 'a {
        let run = |ns: &str| -> &'a [AuthzEntry] {
            let start = self
                .authz
                .partition_point(|e| e.policy.namespace.as_str() < ns);
            let len = self.authz[start..].partition_point(|e| e.policy.namespace == ns);
            &self.authz[start..start + len]
        };
        let root = run(&self.root_namespace);
        let own = if namespace == self.root_namespace {
            &[][..]
        } else {
            run(namespace)
        };
        let (first, second) = if self.root_namespace.as_str() <= namespace {
            (root, own)
        } else {
            (own, root)
        };
        first.iter().chain(second)
    }

    /// Istio's order: (0) a plaintext connection to a STRICT port is denied (ztunnel receives
    /// STRICT as a DENY policy on `notPrincipals: ["*"]`); (1) any matching DENY denies; (2) no
    /// ALLOW applies → allow; (3) any matching ALLOW allows; (4) deny. Every AUDIT policy that
    /// applies is evaluated and reported when it matches, whatever the decision.
    pub fn authorize(&self, workload: &WorkloadMeta, conn: &ConnectionAttrs) -> Decision {
        let facts = Facts {
            conn,
            principal: conn.src_identity.as_ref().map(PeerIdentity::principal),
        };
        let mut denied: Option<Reason> = None;
        if conn.src_identity.is_none() {
            let mtls = self.mtls_mode(workload, conn.dst_port);
            if mtls.mode == MtlsMode::Strict {
                denied = Some(Reason::PlaintextUnderStrictMtls(mtls));
            }
        }
        let mut allowed: Option<RuleMatch> = None;
        let mut allow_policies = Vec::new();
        let mut audits = Vec::new();
        for entry in self.candidates(&workload.namespace) {
            if !self.in_scope(&entry.policy.namespace, &entry.selector, workload) {
                continue;
            }
            match &entry.body {
                AuthzBody::Invalid { error } => {
                    if denied.is_none() {
                        denied = Some(Reason::InvalidPolicy {
                            policy: entry.policy.clone(),
                            error: error.clone(),
                        });
                    }
                }
                AuthzBody::Valid(p) => match p.effect {
                    Effect::Deny => {
                        if denied.is_none() {
                            denied = first_match(p, &facts).map(Reason::DeniedByPolicy);
                        }
                    }
                    Effect::Allow => {
                        allow_policies.push(p.policy.clone());
                        if allowed.is_none() {
                            allowed = first_match(p, &facts);
                        }
                    }
                    Effect::Audit => audits.extend(first_match(p, &facts)),
                },
            }
        }
        let reason = if let Some(denied) = denied {
            denied
        } else if allow_policies.is_empty() {
            Reason::NoAllowPolicy
        } else if let Some(m) = allowed {
            Reason::AllowedByPolicy(m)
        } else {
            Reason::NoAllowPolicyMatched {
                policies: allow_policies,
            }
        };
        Decision { reason, audits }
    }

    /// The `portLevelMtls` entries that apply to `workload` (those of its workload-level
    /// PeerAuthentication), for programming per-port modes. Port 0 never has an entry, so
    /// `mtls_mode(workload, 0)` is the workload-wide mode.
    pub fn mtls_port_overrides(
        &self,
        workload: &WorkloadMeta,
    ) -> std::collections::BTreeMap<u16, MtlsMode> {
        self.workload_peer_policy(workload)
            .map(|p| p.ports.clone())
            .unwrap_or_default()
    }

    fn workload_peer_policy(&self, workload: &WorkloadMeta) -> Option<&CompiledPeerAuthentication> {
        let in_root = workload.namespace == self.root_namespace;
        self.peer.iter().find(|p| {
            !in_root
                && p.policy.namespace == workload.namespace
                && p.selector.is_some()
                && selects(&p.selector, workload)
        })
    }

    /// The effective mTLS mode for connections to `port` of `workload`: the workload policy's
    /// port entry, else the workload policy, else the namespace policy, else the mesh policy,
    /// else PERMISSIVE; UNSET at any level inherits. Where several policies compete at one
    /// level, the first by name wins (Istio picks the oldest).
    pub fn mtls_mode(&self, workload: &WorkloadMeta, port: u16) -> MtlsResolution {
        let root = self.root_namespace.as_str();
        let in_root = workload.namespace == root;
        let mesh = self
            .peer
            .iter()
            .find(|p| p.policy.namespace == root && p.selector.is_none());
        let namespace = self
            .peer
            .iter()
            .find(|p| !in_root && p.policy.namespace == workload.namespace && p.selector.is_none());
        let workload_policy = self.workload_peer_policy(workload);
        let mut out = MtlsResolution {
            mode: MtlsMode::Permissive,
            level: MtlsLevel::Default,
            policy: None,
        };
        for (level, policy) in [
            (MtlsLevel::Mesh, mesh),
            (MtlsLevel::Namespace, namespace),
            (MtlsLevel::Workload, workload_policy),
        ] {
            if let Some(p) = policy
                && let Some(mode) = p.mode
            {
                out = MtlsResolution {
                    mode,
                    level,
                    policy: Some(p.policy.clone()),
                };
            }
        }
        if let Some(p) = workload_policy
            && let Some(&mode) = p.ports.get(&port)
        {
            out = MtlsResolution {
                mode,
                level: MtlsLevel::Port,
                policy: Some(p.policy.clone()),
            };
        }
        out
    }
}
