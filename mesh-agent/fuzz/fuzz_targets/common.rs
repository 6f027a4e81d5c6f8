//! Shared by the targets that build a cluster model.

use std::collections::BTreeMap;

use mesh_agent::{app::compute, model::ClusterModel};

/// What the agent does with every model it accepts: the maps' desired state (every local
/// workload enrolled) and the tunnel's snapshot. Errors are fine; panics are not.
pub fn use_model(model: &ClusterModel) {
    let cookies: BTreeMap<_, _> = model
        .local_workloads()
        .enumerate()
        .map(|(i, w)| (w.key.clone(), i as u64 + 1))
        .collect();
    let _ = compute::desired_state(model, &cookies);
    let _ = compute::snapshot(model);
    let _ = compute::tunnel_settings(model);
}
