//! Tunnel metrics with Istio's standard TCP names, so existing dashboards work, plus the
//! tunnel's own `nodemesh_*` handshake metrics.
//!
//! Each server (inbound, outbound) owns one [`TunnelMetrics`] (a cheap handle: clones share the
//! counters). The wiring registers every server's handle with [`TunnelMetrics::register`], which
//! adds one collector rendering each family once with the samples of all handles (inbound and
//! outbound differ by `reporter`, so their series never collide).
//!
//! Labels follow ztunnel's `CommonTrafficLabels`. The servers record what they know
//! (principals, destination service, security policy, response flags) plus two lookup hints,
//! the source and destination pod addresses ([`TrafficLabels::source_addr`],
//! [`TrafficLabels::destination_addr`]). [`TunnelMetrics`] resolves the hints through the
//! [`WorkloadDirectory`] the wiring installs ([`TunnelMetrics::set_directory`]) into each side's
//! workload name, namespace, app and canonical service/revision ([`WorkloadMeta`], Istio's
//! conventions), then drops them: no address ever becomes a label. A workload is used only if
//! its identity is that side's principal (a stale address, or a `forwarded` header naming
//! someone else, gives `unknown`); a destination service is kept only if the directory knows
//! the hostname. Without a workload, namespaces come from the SPIFFE principal
//! (`spiffe://<td>/ns/<ns>/sa/<sa>`) and the service hostname (`<name>.<ns>.svc...`). Every value
//! is bounded by the cluster's workloads, identities and services: no ports, no IPs.
//!
//! Invariant: recording resolves the key (two directory lookups), takes a read lock on the label
//! map and bumps atomics; only the first connection of a new label set takes the write lock.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
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
    /// Lookup hint, never a label: the source pod's address, resolved to its workload.
    pub source_addr: Option<IpAddr>,
    /// Lookup hint, never a label: the destination pod's address.
    pub destination_addr: Option<IpAddr>,
}

/// A workload as Istio's traffic labels describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadMeta {
    /// The SPIFFE ID it runs as; a hint resolves to this workload only for this principal.
    pub identity: String,
    /// `*_workload`: the workload's name.
    pub name: String,
    /// `*_workload_namespace`.
    pub namespace: String,
    /// `*_canonical_service` and `*_app` (ztunnel reports the canonical name as the app).
    pub canonical_service: String,
    /// `*_canonical_revision`.
    pub canonical_revision: String,
}

impl WorkloadMeta {
    /// Istio's canonical name and revision from the workload's labels: the name is
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the
    /// workload's name; the revision is `service.istio.io/canonical-revision`, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn from_labels(
        identity: String,
        name: String,
        namespace: String,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
        };
        let canonical_service = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| name.clone());
        let canonical_revision = first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned());
        Self {
            identity,
            name,
            namespace,
            canonical_service,
            canonical_revision,
        }
    }
}

/// The cluster as the traffic labels need it; implemented by the wiring over its model.
pub trait WorkloadDirectory: Send + Sync {
    /// The workload owning `ip` (IPv4-mapped IPv6 addresses included), if any.
    fn workload(&self, ip: IpAddr) -> Option<Arc<WorkloadMeta>>;
    /// Whether `hostname` is a service of the mesh.
    fn is_service(&self, hostname: &str) -> bool;
}

/// What a series is keyed and rendered by: the labels without hints, plus each side's workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SeriesKey {
    labels: TrafficLabels,
    source: Option<Arc<WorkloadMeta>>,
    destination: Option<Arc<WorkloadMeta>>,
}

const UNKNOWN: &str = "unknown";

impl SeriesKey {
    fn resolve(labels: &TrafficLabels, directory: Option<&dyn WorkloadDirectory>) -> Self {
        let mut labels = labels.clone();
        let (src, dst) = (labels.source_addr.take(), labels.destination_addr.take());
        let Some(dir) = directory else {
            return Self {
                labels,
                source: None,
                destination: None,
            };
        };
        let lookup = |ip: Option<IpAddr>, principal: &str| {
            ip.and_then(|ip| dir.workload(ip))
                .filter(|w| w.identity == principal)
        };
        let source = lookup(src, &labels.source_principal);
        let destination = lookup(dst, &labels.destination_principal);
        if labels.destination_service != UNKNOWN && !dir.is_service(&labels.destination_service) {
            labels.destination_service = UNKNOWN.to_owned();
        }
        Self {
            labels,
            source,
            destination,
        }
    }
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

/// The `host=` of a `forwarded` header (the service the source addressed), if present.
pub fn forwarded_host(value: &str) -> Option<String> {
    value.split(';').find_map(|part| {
        let h = part.trim().strip_prefix("host=")?.trim_matches('"');
        (!h.is_empty()).then(|| h.to_owned())
    })
}

/// `(<name>, <ns>)` of a `<name>.<ns>.svc...` hostname, else `unknown`s.
fn service_name_namespace(host: &str) -> (&str, &str) {
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc")) if !name.is_empty() && !ns.is_empty() => (name, ns),
        _ => ("unknown", "unknown"),
    }
}

