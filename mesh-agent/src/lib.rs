//! The nodemesh node agent. Today it holds the kernel half's userspace side: loading and attaching
//! the eBPF programs (`datapath`), reading network-namespace cookies for enrollment (`netns`) and
//! finding the cgroup v2 hierarchy (`cgroup`). The tunnel, control plane and admin follow.

pub mod cgroup;
pub mod datapath;
pub mod identity;
pub mod netns;
pub mod tunnel;
