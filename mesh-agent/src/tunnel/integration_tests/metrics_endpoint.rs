//! Traffic through a real tunnel pair, counted exactly on the stats server's `/metrics`.

use super::*;
use crate::{
    admin::{
        StatsState, serve_stats,
        tests::{counter, get, lint, parse},
    },
    metrics::{BuildInfo, MetricsRegistry},
    readiness::Readiness,
    tunnel::metrics::TunnelMetrics,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_a_tunneled_connection_exactly() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    TunnelMetrics::register(
        registry.istio(),
        [
            mesh.outbound.metrics().clone(),
            mesh.inbound.metrics().clone(),
        ],
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = StatsState {
        registry: Arc::new(registry).into(),
        readiness: Readiness::new(),
    };
    let server = tokio::spawn(serve_stats(listener, state, std::future::pending()));

    let before = parse(&get(addr, "/metrics").await.body);
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 10_000).await;
    eventually("both sides to record the close", || {
        mesh.outbound.metrics().totals().closed == 1 && mesh.inbound.metrics().totals().closed == 1
    })
    .await;
    let body = get(addr, "/metrics").await.body;
    lint(&body);
    let after = parse(&body);
    for reporter in ["source", "destination"] {
        let l = [
            ("reporter", reporter),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", &mesh.client.to_string()),
            ("destination_principal", &mesh.server.to_string()),
        ];
        let delta = |name: &str| counter(&after, name, &l) - counter(&before, name, &l);
        assert_eq!(
            delta("istio_tcp_connections_opened_total"),
            1.0,
            "{reporter}\n{body}"
        );
        assert_eq!(
            delta("istio_tcp_connections_closed_total"),
            1.0,
            "{reporter}"
        );
        assert_eq!(delta("istio_tcp_sent_bytes_total"), 10_000.0, "{reporter}");
        assert_eq!(
            delta("istio_tcp_received_bytes_total"),
            10_000.0,
            "{reporter}"
        );
        assert_eq!(
            delta("istio_tcp_connections_failed_total"),
            0.0,
            "{reporter}"
        );
    }
    server.abort();
}
