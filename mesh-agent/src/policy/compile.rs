//! Validation: raw specs in, compiled policies out. Every value is parsed here once (CIDRs,
//! ports, `*` forms), so evaluation only compares. Bad input gives a [`ValidationError`] naming
//! the policy, the path in it and the reason; it never panics.

use super::error::{Findings, PolicyKind, PolicyRef, Problem, ValidationError};
use super::matcher::{Cidr, StringMatch, parse_port};
use super::spec::{self, API_VERSION, Action, AuthorizationPolicy, Labels, WorkloadSelector};

/// What a valid policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
    Audit,
}

/// One compiled match group: the fields present are ANDed; a positive field matches when any
/// value does; a `not*` field matches when no value does. `from` sources, `to` operations and
/// `when` conditions all compile to this one shape (as ztunnel's `RbacMatch`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Match {
    pub(crate) principals: Vec<StringMatch>,
    pub(crate) not_principals: Vec<StringMatch>,
    pub(crate) namespaces: Vec<StringMatch>,
    pub(crate) not_namespaces: Vec<StringMatch>,
    /// `(namespace, service account)`, exact.
    pub(crate) service_accounts: Vec<(String, String)>,
    pub(crate) not_service_accounts: Vec<(String, String)>,
    pub(crate) source_ips: Vec<Cidr>,
    pub(crate) not_source_ips: Vec<Cidr>,
    pub(crate) destination_ips: Vec<Cidr>,
    pub(crate) not_destination_ips: Vec<Cidr>,
    pub(crate) ports: Vec<u16>,
    pub(crate) not_ports: Vec<u16>,
}

/// A compiled rule: `from` (any entry; empty = not present), `to` (any entry; empty = not
/// present), `when` (every condition). A rule with none of the three matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CompiledRule {
    pub(crate) from: Vec<Match>,
    pub(crate) to: Vec<Match>,
    pub(crate) when: Vec<Match>,
}

/// A validated `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledAuthorizationPolicy {
    pub policy: PolicyRef,
    pub effect: Effect,
    /// `None`: every workload in scope (no selector, or empty `matchLabels`).
    pub(crate) selector: Option<Labels>,
    pub(crate) rules: Vec<CompiledRule>,
    /// Findings that did not stop compilation (for example a DENY policy without rules).
    pub warnings: Vec<ValidationError>,
}

pub(crate) fn policy_ref(kind: PolicyKind, meta: &spec::ObjectMeta) -> PolicyRef {
    PolicyRef {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
    }
}

pub(crate) fn selector_labels(selector: &Option<WorkloadSelector>) -> Option<Labels> {
    selector
        .as_ref()
        .filter(|s| !s.match_labels.is_empty())
        .map(|s| s.match_labels.clone())
}

pub(crate) fn check_header(
    findings: &mut Findings,
    api_version: &Option<String>,
    kind: &Option<String>,
    expected_kind: &'static str,
    meta: &spec::ObjectMeta,
) {
    if let Some(found) = api_version
        && found != API_VERSION
    {
        findings.error(
            "apiVersion",
            Problem::ApiVersion {
                found: found.clone(),
                expected: API_VERSION,
            },
        );
    }
    if let Some(found) = kind
        && found != expected_kind
    {
        findings.error(
            "kind",
            Problem::Kind {
                found: found.clone(),
                expected: expected_kind,
            },
        );
    }
    if meta.name.is_empty() {
        findings.error("metadata.name", Problem::MissingName);
    }
}

