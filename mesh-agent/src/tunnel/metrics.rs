//! Tunnel metrics with Istio's standard TCP names, so existing dashboards work, plus the
//! tunnel's own `nodemesh_*` handshake metrics.
//!
//! Each server (inbound, outbound) owns one [`TunnelMetrics`] (a cheap handle: clones share the
//! counters). The wiring registers every server's handle with [`TunnelMetrics::register`], which
//! adds one collector rendering each family once with the samples of all handles (inbound and
//! outbound differ by `reporter`, so their series never collide).
//!
//! Labels follow ztunnel's `CommonTrafficLabels`. What the tunnel knows today (principals,
//! destination service, security policy, response flags) is recorded; namespaces are derived
//! from the SPIFFE principal (`spiffe://<td>/ns/<ns>/sa/<sa>`) and the service hostname
//! (`<name>.<ns>.svc...`); workload and app names are `unknown` until the tunnel passes workload
//! metadata. Every value is bounded by the cluster's identities and services: no ports, no IPs.
//!
//! Invariant: recording takes a read lock on the label map and bumps atomics; only the first
//! connection of a new label set takes the write lock.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::metrics::{label, latency_buckets};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The outbound side (Istio: `source`).
    Source,
    /// The inbound side (Istio: `destination`).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Istio `response_flags` values the tunnel produces.
pub mod flags {
    /// No failure.
    pub const NONE: &str = "-";
    /// Denied by policy.
    pub const DENY: &str = "DENY";
    /// Could not connect upstream (pod, or the peer's HBONE listener).
    pub const CONNECT: &str = "CONNECT";
    /// Malformed request or unknown destination.
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    /// `spiffe://...` of the source, or `unknown`.
    pub source_principal: String,
    pub destination_principal: String,
    /// Service hostname when a service was addressed, else `unknown`.
    pub destination_service: String,
    /// `mutual_tls` or `none` (same node).
    pub connection_security_policy: &'static str,
    pub response_flags: &'static str,
}

/// `<ns>` of `spiffe://<td>/ns/<ns>/sa/<sa>`, else `unknown`.
fn principal_namespace(principal: &str) -> &str {
    principal
        .strip_prefix("spiffe://")
        .and_then(|rest| {
            let mut parts = rest.split('/');
            let _trust_domain = parts.next()?;
            (parts.next()? == "ns").then(|| parts.next()).flatten()
        })
        .filter(|ns| !ns.is_empty())
        .unwrap_or("unknown")
}

/// `(<name>, <ns>)` of a `<name>.<ns>.svc...` hostname, else `unknown`s.
fn service_name_namespace(host: &str) -> (&str, &str) {
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc")) if !name.is_empty() && !ns.is_empty() => (name, ns),
        _ => ("unknown", "unknown"),
    }
}

impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (svc_name, svc_ns) = service_name_namespace(&self.destination_service);
        let pairs: [(&str, &str); 14] = [
            ("reporter", self.reporter.as_str()),
            ("source_workload", "unknown"),
            (
                "source_workload_namespace",
                principal_namespace(&self.source_principal),
            ),
            ("source_principal", &self.source_principal),
            ("source_app", "unknown"),
            ("destination_workload", "unknown"),
            (
                "destination_workload_namespace",
                principal_namespace(&self.destination_principal),
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", "unknown"),
            ("destination_service", &self.destination_service),
            ("destination_service_name", svc_name),
            ("destination_service_namespace", svc_ns),
            ("request_protocol", "tcp"),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ];
        for (k, v) in pairs {
            label(encoder, k, v)?;
        }
        label(encoder, "response_flags", self.response_flags)
    }
}

/// A snapshot of one label set's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

#[derive(Debug, Default)]
struct LiveCounters {
    opened: Counter,
    closed: Counter,
    failed: Counter,
    sent_bytes: Counter,
    received_bytes: Counter,
}

impl LiveCounters {
    fn snapshot(&self) -> TcpCounters {
        TcpCounters {
            opened: self.opened.get(),
            closed: self.closed.get(),
            failed: self.failed.get(),
            sent_bytes: self.sent_bytes.get(),
            received_bytes: self.received_bytes.get(),
        }
    }
}

