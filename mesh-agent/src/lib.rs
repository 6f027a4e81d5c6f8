//! The nodemesh node agent. Today it holds the kernel half's userspace side: loading and attaching
//! the eBPF programs (`datapath`), reading network-namespace cookies for enrollment (`netns`) and
//! finding the cgroup v2 hierarchy (`cgroup`), the pure L4 policy engine (`policy`), the pure
//! cluster model (`model`) and the local-mode configuration file that feeds it (`local_config`).
//! The tunnel, control plane and admin follow.

pub mod cgroup;
pub mod datapath;
pub mod local_config;
pub mod model;
pub mod netns;
pub mod policy;
