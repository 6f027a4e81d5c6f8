//! The controller's own metrics (`nodemesh_controller_*`), registered in the `nodemesh`
//! sub-registry the controller gives each component.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::status::PolicyKind;

type Labels<const N: usize> = [(&'static str, String); N];

/// Handles to the controller's metrics; clones share them.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    leader: Gauge,
    leader_acquired: Counter,
    policies: Family<Labels<2>, Gauge>,
    status_writes: Family<Labels<2>, Counter>,
    api_errors: Family<Labels<3>, Counter>,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry` (a `nodemesh` sub-registry).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "controller_leader",
            "1 while this replica holds the leader Lease (only the leader writes policy status)",
            m.leader.clone(),
        );
        registry.register(
            "controller_leader_acquired",
            "Times this replica became the leader",
            m.leader_acquired.clone(),
        );
        registry.register(
            "controller_policies",
            "Policies by kind and by their Accepted condition (true, false), as judged by this replica",
            m.policies.clone(),
        );
        registry.register(
            "controller_status_writes",
            "Policy status writes by kind and result (success, error)",
            m.status_writes.clone(),
        );
        registry.register(
            "controller_kubernetes_errors",
            "Failed Kubernetes API calls by operation (list, watch, status-patch, lease), resource \
             and HTTP code (0: no answer)",
            m.api_errors.clone(),
        );
        m
    }

    pub fn set_leader(&self, leader: bool) {
        let was = self.leader.set(i64::from(leader));
        if leader && was == 0 {
            self.leader_acquired.inc();
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// The counts of one pass over every policy.
    pub fn set_policies(&self, kind: PolicyKind, accepted: u64, refused: u64) {
        for (value, n) in [("true", accepted), ("false", refused)] {
            self.policies
                .get_or_create(&[
                    ("kind", kind.kind().to_owned()),
                    ("accepted", value.to_owned()),
                ])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn status_write(&self, kind: PolicyKind, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.status_writes
            .get_or_create(&[
                ("kind", kind.kind().to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    pub fn status_writes(&self, kind: PolicyKind, ok: bool) -> u64 {
        let result = if ok { "success" } else { "error" };
        self.status_writes
            .get_or_create(&[
                ("kind", kind.kind().to_owned()),
                ("result", result.to_owned()),
            ])
            .get()
    }

    /// One failed API call; `code` is the HTTP status (0 when the API server did not answer).
    pub fn api_error(&self, operation: &'static str, resource: &str, code: u16) {
        self.api_errors
            .get_or_create(&[
                ("operation", operation.to_owned()),
                ("resource", resource.to_owned()),
                ("code", code.to_string()),
            ])
            .inc();
    }
}

/// The HTTP status of a kube error (0 when the API server did not answer).
pub fn code_of(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        _ => 0,
    }
}