impl EncodeLabelSet for SeriesKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let l = &self.labels;
        let (svc_name, svc_ns) = service_name_namespace(&l.destination_service);
        let side = |w: &Option<Arc<WorkloadMeta>>, principal: &str| -> [String; 4] {
            match w {
                Some(w) => [
                    w.name.clone(),
                    w.namespace.clone(),
                    w.canonical_service.clone(),
                    w.canonical_revision.clone(),
                ],
                None => [
                    UNKNOWN.to_owned(),
                    principal_namespace(principal).to_owned(),
                    UNKNOWN.to_owned(),
                    UNKNOWN.to_owned(),
                ],
            }
        };
        let [src_wl, src_ns, src_svc, src_rev] = side(&self.source, &l.source_principal);
        let [dst_wl, dst_ns, dst_svc, dst_rev] = side(&self.destination, &l.destination_principal);
        let pairs: [(&str, &str); 19] = [
            ("reporter", l.reporter.as_str()),
            ("source_workload", &src_wl),
            ("source_canonical_service", &src_svc),
            ("source_canonical_revision", &src_rev),
            ("source_workload_namespace", &src_ns),
            ("source_principal", &l.source_principal),
            ("source_app", &src_svc),
            ("destination_workload", &dst_wl),
            ("destination_canonical_service", &dst_svc),
            ("destination_canonical_revision", &dst_rev),
            ("destination_workload_namespace", &dst_ns),
            ("destination_principal", &l.destination_principal),
            ("destination_app", &dst_svc),
            ("destination_service", &l.destination_service),
            ("destination_service_name", svc_name),
            ("destination_service_namespace", svc_ns),
            ("request_protocol", "tcp"),
            ("connection_security_policy", l.connection_security_policy),
            ("response_flags", l.response_flags),
        ];
        for (k, v) in pairs {
            label(encoder, k, v)?;
        }
        Ok(())
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

type Traffic = RwLock<HashMap<SeriesKey, Arc<LiveCounters>>>;
type Directory = RwLock<Option<Arc<dyn WorkloadDirectory>>>;

/// The counters of one established connection's series ([`TunnelMetrics::opened`]).
#[derive(Clone, Debug)]
pub struct Series(Arc<LiveCounters>);

impl Series {
    /// The connection ended, having moved these bytes (sent = toward the destination
    /// workload, received = back from it, as Istio).
    pub fn closed(&self, sent: u64, received: u64) {
        self.0.closed.inc();
        self.0.sent_bytes.inc_by(sent);
        self.0.received_bytes.inc_by(received);
    }
}

/// One server's Istio TCP counters. Clones share the counters and the directory.
#[derive(Clone, Default)]
pub struct TunnelMetrics {
    traffic: Arc<Traffic>,
    directory: Arc<Directory>,
}

