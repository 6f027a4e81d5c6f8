//! The policy table test: every row of Istio's L4 evaluation semantics, plus PeerAuthentication
//! resolution and validation errors, all from YAML as users write it.

use std::net::IpAddr;

use serde::de::DeserializeOwned;

use super::spec::{API_VERSION, AuthorizationPolicy, PeerAuthentication};
use super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;
const CURL: &str = "cluster.local/ns/client/sa/curl";

fn parse_all<T: DeserializeOwned>(yaml: &str) -> Result<Vec<T>, serde_norway::Error> {
    if yaml.is_empty() {
        return Ok(Vec::new());
    }
    serde_norway::Deserializer::from_str(yaml)
        .map(T::deserialize)
        .collect()
}

/// `(namespace, name, spec as one line of flow YAML)` → an object as a user writes it.
fn object(kind: &str, ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: {API_VERSION}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn authz_set(policies: &[(&str, &str, &str)]) -> (PolicySet, Vec<ValidationError>) {
    let yaml: Vec<String> = policies
        .iter()
        .map(|(ns, name, spec)| object("AuthorizationPolicy", ns, name, spec))
        .collect();
    let parsed: Vec<AuthorizationPolicy> =
        parse_all(&yaml.join("---\n")).expect("test policies parse");
    PolicySet::compile(ROOT, &parsed, &[])
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// The connection of most rows: `client/curl` from 10.0.1.5 to 10.0.2.7:8080, over mTLS.
#[derive(Clone)]
struct C(ConnectionAttrs);

fn c() -> C {
    C(ConnectionAttrs {
        src_identity: Some(PeerIdentity {
            trust_domain: "cluster.local".into(),
            namespace: "client".into(),
            service_account: "curl".into(),
        }),
        src_ip: ip("10.0.1.5"),
        dst_ip: ip("10.0.2.7"),
        dst_port: 8080,
    })
}

impl C {
    fn id(mut self, td: &str, ns: &str, sa: &str) -> Self {
        self.0.src_identity = Some(PeerIdentity {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        });
        self
    }
    fn plain(mut self) -> Self {
        self.0.src_identity = None;
        self
    }
    fn src(mut self, s: &str) -> Self {
        self.0.src_ip = ip(s);
        self
    }
    fn dst(mut self, s: &str) -> Self {
        self.0.dst_ip = ip(s);
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.0.dst_port = p;
        self
    }
}

/// The destination of most rows: namespace `shop`, labels `app=web, tier=front`.
fn web() -> WorkloadMeta {
    WorkloadMeta {
        namespace: "shop".into(),
        labels: [("app", "web"), ("tier", "front")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V<'a> {
    /// Allowed; `Some(name)` = by that ALLOW policy, `None` = no ALLOW policy applies.
    Allow(Option<&'a str>),
    /// Denied; `Some(name)` = by that DENY (or invalid) policy, `None` = no ALLOW matched.
    Deny(Option<&'a str>),
}

struct Row {
    name: &'static str,
    policies: Vec<(&'static str, &'static str, &'static str)>,
    conn: C,
    want: V<'static>,
    audits: &'static [&'static str],
}

fn row(
    name: &'static str,
    policies: &[(&'static str, &'static str, &'static str)],
    conn: C,
    want: V<'static>,
) -> Row {
    Row {
        name,
        policies: policies.to_vec(),
        conn,
        want,
        audits: &[],
    }
}

fn audited(mut r: Row, audits: &'static [&'static str]) -> Row {
    r.audits = audits;
    r
}

// Policy specs reused by many rows.
const ALLOW_ALL: &str = "{rules: [{}]}";
const ALLOW_NOTHING: &str = "{}";
const ALLOW_CURL: &str =
    "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl]}}]}]}";
const ALLOW_OTHER: &str =
    "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/other]}}]}]}";
const DENY_CURL: &str =
    "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl]}}]}]}";
const DENY_OTHER: &str =
    "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/other]}}]}]}";
const DENY_ALL: &str = "{action: DENY, rules: [{}]}";
const AUDIT_ALL: &str = "{action: AUDIT, rules: [{}]}";

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// An ALLOW policy with one source setting `field` to `[values]`.
fn s(field: &str, values: &str) -> &'static str {
    leak(format!(
        "{{rules: [{{from: [{{source: {{{field}: [{values}]}}}}]}}]}}"
    ))
}

/// An ALLOW policy with one rule of `when` conditions.
fn when(conds: &str) -> &'static str {
    leak(format!("{{rules: [{{when: [{conds}]}}]}}"))
}

#[rustfmt::skip]
fn rows() -> Vec<Row> {
    use V::{Allow, Deny};
    vec![
        // Decision order.
        row("no policy: allow", &[], c(), Allow(None)),
        row("ALLOW matches", &[("shop", "allow-curl", ALLOW_CURL)], c(), Allow(Some("allow-curl"))),
        row("ALLOW applies but no rule matches: deny", &[("shop", "allow-other", ALLOW_OTHER)], c(), Deny(None)),
        row("matching DENY beats matching ALLOW", &[("shop", "allow-all", ALLOW_ALL), ("shop", "deny-curl", DENY_CURL)], c(), Deny(Some("deny-curl"))),
        row("DENY not matching, no ALLOW: allow", &[("shop", "deny-other", DENY_OTHER)], c(), Allow(None)),
        row("DENY not matching, ALLOW matching: allow", &[("shop", "deny-other", DENY_OTHER), ("shop", "allow-curl", ALLOW_CURL)], c(), Allow(Some("allow-curl"))),
        row("any ALLOW matching is enough", &[("shop", "a-allow-other", ALLOW_OTHER), ("shop", "b-allow-curl", ALLOW_CURL)], c(), Allow(Some("b-allow-curl"))),
        row("first DENY by name is reported", &[("shop", "z-deny", DENY_ALL), ("shop", "a-deny", DENY_CURL)], c(), Deny(Some("a-deny"))),
        // Scope: namespace, selector, root namespace.
        row("ALLOW in another namespace does not apply", &[("other", "allow-nothing", ALLOW_NOTHING)], c(), Allow(None)),
        row("DENY in another namespace does not apply", &[("other", "deny-all", DENY_ALL)], c(), Allow(None)),
        row("selector not matching: does not apply", &[("shop", "db-only", "{selector: {matchLabels: {app: db}}}")], c(), Allow(None)),
        row("selector matching: applies", &[("shop", "web-only", "{selector: {matchLabels: {app: web}}}")], c(), Deny(None)),
        row("selector needs every label", &[("shop", "web-back", "{selector: {matchLabels: {app: web, tier: back}}}")], c(), Allow(None)),
        row("selector with all labels matching applies", &[("shop", "web-front", "{selector: {matchLabels: {app: web, tier: front}}}")], c(), Deny(None)),
        row("empty matchLabels: namespace-wide", &[("shop", "ns-wide", "{selector: {matchLabels: {}}}")], c(), Deny(None)),
        row("root namespace, no selector: mesh-wide", &[(ROOT, "mesh-allow-nothing", ALLOW_NOTHING)], c(), Deny(None)),
        row("root namespace, matching selector: applies in every namespace", &[(ROOT, "mesh-web", "{selector: {matchLabels: {app: web}}}")], c(), Deny(None)),
        row("root namespace, selector not matching: does not apply", &[(ROOT, "mesh-db", "{selector: {matchLabels: {app: db}}}")], c(), Allow(None)),
        row("root namespace DENY matches", &[(ROOT, "mesh-deny-curl", DENY_CURL), ("shop", "allow-all", ALLOW_ALL)], c(), Deny(Some("mesh-deny-curl"))),
        row("root namespace ALLOW matches", &[(ROOT, "mesh-allow-curl", ALLOW_CURL)], c(), Allow(Some("mesh-allow-curl"))),
        row("istio-system is not nodemesh's root namespace", &[("istio-system", "allow-nothing", ALLOW_NOTHING)], c(), Allow(None)),
        // Empty rules.
        row("ALLOW without rules selects and denies everything", &[("shop", "allow-nothing", ALLOW_NOTHING)], c(), Deny(None)),
        row("ALLOW with rules: [] denies everything", &[("shop", "allow-nothing", "{rules: []}")], c(), Deny(None)),
        row("ALLOW with rules: [{}] allows everything", &[("shop", "allow-all", ALLOW_ALL)], c(), Allow(Some("allow-all"))),
        row("ALLOW with rules: [{}] allows plaintext too", &[("shop", "allow-all", ALLOW_ALL)], c().plain(), Allow(Some("allow-all"))),
        row("DENY without rules never matches", &[("shop", "deny-nothing", "{action: DENY}")], c(), Allow(None)),
        row("DENY with rules: [] never matches", &[("shop", "deny-nothing", "{action: DENY, rules: []}")], c(), Allow(None)),
        row("DENY with rules: [{}] denies everything", &[("shop", "deny-all", DENY_ALL)], c(), Deny(Some("deny-all"))),
        // AUDIT.
        audited(row("AUDIT matching is reported and changes nothing", &[("shop", "audit-all", AUDIT_ALL)], c(), Allow(None)), &["audit-all"]),
        audited(row("AUDIT is not an ALLOW policy", &[("shop", "audit-all", AUDIT_ALL), ("shop", "allow-other", ALLOW_OTHER)], c(), Deny(None)), &["audit-all"]),
        audited(row("AUDIT reported beside a DENY", &[("shop", "audit-all", AUDIT_ALL), ("shop", "deny-all", DENY_ALL)], c(), Deny(Some("deny-all"))), &["audit-all"]),
        audited(row("AUDIT reported beside an ALLOW", &[("shop", "audit-all", AUDIT_ALL), ("shop", "allow-curl", ALLOW_CURL)], c(), Allow(Some("allow-curl"))), &["audit-all"]),
        audited(row("every matching AUDIT is reported, by namespace then name", &[("shop", "audit-a", AUDIT_ALL), (ROOT, "audit-b", AUDIT_ALL)], c(), Allow(None)), &["audit-b", "audit-a"]),
        row("AUDIT not matching is not reported", &[("shop", "audit-other", "{action: AUDIT, rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/other]}}]}]}")], c(), Allow(None)),
        row("AUDIT without rules never matches", &[("shop", "audit-nothing", "{action: AUDIT}")], c(), Allow(None)),
        row("AUDIT out of scope is not reported", &[("other", "audit-all", AUDIT_ALL)], c(), Allow(None)),
        // principals / notPrincipals.
        row("principals exact: other trust domain misses", &[("shop", "p", ALLOW_CURL)], c().id("other.td", "client", "curl"), Deny(None)),
        row("principals prefix matches", &[("shop", "p", s("principals", "\"cluster.local/ns/client/*\""))], c(), Allow(Some("p"))),
        row("principals prefix misses", &[("shop", "p", s("principals", "\"cluster.local/ns/client/*\""))], c().id("cluster.local", "prod", "curl"), Deny(None)),
        row("principals suffix matches", &[("shop", "p", s("principals", "\"*/sa/curl\""))], c().id("other.td", "x", "curl"), Allow(Some("p"))),
        row("principals suffix misses", &[("shop", "p", s("principals", "\"*/sa/curl\""))], c().id("cluster.local", "client", "wget"), Deny(None)),
        row("principals * matches any identity", &[("shop", "p", s("principals", "\"*\""))], c(), Allow(Some("p"))),
        row("principals * does not match plaintext", &[("shop", "p", s("principals", "\"*\""))], c().plain(), Deny(None)),
        row("principals exact does not match plaintext", &[("shop", "p", ALLOW_CURL)], c().plain(), Deny(None)),
        row("principals: any value matches", &[("shop", "p", s("principals", "cluster.local/ns/client/sa/other, cluster.local/ns/client/sa/curl"))], c(), Allow(Some("p"))),
        row("notPrincipals listed: no match", &[("shop", "p", s("notPrincipals", CURL))], c(), Deny(None)),
        row("notPrincipals not listed: match", &[("shop", "p", s("notPrincipals", CURL))], c().id("cluster.local", "client", "wget"), Allow(Some("p"))),
        row("notPrincipals matches plaintext", &[("shop", "p", s("notPrincipals", CURL))], c().plain(), Allow(Some("p"))),
        row("notPrincipals * matches plaintext only", &[("shop", "no-id", "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}")], c().plain(), Deny(Some("no-id"))),
        row("notPrincipals * misses an identity", &[("shop", "no-id", "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}")], c(), Allow(None)),
        // namespaces / notNamespaces.
        row("namespaces exact matches", &[("shop", "n", s("namespaces", "client"))], c(), Allow(Some("n"))),
        row("namespaces exact misses", &[("shop", "n", s("namespaces", "prod"))], c(), Deny(None)),
        row("namespaces prefix", &[("shop", "n", s("namespaces", "\"cli*\""))], c(), Allow(Some("n"))),
        row("namespaces suffix", &[("shop", "n", s("namespaces", "\"*ent\""))], c(), Allow(Some("n"))),
        row("namespaces * matches an identity", &[("shop", "n", s("namespaces", "\"*\""))], c(), Allow(Some("n"))),
        row("namespaces * does not match plaintext", &[("shop", "n", s("namespaces", "\"*\""))], c().plain(), Deny(None)),
        row("namespaces come from the identity, not the workload", &[("shop", "n", s("namespaces", "shop"))], c(), Deny(None)),
        row("notNamespaces listed: no match", &[("shop", "n", s("notNamespaces", "client"))], c(), Deny(None)),
        row("notNamespaces not listed: match", &[("shop", "n", s("notNamespaces", "prod"))], c(), Allow(Some("n"))),
        row("notNamespaces prefix", &[("shop", "n", s("notNamespaces", "\"cl*\""))], c(), Deny(None)),
        row("notNamespaces matches plaintext", &[("shop", "n", s("notNamespaces", "client"))], c().plain(), Allow(Some("n"))),
        // serviceAccounts / notServiceAccounts.
        row("serviceAccounts NS/SA matches", &[("shop", "sa", s("serviceAccounts", "client/curl"))], c(), Allow(Some("sa"))),
        row("serviceAccounts SA is in the policy's namespace", &[("shop", "sa", s("serviceAccounts", "curl"))], c(), Deny(None)),
        row("serviceAccounts SA matches in the policy's namespace", &[("shop", "sa", s("serviceAccounts", "curl"))], c().id("cluster.local", "shop", "curl"), Allow(Some("sa"))),
        row("serviceAccounts ignore the trust domain", &[("shop", "sa", s("serviceAccounts", "client/curl"))], c().id("other.td", "client", "curl"), Allow(Some("sa"))),
        row("serviceAccounts do not match plaintext", &[("shop", "sa", s("serviceAccounts", "client/curl"))], c().plain(), Deny(None)),
        row("notServiceAccounts listed: no match", &[("shop", "sa", s("notServiceAccounts", "client/curl"))], c(), Deny(None)),
        row("notServiceAccounts match plaintext", &[("shop", "sa", s("notServiceAccounts", "client/curl"))], c().plain(), Allow(Some("sa"))),
        // ipBlocks / notIpBlocks.
        row("ipBlocks v4 CIDR matches", &[("shop", "ip", s("ipBlocks", "10.0.1.0/24"))], c(), Allow(Some("ip"))),
        row("ipBlocks v4 CIDR misses", &[("shop", "ip", s("ipBlocks", "10.0.1.0/24"))], c().src("10.0.9.5"), Deny(None)),
        row("ipBlocks bare address is a /32", &[("shop", "ip", s("ipBlocks", "10.0.1.5"))], c(), Allow(Some("ip"))),
        row("ipBlocks bare address misses its neighbour", &[("shop", "ip", s("ipBlocks", "10.0.1.5"))], c().src("10.0.1.6"), Deny(None)),
        row("ipBlocks host bits are ignored", &[("shop", "ip", s("ipBlocks", "10.0.1.77/24"))], c(), Allow(Some("ip"))),
        row("ipBlocks /0 matches every v4 address", &[("shop", "ip", s("ipBlocks", "0.0.0.0/0"))], c().src("192.0.2.1"), Allow(Some("ip"))),
        row("ipBlocks v6 CIDR matches", &[("shop", "ip", s("ipBlocks", "\"fd00:1::/64\""))], c().src("fd00:1::5"), Allow(Some("ip"))),
        row("ipBlocks v6 CIDR misses", &[("shop", "ip", s("ipBlocks", "\"fd00:1::/64\""))], c().src("fd00:2::5"), Deny(None)),
        row("ipBlocks v6 bare address", &[("shop", "ip", s("ipBlocks", "\"fd00:1::5\""))], c().src("fd00:1::5"), Allow(Some("ip"))),
        row("ipBlocks v4 block never matches a v6 source", &[("shop", "ip", s("ipBlocks", "0.0.0.0/0"))], c().src("fd00:1::5"), Deny(None)),
        row("ipBlocks v4 block matches a v4-mapped v6 source", &[("shop", "ip", s("ipBlocks", "10.0.1.0/24"))], c().src("::ffff:10.0.1.5"), Allow(Some("ip"))),
        row("notIpBlocks listed: no match", &[("shop", "ip", s("notIpBlocks", "10.0.1.0/24"))], c(), Deny(None)),
        row("notIpBlocks not listed: match", &[("shop", "ip", s("notIpBlocks", "10.0.1.0/24"))], c().src("10.9.9.9"), Allow(Some("ip"))),
        row("notIpBlocks v6", &[("shop", "ip", s("notIpBlocks", "\"fd00::/8\""))], c().src("fd00:1::5"), Deny(None)),
        // ports / notPorts.
        row("ports matches", &[("shop", "pt", "{rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}")], c(), Allow(Some("pt"))),
        row("ports misses", &[("shop", "pt", "{rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}")], c().port(9090), Deny(None)),
        row("ports: any value matches", &[("shop", "pt", "{rules: [{to: [{operation: {ports: [\"9090\", \"8080\"]}}]}]}")], c(), Allow(Some("pt"))),
        row("notPorts listed: no match", &[("shop", "pt", "{rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]}")], c(), Deny(None)),
        row("notPorts not listed: match", &[("shop", "pt", "{rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]}")], c().port(9090), Allow(Some("pt"))),
        row("DENY a port (Istio's example) hits it", &[("shop", "deny-9999", "{action: DENY, rules: [{to: [{operation: {ports: [\"9999\"]}}]}]}")], c().port(9999), Deny(Some("deny-9999"))),
        row("DENY a port leaves the others", &[("shop", "deny-9999", "{action: DENY, rules: [{to: [{operation: {ports: [\"9999\"]}}]}]}")], c(), Allow(None)),
        // when.
        row("when source.ip values", &[("shop", "w", when("{key: source.ip, values: [10.0.1.0/24]}"))], c(), Allow(Some("w"))),
        row("when source.ip notValues", &[("shop", "w", when("{key: source.ip, notValues: [10.0.1.0/24]}"))], c(), Deny(None)),
        row("when source.namespace values", &[("shop", "w", when("{key: source.namespace, values: [client]}"))], c(), Allow(Some("w"))),
        row("when source.namespace notValues", &[("shop", "w", when("{key: source.namespace, notValues: [client]}"))], c(), Deny(None)),
        row("when source.namespace does not match plaintext", &[("shop", "w", when("{key: source.namespace, values: [\"*\"]}"))], c().plain(), Deny(None)),
        row("when source.principal values prefix", &[("shop", "w", when("{key: source.principal, values: [\"cluster.local/ns/client/*\"]}"))], c(), Allow(Some("w"))),
        row("when source.principal does not match plaintext", &[("shop", "w", when("{key: source.principal, values: [\"*\"]}"))], c().plain(), Deny(None)),
        row("when source.principal notValues match plaintext", &[("shop", "w", when("{key: source.principal, notValues: [\"*\"]}"))], c().plain(), Allow(Some("w"))),
        row("when destination.ip values", &[("shop", "w", when("{key: destination.ip, values: [10.0.2.0/24]}"))], c(), Allow(Some("w"))),
        row("when destination.ip misses", &[("shop", "w", when("{key: destination.ip, values: [10.0.2.0/24]}"))], c().dst("10.0.3.7"), Deny(None)),
        row("when destination.ip notValues", &[("shop", "w", when("{key: destination.ip, notValues: [\"10.0.2.7\"]}"))], c(), Deny(None)),
        row("when destination.port values", &[("shop", "w", when("{key: destination.port, values: [\"8080\"]}"))], c(), Allow(Some("w"))),
        row("when destination.port notValues", &[("shop", "w", when("{key: destination.port, notValues: [\"8080\"]}"))], c(), Deny(None)),
        row("when values and notValues: both must hold (miss)", &[("shop", "w", when("{key: source.ip, values: [10.0.0.0/16], notValues: [10.0.1.0/24]}"))], c(), Deny(None)),
        row("when values and notValues: both must hold (match)", &[("shop", "w", when("{key: source.ip, values: [10.0.0.0/16], notValues: [10.0.1.0/24]}"))], c().src("10.0.2.5"), Allow(Some("w"))),
        row("when conditions are ANDed (miss)", &[("shop", "w", when("{key: source.namespace, values: [client]}, {key: destination.port, values: [\"9090\"]}"))], c(), Deny(None)),
        row("when conditions are ANDed (match)", &[("shop", "w", when("{key: source.namespace, values: [client]}, {key: destination.port, values: [\"9090\"]}"))], c().port(9090), Allow(Some("w"))),
        // Combinators.
        row("source fields are ANDed", &[("shop", "and", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl], ipBlocks: [10.9.0.0/16]}}]}]}")], c(), Deny(None)),
        row("source fields are ANDed (all match)", &[("shop", "and", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl], ipBlocks: [10.0.0.0/16]}}]}]}")], c(), Allow(Some("and"))),
        row("positive and not* fields in one source (miss)", &[("shop", "mix", "{rules: [{from: [{source: {namespaces: [client], notPrincipals: [cluster.local/ns/client/sa/curl]}}]}]}")], c(), Deny(None)),
        row("positive and not* fields in one source (match)", &[("shop", "mix", "{rules: [{from: [{source: {namespaces: [client], notPrincipals: [cluster.local/ns/client/sa/curl]}}]}]}")], c().id("cluster.local", "client", "wget"), Allow(Some("mix"))),
        row("from entries are ORed", &[("shop", "or", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/other]}}, {source: {namespaces: [client]}}]}]}")], c(), Allow(Some("or"))),
        row("to entries are ORed", &[("shop", "or", "{rules: [{to: [{operation: {ports: [\"9090\"]}}, {operation: {ports: [\"8080\"]}}]}]}")], c(), Allow(Some("or"))),
        row("from and to are ANDed (miss)", &[("shop", "ft", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl]}}], to: [{operation: {ports: [\"9090\"]}}]}]}")], c(), Deny(None)),
        row("from and to are ANDed (match)", &[("shop", "ft", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/curl]}}], to: [{operation: {ports: [\"9090\"]}}]}]}")], c().port(9090), Allow(Some("ft"))),
        row("from, to and when are ANDed (when misses)", &[("shop", "ftw", "{rules: [{from: [{source: {namespaces: [client]}}], to: [{operation: {ports: [\"8080\"]}}], when: [{key: destination.ip, values: [\"10.9.9.9\"]}]}]}")], c(), Deny(None)),
        row("rules are ORed", &[("shop", "rules", "{rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/other]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}")], c(), Allow(Some("rules"))),
        // Invalid policies fail closed (see docs/policy.md).
        row("invalid ALLOW denies what it selects", &[("shop", "bad-allow", "{rules: [{to: [{operation: {methods: [GET]}}]}]}")], c(), Deny(Some("bad-allow"))),
        row("invalid DENY denies what it selects, even beside an ALLOW", &[("shop", "allow-all", ALLOW_ALL), ("shop", "bad-deny", "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}")], c(), Deny(Some("bad-deny"))),
        row("invalid CUSTOM denies what it selects", &[("shop", "ext", "{action: CUSTOM, provider: {name: opa}, rules: [{}]}")], c(), Deny(Some("ext"))),
        row("invalid AUDIT is left out", &[("shop", "bad-audit", "{action: AUDIT, rules: [{to: [{operation: {paths: [/x]}}]}]}")], c(), Allow(None)),
        row("invalid policy out of scope does not apply", &[("shop", "bad-db", "{selector: {matchLabels: {app: db}}, rules: [{to: [{operation: {hosts: [x]}}]}]}")], c(), Allow(None)),
    ]
}

