//! The nodemesh node agent.
//!
//! Bottom layer (pure, no I/O): the L4 policy engine (`policy`), the cluster model (`model`) fed
//! by the local-mode configuration file (`local_config`) or by Kubernetes (`k8s`, whose
//! `convert` step is pure too), and the model of what goes into the eBPF maps (`map_model`). Seams: loading and attaching the eBPF programs (`datapath`), the trait
//! every map write passes through (`maps`), level-triggered convergence (`reconcile`), reading
//! network-namespace cookies for enrollment (`netns`), finding a Kubernetes pod's network
//! namespace from its UID through `/proc` (`podns`), the node-local interface holding the tunnel
//! address (`tunnel_iface`) and finding the cgroup v2 hierarchy (`cgroup`). Components: workload
//! identities and certificates (`identity`), the HBONE tunnel (`tunnel`), the metrics registry
//! (`metrics`), readiness gates (`readiness`) and the stats and admin HTTP servers (`admin`). What the agent may do: its
//! Kubernetes RBAC (`rbac`) and its Linux capabilities (`privileges`), one list each that the
//! chart must grant exactly.
//! Top: `node`, the data-path-only process (`mesh-agent node --datapath-only`), and `app`, the
//! whole agent wired together from a model source (`mesh-agent local`, `mesh-agent node`).

pub mod admin;
pub mod app;
pub mod ca;
pub mod cgroup;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod datapath;
pub mod identity;
pub mod k8s;
pub mod local_config;
pub mod map_model;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod node;
pub mod podns;
pub mod policy;
pub mod privileges;
pub mod rbac;
pub mod readiness;
pub mod reconcile;
pub mod splice;
pub mod tunnel;
pub mod tunnel_iface;
