//! Micro-benchmarks of the agent's hot pure code (`cargo bench -p mesh-agent`; `cargo xtask
//! bench` runs them too): policy evaluation with 10,000 policies (the engine alone, and the
//! tunnel's authorizer with and without its decision cache), map-content compilation for 5,000
//! workloads, and HBONE header handling. Inputs are generated, so the numbers do not depend
//! on any file.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use mesh_agent::{
    app::{PolicyAuthorizer, compute, decisions},
    identity::SpiffeId,
    local_config::build_from_texts,
    model::ObjectKey,
    policy::{
        ConnectionAttrs, DEFAULT_ROOT_NAMESPACE, PeerIdentity, PolicySet, WorkloadMeta,
        spec::AuthorizationPolicy,
    },
    reconcile,
    tunnel::{
        Authorizer, AuthzRequest, LocalWorkload, Transport, forwarded_for, parse_forwarded_for,
        pool::connect_request,
    },
};

const NAMESPACES: usize = 100;

/// 10,000 policies: 100 per namespace over 100 namespaces, each selecting one app and allowing
/// or denying some principals, namespaces, IP blocks and ports (the common L4 shapes).
fn policies(n: usize) -> Vec<AuthorizationPolicy> {
    (0..n)
        .map(|i| serde_norway::from_str(&policy_yaml(i)).expect("generated policy parses"))
        .collect()
}

/// Policy `i` of [`policies`].
fn policy_yaml(i: usize) -> String {
    let ns = i % NAMESPACES;
    let app = (i / NAMESPACES) % 20;
    let action = if i.is_multiple_of(7) { "DENY" } else { "ALLOW" };
    format!(
        "apiVersion: security.nodemesh.io/v1alpha1\n\
         kind: AuthorizationPolicy\n\
         metadata: {{name: p{i}, namespace: ns{ns}}}\n\
         spec:\n\
         \x20 selector: {{matchLabels: {{app: app{app}}}}}\n\
         \x20 action: {action}\n\
         \x20 rules:\n\
         \x20 - from:\n\
         \x20   - source: {{principals: [\"cluster.local/ns/ns{ns}/sa/sa{i}\", \"cluster.local/ns/other/sa/*\"]}}\n\
         \x20   - source: {{namespaces: [\"team-{i}\"], ipBlocks: [\"10.{a}.{b}.0/24\"]}}\n\
         \x20   to:\n\
         \x20   - operation: {{ports: [\"{p1}\", \"{p2}\"]}}\n",
        a = i % 250,
        b = (i / 250) % 250,
        p1 = 8000 + i % 1000,
        p2 = 9000 + i % 1000,
    )
}

fn policy_eval(c: &mut Criterion) {
    let all = policies(10_000);
    let mut group = c.benchmark_group("policy");
    group.sample_size(10);
    group.bench_function("compile_10k", |b| {
        b.iter(|| PolicySet::compile(DEFAULT_ROOT_NAMESPACE, black_box(&all), &[]))
    });
    group.finish();

    let (set, findings) = PolicySet::compile(DEFAULT_ROOT_NAMESPACE, &all, &[]);
    assert!(
        findings.is_empty(),
        "generated policies are valid: {findings:?}"
    );
    let workload = WorkloadMeta {
        namespace: "ns42".into(),
        labels: BTreeMap::from([("app".to_owned(), "app3".to_owned())]),
    };
    let conn = |sa: &str, port: u16| ConnectionAttrs {
        src_identity: Some(PeerIdentity {
            trust_domain: "cluster.local".into(),
            namespace: "ns42".into(),
            service_account: sa.into(),
        }),
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        dst_ip: IpAddr::V4(Ipv4Addr::new(10, 2, 0, 9)),
        dst_port: port,
    };
    // Allowed by the selected ALLOW policy (ns42, app3: policy 342 → sa342, port 8342).
    let allowed = conn("sa342", 8342);
    // Matches nothing: every ALLOW of the workload is tried before the default deny.
    let denied = conn("nobody", 1);
    let mut group = c.benchmark_group("policy_10k");
    group.bench_function("authorize_allowed", |b| {
        b.iter(|| set.authorize(black_box(&workload), black_box(&allowed)))
    });
    group.bench_function("authorize_no_match", |b| {
        b.iter(|| set.authorize(black_box(&workload), black_box(&denied)))
    });
    group.finish();
}

/// A local-mode file with two nodes, `n` workloads (half per node) in 50 namespaces, a service
/// per namespace and a DENY policy per namespace.
fn cluster_yaml(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\nthisNode: node-a\nnodes:\n\
         - {name: node-a, address: 10.200.0.1, tunnelAddress: 169.254.200.1}\n\
         - {name: node-b, address: 10.200.0.2, tunnelAddress: 169.254.200.2}\nworkloads:\n",
    );
    for i in 0..n {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        let _ = writeln!(
            y,
            "- {{name: w{i}, namespace: ns{ns}, serviceAccount: sa{sa}, labels: {{app: app{app}}}, \
             ips: [10.{a}.{b}.{c}], netns: /run/netns/w{i}, node: {node}}}",
            ns = i % 50,
            sa = i % 200,
            app = i % 20,
            a = 10 + i / 65_536,
            b = (i / 256) % 256,
            c = i % 256,
        );
    }
    y.push_str("services:\n");
    for ns in 0..50 {
        let _ = writeln!(
            y,
            "- {{name: svc, namespace: ns{ns}, vips: [10.96.0.{v}], ports: [{{port: 80, targetPort: 8080}}], \
             selector: {{matchLabels: {{app: app1}}}}}}",
            v = ns + 1
        );
    }
    for ns in 0..50 {
        let _ = write!(
            y,
            "---\napiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: deny-admin, namespace: ns{ns}}}\nspec:\n  action: DENY\n  rules:\n\
             \x20 - from:\n    - source: {{namespaces: [ns{other}]}}\n    to:\n    - operation: {{ports: [\"9090\"]}}\n",
            other = (ns + 1) % 50
        );
    }
    y
}