#[test]
fn authorization_table() {
    let rows = rows();
    let mut failures = Vec::new();
    for r in &rows {
        let (set, _) = authz_set(&r.policies);
        let d = set.authorize(&web(), &r.conn.0);
        let name = d.policy().map(|p| p.name.as_str());
        let got = if d.is_allowed() {
            V::Allow(name)
        } else {
            V::Deny(name)
        };
        let audits: Vec<&str> = d.audits.iter().map(|a| a.policy.name.as_str()).collect();
        if got != r.want || audits != r.audits {
            failures.push(format!(
                "{}: want {:?} audits {:?}, got {:?} audits {:?} ({d})",
                r.name, r.want, r.audits, got, audits
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn decision_names_rule_and_reason() {
    let (set, _) = authz_set(&[(
        "shop",
        "two-rules",
        "{rules: [{from: [{source: {namespaces: [prod]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}",
    )]);
    let d = set.authorize(&web(), &c().0);
    let Reason::AllowedByPolicy(m) = &d.reason else {
        panic!("want AllowedByPolicy, got {d}");
    };
    assert_eq!(m.rule, 1);
    assert_eq!(
        d.to_string(),
        "allowed by ALLOW AuthorizationPolicy shop/two-rules (rule 1)"
    );

    let d = set.authorize(&web(), &c().port(9090).0);
    assert_eq!(
        d.reason,
        Reason::NoAllowPolicyMatched {
            policies: vec![PolicyRef {
                kind: PolicyKind::AuthorizationPolicy,
                namespace: "shop".into(),
                name: "two-rules".into()
            }]
        }
    );
    assert!(d.to_string().contains("shop/two-rules"), "{d}");

    let (set, _) = authz_set(&[("shop", "audit", AUDIT_ALL), ("shop", "deny", DENY_ALL)]);
    let d = set.authorize(&web(), &c().0);
    assert_eq!(
        d.to_string(),
        "denied by DENY AuthorizationPolicy shop/deny (rule 0); audited by \
         AuthorizationPolicy shop/audit (rule 0)"
    );
    assert_eq!(
        PolicySet::default().authorize(&web(), &c().0).reason,
        Reason::NoAllowPolicy
    );
}

#[test]
fn invalid_policy_decision_says_why() {
    let (set, findings) = authz_set(&[(
        "shop",
        "bad",
        "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
    )]);
    assert_eq!(findings.len(), 1);
    let d = set.authorize(&web(), &c().0);
    let text = d.to_string();
    assert!(text.contains("shop/bad"), "{text}");
    assert!(text.contains("methods"), "{text}");
    assert!(!d.is_allowed());
}

#[test]
fn root_namespace_is_configurable() {
    let parsed: Vec<AuthorizationPolicy> = parse_all(&object(
        "AuthorizationPolicy",
        "istio-system",
        "mesh-allow-nothing",
        "{}",
    ))
    .unwrap();
    let (set, _) = PolicySet::compile("istio-system", &parsed, &[]);
    assert_eq!(set.root_namespace(), "istio-system");
    assert!(!set.authorize(&web(), &c().0).is_allowed());
    let (set, _) = PolicySet::compile(ROOT, &parsed, &[]);
    assert!(set.authorize(&web(), &c().0).is_allowed());
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication.

fn peer_set(policies: &[(&str, &str, &str)]) -> (PolicySet, Vec<ValidationError>) {
    let yaml: Vec<String> = policies
        .iter()
        .map(|(ns, name, spec)| object("PeerAuthentication", ns, name, spec))
        .collect();
    let parsed: Vec<PeerAuthentication> =
        parse_all(&yaml.join("---\n")).expect("test policies parse");
    PolicySet::compile(ROOT, &[], &parsed)
}

/// (name, policies, port, mode, level, deciding policy).
type PeerRow = (
    &'static str,
    Vec<(&'static str, &'static str, &'static str)>,
    u16,
    MtlsMode,
    MtlsLevel,
    Option<&'static str>,
);

#[test]
#[rustfmt::skip]
fn peer_authentication_table() {
    use MtlsLevel as L;
    use MtlsMode::{Permissive as P, Strict as S};
    const STRICT: &str = "{mtls: {mode: STRICT}}";
    const PERMISSIVE: &str = "{mtls: {mode: PERMISSIVE}}";
    const UNSET: &str = "{mtls: {mode: UNSET}}";
    let rows: Vec<PeerRow> = vec![
        ("no policy: PERMISSIVE", vec![], 8080, P, L::Default, None),
        ("mesh STRICT", vec![(ROOT, "mesh", STRICT)], 8080, S, L::Mesh, Some("mesh")),
        ("mesh UNSET: default", vec![(ROOT, "mesh", UNSET)], 8080, P, L::Default, None),
        ("mesh without mtls: default", vec![(ROOT, "mesh", "{}")], 8080, P, L::Default, None),
        ("namespace overrides mesh", vec![(ROOT, "mesh", STRICT), ("shop", "ns", PERMISSIVE)], 8080, P, L::Namespace, Some("ns")),
        ("namespace UNSET inherits mesh", vec![(ROOT, "mesh", STRICT), ("shop", "ns", UNSET)], 8080, S, L::Mesh, Some("mesh")),
        ("other namespace's policy does not apply", vec![("other", "ns", STRICT)], 8080, P, L::Default, None),
        ("workload overrides namespace", vec![("shop", "ns", STRICT), ("shop", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}")], 8080, P, L::Workload, Some("wl")),
        ("workload UNSET inherits namespace", vec![("shop", "ns", STRICT), ("shop", "wl", "{selector: {matchLabels: {app: web}}}")], 8080, S, L::Namespace, Some("ns")),
        ("workload selector not matching", vec![("shop", "ns", STRICT), ("shop", "wl", "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}}")], 8080, S, L::Namespace, Some("ns")),
        ("port STRICT over PERMISSIVE workload", vec![("shop", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: STRICT}}}")], 8080, S, L::Port, Some("wl")),
        ("other port keeps the workload mode", vec![("shop", "wl", "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: STRICT}}}")], 9090, P, L::Workload, Some("wl")),
        ("port PERMISSIVE under STRICT namespace", vec![("shop", "ns", STRICT), ("shop", "wl", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}")], 8080, P, L::Port, Some("wl")),
        ("other port inherits STRICT namespace", vec![("shop", "ns", STRICT), ("shop", "wl", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}")], 9090, S, L::Namespace, Some("ns")),
        ("port UNSET inherits", vec![(ROOT, "mesh", STRICT), ("shop", "wl", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: UNSET}}}")], 8080, S, L::Mesh, Some("mesh")),
        ("root namespace selector policy is ignored", vec![(ROOT, "mesh-web", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}")], 8080, P, L::Default, None),
        ("two namespace policies: first by name", vec![("shop", "b", PERMISSIVE), ("shop", "a", STRICT)], 8080, S, L::Namespace, Some("a")),
        ("DISABLE is rejected and fails closed", vec![("shop", "ns", "{mtls: {mode: DISABLE}}")], 8080, S, L::Namespace, Some("ns")),
        ("DISABLE at port level fails closed for the workload", vec![("shop", "wl", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}}}")], 9090, S, L::Workload, Some("wl")),
    ];
    let mut failures = Vec::new();
    for (name, policies, port, mode, level, by) in &rows {
        let (set, _) = peer_set(policies);
        let got = set.mtls_mode(&web(), *port);
        let got_by = got.policy.as_ref().map(|p| p.name.as_str());
        if got.mode != *mode || got.level != *level || got_by != *by {
            failures.push(format!(
                "{name}: want {mode:?}/{level:?}/{by:?}, got {:?}/{:?}/{got_by:?}",
                got.mode, got.level
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A workload in the root namespace sees only the mesh policy.
    let (set, _) = peer_set(&[(ROOT, "mesh", STRICT)]);
    let sys = WorkloadMeta { namespace: ROOT.into(), labels: Default::default() };
    assert_eq!(set.mtls_mode(&sys, 1).mode, S);
}

#[test]
fn strict_mtls_denies_plaintext_in_authorize() {
    let authz: Vec<AuthorizationPolicy> = parse_all(
        &[
            object("AuthorizationPolicy", "shop", "allow-all", ALLOW_ALL),
            object("AuthorizationPolicy", "shop", "audit-all", AUDIT_ALL),
        ]
        .join("---\n"),
    )
    .unwrap();
    let peer: Vec<PeerAuthentication> = parse_all(
        &[
            object("PeerAuthentication", ROOT, "mesh", "{mtls: {mode: STRICT}}"),
            object(
                "PeerAuthentication",
                "shop",
                "web-9090",
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {9090: {mode: PERMISSIVE}}}",
            ),
        ]
        .join("---\n"),
    )
    .unwrap();
    let (set, findings) = PolicySet::compile(ROOT, &authz, &peer);
    assert!(findings.is_empty(), "{findings:?}");

    let d = set.authorize(&web(), &c().plain().0);
    assert!(!d.is_allowed());
    assert!(matches!(&d.reason, Reason::PlaintextUnderStrictMtls(m) if m.level == MtlsLevel::Mesh));
    assert_eq!(d.policy().map(|p| p.name.as_str()), Some("mesh"));
    assert_eq!(d.audits.len(), 1, "AUDIT is still evaluated");
    assert!(
        d.to_string()
            .starts_with("denied: plaintext connection, but mTLS is STRICT"),
        "{d}"
    );

    // mTLS is allowed; plaintext to the PERMISSIVE port is allowed.
    assert!(set.authorize(&web(), &c().0).is_allowed());
    assert!(
        set.authorize(&web(), &c().plain().port(9090).0)
            .is_allowed()
    );
    // Without PeerAuthentication (PERMISSIVE by default) plaintext reaches the authz policies.
    let (set, _) = PolicySet::compile(ROOT, &authz, &[]);
    assert!(set.authorize(&web(), &c().plain().0).is_allowed());
}

// ---------------------------------------------------------------------------------------------
// Validation.

fn authz_errors(spec: &str) -> Vec<ValidationError> {
    let parsed: Vec<AuthorizationPolicy> =
        parse_all(&object("AuthorizationPolicy", "shop", "p", spec)).expect("parses");
    match compile_authorization_policy(&parsed[0]) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    }
}

fn peer_errors(spec: &str) -> Vec<ValidationError> {
    let parsed: Vec<PeerAuthentication> =
        parse_all(&object("PeerAuthentication", "shop", "p", spec)).expect("parses");
    match compile_peer_authentication(&parsed[0]) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    }
}

fn one(errors: &[ValidationError]) -> (&str, &Problem) {
    assert_eq!(errors.len(), 1, "want one error, got {errors:#?}");
    (errors[0].path.as_str(), &errors[0].problem)
}

#[test]
#[rustfmt::skip]
fn l7_fields_are_rejected_by_name() {
    let cases = [
        ("{rules: [{to: [{operation: {methods: [GET]}}]}]}", "spec.rules[0].to[0].operation.methods", "methods"),
        ("{rules: [{to: [{operation: {notMethods: [GET]}}]}]}", "spec.rules[0].to[0].operation.notMethods", "notMethods"),
        ("{rules: [{to: [{operation: {paths: [/a]}}]}]}", "spec.rules[0].to[0].operation.paths", "paths"),
        ("{rules: [{to: [{operation: {notPaths: [/a]}}]}]}", "spec.rules[0].to[0].operation.notPaths", "notPaths"),
        ("{rules: [{to: [{operation: {hosts: [a.b]}}]}]}", "spec.rules[0].to[0].operation.hosts", "hosts"),
        ("{rules: [{to: [{operation: {notHosts: [a.b]}}]}]}", "spec.rules[0].to[0].operation.notHosts", "notHosts"),
        ("{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}", "spec.rules[0].from[0].source.requestPrincipals", "requestPrincipals"),
        ("{rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]}", "spec.rules[0].from[0].source.notRequestPrincipals", "notRequestPrincipals"),
        ("{rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]}", "spec.rules[0].from[0].source.remoteIpBlocks", "remoteIpBlocks"),
        ("{action: DENY, rules: [{}, {from: [{source: {notRemoteIpBlocks: [1.2.3.4]}}]}]}", "spec.rules[1].from[0].source.notRemoteIpBlocks", "notRemoteIpBlocks"),
    ];
    for (spec, want_path, field) in cases {
        let errors = authz_errors(spec);
        let (path, problem) = one(&errors);
        assert_eq!(path, want_path);
        assert_eq!(problem, &Problem::L7Field { field });
        let text = errors[0].to_string();
        assert!(text.starts_with("AuthorizationPolicy shop/p: "), "{text}");
        assert!(text.contains("L4 only"), "{text}");
        assert!(text.contains("waypoint"), "{text}");
    }
}

#[test]
fn non_l4_condition_keys_are_rejected() {
    for key in [
        "request.headers[x-user]",
        "remote.ip",
        "request.auth.claims[iss]",
        "connection.sni",
        "source.serviceAccount",
    ] {
        let errors = authz_errors(&format!(
            "{{rules: [{{when: [{{key: \"{key}\", values: [a]}}]}}]}}"
        ));
        let (path, problem) = one(&errors);
        assert_eq!(path, "spec.rules[0].when[0].key");
        assert_eq!(problem, &Problem::NonL4ConditionKey { key: key.into() });
        assert!(errors[0].to_string().contains("destination.port"));
    }
}

#[test]
fn custom_action_provider_and_target_refs_are_rejected() {
    let errors = authz_errors("{action: CUSTOM, provider: {name: opa}, rules: [{}]}");
    let got: Vec<(&str, &Problem)> = errors
        .iter()
        .map(|e| (e.path.as_str(), &e.problem))
        .collect();
    assert_eq!(
        got,
        [
            ("spec.provider", &Problem::Provider),
            ("spec.action", &Problem::CustomAction)
        ]
    );
    let errors =
        authz_errors("{targetRefs: [{kind: Service, group: \"\", name: web}], rules: [{}]}");
    assert_eq!(
        one(&errors),
        (
            "spec.targetRefs",
            &Problem::TargetRef {
                field: "targetRefs"
            }
        )
    );
    let errors = authz_errors("{targetRef: {kind: Gateway, name: gw}}");
    assert_eq!(
        one(&errors),
        ("spec.targetRef", &Problem::TargetRef { field: "targetRef" })
    );
}

#[test]
#[rustfmt::skip]
fn bad_values_are_rejected_with_their_path() {
    let bad_cidr = |v: &str| authz_errors(&format!("{{rules: [{{from: [{{source: {{ipBlocks: [\"{v}\"]}}}}]}}]}}"));
    for v in ["10.0.0.0/33", "fd00::/129", "10.0.0/8", "not-an-ip", "10.0.0.0/", "10.0.0.0/+8", "10.0.0.0/8/8", "1.2.3.4/1000"] {
        let errors = bad_cidr(v);
        let (path, problem) = one(&errors);
        assert_eq!(path, "spec.rules[0].from[0].source.ipBlocks[0]", "{v}");
        assert!(matches!(problem, Problem::BadCidr { value, .. } if value == v), "{v}: {problem:?}");
    }
    let bad_port = |field: &str, v: &str| {
        authz_errors(&format!("{{rules: [{{to: [{{operation: {{{field}: [\"8080\", \"{v}\"]}}}}]}}]}}"))
    };
    for v in ["0", "70000", "65536", "http", "", "-1", "+80", "8080.0", "123456"] {
        for field in ["ports", "notPorts"] {
            let errors = bad_port(field, v);
            assert_eq!(
                one(&errors),
                (format!("spec.rules[0].to[0].operation.{field}[1]").as_str(), &Problem::BadPort { value: v.into() }),
                "{field} {v}"
            );
        }
    }
    for (key, value) in [("destination.port", "0"), ("destination.ip", "1.2.3"), ("source.ip", "::g")] {
        let errors = authz_errors(&format!("{{rules: [{{when: [{{key: {key}, notValues: [\"{value}\"]}}]}}]}}"));
        let (path, _) = one(&errors);
        assert_eq!(path, "spec.rules[0].when[0].notValues[0]");
    }
    let cases: [(&str, &str, Problem); 12] = [
        ("{rules: [{from: [{source: {principals: [\"a*b\"]}}]}]}", "spec.rules[0].from[0].source.principals[0]", Problem::BadWildcard { value: "a*b".into() }),
        ("{rules: [{from: [{source: {namespaces: [\"**\"]}}]}]}", "spec.rules[0].from[0].source.namespaces[0]", Problem::BadWildcard { value: "**".into() }),
        ("{rules: [{from: [{source: {namespaces: [\"\"]}}]}]}", "spec.rules[0].from[0].source.namespaces[0]", Problem::EmptyValue),
        ("{rules: [{from: [{source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\"]}}]}]}", "spec.rules[0].from[0].source.principals[0]", Problem::SpiffeScheme { value: "spiffe://cluster.local/ns/a/sa/b".into() }),
        ("{rules: [{from: [{source: {serviceAccounts: [\"a/b/c\"]}}]}]}", "spec.rules[0].from[0].source.serviceAccounts[0]", Problem::BadServiceAccount { value: "a/b/c".into() }),
        ("{rules: [{from: [{source: {serviceAccounts: [\"client/*\"]}}]}]}", "spec.rules[0].from[0].source.serviceAccounts[0]", Problem::BadServiceAccount { value: "client/*".into() }),
        ("{rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]}", "spec.rules[0].from[0].source", Problem::ServiceAccountsWithPrincipals),
        ("{rules: [{from: []}]}", "spec.rules[0].from", Problem::EmptyList("from")),
        ("{rules: [{from: [{}]}]}", "spec.rules[0].from[0].source", Problem::EmptySource),
        ("{rules: [{from: [{source: {}}]}]}", "spec.rules[0].from[0].source", Problem::EmptySource),
        ("{rules: [{to: [{operation: {}}]}]}", "spec.rules[0].to[0].operation", Problem::EmptyOperation),
        ("{rules: [{when: [{key: source.ip}]}]}", "spec.rules[0].when[0]", Problem::EmptyCondition { key: "source.ip".into() }),
    ];
    for (spec, want_path, want) in cases {
        let errors = authz_errors(spec);
        assert_eq!(one(&errors), (want_path, &want), "{spec}");
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let errors = authz_errors(
        "{rules: [{from: [{source: {ipBlocks: [bad], principals: [\"x*y\"]}}], to: [{operation: {ports: [\"0\"], methods: [GET]}}]}]}",
    );
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.rules[0].from[0].source.principals[0]",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "spec.rules[0].to[0].operation.methods",
            "spec.rules[0].to[0].operation.ports[0]",
        ]
    );
}

#[test]
fn header_and_metadata_are_checked() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {}\n";
    let parsed: Vec<AuthorizationPolicy> = parse_all(yaml).unwrap();
    let errors = compile_authorization_policy(&parsed[0]).unwrap_err();
    assert!(
        matches!(&errors[0].problem, Problem::ApiVersion { found, .. } if found == "security.istio.io/v1")
    );
    assert!(errors[0].to_string().contains(API_VERSION));

    let yaml = "kind: PeerAuthentication\nmetadata: {namespace: shop}\nspec: {}\n";
    let parsed: Vec<AuthorizationPolicy> = parse_all(yaml).unwrap();
    let errors = compile_authorization_policy(&parsed[0]).unwrap_err();
    let problems: Vec<&Problem> = errors.iter().map(|e| &e.problem).collect();
    assert!(
        matches!(problems[..], [Problem::Kind { .. }, Problem::MissingName]),
        "{problems:?}"
    );

    // A list written without a value is empty (here: the source sets nothing else → error).
    let errors = authz_errors("{rules: [{from: [{source: {principals: , namespaces: [a]}}]}]}");
    assert!(errors.is_empty(), "{errors:?}");
    let errors = authz_errors("{rules: [{from: [{source: {principals: }}]}]}");
    assert_eq!(
        one(&errors),
        ("spec.rules[0].from[0].source", &Problem::EmptySource)
    );

    // Namespace defaults to `default`; other metadata and `status` are ignored.
    let yaml = "metadata: {name: p, labels: {a: b}, resourceVersion: \"3\"}\nspec: {rules: [{}]}\nstatus: {x: y}\n";
    let parsed: Vec<AuthorizationPolicy> = parse_all(yaml).unwrap();
    let compiled = compile_authorization_policy(&parsed[0]).unwrap();
    assert_eq!(compiled.policy.namespace, "default");
    assert_eq!(compiled.effect, Effect::Allow);
}

#[test]
fn deny_without_rules_is_a_warning() {
    let parsed: Vec<AuthorizationPolicy> = parse_all(&object(
        "AuthorizationPolicy",
        "shop",
        "p",
        "{action: DENY}",
    ))
    .unwrap();
    let compiled = compile_authorization_policy(&parsed[0]).unwrap();
    assert_eq!(compiled.warnings.len(), 1);
    assert_eq!(compiled.warnings[0].severity, Severity::Warning);
    assert_eq!(compiled.warnings[0].problem, Problem::DenyWithoutRules);
    let (_, findings) = PolicySet::compile(ROOT, &parsed, &[]);
    assert_eq!(findings, compiled.warnings);
}

#[test]
fn unknown_fields_are_parse_errors() {
    for spec in [
        "{rule: [{}]}",
        "{rules: [{from: [{source: {principal: [a]}}]}]}",
        "{rules: [{to: [{operation: {port: [\"80\"]}}]}]}",
        "{rules: [{when: [{key: source.ip, value: [a]}]}]}",
        "{selector: {matchExpressions: []}}",
        "{action: REJECT}",
        "{rules: [{to: [{operation: {ports: [{port: 8080}]}}]}]}",
    ] {
        let err =
            parse_all::<AuthorizationPolicy>(&object("AuthorizationPolicy", "shop", "p", spec))
                .expect_err(spec);
        let text = err.to_string();
        assert!(
            text.contains("unknown field")
                || text.contains("unknown variant")
                || text.contains("invalid type"),
            "{spec}: {text}"
        );
    }
    for yaml in [
        "metadata: {name: p}\nsepc: {}\n",
        "metadata: {name: p}\nspec: {}\nextra: 1\n",
    ] {
        let err = parse_all::<AuthorizationPolicy>(yaml).expect_err(yaml);
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = parse_all::<PeerAuthentication>(yaml).expect_err(yaml);
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
    for spec in [
        "{mtls: {mode: STRICT, foo: 1}}",
        "{mode: STRICT}",
        "{mtls: {mode: ON}}",
        "{portLevelMtls: {-1: {mode: STRICT}}}",
    ] {
        assert!(
            parse_all::<PeerAuthentication>(&object("PeerAuthentication", "shop", "p", spec))
                .is_err(),
            "{spec}"
        );
    }
}

#[test]
fn peer_authentication_validation() {
    assert_eq!(
        one(&peer_errors("{mtls: {mode: DISABLE}}")),
        ("spec.mtls.mode", &Problem::MtlsDisable)
    );
    assert!(
        peer_errors("{mtls: {mode: DISABLE}}")[0]
            .to_string()
            .contains("never downgrades")
    );
    assert_eq!(
        one(&peer_errors(
            "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"
        )),
        ("spec.portLevelMtls", &Problem::PortLevelWithoutSelector)
    );
    assert_eq!(
        one(&peer_errors(
            "{selector: {matchLabels: {a: b}}, portLevelMtls: {}}"
        )),
        ("spec.portLevelMtls", &Problem::EmptyList("portLevelMtls"))
    );
    for port in [0u32, 70000] {
        assert_eq!(
            one(&peer_errors(&format!(
                "{{selector: {{matchLabels: {{a: b}}}}, portLevelMtls: {{{port}: {{mode: STRICT}}}}}}"
            ))),
            (
                format!("spec.portLevelMtls.{port}").as_str(),
                &Problem::BadPortKey { value: port }
            )
        );
    }
    assert_eq!(
        one(&peer_errors(
            "{selector: {matchLabels: {a: b}}, portLevelMtls: {8080: {mode: DISABLE}}}"
        )),
        ("spec.portLevelMtls.8080.mode", &Problem::MtlsDisable)
    );
    assert!(
        peer_errors(
            "{selector: {matchLabels: {a: b}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"
        )
        .is_empty()
    );

    let (_, findings) = peer_set(&[(
        ROOT,
        "mesh-web",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
    )]);
    assert_eq!(
        one(&findings),
        (
            "spec.selector",
            &Problem::SelectorInRootNamespace { root: ROOT.into() }
        )
    );
}

#[test]
fn json_objects_parse_too() {
    let json = r#"{"apiVersion": "security.nodemesh.io/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "wl", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"},
                 "portLevelMtls": {"8080": {"mode": "STRICT"}}}}"#;
    let pa: PeerAuthentication = serde_json::from_str(json).unwrap();
    let (set, findings) = PolicySet::compile(ROOT, &[], &[pa]);
    assert!(findings.is_empty());
    assert_eq!(set.mtls_mode(&web(), 8080).mode, MtlsMode::Strict);

    let json = r#"{"metadata": {"name": "p", "namespace": "shop"},
        "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.1.0/24"]}}]}]}}"#;
    let ap: AuthorizationPolicy = serde_json::from_str(json).unwrap();
    let compiled = compile_authorization_policy(&ap).unwrap();
    assert_eq!(compiled.effect, Effect::Allow);
    // Serialising gives back the user's shape.
    let back = serde_json::to_value(&ap.spec).unwrap();
    assert_eq!(
        back["rules"][0]["from"][0]["source"]["ipBlocks"][0],
        "10.0.1.0/24"
    );
}

#[test]
fn specs_round_trip_through_yaml() {
    let spec = "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{from: [{source: {principals: [\"a/*\"], notNamespaces: [b], ipBlocks: [\"10.0.0.0/8\"]}}], to: [{operation: {notPorts: [\"22\"]}}], when: [{key: destination.ip, notValues: [\"::1\"]}]}]}";
    let parsed: Vec<AuthorizationPolicy> =
        parse_all(&object("AuthorizationPolicy", "shop", "p", spec)).unwrap();
    let text = serde_norway::to_string(&parsed[0]).unwrap();
    let again: Vec<AuthorizationPolicy> = parse_all(&text).unwrap();
    assert_eq!(parsed, again, "{text}");

    let spec = "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}";
    let parsed: Vec<PeerAuthentication> =
        parse_all(&object("PeerAuthentication", "shop", "p", spec)).unwrap();
    let text = serde_norway::to_string(&parsed[0]).unwrap();
    let again: Vec<PeerAuthentication> = parse_all(&text).unwrap();
    assert_eq!(parsed, again, "{text}");
}

#[test]
fn spiffe_ids_parse() {
    let id = PeerIdentity::from_spiffe_uri("spiffe://cluster.local/ns/client/sa/curl").unwrap();
    assert_eq!(id.principal(), CURL);
    for bad in [
        "cluster.local/ns/client/sa/curl",
        "spiffe://cluster.local/ns/client/sa/curl/x",
        "spiffe://cluster.local/ns/client/sa/",
        "spiffe://cluster.local/sa/client/ns/curl",
        "spiffe:///ns/client/sa/curl",
        "spiffe://td/ns/a",
        "",
    ] {
        assert_eq!(PeerIdentity::from_spiffe_uri(bad), None, "{bad}");
    }
}

/// Bad input never panics: mangled variants of a valid policy either parse and compile to
/// `Ok`/`Err`, or fail to parse.
#[test]
fn garbage_never_panics() {
    let base = object(
        "AuthorizationPolicy",
        "shop",
        "p",
        "{action: DENY, rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/8\"], principals: [\"a*\"]}}], to: [{operation: {ports: [\"80\"]}}], when: [{key: destination.port, values: [\"80\"]}]}]}",
    );
    let bytes = base.as_bytes();
    let replacements = [
        b'*', b'/', b'0', b'9', b':', b' ', b'{', b']', b'-', b'"', b'\n', b'x',
    ];
    let mut parsed = 0;
    for i in 0..bytes.len() {
        for r in replacements {
            let mut m = bytes.to_vec();
            m[i] = r;
            let Ok(text) = String::from_utf8(m) else {
                continue;
            };
            if let Ok(objs) = parse_all::<AuthorizationPolicy>(&text) {
                parsed += 1;
                let (set, _) = PolicySet::compile(ROOT, &objs, &[]);
                let _ = set.authorize(&web(), &c().0);
            }
        }
    }
    assert!(parsed > 100, "only {parsed} variants parsed");
}
