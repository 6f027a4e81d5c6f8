//! The nodemesh node agent. Today it holds the kernel half's userspace side: loading and attaching
//! the eBPF programs (`datapath`), the pure model of what goes into the maps (`model`) and the
//! seam every map write passes through (`maps`), level-triggered convergence (`reconcile`), reading network-namespace cookies for enrollment
//! (`netns`), the node-local interface holding the tunnel address (`tunnel_iface`) and finding the
//! cgroup v2 hierarchy (`cgroup`), and `node`, the long-running `mesh-agent node` process. The
//! tunnel, control plane and admin follow.

pub mod cgroup;
pub mod datapath;
pub mod maps;
pub mod model;
pub mod netns;
pub mod node;
pub mod reconcile;
pub mod tunnel_iface;