/// Validates and compiles one `AuthorizationPolicy`. On error, every finding (errors and
/// warnings) is returned, so an operator can fix them all at once.
pub fn compile_authorization_policy(
    policy: &AuthorizationPolicy,
) -> Result<CompiledAuthorizationPolicy, Vec<ValidationError>> {
    let policy_ref = policy_ref(PolicyKind::AuthorizationPolicy, &policy.metadata);
    let mut f = Findings::new(policy_ref.clone());
    check_header(
        &mut f,
        &policy.api_version,
        &policy.kind,
        "AuthorizationPolicy",
        &policy.metadata,
    );
    let spec = &policy.spec;
    if spec.target_ref.is_some() {
        f.error("spec.targetRef", Problem::TargetRef { field: "targetRef" });
    }
    if spec.target_refs.is_some() {
        f.error(
            "spec.targetRefs",
            Problem::TargetRef {
                field: "targetRefs",
            },
        );
    }
    if spec.provider.is_some() {
        f.error("spec.provider", Problem::Provider);
    }
    let effect = match spec.action {
        Action::Allow => Effect::Allow,
        Action::Deny => Effect::Deny,
        Action::Audit => Effect::Audit,
        Action::Custom => {
            f.error("spec.action", Problem::CustomAction);
            Effect::Deny
        }
    };
    if spec.action == Action::Deny && spec.rules.as_ref().is_none_or(Vec::is_empty) {
        f.warn("spec.rules", Problem::DenyWithoutRules);
    }
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        rules.push(compile_rule(
            &mut f,
            &format!("spec.rules[{i}]"),
            rule,
            &policy.metadata.namespace,
        ));
    }
    if f.has_errors() {
        return Err(f.list);
    }
    Ok(CompiledAuthorizationPolicy {
        policy: policy_ref,
        effect,
        selector: selector_labels(&spec.selector),
        rules,
        warnings: f.list,
    })
}

fn compile_rule(f: &mut Findings, path: &str, rule: &spec::Rule, policy_ns: &str) -> CompiledRule {
    let mut out = CompiledRule::default();
    if let Some(from) = &rule.from {
        if from.is_empty() {
            f.error(format!("{path}.from"), Problem::EmptyList("from"));
        }
        for (i, entry) in from.iter().enumerate() {
            let path = format!("{path}.from[{i}].source");
            match &entry.source {
                Some(source) => out.from.push(compile_source(f, &path, source, policy_ns)),
                None => f.error(path, Problem::EmptySource),
            }
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            f.error(format!("{path}.to"), Problem::EmptyList("to"));
        }
        for (i, entry) in to.iter().enumerate() {
            let path = format!("{path}.to[{i}].operation");
            match &entry.operation {
                Some(op) => out.to.push(compile_operation(f, &path, op)),
                None => f.error(path, Problem::EmptyOperation),
            }
        }
    }
    if let Some(when) = &rule.when {
        if when.is_empty() {
            f.error(format!("{path}.when"), Problem::EmptyList("when"));
        }
        for (i, cond) in when.iter().enumerate() {
            if let Some(m) = compile_condition(f, &format!("{path}.when[{i}]"), cond) {
                out.when.push(m);
            }
        }
    }
    out
}

/// Parses every value of one list field with `parse`, reporting each bad one at its index.
fn each<T>(
    f: &mut Findings,
    path: &str,
    field: &str,
    values: &[String],
    mut parse: impl FnMut(&str) -> Result<T, Problem>,
) -> Vec<T> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match parse(v) {
            Ok(t) => Some(t),
            Err(problem) => {
                f.error(format!("{path}.{field}[{i}]"), problem);
                None
            }
        })
        .collect()
}

fn parse_principal(value: &str) -> Result<StringMatch, Problem> {
    if value.starts_with("spiffe://") {
        return Err(Problem::SpiffeScheme {
            value: value.to_owned(),
        });
    }
    StringMatch::parse(value)
}

fn parse_service_account(value: &str, policy_ns: &str) -> Result<(String, String), Problem> {
    let bad = || Problem::BadServiceAccount {
        value: value.to_owned(),
    };
    if value.contains('*') {
        return Err(bad());
    }
    let (ns, sa) = value.split_once('/').unwrap_or((policy_ns, value));
    if ns.is_empty() || sa.is_empty() || sa.contains('/') {
        return Err(bad());
    }
    Ok((ns.to_owned(), sa.to_owned()))
}

