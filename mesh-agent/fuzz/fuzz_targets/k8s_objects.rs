//! Kubernetes mode: objects as the API server would send them (here YAML documents, a superset
//! of the JSON a watch delivers) deserialized into the reflectors' types (Pod, Node, Namespace,
//! Service, EndpointSlice, and the nodemesh CRDs as dynamic objects), converted
//! (`k8s::convert::convert`) and built into a model, then what the agent computes from it.
//!
//! Checks the conversion's promise (docs in `k8s/convert.rs`): whenever this node is among the
//! converted nodes, `ClusterModel::build` accepts the result: one odd object is skipped, it
//! never blocks the model.
#![no_main]

#[path = "common.rs"]
mod common;

use std::{path::PathBuf, sync::Arc};

use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    k8s::{
        NetnsFinder,
        convert::{Settings, Snapshot, convert},
        // What the agent's reflectors store: the API's JSON deserialized into projections.
        projected::{EndpointSlice, Namespace, Node, Pod, Service},
    },
    model::ClusterModel,
};
use serde::Deserialize;

const NODE: &str = "n1";

/// Finds a namespace for every pod whose UID does not start with `x` (so both outcomes occur).
struct Finder;

impl NetnsFinder for Finder {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        if pod_uid.starts_with('x') {
            Err(format!("no process of pod {pod_uid}"))
        } else {
            Ok(PathBuf::from(format!("/proc/1/task/{pod_uid}/ns/net")))
        }
    }
}

fn add(snap: &mut Snapshot, value: serde_norway::Value) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    macro_rules! push {
        ($field:ident, $ty:ty) => {
            if let Ok(o) = <$ty>::deserialize(value) {
                snap.$field.push(Arc::new(o));
            }
        };
    }
    match kind.as_str() {
        "Pod" => push!(pods, Pod),
        "Node" => push!(nodes, Node),
        "Namespace" => push!(namespaces, Namespace),
        "Service" => push!(services, Service),
        "EndpointSlice" => push!(endpoint_slices, EndpointSlice),
        "AuthorizationPolicy" => push!(authorization_policies, DynamicObject),
        "PeerAuthentication" => push!(peer_authentications, DynamicObject),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut snap = Snapshot::default();
    for document in serde_norway::Deserializer::from_str(text) {
        match serde_norway::Value::deserialize(document) {
            Ok(v) => add(&mut snap, v),
            Err(_) => break,
        }
    }
    let settings = Settings::new(NODE, "10.0.0.1".parse().expect("addr"));
    let converted = convert(&snap, &settings, &Finder);
    let this_node_converted = converted.input.nodes.iter().any(|n| n.spec.name == NODE);
    match ClusterModel::build(&converted.input) {
        Ok(model) => common::use_model(&model),
        Err(errors) => assert!(
            !this_node_converted,
            "convert's output was refused although node {NODE} is in it: {errors:?}\nskipped: {:?}",
            converted.skipped
        ),
    }
});
