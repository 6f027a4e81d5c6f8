//! Scraping `/metrics` 1,000 times in a row grows neither the series count nor memory. A test
//! binary of its own, so the RSS it measures is not shared with other tests running in parallel.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use mesh_agent::{
    admin::{StatsState, serve_stats},
    metrics::{BuildInfo, MetricsRegistry, datapath, process::ProcessStats},
    readiness::Readiness,
    tunnel::metrics::{Reporter, TrafficLabels, TunnelMetrics, flags},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const DEADLINE: Duration = Duration::from_secs(10);

async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("answer before the deadline")
        .expect("read");
    let text = String::from_utf8(buf).expect("utf-8");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn series(response: &str) -> usize {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines().filter(|l| !l.starts_with('#')).count()
}

#[tokio::test]
async fn a_thousand_scrapes_grow_nothing() {
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    let tunnel = TunnelMetrics::default();
    TunnelMetrics::register(registry.istio(), [tunnel.clone()]);
    datapath::register(
        registry.nodemesh(),
        Box::new(|| BTreeMap::from([("redirected", 7), ("denied_policy", 1)])),
        None,
    );
    tunnel.opened(&TrafficLabels {
        reporter: Reporter::Source,
        source_principal: "spiffe://td/ns/a/sa/b".into(),
        destination_principal: "spiffe://td/ns/c/sa/d".into(),
        destination_service: "unknown".into(),
        connection_security_policy: "mutual_tls",
        response_flags: flags::NONE,
        source_addr: None,
        destination_addr: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = StatsState {
        registry: Arc::new(registry).into(),
        readiness: Readiness::new(),
    };
    tokio::spawn(serve_stats(listener, state, std::future::pending()));

    let first = series(&scrape(addr).await);
    assert!(first > 10, "{first}");
    // Let the allocator reach its steady state before measuring.
    for _ in 0..50 {
        scrape(addr).await;
    }
    let rss_before = ProcessStats::read().resident_bytes.expect("rss");
    for _ in 0..1_000 {
        assert_eq!(series(&scrape(addr).await), first);
    }
    let rss_after = ProcessStats::read().resident_bytes.expect("rss");
    assert_eq!(tunnel.series(), 1);
    // A scrape allocates ~20 KiB and frees it; keeping even 4 KiB of each would exceed this.
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 4 << 20,
        "RSS grew by {grown} bytes over 1,000 scrapes"
    );
}
