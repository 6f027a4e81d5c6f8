//! `nodemesh_tls_*` and `nodemesh_connect_duration_seconds`: exact deltas from real handshakes.

use super::*;
use crate::{
    admin::tests::{counter, lint, parse},
    metrics::{BuildInfo, MetricsRegistry},
    tunnel::metrics::{Direction, HandshakeFailure, HandshakeMetrics},
};

fn mesh_options() -> (MeshOptions, HandshakeMetrics) {
    let opts = MeshOptions::default();
    let hs = opts.config.handshake_metrics.clone();
    (opts, hs)
}

/// Connects to the inbound with `cert` and waits until the server judged it.
async fn rejected_client(mesh: &Mesh, cert: &crate::identity::WorkloadCert) {
    let ccfg = client_config(cert, &mesh.certs.trust_bundle(), &mesh.server).expect("cfg");
    let tcp = TcpStream::connect(mesh.inbound_addr)
        .await
        .expect("connect");
    if let Ok(tls) = tokio_rustls::TlsConnector::from(ccfg)
        .connect(placeholder_server_name(), tcp)
        .await
    {
        let _ = h2::client::handshake(tls).await;
    }
    eventually("the rejected connection to be released", || {
        mesh.inbound.active_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_counts_one_handshake_on_each_side_and_both_connects() {
    let (opts, hs) = mesh_options();
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    let exported = HandshakeMetrics::new(registry.nodemesh());
    let opts = MeshOptions {
        config: TunnelConfig {
            handshake_metrics: exported.clone(),
            ..opts.config
        },
        ..opts
    };
    drop(hs);
    let mesh = Mesh::start(opts).await;
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 1000).await;
    eventually("both sides to record the close", || {
        mesh.inbound.metrics().totals().closed == 1
    })
    .await;
    assert_eq!(exported.handshakes(Direction::Inbound), 1);
    assert_eq!(exported.handshakes(Direction::Outbound), 1);
    let body = registry.encode(crate::metrics::Format::Prometheus);
    lint(&body);
    let m = parse(&body);
    for direction in ["inbound", "outbound"] {
        let l = [("direction", direction)];
        assert_eq!(
            counter(&m, "nodemesh_tls_handshakes_total", &l),
            1.0,
            "{body}"
        );
        for histogram in [
            "nodemesh_tls_handshake_duration_seconds",
            "nodemesh_connect_duration_seconds",
        ] {
            let line = format!("{histogram}_count{{direction=\"{direction}\"}} 1\n");
            assert!(body.contains(&line), "{line}{body}");
        }
    }
    assert!(
        !body.contains("nodemesh_tls_handshake_failures_total{"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_trust_domain_expired_and_garbage_count_their_reasons() {
    let (opts, hs) = mesh_options();
    let mesh = Mesh::start(opts).await;
    let inbound = |r| hs.failures(Direction::Inbound, r);

    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_ca = LocalCa::open(other_dir.path(), "other.td").expect("ca");
    let foreign = other_ca
        .issue(
            &"spiffe://other.td/ns/default/sa/client"
                .parse()
                .expect("id"),
        )
        .await
        .expect("cert");
    rejected_client(&mesh, &foreign).await;
    assert_eq!(inbound(HandshakeFailure::ForeignTrustDomain), 1);

    let now = SystemTime::now();
    let expired = mesh
        .ca
        .issue_with_validity(
            &mesh.client,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("cert");
    rejected_client(&mesh, &expired).await;
    assert_eq!(inbound(HandshakeFailure::Expired), 1);
    assert_eq!(inbound(HandshakeFailure::ForeignTrustDomain), 1);

    let mut s = TcpStream::connect(mesh.inbound_addr)
        .await
        .expect("connect");
    s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64))
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(DEADLINE, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    eventually("the garbage connection to be released", || {
        mesh.inbound.active_connections() == 0
    })
    .await;
    assert_eq!(inbound(HandshakeFailure::Protocol), 1);
    assert_eq!(hs.handshakes(Direction::Inbound), 0);
    for r in [
        HandshakeFailure::Timeout,
        HandshakeFailure::Io,
        HandshakeFailure::UntrustedChain,
        HandshakeFailure::NoCertificate,
    ] {
        assert_eq!(inbound(r), 0, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_gauges_count_one_connection_and_its_open_streams() {
    let mut opts = MeshOptions::default();
    // No spreading: the three streams share one connection.
    opts.config.pool_max_connections_per_key = 1;
    let mesh = Mesh::start(opts).await;
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    Pool::register(registry.nodemesh(), mesh.outbound.pool().clone());
    let gauges = |registry: &MetricsRegistry| {
        let body = registry.encode(crate::metrics::Format::Prometheus);
        lint(&body);
        let m = parse(&body);
        (
            counter(&m, "nodemesh_pool_connections", &[]),
            counter(&m, "nodemesh_pool_streams", &[]),
        )
    };
    assert_eq!(gauges(&registry), (0.0, 0.0));
    let mut apps = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(mesh.outbound_addr)
            .await
            .expect("connect");
        // An echoed byte means the stream is open end to end.
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut b))
            .await
            .expect("echo in time")
            .expect("echo");
        apps.push(s);
    }
    assert_eq!(gauges(&registry), (1.0, 3.0));
    drop(apps);
    eventually("the streams to be released", || {
        mesh.outbound.pool().stream_count() == 0
    })
    .await;
    assert_eq!(gauges(&registry), (1.0, 0.0));
}