impl std::fmt::Debug for TunnelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelMetrics")
            .field("series", &self.series())
            .finish_non_exhaustive()
    }
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
    /// Resolves the address hints of every later recording through `directory` (this handle
    /// and its clones). Until then, workload labels are `unknown`.
    pub fn set_directory(&self, directory: Arc<dyn WorkloadDirectory>) {
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = Some(directory);
    }

    fn key(&self, labels: &TrafficLabels) -> SeriesKey {
        let dir = self
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        SeriesKey::resolve(labels, dir.as_deref())
    }

    fn live(&self, labels: &TrafficLabels) -> Arc<LiveCounters> {
        let key = self.key(labels);
        {
            let t = self.traffic.read().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = t.get(&key) {
                return c.clone();
            }
        }
        let mut t = self.traffic.write().unwrap_or_else(|p| p.into_inner());
        t.entry(key).or_default().clone()
    }

    /// A connection was established end to end. The returned series records its close
    /// ([`Series::closed`]) without resolving the labels again (they do not change while the
    /// connection lives).
    pub fn opened(&self, labels: &TrafficLabels) -> Series {
        let series = self.live(labels);
        series.opened.inc();
        Series(series)
    }

    /// A connection failed before it was established (denied, unreachable, malformed).
    pub fn failed(&self, labels: &TrafficLabels) {
        self.live(labels).failed.inc();
    }

    /// The counters of the series `labels` records into (hints resolved as when recording).
    pub fn get(&self, labels: &TrafficLabels) -> TcpCounters {
        let key = self.key(labels);
        self.traffic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
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

    fn snapshot(&self) -> BTreeMap<SeriesKey, TcpCounters> {
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
            source_addr: None,
            destination_addr: None,
        }
    }

    #[test]
    fn renders_istio_names_and_escapes_labels() {
        let m = TunnelMetrics::default();
        let l = labels(Reporter::Destination);
        m.opened(&l).closed(10, 20);
        let text = m.render();
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened_total counter"),
            "{text}"
        );
        assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"destination\",source_workload=\"unknown\",source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",source_workload_namespace=\"a\",source_principal=\"spiffe://td/ns/a/sa/b\""), "{text}");
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

    struct Dir(HashMap<IpAddr, Arc<WorkloadMeta>>);

    impl WorkloadDirectory for Dir {
        fn workload(&self, ip: IpAddr) -> Option<Arc<WorkloadMeta>> {
            self.0.get(&ip.to_canonical()).cloned()
        }
        fn is_service(&self, hostname: &str) -> bool {
            hostname == "web.shop.svc.cluster.local"
        }
    }

    fn meta(sa: &str, name: &str, labels: &[(&str, &str)]) -> Arc<WorkloadMeta> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(WorkloadMeta::from_labels(
            format!("spiffe://td/ns/shop/sa/{sa}"),
            name.into(),
            "shop".into(),
            &labels,
        ))
    }

    #[test]
    fn canonical_names_follow_istio_precedence() {
        let m = meta("x", "wl", &[]);
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("wl", "latest")
        );
        let m = meta("x", "wl", &[("app", "a"), ("version", "v1")]);
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("a", "v1")
        );
        let m = meta(
            "x",
            "wl",
            &[
                ("app", "a"),
                ("app.kubernetes.io/name", "k"),
                ("app.kubernetes.io/version", "2"),
                ("version", "v1"),
            ],
        );
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("k", "2")
        );
        let m = meta(
            "x",
            "wl",
            &[
                ("app.kubernetes.io/name", "k"),
                ("service.istio.io/canonical-name", "c"),
                ("service.istio.io/canonical-revision", "r"),
            ],
        );
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("c", "r")
        );
    }

    #[test]
    fn hints_resolve_to_workload_labels_and_never_to_addresses() {
        let client = meta(
            "client",
            "client-v1",
            &[("app", "client"), ("version", "v1")],
        );
        let server = meta("server", "server", &[("app.kubernetes.io/name", "web")]);
        let dir = Dir(HashMap::from([
            (IpAddr::from([10, 0, 0, 1]), client.clone()),
            (IpAddr::from([10, 0, 0, 2]), client.clone()),
            (IpAddr::from([10, 0, 1, 1]), server.clone()),
        ]));
        let m = TunnelMetrics::default();
        m.set_directory(Arc::new(dir));
        let from = |src: [u8; 4], dst: [u8; 4]| TrafficLabels {
            reporter: Reporter::Source,
            source_principal: client.identity.clone(),
            destination_principal: server.identity.clone(),
            destination_service: "web.shop.svc.cluster.local".into(),
            connection_security_policy: "mutual_tls",
            response_flags: flags::NONE,
            source_addr: Some(src.into()),
            destination_addr: Some(dst.into()),
        };
        // Two replicas of the client, v4 and v4-mapped: one series.
        m.opened(&from([10, 0, 0, 1], [10, 0, 1, 1]));
        let mut mapped = from([10, 0, 0, 2], [10, 0, 1, 1]);
        mapped.source_addr = Some("::ffff:10.0.0.2".parse().expect("ip"));
        m.opened(&mapped);
        assert_eq!(m.series(), 1);
        assert_eq!(m.get(&from([10, 0, 0, 1], [10, 0, 1, 1])).opened, 2);
        let text = m.render();
        for want in [
            "source_workload=\"client-v1\"",
            "source_canonical_service=\"client\"",
            "source_canonical_revision=\"v1\"",
            "source_workload_namespace=\"shop\"",
            "source_app=\"client\"",
            "destination_workload=\"server\"",
            "destination_canonical_service=\"web\"",
            "destination_canonical_revision=\"latest\"",
            "destination_app=\"web\"",
            "destination_service=\"web.shop.svc.cluster.local\"",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert!(
            !text.contains("10.0."),
            "an address leaked into a label:\n{text}"
        );

        // An address whose workload runs as someone else (stale, or a forged `forwarded`
        // header) and a hostname the directory does not know resolve to `unknown`.
        let mut forged = from([10, 0, 1, 1], [10, 0, 0, 1]);
        forged.reporter = Reporter::Destination;
        forged.destination_service = "evil.example".into();
        m.failed(&forged);
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_failed_total{reporter=\"destination\""))
            .expect("failed series");
        assert!(line.contains("source_workload=\"unknown\""), "{line}");
        assert!(line.contains("destination_workload=\"unknown\""), "{line}");
        assert!(line.contains("destination_service=\"unknown\""), "{line}");
        assert!(
            line.contains("source_workload_namespace=\"shop\""),
            "from the principal: {line}"
        );
        assert!(line.ends_with("} 1"), "{line}");
    }

    #[test]
    fn namespaces_from_principal_and_host() {
        assert_eq!(principal_namespace("spiffe://td/ns/x/sa/y"), "x");
        assert_eq!(principal_namespace("unknown"), "unknown");
        assert_eq!(principal_namespace("spiffe://td/other"), "unknown");
        assert_eq!(service_name_namespace("a.b.svc.cluster.local"), ("a", "b"));
        assert_eq!(service_name_namespace("unknown"), ("unknown", "unknown"));
        assert_eq!(
            forwarded_host("for=\"10.0.0.1:4\";host=web.shop.svc.cluster.local").as_deref(),
            Some("web.shop.svc.cluster.local")
        );
        assert_eq!(forwarded_host("for=\"10.0.0.1:4\""), None);
        assert_eq!(forwarded_host("for=\"10.0.0.1:4\";host="), None);
    }
}