fn compile_source(f: &mut Findings, path: &str, s: &spec::Source, policy_ns: &str) -> Match {
    let l7: [(&'static str, bool); 4] = [
        ("remoteIpBlocks", s.remote_ip_blocks.is_some()),
        ("notRemoteIpBlocks", s.not_remote_ip_blocks.is_some()),
        ("requestPrincipals", s.request_principals.is_some()),
        ("notRequestPrincipals", s.not_request_principals.is_some()),
    ];
    let mut any_l7 = false;
    for (field, present) in l7 {
        if present {
            any_l7 = true;
            f.error(format!("{path}.{field}"), Problem::L7Field { field });
        }
    }
    let l4_lists = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
    ];
    if !any_l7 && l4_lists.iter().all(|l| l.is_empty()) {
        f.error(path, Problem::EmptySource);
    }
    let sets_service_accounts =
        !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let sets_principals_or_namespaces = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if sets_service_accounts && sets_principals_or_namespaces {
        f.error(path, Problem::ServiceAccountsWithPrincipals);
    }
    Match {
        principals: each(f, path, "principals", &s.principals, parse_principal),
        not_principals: each(f, path, "notPrincipals", &s.not_principals, parse_principal),
        namespaces: each(f, path, "namespaces", &s.namespaces, StringMatch::parse),
        not_namespaces: each(
            f,
            path,
            "notNamespaces",
            &s.not_namespaces,
            StringMatch::parse,
        ),
        service_accounts: each(f, path, "serviceAccounts", &s.service_accounts, |v| {
            parse_service_account(v, policy_ns)
        }),
        not_service_accounts: each(
            f,
            path,
            "notServiceAccounts",
            &s.not_service_accounts,
            |v| parse_service_account(v, policy_ns),
        ),
        source_ips: each(f, path, "ipBlocks", &s.ip_blocks, Cidr::parse),
        not_source_ips: each(f, path, "notIpBlocks", &s.not_ip_blocks, Cidr::parse),
        ..Match::default()
    }
}

fn compile_operation(f: &mut Findings, path: &str, op: &spec::Operation) -> Match {
    let l7: [(&'static str, bool); 6] = [
        ("hosts", op.hosts.is_some()),
        ("notHosts", op.not_hosts.is_some()),
        ("methods", op.methods.is_some()),
        ("notMethods", op.not_methods.is_some()),
        ("paths", op.paths.is_some()),
        ("notPaths", op.not_paths.is_some()),
    ];
    let mut any_l7 = false;
    for (field, present) in l7 {
        if present {
            any_l7 = true;
            f.error(format!("{path}.{field}"), Problem::L7Field { field });
        }
    }
    if !any_l7 && op.ports.is_empty() && op.not_ports.is_empty() {
        f.error(path, Problem::EmptyOperation);
    }
    Match {
        ports: each(f, path, "ports", &op.ports, parse_port),
        not_ports: each(f, path, "notPorts", &op.not_ports, parse_port),
        ..Match::default()
    }
}

/// The condition keys ztunnel evaluates (istiod's `l4WhenAttributes`).
pub const L4_CONDITION_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn compile_condition(f: &mut Findings, path: &str, c: &spec::Condition) -> Option<Match> {
    if c.key.is_empty() {
        f.error(format!("{path}.key"), Problem::EmptyConditionKey);
        return None;
    }
    if !L4_CONDITION_KEYS.contains(&c.key.as_str()) {
        f.error(
            format!("{path}.key"),
            Problem::NonL4ConditionKey { key: c.key.clone() },
        );
        return None;
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        f.error(path, Problem::EmptyCondition { key: c.key.clone() });
        return None;
    }
    let (v, nv) = (&c.values, &c.not_values);
    let mut m = Match::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = each(f, path, "values", v, Cidr::parse);
            m.not_source_ips = each(f, path, "notValues", nv, Cidr::parse);
        }
        "destination.ip" => {
            m.destination_ips = each(f, path, "values", v, Cidr::parse);
            m.not_destination_ips = each(f, path, "notValues", nv, Cidr::parse);
        }
        "source.namespace" => {
            m.namespaces = each(f, path, "values", v, StringMatch::parse);
            m.not_namespaces = each(f, path, "notValues", nv, StringMatch::parse);
        }
        "source.principal" => {
            m.principals = each(f, path, "values", v, parse_principal);
            m.not_principals = each(f, path, "notValues", nv, parse_principal);
        }
        _ => {
            m.ports = each(f, path, "values", v, parse_port);
            m.not_ports = each(f, path, "notValues", nv, parse_port);
        }
    }
    Some(m)
}
