//! Tunnel metrics with Istio's standard TCP names, so existing dashboards work.
//!
//! Each server (inbound, outbound) owns one [`TunnelMetrics`]; the admin server renders them
//! with [`TunnelMetrics::render`] (Prometheus text format). Labels are a subset of Istio's
//! (`reporter`, principals, destination service, security policy, response flags); values that
//! are not known are `unknown`, as in Istio.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write,
    sync::Mutex,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The outbound side (Istio: `source`).
    Source,
    /// The inbound side (Istio: `destination`).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

#[derive(Debug, Default)]
pub struct TunnelMetrics {
    traffic: Mutex<HashMap<TrafficLabels, TcpCounters>>,
}

impl TunnelMetrics {
    fn with(&self, labels: &TrafficLabels, f: impl FnOnce(&mut TcpCounters)) {
        let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = t.get_mut(labels) {
            f(c);
        } else {
            f(t.entry(labels.clone()).or_default());
        }
    }

    /// A connection was established end to end.
    pub fn opened(&self, labels: &TrafficLabels) {
        self.with(labels, |c| c.opened += 1);
    }

    /// An established connection ended, having moved these bytes (sent = toward the
    /// destination workload, received = back from it, as Istio).
    pub fn closed(&self, labels: &TrafficLabels, sent: u64, received: u64) {
        self.with(labels, |c| {
            c.closed += 1;
            c.sent_bytes += sent;
            c.received_bytes += received;
        });
    }

    /// A connection failed before it was established (denied, unreachable, malformed).
    pub fn failed(&self, labels: &TrafficLabels) {
        self.with(labels, |c| c.failed += 1);
    }

    pub fn get(&self, labels: &TrafficLabels) -> TcpCounters {
        self.traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(labels)
            .copied()
            .unwrap_or_default()
    }

    /// Prometheus text format, families in a stable order.
    pub fn render(&self) -> String {
        let t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        let sorted: BTreeMap<&TrafficLabels, &TcpCounters> = t.iter().collect();
        type Family = (&'static str, &'static str, fn(&TcpCounters) -> u64);
        let families: [Family; 5] = [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                |c| c.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                |c| c.closed,
            ),
            (
                "istio_tcp_connections_failed_total",
                "TCP connections that failed before being established",
                |c| c.failed,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent toward the destination workload",
                |c| c.sent_bytes,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the destination workload",
                |c| c.received_bytes,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (l, c) in &sorted {
                let _ = writeln!(
                    out,
                    "{name}{{reporter=\"{}\",source_principal=\"{}\",destination_principal=\"{}\",\
                     destination_service=\"{}\",connection_security_policy=\"{}\",response_flags=\"{}\"}} {}",
                    l.reporter.as_str(),
                    escape(&l.source_principal),
                    escape(&l.destination_principal),
                    escape(&l.destination_service),
                    l.connection_security_policy,
                    l.response_flags,
                    value(c)
                );
            }
        }
        out
    }
}

/// Prometheus label value escaping.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_names_and_escapes_labels() {
        let m = TunnelMetrics::default();
        let l = TrafficLabels {
            reporter: Reporter::Destination,
            source_principal: "spiffe://td/ns/a/sa/b".into(),
            destination_principal: "we\"ird".into(),
            destination_service: "unknown".into(),
            connection_security_policy: "mutual_tls",
            response_flags: flags::NONE,
        };
        m.opened(&l);
        m.closed(&l, 10, 20);
        let text = m.render();
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened_total counter"),
            "{text}"
        );
        assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"destination\",source_principal=\"spiffe://td/ns/a/sa/b\",destination_principal=\"we\\\"ird\""), "{text}");
        assert!(text.contains("} 20\n"), "{text}");
        assert_eq!(m.get(&l).closed, 1);
    }
}
