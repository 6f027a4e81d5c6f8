//! Differential test: random valid policies and connections, decided by the engine and by a
//! direct reading of Istio's rules over the raw specs (no compile step, no shared code beyond
//! the spec types). Deterministic: a fixed-seed xorshift generator, no extra dependencies.

use std::net::IpAddr;

use super::spec::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, From, ObjectMeta, Operation,
    Rule, Source, To, WorkloadSelector,
};
use super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
    /// 1–3 distinct-ish values.
    fn some(&mut self, from: &[&str]) -> Vec<String> {
        (0..1 + self.below(3))
            .map(|_| self.pick(from).to_owned())
            .collect()
    }
    fn maybe(&mut self, percent: u64, from: &[&str]) -> Vec<String> {
        if self.chance(percent) {
            self.some(from)
        } else {
            Vec::new()
        }
    }
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/client/sa/curl",
    "cluster.local/ns/client/*",
    "*/sa/curl",
    "*",
    "cluster.local/ns/prod/sa/api",
    "other.td/ns/client/sa/curl",
];
const NAMESPACES: &[&str] = &["client", "prod", "cl*", "*od", "*"];
const SERVICE_ACCOUNTS: &[&str] = &["client/curl", "prod/api", "curl", "api"];
const BLOCKS: &[&str] = &[
    "10.0.1.0/24",
    "10.0.0.0/8",
    "10.0.1.5",
    "0.0.0.0/0",
    "fd00:1::/64",
    "fd00::/8",
];
const PORTS: &[&str] = &["8080", "9090", "22"];
const POLICY_NAMESPACES: &[&str] = &["shop", "shop", "other", ROOT];

fn source(r: &mut Rng) -> Source {
    loop {
        let mut s = Source {
            ip_blocks: r.maybe(30, BLOCKS),
            not_ip_blocks: r.maybe(20, BLOCKS),
            ..Source::default()
        };
        if r.chance(25) {
            s.service_accounts = r.maybe(60, SERVICE_ACCOUNTS);
            s.not_service_accounts = r.maybe(40, SERVICE_ACCOUNTS);
        } else {
            s.principals = r.maybe(35, PRINCIPALS);
            s.not_principals = r.maybe(20, PRINCIPALS);
            s.namespaces = r.maybe(30, NAMESPACES);
            s.not_namespaces = r.maybe(20, NAMESPACES);
        }
        let lists = [
            &s.principals,
            &s.not_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.service_accounts,
            &s.not_service_accounts,
            &s.ip_blocks,
            &s.not_ip_blocks,
        ];
        if lists.iter().any(|l| !l.is_empty()) {
            return s;
        }
    }
}

fn operation(r: &mut Rng) -> Operation {
    loop {
        let op = Operation {
            ports: r.maybe(60, PORTS),
            not_ports: r.maybe(30, PORTS),
            ..Operation::default()
        };
        if !(op.ports.is_empty() && op.not_ports.is_empty()) {
            return op;
        }
    }
}

fn condition(r: &mut Rng) -> Condition {
    let (key, vocab): (&str, &[&str]) = match r.below(5) {
        0 => ("source.ip", BLOCKS),
        1 => (
            "destination.ip",
            &["10.0.2.7", "10.0.2.0/24", "fd00:2::/64"],
        ),
        2 => ("source.namespace", NAMESPACES),
        3 => ("source.principal", PRINCIPALS),
        _ => ("destination.port", PORTS),
    };
    loop {
        let c = Condition {
            key: key.to_owned(),
            values: r.maybe(70, vocab),
            not_values: r.maybe(40, vocab),
        };
        if !(c.values.is_empty() && c.not_values.is_empty()) {
            return c;
        }
    }
}

fn rule(r: &mut Rng) -> Rule {
    Rule {
        from: r.chance(60).then(|| {
            (0..1 + r.below(2))
                .map(|_| From {
                    source: Some(source(r)),
                })
                .collect()
        }),
        to: r.chance(40).then(|| {
            (0..1 + r.below(2))
                .map(|_| To {
                    operation: Some(operation(r)),
                })
                .collect()
        }),
        when: r
            .chance(30)
            .then(|| (0..1 + r.below(2)).map(|_| condition(r)).collect()),
    }
}

