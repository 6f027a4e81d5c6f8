//! Outbound TLS handshake failures counted by reason: the outbound's pool connects to a fake
//! HBONE peer that presents a wrong certificate (another identity, expired, another CA of the
//! same trust domain, another trust domain), and `nodemesh_tls_handshake_failures_total
//! {direction="outbound",reason}` counts exactly one failure of that reason per attempt, no
//! success, and the app connection is counted failed with `CONNECT`.

use super::*;
use crate::{
    admin::tests::{counter, lint, parse},
    metrics::{BuildInfo, MetricsRegistry},
    tunnel::metrics::{
        Direction, HandshakeFailure, HandshakeMetrics, Reporter, TrafficLabels, flags,
    },
};

/// A TLS server on 127.0.0.2 presenting `cert` (its client-certificate check uses `bundle`);
/// it completes no handshake the client rejects. Returns its address.
async fn impostor(
    cert: crate::identity::WorkloadCert,
    bundle: &crate::identity::TrustBundle,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = server_config(&cert, bundle).expect("server config");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = h2::server::handshake(tls).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_handshake_failures_count_by_reason() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    let hs = HandshakeMetrics::new(registry.nodemesh());
    let config = TunnelConfig {
        handshake_metrics: hs.clone(),
        ..test_config()
    };
    let bundle = mesh.certs.trust_bundle();
    let now = SystemTime::now();

    let other_ca_dir = tempfile::tempdir().expect("tempdir");
    let same_td_other_ca = LocalCa::open(other_ca_dir.path(), TD).expect("ca");
    let foreign_dir = tempfile::tempdir().expect("tempdir");
    let foreign_ca = LocalCa::open(foreign_dir.path(), "other.td").expect("ca");
    let cases = [
        (
            "another identity of the mesh's CA",
            mesh.ca.issue(&id("impostor")).await.expect("cert"),
            HandshakeFailure::BadCertificate,
        ),
        (
            "the expected identity, expired",
            mesh.ca
                .issue_with_validity(
                    &mesh.server,
                    now - Duration::from_secs(7200),
                    now - Duration::from_secs(3600),
                )
                .expect("cert"),
            HandshakeFailure::Expired,
        ),
        (
            "the expected identity, signed by an unknown CA",
            same_td_other_ca.issue(&mesh.server).await.expect("cert"),
            HandshakeFailure::UntrustedChain,
        ),
        (
            "an identity of another trust domain",
            foreign_ca
                .issue(
                    &"spiffe://other.td/ns/default/sa/server"
                        .parse()
                        .expect("id"),
                )
                .await
                .expect("cert"),
            HandshakeFailure::ForeignTrustDomain,
        ),
    ];
    let outbound_failures = |r| hs.failures(Direction::Outbound, r);

    for (i, (what, cert, reason)) in cases.into_iter().enumerate() {
        let hbone = impostor(cert, &bundle).await;
        let ep = Endpoint {
            addr: mesh.echo,
            identity: mesh.server.clone(),
            location: Location::Remote { hbone },
        };
        let resolver = Arc::new(StaticResolver(
            [(mesh.echo, Destination::Workload(ep))]
                .into_iter()
                .collect(),
        ));
        let outbound = Outbound::new(
            config.clone(),
            Pool::new(config.clone(), mesh.certs.clone()),
            Arc::new(FixedRedirect(Redirect {
                original_dst: mesh.echo,
                source: mesh.client.clone(),
                baggage: None,
            })),
            resolver,
            Arc::new(StaticWorkloads::default()),
            Arc::new(AllowAll),
        );
        let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_trigger, watch) = drain::channel();
        tokio::spawn(outbound.clone().serve(listener, watch));

        // The app's connection is closed without a byte: the tunnel could not be built.
        let n = bytes_before_close(addr).await;
        assert_eq!(n, 0, "{what}: no data through a failed handshake");
        eventually("the failed connection to be counted", || {
            outbound.metrics().totals().failed == 1
        })
        .await;

        assert_eq!(outbound_failures(reason), 1, "{what}: {reason:?}");
        let all: u64 = [
            HandshakeFailure::Timeout,
            HandshakeFailure::UntrustedChain,
            HandshakeFailure::ForeignTrustDomain,
            HandshakeFailure::Expired,
            HandshakeFailure::BadCertificate,
            HandshakeFailure::NoCertificate,
            HandshakeFailure::NoLocalCertificate,
            HandshakeFailure::Protocol,
            HandshakeFailure::Io,
        ]
        .into_iter()
        .map(outbound_failures)
        .sum();
        assert_eq!(
            all,
            i as u64 + 1,
            "{what}: one failure per case, no other reason"
        );
        assert_eq!(hs.handshakes(Direction::Outbound), 0, "{what}");
        assert_eq!(
            outbound
                .metrics()
                .get(&TrafficLabels {
                    reporter: Reporter::Source,
                    source_principal: mesh.client.to_string(),
                    destination_principal: mesh.server.to_string(),
                    destination_service: "unknown".into(),
                    connection_security_policy: "mutual_tls",
                    response_flags: flags::CONNECT,
                    source_addr: None,
                    destination_addr: None,
                })
                .failed,
            1,
            "{what}: the app connection fails with CONNECT"
        );
    }

    // The exposition carries each reason once, in the Prometheus format.
    let body = registry.encode(crate::metrics::Format::Prometheus);
    lint(&body);
    let m = parse(&body);
    for reason in [
        "bad_certificate",
        "expired",
        "untrusted_chain",
        "foreign_trust_domain",
    ] {
        assert_eq!(
            counter(
                &m,
                "nodemesh_tls_handshake_failures_total",
                &[("direction", "outbound"), ("reason", reason)]
            ),
            1.0,
            "{reason}:\n{body}"
        );
    }
}