type Traffic = RwLock<HashMap<TrafficLabels, Arc<LiveCounters>>>;

/// One server's Istio TCP counters. Clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct TunnelMetrics {
    traffic: Arc<Traffic>,
}

/// The Istio families: OpenMetrics name (the encoder adds `_total`), help, value.
type IstioFamily = (&'static str, &'static str, fn(&TcpCounters) -> u64);
const ISTIO_FAMILIES: [IstioFamily; 5] = [
    (
        "istio_tcp_connections_opened",
        "TCP connections opened.",
        |c| c.opened,
    ),
    (
        "istio_tcp_connections_closed",
        "TCP connections closed.",
        |c| c.closed,
    ),
    (
        "istio_tcp_connections_failed",
        "TCP connections that failed before being established.",
        |c| c.failed,
    ),
    (
        "istio_tcp_sent_bytes",
        "Bytes sent toward the destination workload.",
        |c| c.sent_bytes,
    ),
    (
        "istio_tcp_received_bytes",
        "Bytes received from the destination workload.",
        |c| c.received_bytes,
    ),
];

impl TunnelMetrics {
    fn with(&self, labels: &TrafficLabels, f: impl FnOnce(&LiveCounters)) {
        {
            let t = self.traffic.read().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = t.get(labels) {
                f(c);
                return;
            }
        }
        let mut t = self.traffic.write().unwrap_or_else(|p| p.into_inner());
        f(t.entry(labels.clone()).or_default());
    }

    /// A connection was established end to end.
    pub fn opened(&self, labels: &TrafficLabels) {
        self.with(labels, |c| {
            c.opened.inc();
        });
    }

    /// An established connection ended, having moved these bytes (sent = toward the
    /// destination workload, received = back from it, as Istio).
    pub fn closed(&self, labels: &TrafficLabels, sent: u64, received: u64) {
        self.with(labels, |c| {
            c.closed.inc();
            c.sent_bytes.inc_by(sent);
            c.received_bytes.inc_by(received);
        });
    }

    /// A connection failed before it was established (denied, unreachable, malformed).
    pub fn failed(&self, labels: &TrafficLabels) {
        self.with(labels, |c| {
            c.failed.inc();
        });
    }

    pub fn get(&self, labels: &TrafficLabels) -> TcpCounters {
        self.traffic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(labels)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    /// The counters summed over every label set.
    pub fn totals(&self) -> TcpCounters {
        self.snapshot()
            .values()
            .fold(TcpCounters::default(), |a, c| TcpCounters {
                opened: a.opened + c.opened,
                closed: a.closed + c.closed,
                failed: a.failed + c.failed,
                sent_bytes: a.sent_bytes + c.sent_bytes,
                received_bytes: a.received_bytes + c.received_bytes,
            })
    }

    /// Number of label sets (series per family) recorded so far.
    pub fn series(&self) -> usize {
        self.traffic.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn snapshot(&self) -> BTreeMap<TrafficLabels, TcpCounters> {
        self.traffic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(l, c)| (l.clone(), c.snapshot()))
            .collect()
    }

    /// Registers the Istio TCP families of all these servers (normally outbound and inbound) in
    /// `registry` (unprefixed: the names are Istio's).
    pub fn register(registry: &mut Registry, servers: impl IntoIterator<Item = TunnelMetrics>) {
        registry.register_collector(Box::new(IstioTcpCollector {
            servers: servers.into_iter().collect(),
        }));
    }

    /// This server's families alone, Prometheus text format (for logs and tests; the endpoint
    /// serves the whole registry).
    pub fn render(&self) -> String {
        let mut r = Registry::default();
        Self::register(&mut r, [self.clone()]);
        crate::metrics::encode_registry(&r, crate::metrics::Format::Prometheus)
    }
}

#[derive(Debug)]
struct IstioTcpCollector {
    servers: Vec<TunnelMetrics>,
}

impl Collector for IstioTcpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut all = BTreeMap::new();
        for s in &self.servers {
            all.extend(s.snapshot());
        }
        if all.is_empty() {
            return Ok(());
        }
        for (name, help, value) in ISTIO_FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, counters) in &all {
                ConstCounter::new(value(counters)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// Which side of the tunnel a handshake or connect concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Why a TLS handshake failed: a closed set, so the label stays bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The deadline (`TunnelConfig::handshake_timeout`) passed.
    Timeout,
    /// The peer's certificate does not chain to a trusted root.
    UntrustedChain,
    /// The peer's certificate is in another trust domain.
    ForeignTrustDomain,
    /// The peer's certificate expired (or is not valid yet).
    Expired,
    /// The peer's certificate was rejected for another reason (identity, SAN, encoding).
    BadCertificate,
    /// The peer presented no certificate.
    NoCertificate,
    /// No certificate for the local identity (not yet issued).
    NoLocalCertificate,
    /// TLS protocol error (version, ALPN, malformed records).
    Protocol,
    /// The TCP connection failed or closed mid-handshake.
    Io,
}

impl HandshakeFailure {
    fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::UntrustedChain => "untrusted_chain",
            HandshakeFailure::ForeignTrustDomain => "foreign_trust_domain",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::NoLocalCertificate => "no_local_certificate",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }
}