fn policy(r: &mut Rng, i: usize) -> AuthorizationPolicy {
    let selector = match r.below(5) {
        0 => Some(WorkloadSelector {
            match_labels: [("app".to_owned(), "web".to_owned())].into(),
        }),
        1 => Some(WorkloadSelector {
            match_labels: [("app".to_owned(), "db".to_owned())].into(),
        }),
        _ => None,
    };
    let rules = match r.below(8) {
        0 => None,
        1 => Some(Vec::new()),
        2 => Some(vec![Rule::default()]),
        _ => Some((0..1 + r.below(3)).map(|_| rule(r)).collect()),
    };
    AuthorizationPolicy {
        metadata: ObjectMeta {
            name: format!("p{i}"),
            namespace: r.pick(POLICY_NAMESPACES).to_owned(),
        },
        spec: AuthorizationPolicySpec {
            selector,
            action: [Action::Allow, Action::Allow, Action::Deny, Action::Audit][r.below(4)],
            rules,
            ..AuthorizationPolicySpec::default()
        },
        ..AuthorizationPolicy::default()
    }
}

fn connection(r: &mut Rng) -> ConnectionAttrs {
    let ids = [
        Some(("cluster.local", "client", "curl")),
        Some(("cluster.local", "prod", "api")),
        Some(("other.td", "client", "curl")),
        Some(("cluster.local", "shop", "curl")),
        None,
    ];
    let src = [
        "10.0.1.5",
        "10.0.9.9",
        "192.0.2.1",
        "fd00:1::5",
        "::ffff:10.0.1.5",
    ];
    let dst = ["10.0.2.7", "fd00:2::7"];
    ConnectionAttrs {
        src_identity: ids[r.below(ids.len())].map(|(td, ns, sa)| PeerIdentity {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }),
        src_ip: src[r.below(src.len())].parse().expect("ip"),
        dst_ip: dst[r.below(dst.len())].parse().expect("ip"),
        dst_port: [8080, 9090, 22, 443][r.below(4)],
    }
}

// ---- The reference: Istio's rules read directly off the raw spec. ----

fn str_match(pattern: &str, value: Option<&str>) -> bool {
    let Some(value) = value else { return false };
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn in_block(block: &str, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().expect("len")),
        None => (block, if block.contains(':') { 128 } else { 32 }),
    };
    match (addr.parse::<IpAddr>().expect("addr"), ip) {
        (IpAddr::V4(b), IpAddr::V4(i)) => {
            len == 0 || (u32::from(b) ^ u32::from(i)) >> (32 - len) == 0
        }
        (IpAddr::V6(b), IpAddr::V6(i)) => {
            len == 0 || (u128::from(b) ^ u128::from(i)) >> (128 - len) == 0
        }
        _ => false,
    }
}

/// `positive` empty or any matches, and no `negative` matches.
fn both(positive: &[String], negative: &[String], m: impl Fn(&str) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(|v| m(v))) && !negative.iter().any(|v| m(v))
}

