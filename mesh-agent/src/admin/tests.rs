//! In-process tests of the stats and admin servers over loopback (port 0), with a raw HTTP/1.1
//! client so malformed requests can be sent too.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_parse::{LineInfo, Scrape, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use super::*;
use crate::{
    metrics::{
        BuildInfo, MetricsRegistry,
        agent::{AgentMetrics, CertExpiry, CertificateExpiry, PolicyAction},
        datapath::{self, MapUsage},
    },
    tunnel::metrics::{
        Direction, HandshakeFailure, HandshakeMetrics, Reporter, TrafficLabels, TunnelMetrics,
        flags,
    },
};

const DEADLINE: Duration = Duration::from_secs(10);

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

/// Sends `raw` and reads until the server closes (or the deadline). `None` if the server closed
/// without answering.
pub(crate) async fn exchange(addr: SocketAddr, raw: &[u8]) -> Option<Response> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // A server that refuses early may reset before we finish writing: that is an answer too.
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("the server neither answered nor closed");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

async fn send(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> Response {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{accept}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    exchange(addr, req.as_bytes())
        .await
        .expect("a well-formed request gets an answer")
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> Response {
    send(addr, "GET", path, None).await
}

/// Polls `f` until it is true, failing after [`DEADLINE`].
async fn eventually<F: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

struct Stats {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stats {
    async fn start(registry: MetricsRegistry, readiness: Readiness) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        let state = StatsState {
            registry: Arc::new(registry).into(),
            readiness,
        };
        let task = tokio::spawn(serve_stats(listener, state, async {
            let _ = rx.await;
        }));
        Stats {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("the server stops on shutdown")
            .expect("no panic");
    }
}

fn traffic(reporter: Reporter) -> TrafficLabels {
    TrafficLabels {
        reporter,
        source_principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
        destination_principal: "spiffe://cluster.local/ns/shop/sa/server".into(),
        destination_service: "web.shop.svc.cluster.local".into(),
        connection_security_policy: "mutual_tls",
        response_flags: flags::NONE,
        source_addr: None,
        destination_addr: None,
    }
}

/// A registry with every kind of metric the agent has, and handles to change them.
struct Fixture {
    registry: MetricsRegistry,
    inbound: TunnelMetrics,
    outbound: TunnelMetrics,
    redirects: Arc<AtomicU64>,
}

fn fixture() -> Fixture {
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    let (inbound, outbound) = (TunnelMetrics::default(), TunnelMetrics::default());
    TunnelMetrics::register(registry.istio(), [inbound.clone(), outbound.clone()]);
    let handshakes = HandshakeMetrics::new(registry.nodemesh());
    handshakes.handshake(Direction::Inbound, 0.003);
    handshakes.handshake_failed(Direction::Outbound, HandshakeFailure::BadCertificate);
    handshakes.connected(Direction::Outbound, 0.0007);
    let agent = AgentMetrics::new(registry.nodemesh());
    agent.policy_decision(PolicyAction::Allow);
    agent.policy_decision(PolicyAction::Deny);
    agent.workloads_enrolled(3);
    agent.config_reload(true);
    let redirects = Arc::new(AtomicU64::new(0));
    let r = redirects.clone();
    datapath::register(
        registry.nodemesh(),
        Box::new(move || {
            BTreeMap::from([
                ("redirected", r.load(Ordering::Relaxed)),
                ("denied_policy", 2),
                ("guard_dropped", 0),
            ])
        }),
        Some(Box::new(|| {
            BTreeMap::from([(
                "NM_IDENTITY",
                MapUsage {
                    entries: 4,
                    capacity: 65536,
                },
            )])
        })),
    );
    CertExpiry::register(
        registry.nodemesh(),
        Box::new(|| {
            vec![CertificateExpiry {
                identity: "spiffe://cluster.local/ns/shop/sa/server".into(),
                not_after_unix_seconds: 1_900_000_000,
            }]
        }),
    );
    Fixture {
        registry,
        inbound,
        outbound,
        redirects,
    }
}

pub(crate) fn parse(text: &str) -> Scrape {
    for line in text.lines() {
        if let LineInfo::Ignored = LineInfo::parse(line) {
            panic!("line the Prometheus parser does not understand: {line:?}\n{text}");
        }
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

pub(crate) fn counter(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is not a scalar: {other:?}"),
        })
        .collect();
    match found[..] {
        [] => 0.0,
        [v] => v,
        _ => panic!("{name} {want:?} matches {} series", found.len()),
    }
}

/// `promtool check metrics`-style rules, checked on the Prometheus text exposition.
pub(crate) fn lint(text: &str) {
    let mut help = HashSet::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut series = HashSet::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("help text");
            assert!(!doc.trim().is_empty(), "empty help for {name}");
            assert!(help.insert(name.to_string()), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("type");
            assert!(valid_name(name), "invalid name {name}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice for {name}"
            );
            assert_eq!(
                name.ends_with("_total"),
                kind == "counter",
                "{name} is a {kind}: only counters end _total"
            );
            for bad in ["_ms", "milliseconds", "_kb", "_mb", "minutes", "_percent"] {
                assert!(
                    !name.contains(bad),
                    "{name}: use base units (seconds, bytes, ratios)"
                );
            }
            if kind == "histogram" {
                assert!(
                    name.ends_with("_seconds") || name.ends_with("_bytes"),
                    "{name}: histogram without a unit"
                );
            }
            for unit in ["seconds", "bytes"] {
                if name.contains(unit) {
                    let ends = name.ends_with(unit) || name.ends_with(&format!("{unit}_total"));
                    assert!(ends, "{name}: the unit goes at the end");
                }
            }
        } else if line.starts_with('#') {
            panic!("unexpected comment line {line:?}");
        } else if !line.is_empty() {
            let (id, _) = line.rsplit_once(' ').expect("sample value");
            assert!(series.insert(id.to_string()), "duplicate series {id}");
            let name = id.split('{').next().unwrap_or(id);
            let family = types.keys().rev().find(|f| {
                name == f.as_str()
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            });
            let family = family.unwrap_or_else(|| panic!("sample {name} without TYPE"));
            assert!(help.contains(family), "{family} has no HELP");
        }
    }
}

#[tokio::test]
async fn exact_counter_deltas_and_a_clean_exposition() {
    let f = fixture();
    let (inbound, outbound, redirects) =
        (f.inbound.clone(), f.outbound.clone(), f.redirects.clone());
    let stats = Stats::start(f.registry, Readiness::new()).await;

    let before = get(stats.addr, "/metrics").await;
    assert_eq!(before.status, 200);
    assert!(
        before.head.contains("text/plain; version=0.0.4"),
        "{}",
        before.head
    );
    lint(&before.body);
    let before = parse(&before.body);

    let (src, dst) = (traffic(Reporter::Source), traffic(Reporter::Destination));
    for (m, l) in [(&outbound, &src), (&inbound, &dst)] {
        m.opened(l);
        m.opened(l).closed(1_000, 20_000);
    }
    outbound.failed(&TrafficLabels {
        response_flags: flags::DENY,
        ..src.clone()
    });
    redirects.fetch_add(5, Ordering::Relaxed);

    let after = get(stats.addr, "/metrics").await;
    lint(&after.body);
    let after = parse(&after.body);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    for reporter in ["source", "destination"] {
        let l = [("reporter", reporter), ("response_flags", "-")];
        assert_eq!(delta("istio_tcp_connections_opened_total", &l), 2.0);
        assert_eq!(delta("istio_tcp_connections_closed_total", &l), 1.0);
        assert_eq!(delta("istio_tcp_sent_bytes_total", &l), 1_000.0);
        assert_eq!(delta("istio_tcp_received_bytes_total", &l), 20_000.0);
    }
    let denied = [("reporter", "source"), ("response_flags", "DENY")];
    assert_eq!(delta("istio_tcp_connections_failed_total", &denied), 1.0);
    assert_eq!(
        counter(
            &after,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("response_flags", "-"),
                ("source_workload_namespace", "shop"),
                ("destination_service_namespace", "shop"),
                ("connection_security_policy", "mutual_tls"),
            ]
        ),
        2.0
    );
    assert_eq!(
        delta("nodemesh_datapath_events_total", &[("event", "redirected")]),
        5.0
    );
    assert_eq!(
        counter(
            &after,
            "nodemesh_datapath_events_total",
            &[("event", "denied_policy")]
        ),
        2.0
    );
    assert_eq!(
        counter(
            &after,
            "nodemesh_datapath_map_capacity",
            &[("map", "NM_IDENTITY")]
        ),
        65536.0
    );
    assert_eq!(
        counter(
            &after,
            "nodemesh_policy_decisions_total",
            &[("action", "deny")]
        ),
        1.0
    );
    assert_eq!(counter(&after, "nodemesh_workloads_enrolled", &[]), 3.0);
    assert_eq!(
        counter(
            &after,
            "nodemesh_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &after,
            "nodemesh_tls_handshake_failures_total",
            &[("reason", "bad_certificate")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &after,
            "nodemesh_certificate_expiration_timestamp_seconds",
            &[]
        ),
        1_900_000_000.0
    );
    assert!(counter(&after, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(counter(&after, "process_open_fds", &[]) > 0.0);
    let histogram = after
        .samples
        .iter()
        .find(|s| s.metric == "nodemesh_tls_handshake_duration_seconds")
        .expect("handshake histogram");
    assert!(
        matches!(&histogram.value, Value::Histogram(b) if !b.is_empty()),
        "{histogram:?}"
    );

    let om = send(
        stats.addr,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    )
    .await;
    assert!(
        om.head.contains("application/openmetrics-text"),
        "{}",
        om.head
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(
        om.body
            .contains("# TYPE istio_tcp_connections_opened counter\n"),
        "{}",
        om.body
    );
    stats.stop().await;
}

#[tokio::test]
async fn readyz_turns_200_as_gates_clear() {
    let readiness = Readiness::new();
    let bpf = readiness.register("bpf-attached");
    let certs = readiness.register("certificates");
    let stats = Stats::start(
        MetricsRegistry::new(&BuildInfo::default()),
        readiness.clone(),
    )
    .await;

    assert_eq!(get(stats.addr, "/healthz").await.status, 200);
    let r = get(stats.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("bpf-attached, certificates"), "{}", r.body);
    bpf.ready();
    let r = get(stats.addr, "/readyz").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "not ready: certificates\n")
    );
    drop(certs);
    assert_eq!(get(stats.addr, "/readyz").await.status, 200);
    assert_eq!(get(stats.addr, "/healthz/ready").await.status, 200);

    assert_eq!(get(stats.addr, "/nope").await.status, 404);
    assert_eq!(send(stats.addr, "POST", "/metrics", None).await.status, 405);
    stats.stop().await;
}

#[tokio::test]
async fn bad_requests_get_4xx_or_a_close() {
    let stats = Stats::start(
        MetricsRegistry::new(&BuildInfo::default()),
        Readiness::new(),
    )
    .await;
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    if let Some(r) = exchange(stats.addr, huge.as_bytes()).await {
        assert!((400..500).contains(&r.status), "{}", r.head);
    }
    let r = exchange(stats.addr, b"\x00\x01garbage\r\n\r\n").await;
    assert!(r.is_none_or(|r| (400..500).contains(&r.status)));
    let r = exchange(
        stats.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    )
    .await;
    assert!(r.is_none_or(|r| (400..500).contains(&r.status)));
    // A client that sends half a request and goes away.
    {
        let mut s = TcpStream::connect(stats.addr).await.expect("connect");
        s.write_all(b"GET /metr").await.expect("write");
    }
    assert_eq!(
        get(stats.addr, "/healthz").await.status,
        200,
        "still serving"
    );
    stats.stop().await;
}

struct Admin {
    addr: SocketAddr,
    quit: Arc<AtomicBool>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), AdminError>>,
}

async fn start_admin(logging: Option<LogHandle>) -> Admin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let quit = Arc::new(AtomicBool::new(false));
    let q = quit.clone();
    let state = AdminState {
        config_dump: Arc::new(|| {
            serde_json::json!({
                "certificates": [{
                    "identity": "spiffe://cluster.local/ns/shop/sa/server",
                    "serial": "0a:1b",
                    "expiry": "2030-03-17T17:46:40Z",
                }],
                "maps": {"NM_IDENTITY": {"entries": 4, "capacity": 65536}},
            })
        }),
        logging,
        quit: Arc::new(move || q.store(true, Ordering::SeqCst)),
    };
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(serve_admin(listener, state, async {
        let _ = rx.await;
    }));
    Admin {
        addr,
        quit,
        stop,
        task,
    }
}

#[tokio::test]
async fn config_dump_and_quitquitquit() {
    let admin = start_admin(None).await;
    let r = get(admin.addr, "/config_dump").await;
    assert_eq!(r.status, 200);
    assert!(r.head.contains("application/json"), "{}", r.head);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(v["certificates"][0]["expiry"], "2030-03-17T17:46:40Z");
    assert_eq!(v["certificates"][0]["serial"], "0a:1b");

    assert_eq!(get(admin.addr, "/logging").await.status, 503);
    assert_eq!(get(admin.addr, "/quitquitquit").await.status, 405);
    assert!(!admin.quit.load(Ordering::SeqCst));
    assert_eq!(
        send(admin.addr, "POST", "/quitquitquit", None).await.status,
        200
    );
    assert!(admin.quit.load(Ordering::SeqCst));
    assert_eq!(get(admin.addr, "/stats").await.status, 404);

    let _ = admin.stop.send(());
    let done = tokio::time::timeout(DEADLINE, admin.task)
        .await
        .expect("stops");
    assert!(matches!(done, Ok(Ok(()))));
}

#[tokio::test]
async fn admin_refuses_a_non_loopback_listener() {
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let state = AdminState {
        config_dump: Arc::new(|| serde_json::Value::Null),
        logging: None,
        quit: Arc::new(|| {}),
    };
    let r = serve_admin(listener, state, std::future::pending()).await;
    assert!(matches!(r, Err(AdminError::NotLoopback(_))), "{r:?}");
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

// Current-thread runtime: the subscriber set with `set_default` covers the server's tasks too.
#[tokio::test(flavor = "current_thread")]
async fn logging_changes_the_level_at_runtime() {
    let buf = Buffer::default();
    let b = buf.clone();
    let (subscriber, handle) =
        logging::subscriber(LogFormat::Json, "info", move || b.clone(), false).expect("subscriber");
    let _guard = tracing::subscriber::set_default(subscriber);
    let admin = start_admin(Some(handle)).await;

    tracing::debug!(marker = "before", "hidden");
    assert!(!buf.text().contains("before"), "{}", buf.text());
    let r = get(admin.addr, "/logging").await;
    assert_eq!((r.status, r.body.as_str()), (200, "info\n"));

    let r = send(admin.addr, "POST", "/logging?level=debug", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "debug\n"));
    tracing::debug!(marker = "after", "shown");
    eventually("the debug line to be written", || {
        let t = buf.text();
        async move { t.contains("\"marker\":\"after\"") }
    })
    .await;
    let line = buf
        .text()
        .lines()
        .find(|l| l.contains("after"))
        .map(str::to_string);
    let v: serde_json::Value = serde_json::from_str(&line.expect("line")).expect("JSON log line");
    assert_eq!(v["level"], "DEBUG");

    let r = send(admin.addr, "POST", "/logging?level=not%3D%3Dvalid%5B", None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        get(admin.addr, "/logging").await.body,
        "debug\n",
        "a bad filter changes nothing"
    );
    assert_eq!(send(admin.addr, "POST", "/logging", None).await.status, 400);
    let _ = admin.stop.send(());
}

/// The dashboard queries only metrics the agent exports, and metrics.md documents every one.
#[test]
fn dashboard_and_docs_match_the_exposition() {
    let mut f = fixture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    crate::metrics::runtime::RuntimeCollector::register(f.registry.nodemesh(), rt.handle().clone());
    let l = traffic(Reporter::Destination);
    f.inbound.opened(&l).closed(1, 1);
    f.inbound.failed(&l);
    let text = f.registry.encode(Format::Prometheus);
    let mut exported = HashSet::new();
    for line in text.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            exported.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{s}"));
                }
            }
        }
    }
    let names = |doc: &str| -> HashSet<String> {
        doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| {
                ["istio_", "nodemesh_", "process_"]
                    .iter()
                    .any(|p| t.starts_with(p))
            })
            .map(str::to_string)
            .collect()
    };
    let dashboard = include_str!("../../../docs/grafana-dashboard.json");
    serde_json::from_str::<serde_json::Value>(dashboard).expect("dashboard is JSON");
    for name in names(dashboard) {
        assert!(
            exported.contains(&name),
            "the dashboard queries {name}, which is not exported"
        );
    }
    let docs = include_str!("../../../docs/metrics.md");
    for name in exported
        .iter()
        .filter(|n| !n.ends_with("_bucket") && !n.ends_with("_sum") && !n.ends_with("_count"))
    {
        assert!(
            docs.contains(name.as_str()),
            "docs/metrics.md does not mention {name}"
        );
    }
}

