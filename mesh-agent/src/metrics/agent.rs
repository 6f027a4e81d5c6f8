//! Agent-level metrics recorded by the wiring (`app`): policy decisions, enrolled workloads,
//! configuration reloads, and certificate expiry read at scrape time.
//!
//! Where they get recorded: the `Authorizer` the wiring gives the tunnel calls
//! [`AgentMetrics::policy_decision`]; enrollment and unenrollment set
//! [`AgentMetrics::workloads_enrolled`]; the local-config watcher calls
//! [`AgentMetrics::config_reload`] after each attempt.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge},
    registry::Registry,
};

use super::label;

/// Outcome of one policy evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Allow,
    Deny,
}

type Labels1 = [(&'static str, &'static str); 1];

/// Handles to the agent's metrics; clones share them.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    policy_decisions: Family<Labels1, Counter>,
    workloads: Gauge,
    not_enrolled: Family<Labels1, Gauge>,
    config_reloads: Family<Labels1, Counter>,
}

/// Local workloads the last configuration pass could not enroll, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotEnrolled {
    /// Their network namespace could not be read (not there yet); retried on the next change.
    pub netns_unreadable: usize,
    /// The enrolled-pods map was full.
    pub map_full: usize,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry` (the `nodemesh` sub-registry).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "policy_decisions",
            "Connection authorization decisions by the tunnel, by action",
            m.policy_decisions.clone(),
        );
        registry.register(
            "workloads_enrolled",
            "Workloads on this node captured by the datapath",
            m.workloads.clone(),
        );
        registry.register(
            "workloads_not_enrolled",
            "Workloads on this node the datapath does not capture, by reason (map_full, netns_unreadable)",
            m.not_enrolled.clone(),
        );
        m.workloads_not_enrolled(&NotEnrolled::default());
        registry.register(
            "config_reloads",
            "Configuration reload attempts by result (success, failure)",
            m.config_reloads.clone(),
        );
        m
    }

    pub fn policy_decision(&self, action: PolicyAction) {
        let action = match action {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
        };
        self.policy_decisions
            .get_or_create(&[("action", action)])
            .inc();
    }

    pub fn workloads_enrolled(&self, n: u64) {
        self.workloads.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn workloads_not_enrolled(&self, n: &NotEnrolled) {
        for (reason, count) in [
            ("map_full", n.map_full),
            ("netns_unreadable", n.netns_unreadable),
        ] {
            self.not_enrolled
                .get_or_create(&[("reason", reason)])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// One reload attempt; a failure keeps the last good configuration.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub fn policy_decisions(&self, action: PolicyAction) -> u64 {
        let action = match action {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
        };
        self.policy_decisions
            .get(&[("action", action)])
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

/// One certificate as the expiry gauge sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct CertificateExpiry {
    /// The SPIFFE ID.
    pub identity: String,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after_unix_seconds: i64,
}

/// The certificates to report, read at scrape time.
pub type ExpirySource = Box<dyn Fn() -> Vec<CertificateExpiry> + Send + Sync>;

/// `nodemesh_certificate_expiration_timestamp_seconds{identity}`: when each workload certificate
/// expires (a timestamp, so alerts compute `... - time()`; it does not change every second).
pub struct CertExpiry {
    source: ExpirySource,
}

impl std::fmt::Debug for CertExpiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertExpiry").finish_non_exhaustive()
    }
}

impl CertExpiry {
    /// Registers the gauge in `registry` (the `nodemesh` sub-registry).
    pub fn register(registry: &mut Registry, source: ExpirySource) {
        registry.register_collector(Box::new(CertExpiry { source }));
    }
}

struct Identity<'a>(&'a str);

impl EncodeLabelSet for Identity<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(encoder, "identity", self.0)
    }
}

impl Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut certs = (self.source)();
        if certs.is_empty() {
            return Ok(());
        }
        certs.sort_by(|a, b| a.identity.cmp(&b.identity));
        certs.dedup_by(|a, b| a.identity == b.identity);
        let mut family = encoder.encode_descriptor(
            "certificate_expiration_timestamp_seconds",
            "When each workload certificate expires, seconds since the Unix epoch.",
            None,
            MetricType::Gauge,
        )?;
        for c in &certs {
            let labels = Identity(&c.identity);
            ConstGauge::new(c.not_after_unix_seconds).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