fn ref_rule(rule: &Rule, policy_ns: &str, c: &ConnectionAttrs) -> bool {
    let principal = c.src_identity.as_ref().map(|i| {
        format!(
            "{}/ns/{}/sa/{}",
            i.trust_domain, i.namespace, i.service_account
        )
    });
    let principal = principal.as_deref();
    let ns = c.src_identity.as_ref().map(|i| i.namespace.as_str());
    let sa = |v: &str| {
        let (n, s) = v.split_once('/').unwrap_or((policy_ns, v));
        c.src_identity
            .as_ref()
            .is_some_and(|i| i.namespace == n && i.service_account == s)
    };
    let port = |v: &str| v.parse::<u16>().ok() == Some(c.dst_port);
    let source_ok = |s: &Source| {
        both(&s.principals, &s.not_principals, |v| {
            str_match(v, principal)
        }) && both(&s.namespaces, &s.not_namespaces, |v| str_match(v, ns))
            && both(&s.service_accounts, &s.not_service_accounts, sa)
            && both(&s.ip_blocks, &s.not_ip_blocks, |v| in_block(v, c.src_ip))
    };
    let cond_ok = |w: &Condition| {
        let m = |v: &str| match w.key.as_str() {
            "source.ip" => in_block(v, c.src_ip),
            "destination.ip" => in_block(v, c.dst_ip),
            "source.namespace" => str_match(v, ns),
            "source.principal" => str_match(v, principal),
            _ => port(v),
        };
        both(&w.values, &w.not_values, m)
    };
    rule.from
        .as_ref()
        .is_none_or(|f| f.iter().any(|e| e.source.as_ref().is_some_and(&source_ok)))
        && rule.to.as_ref().is_none_or(|t| {
            t.iter().any(|e| {
                e.operation
                    .as_ref()
                    .is_some_and(|o| both(&o.ports, &o.not_ports, port))
            })
        })
        && rule.when.iter().flatten().all(cond_ok)
}

/// (allowed, deciding policy, matching audits), Istio's four steps.
fn reference(
    policies: &[AuthorizationPolicy],
    w: &WorkloadMeta,
    c: &ConnectionAttrs,
) -> (bool, Option<String>, Vec<String>) {
    let mut applying: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| {
            (p.metadata.namespace == ROOT || p.metadata.namespace == w.namespace)
                && p.spec.selector.as_ref().is_none_or(|s| {
                    s.match_labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v))
                })
        })
        .collect();
    applying.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let matches = |p: &AuthorizationPolicy| {
        p.spec
            .rules
            .iter()
            .flatten()
            .any(|r| ref_rule(r, &p.metadata.namespace, c))
    };
    let of = |a: Action| applying.iter().filter(move |p| p.spec.action == a);
    let audits = of(Action::Audit)
        .filter(|p| matches(p))
        .map(|p| p.metadata.name.clone())
        .collect();
    if let Some(p) = of(Action::Deny).find(|p| matches(p)) {
        return (false, Some(p.metadata.name.clone()), audits);
    }
    if of(Action::Allow).next().is_none() {
        return (true, None, audits);
    }
    match of(Action::Allow).find(|p| matches(p)) {
        Some(p) => (true, Some(p.metadata.name.clone()), audits),
        None => (false, None, audits),
    }
}

#[test]
fn engine_agrees_with_reference_on_random_policies() {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let workloads = [
        WorkloadMeta {
            namespace: "shop".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
        },
        WorkloadMeta {
            namespace: "other".into(),
            labels: [("app".to_owned(), "db".to_owned())].into(),
        },
    ];
    let mut decided_by_policy = 0;
    for case in 0..3000 {
        let policies: Vec<AuthorizationPolicy> =
            (0..1 + r.below(4)).map(|i| policy(&mut r, i)).collect();
        let (set, findings) = PolicySet::compile(ROOT, &policies, &[]);
        assert!(
            findings.iter().all(|f| f.severity == Severity::Warning),
            "case {case}: generator made an invalid policy: {findings:?}"
        );
        for _ in 0..6 {
            let w = &workloads[r.below(workloads.len())];
            let c = connection(&mut r);
            let d = set.authorize(w, &c);
            let got = (
                d.is_allowed(),
                d.policy().map(|p| p.name.clone()),
                d.audits
                    .iter()
                    .map(|a| a.policy.name.clone())
                    .collect::<Vec<_>>(),
            );
            let want = reference(&policies, w, &c);
            assert_eq!(
                got, want,
                "case {case}: {d}\nworkload {w:?}\nconnection {c:?}\npolicies {policies:#?}"
            );
            decided_by_policy += usize::from(got.1.is_some());
        }
    }
    // The generator must exercise real matches, not only "no policy applies".
    assert!(decided_by_policy > 3000, "{decided_by_policy}");
}
