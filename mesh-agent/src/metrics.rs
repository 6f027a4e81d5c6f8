//! The agent's metrics registry, on `prometheus-client`.
//!
//! One [`MetricsRegistry`] per process. Each component owns its metrics and registers them in a
//! sub-registry: [`MetricsRegistry::istio`] (unprefixed, Istio's names: the tunnel's
//! `istio_tcp_*`), [`MetricsRegistry::nodemesh`] (`nodemesh_` prefix). The root holds the
//! process metrics ([`process`], read from `/proc/self` at scrape time) and
//! `nodemesh_build_info`. Values owned by lower layers (eBPF counters, certificate expiry) are
//! read at scrape time through functions ([`datapath`], [`agent::CertExpiry`]), so this module
//! depends on none of them.
//!
//! Encoding: `prometheus-client` writes OpenMetrics text; [`Format::Prometheus`] converts it to
//! the Prometheus text format 0.0.4 (counters' `# TYPE` names end `_total`, no `# UNIT`, no
//! `# EOF`, `info` becomes a gauge), which is what a scraper gets unless its `Accept` asks for
//! `application/openmetrics-text`.

pub mod agent;
pub mod datapath;
pub mod process;
pub mod runtime;

use std::{
    fmt::Write as _,
    sync::{Arc, RwLock},
};

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder},
    metrics::info::Info,
    registry::Registry,
};

/// Exposition format, chosen from the request's `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (`text/plain`).
    Prometheus,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `Accept` names `application/openmetrics-text`, else Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// What `nodemesh_build_info` reports.
#[derive(Clone, Debug)]
pub struct BuildInfo {
    pub version: String,
    /// Git revision, or `unknown`.
    pub revision: String,
}

impl Default for BuildInfo {
    fn default() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: option_env!("NODEMESH_GIT_REVISION")
                .unwrap_or("unknown")
                .to_string(),
        }
    }
}

/// The process-wide registry. Build it at start, let components register, then share it
/// (`Arc<MetricsRegistry>`) with the stats server; registration needs `&mut`, scraping `&`.
#[derive(Debug)]
pub struct MetricsRegistry {
    root: Registry,
}

impl MetricsRegistry {
    /// A root registry holding the process metrics and `nodemesh_build_info`.
    pub fn new(build: &BuildInfo) -> Self {
        let mut root = Registry::default();
        root.register(
            "nodemesh_build",
            "nodemesh agent build",
            Info::new(vec![
                ("version", build.version.clone()),
                ("revision", build.revision.clone()),
            ]),
        );
        root.register_collector(Box::new(process::ProcessCollector));
        Self { root }
    }

    /// A new unprefixed sub-registry, for metrics that keep Istio's names.
    pub fn istio(&mut self) -> &mut Registry {
        self.root.sub_registry_with_labels(std::iter::empty())
    }

    /// A new sub-registry whose metric names get the `nodemesh_` prefix. Call once per component.
    pub fn nodemesh(&mut self) -> &mut Registry {
        self.root.sub_registry_with_prefix("nodemesh")
    }

    /// The whole exposition.
    pub fn encode(&self, format: Format) -> String {
        encode_registry(&self.root, format)
    }
}

/// The registry the stats server reads, replaceable while it serves: the agent starts serving
/// `/healthz` and `/readyz` with a bootstrap registry (build and process metrics) before its
/// components exist, then swaps in the full one. Clones share the slot.
#[derive(Clone, Debug)]
pub struct SharedRegistry(Arc<RwLock<Arc<MetricsRegistry>>>);

impl SharedRegistry {
    pub fn new(registry: MetricsRegistry) -> Self {
        Arc::new(registry).into()
    }

    /// Serves `registry` from the next scrape on.
    pub fn replace(&self, registry: MetricsRegistry) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(registry);
    }

    /// The whole exposition of the current registry.
    pub fn encode(&self, format: Format) -> String {
        let current = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        current.encode(format)
    }
}

impl From<Arc<MetricsRegistry>> for SharedRegistry {
    fn from(registry: Arc<MetricsRegistry>) -> Self {
        Self(Arc::new(RwLock::new(registry)))
    }
}

/// Encodes any registry. Writing to a `String` cannot fail, and no encoder of ours returns an
/// error, so a failure leaves what was written so far (and is logged).
pub fn encode_registry(registry: &Registry, format: Format) -> String {
    let mut om = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut om, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    match format {
        Format::OpenMetrics => om,
        Format::Prometheus => to_prometheus_text(&om),
    }
}

/// OpenMetrics text → Prometheus text 0.0.4, line by line. A family's `# HELP` precedes its
/// `# TYPE`, so the help line is held until the type says how to rename it.
fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some((_, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Latency buckets in seconds, 0.5 ms to 10 s: a same-node connect takes well under a
/// millisecond, a cross-node TLS handshake a few; the top bounds the tunnel's 10 s timeouts.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

/// A label value written with the text format's escapes (`prometheus-client` writes values
/// verbatim). Use it for values that come from outside (identities, hostnames).
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Writes one label, its value escaped.
pub fn label(encoder: &mut LabelSetEncoder, key: &str, value: &str) -> Result<(), std::fmt::Error> {
    (key, Escaped(value)).encode(encoder.encode_label())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
    }

    #[test]
    fn prometheus_text_renames_counters_and_info() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total 3\n# HELP x_build Build.\n\
                  # TYPE x_build info\nx_build_info{v=\"1\"} 1\n# HELP d_seconds D.\n\
                  # TYPE d_seconds gauge\n# UNIT d_seconds seconds\nd_seconds 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total 3\n\
             # HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{v=\"1\"} 1\n\
             # HELP d_seconds D.\n# TYPE d_seconds gauge\nd_seconds 2\n"
        );
    }

    #[test]
    fn root_registry_has_build_and_process_metrics() {
        let r = MetricsRegistry::new(&BuildInfo::default());
        let text = r.encode(Format::Prometheus);
        assert!(text.contains("nodemesh_build_info{version=\""), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        let om = r.encode(Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn a_shared_registry_serves_its_replacement() {
        let shared = SharedRegistry::new(MetricsRegistry::new(&BuildInfo::default()));
        let clone = shared.clone();
        assert!(!shared.encode(Format::Prometheus).contains("nodemesh_late"));
        let mut full = MetricsRegistry::new(&BuildInfo::default());
        full.nodemesh().register(
            "late",
            "Registered after serving began.",
            prometheus_client::metrics::gauge::Gauge::<i64>::default(),
        );
        clone.replace(full);
        assert!(
            shared
                .encode(Format::Prometheus)
                .contains("\nnodemesh_late 0\n")
        );
    }
}