/// Shutdown stops accepting, closes idle keep-alive connections, lets a response that is being
/// sent finish (the client reads it slowly, after the shutdown began), and `serve` returns once
/// every connection is done.
#[tokio::test]
async fn shutdown_is_graceful() {
    let mut registry = MetricsRegistry::new(&BuildInfo::default());
    // About 2 MB of exposition, still being written when the shutdown begins.
    let big = prometheus_client::metrics::family::Family::<
        [(&str, String); 1],
        prometheus_client::metrics::counter::Counter,
    >::default();
    for i in 0..40_000 {
        big.get_or_create(&[("series", format!("s{i:06}"))]).inc();
    }
    registry.nodemesh().register("big", "Many series.", big);
    // A small send buffer (accepted sockets inherit it), so most of the body waits in the
    // server until the client reads.
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    socket.set_send_buffer_size(64 * 1024).expect("sndbuf");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    socket.listen(64).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    let listener = TcpListener::from_std(socket.into()).expect("listener");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = oneshot::channel();
    let state = StatsState {
        registry: Arc::new(registry).into(),
        readiness: Readiness::new(),
    };
    let mut task = tokio::spawn(serve_stats(listener, state, async {
        let _ = rx.await;
    }));
    // An idle keep-alive connection, after one answered request.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).ends_with("ok\n") {
        let n = tokio::time::timeout(DEADLINE, idle.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    // A large response, of which the client has read only the head.
    let mut busy = TcpStream::connect(addr).await.expect("connect");
    busy.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, busy.read(&mut buf[..1024]))
            .await
            .expect("head in time")
            .expect("read");
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }

    let _ = stop.send(());
    // New connections are refused once the listener is closed.
    let start = tokio::time::Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Queued in the backlog as the listener closed.
            Ok(_) | Err(_) => {
                assert!(start.elapsed() < DEADLINE, "still accepting after shutdown");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let finished_early = task.is_finished();
    // The idle connection is closed without another answer.
    let n = tokio::time::timeout(DEADLINE, idle.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the idle keep-alive connection is closed");
    // The response in flight arrives whole, then the connection closes.
    tokio::time::timeout(DEADLINE, busy.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    assert!(length > 1_000_000, "{length}");
    assert_eq!(body.len(), length, "the whole body arrived");
    assert!(body.contains("nodemesh_big_total{series=\"s039999\"} 1"));
    assert!(!finished_early, "serve waited for the response being sent");
    tokio::time::timeout(DEADLINE, &mut task)
        .await
        .expect("serve returns once the connections are done")
        .expect("no panic");
}