impl HandshakeFailure {
    /// Classifies a TLS handshake error (as returned by `tokio_rustls`) into a bounded reason.
    pub fn of_tls_error(e: &std::io::Error) -> Self {
        use crate::identity::tls::{PeerCertError, peer_cert_error};
        use rustls::CertificateError as C;
        if let Some(p) = peer_cert_error(e) {
            return match p {
                PeerCertError::WrongTrustDomain { .. } => HandshakeFailure::ForeignTrustDomain,
                PeerCertError::Expired(_) | PeerCertError::NotYetValid(_) => {
                    HandshakeFailure::Expired
                }
                PeerCertError::Untrusted(_) => HandshakeFailure::UntrustedChain,
                _ => HandshakeFailure::BadCertificate,
            };
        }
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure::NoCertificate,
            Some(rustls::Error::InvalidCertificate(c)) => match c {
                C::UnknownIssuer | C::BadSignature => HandshakeFailure::UntrustedChain,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => HandshakeFailure::Expired,
                _ => HandshakeFailure::BadCertificate,
            },
            Some(_) => HandshakeFailure::Protocol,
            None if e.kind() == std::io::ErrorKind::InvalidData => HandshakeFailure::Protocol,
            None => HandshakeFailure::Io,
        }
    }
}

type DirectionLabel = [(&'static str, &'static str); 1];
type FailureLabels = [(&'static str, &'static str); 2];

/// TLS handshakes and connect latency (`nodemesh_tls_*`, `nodemesh_connect_duration_seconds`).
///
/// Passed to the tunnel in `TunnelConfig::handshake_metrics` (clones share the series). Recorded
/// at the inbound TLS accept (`tunnel/inbound.rs`, around `TlsAcceptor::accept`) and the pool's
/// TLS connect (`tunnel/pool.rs`) call [`HandshakeMetrics::handshake`] /
/// [`HandshakeMetrics::handshake_failed`]; the inbound connect to the local pod and the
/// outbound `CONNECT` round trip call [`HandshakeMetrics::connected`].
#[derive(Clone, Debug)]
pub struct HandshakeMetrics {
    handshakes: Family<DirectionLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    handshake_seconds: Family<DirectionLabel, Histogram>,
    connect_seconds: Family<DirectionLabel, Histogram>,
}

impl Default for HandshakeMetrics {
    fn default() -> Self {
        let histogram = || Histogram::new(latency_buckets());
        Self {
            handshakes: Family::default(),
            failures: Family::default(),
            handshake_seconds: Family::new_with_constructor(histogram),
            connect_seconds: Family::new_with_constructor(histogram),
        }
    }
}