fn map_compilation(c: &mut Criterion) {
    let text = cluster_yaml(5_000);
    let mut group = c.benchmark_group("maps_5k_workloads");
    group.sample_size(10);
    group.bench_function("model_build", |b| {
        b.iter(|| {
            build_from_texts(&[("bench.yaml".into(), black_box(text.clone()))], None)
                .expect("generated cluster is valid")
        })
    });
    let model = build_from_texts(&[("bench.yaml".into(), text)], None).expect("valid cluster");
    let cookies: BTreeMap<ObjectKey, u64> = model
        .local_workloads()
        .enumerate()
        .map(|(i, w)| (w.key.clone(), 1000 + i as u64))
        .collect();
    group.bench_function("desired_state_and_compile", |b| {
        b.iter(|| {
            let desired = compute::desired_state(black_box(&model), &cookies).expect("computes");
            reconcile::compile(&desired).expect("compiles")
        })
    });
    group.bench_function("tunnel_snapshot", |b| {
        b.iter(|| compute::snapshot(black_box(&model)).expect("snapshot"))
    });
    group.finish();
}

fn hbone_headers(c: &mut Criterion) {
    let src: SocketAddr = "10.1.2.3:45678".parse().expect("addr");
    let dst: SocketAddr = "10.2.0.9:8080".parse().expect("addr");
    let mut group = c.benchmark_group("hbone");
    group.bench_function("connect_request", |b| {
        b.iter_batched(
            || {
                let mut h = http::HeaderMap::new();
                h.insert(
                    "forwarded",
                    forwarded_for(src, None).parse().expect("header value"),
                );
                h.insert(
                    "baggage",
                    "k8s.namespace.name=demo,k8s.deployment.name=client"
                        .parse()
                        .expect("header value"),
                );
                h
            },
            |h| connect_request(black_box(dst), &h).expect("request"),
            BatchSize::SmallInput,
        )
    });
    let header = forwarded_for(src, Some("echo.demo.svc.cluster.local"));
    group.bench_function("parse_forwarded", |b| {
        b.iter(|| parse_forwarded_for(black_box(&header)))
    });
    group.finish();
}

/// The tunnel's authorization path ([`PolicyAuthorizer`], inbound and same-node) on a model with
/// the 10,000 policies of [`policies`] and the workload they select, without and with the
/// decision cache. The requests repeat, as connections from one client to one port do.
fn authorizer(c: &mut Criterion) {
    let mut text = String::from(
        "apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\nthisNode: node-a\nnodes:\n\
         - {name: node-a, address: 10.200.0.1, tunnelAddress: 169.254.200.1}\nworkloads:\n\
         - {name: w, namespace: ns42, serviceAccount: w, labels: {app: app3}, ips: [10.2.0.9], \
            netns: /run/netns/w, node: node-a}\n",
    );
    for i in 0..10_000 {
        text.push_str("---\n");
        text.push_str(&policy_yaml(i));
    }
    let model =
        Arc::new(build_from_texts(&[("bench.yaml".into(), text)], None).expect("valid cluster"));
    let workload = LocalWorkload {
        name: "w".into(),
        namespace: "ns42".into(),
        identity: SpiffeId::new("cluster.local", "ns42", "w").expect("identity"),
        ip: IpAddr::V4(Ipv4Addr::new(10, 2, 0, 9)),
    };
    let allowed_id = SpiffeId::new("cluster.local", "ns42", "sa342").expect("identity");
    let denied_id = SpiffeId::new("cluster.local", "ns42", "nobody").expect("identity");
    let request = |id, port| AuthzRequest {
        source_identity: Some(id),
        source_addr: "10.1.2.3:45678".parse().expect("addr"),
        destination: SocketAddr::new(workload.ip, port),
        destination_workload: &workload,
        transport: Transport::Mtls,
    };
    let allowed = request(&allowed_id, 8342);
    let denied = request(&denied_id, 1);
    let mut group = c.benchmark_group("authorizer_10k");
    for (cache, capacity) in [("uncached", 0), ("cached", decisions::DEFAULT_CAPACITY)] {
        let a = PolicyAuthorizer::with_cache(model.clone(), Default::default(), capacity);
        assert_eq!(
            a.authorize(&allowed),
            mesh_agent::tunnel::AuthzDecision::Allow
        );
        assert_ne!(
            a.authorize(&denied),
            mesh_agent::tunnel::AuthzDecision::Allow
        );
        group.bench_function(format!("allowed_{cache}"), |b| {
            b.iter(|| a.authorize(black_box(&allowed)))
        });
        group.bench_function(format!("denied_{cache}"), |b| {
            b.iter(|| a.authorize(black_box(&denied)))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    policy_eval,
    authorizer,
    map_compilation,
    hbone_headers
);
criterion_main!(benches);