impl HandshakeMetrics {
    /// Creates the metrics and registers them in `registry` (the `nodemesh` sub-registry).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tls_handshakes",
            "Completed TLS handshakes by direction",
            m.handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by direction and reason",
            m.failures.clone(),
        );
        registry.register(
            "tls_handshake_duration_seconds",
            "TLS handshake latency (TCP connect excluded)",
            m.handshake_seconds.clone(),
        );
        registry.register(
            "connect_duration_seconds",
            "Time to reach the destination: inbound, TCP connect to the local pod; outbound, \
             CONNECT request to response",
            m.connect_seconds.clone(),
        );
        m
    }

    pub fn handshake(&self, direction: Direction, seconds: f64) {
        let l = [("direction", direction.as_str())];
        self.handshakes.get_or_create(&l).inc();
        self.handshake_seconds.get_or_create(&l).observe(seconds);
    }

    pub fn handshake_failed(&self, direction: Direction, reason: HandshakeFailure) {
        self.failures
            .get_or_create(&[
                ("direction", direction.as_str()),
                ("reason", reason.as_str()),
            ])
            .inc();
    }

    /// Completed handshakes so far (tests).
    pub fn handshakes(&self, direction: Direction) -> u64 {
        self.handshakes
            .get_or_create(&[("direction", direction.as_str())])
            .get()
    }

    /// Failed handshakes so far for this reason (tests).
    pub fn failures(&self, direction: Direction, reason: HandshakeFailure) -> u64 {
        self.failures
            .get_or_create(&[
                ("direction", direction.as_str()),
                ("reason", reason.as_str()),
            ])
            .get()
    }

    pub fn connected(&self, direction: Direction, seconds: f64) {
        self.connect_seconds
            .get_or_create(&[("direction", direction.as_str())])
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(reporter: Reporter) -> TrafficLabels {
        TrafficLabels {
            reporter,
            source_principal: "spiffe://td/ns/a/sa/b".into(),
            destination_principal: "we\"ird".into(),
            destination_service: "web.shop.svc.cluster.local".into(),
            connection_security_policy: "mutual_tls",
            response_flags: flags::NONE,
        }
    }

    #[test]
    fn renders_istio_names_and_escapes_labels() {
        let m = TunnelMetrics::default();
        let l = labels(Reporter::Destination);
        m.opened(&l);
        m.closed(&l, 10, 20);
        let text = m.render();
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened_total counter"),
            "{text}"
        );
        assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"a\",source_principal=\"spiffe://td/ns/a/sa/b\""), "{text}");
        assert!(
            text.contains("destination_principal=\"we\\\"ird\""),
            "{text}"
        );
        assert!(
            text.contains(
                "destination_service_name=\"web\",destination_service_namespace=\"shop\""
            ),
            "{text}"
        );
        assert!(text.contains("} 20\n"), "{text}");
        assert_eq!(m.get(&l).closed, 1);
    }

    #[test]
    fn one_family_for_both_servers() {
        let (inbound, outbound) = (TunnelMetrics::default(), TunnelMetrics::default());
        inbound.opened(&labels(Reporter::Destination));
        outbound.opened(&labels(Reporter::Source));
        let mut r = Registry::default();
        TunnelMetrics::register(&mut r, [inbound, outbound]);
        let text = crate::metrics::encode_registry(&r, crate::metrics::Format::Prometheus);
        assert_eq!(
            text.matches("# TYPE istio_tcp_connections_opened_total")
                .count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("\nistio_tcp_connections_opened_total{")
                .count(),
            2,
            "{text}"
        );
    }

    #[test]
    fn namespaces_from_principal_and_host() {
        assert_eq!(principal_namespace("spiffe://td/ns/x/sa/y"), "x");
        assert_eq!(principal_namespace("unknown"), "unknown");
        assert_eq!(principal_namespace("spiffe://td/other"), "unknown");
        assert_eq!(service_name_namespace("a.b.svc.cluster.local"), ("a", "b"));
        assert_eq!(service_name_namespace("unknown"), ("unknown", "unknown"));
    }
}
