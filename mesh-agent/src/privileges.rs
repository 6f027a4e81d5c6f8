//! The Linux capabilities the node agent needs, each with the code that needs it and why: the
//! one list the chart's DaemonSet (`charts/nodemesh/templates/agent-daemonset.yaml`) must add
//! after dropping `ALL`. The chart test `tests/tests/chart.rs` compares the rendered DaemonSet
//! with [`AGENT_CAPABILITIES`] both ways and refuses `privileged: true`, and runs the agent with
//! exactly these capabilities (its bounding set) until it is ready. Add a capability here, with
//! its reason, before the code that needs it lands.
//!
//! Measured on Linux 6.18 (`setpriv --bounding-set`): with `BPF` + `NET_ADMIN` alone the
//! verifier refuses `mesh_connect4` ("pointer -= pointer prohibited", which needs `PERFMON`);
//! without `BPF` (and without `SYS_ADMIN`, which implies it) `BPF_PROG_LOAD` fails with EPERM;
//! without `SYS_PTRACE` a pod's `/proc/<pid>/ns/net` cannot be opened (EACCES: the pod's pause
//! process holds capabilities the agent lacks), so the pod is never enrolled and `/readyz` stays
//! 503 (the chart test fails that way).

/// One capability the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// The name as Kubernetes writes it (`securityContext.capabilities.add`): no `CAP_` prefix.
    pub name: &'static str,
    /// Where in the code it is needed.
    pub used_by: &'static str,
    /// Why: what fails without it.
    pub reason: &'static str,
}

/// Everything the agent's container is granted (with `drop: [ALL]` and never `privileged`).
pub const AGENT_CAPABILITIES: &[Capability] = &[
    Capability {
        name: "BPF",
        used_by: "datapath::Datapath::load_with",
        reason: "bpf(2): load the programs (BPF_PROG_LOAD), create and pin their maps \
                 (BPF_MAP_CREATE, BPF_OBJ_PIN) and load their BTF (BPF_BTF_LOAD)",
    },
    Capability {
        name: "PERFMON",
        used_by: "datapath::Datapath::load_with",
        reason: "the verifier allows the programs' pointer arithmetic (\"pointer -= pointer \
                 prohibited\" without it) only to perfmon-capable loaders",
    },
    Capability {
        name: "NET_ADMIN",
        used_by: "datapath::Datapath::attach, tunnel_iface::ensure_tunnel_iface",
        reason: "the programs are networking types (cgroup sock_addr, sock_ops, cgroup_skb, sk_skb) whose \
                 load and attach need it besides BPF; creating the nm-tunnel interface and its \
                 address (`ip link add`, `ip addr add`) in the host's network namespace",
    },
    Capability {
        name: "SYS_ADMIN",
        used_by: "netns::in_netns (enrollment: netns::netns_cookie)",
        reason: "setns(2) into each local pod's network namespace to read its cookie \
                 (SO_NETNS_COOKIE), the key the programs enroll pods by",
    },
    Capability {
        name: "SYS_PTRACE",
        used_by: "podns::ProcScanner",
        reason: "opening /proc/<pid>/ns/net of the pods' processes (other users', or with \
                 capabilities the agent lacks) needs ptrace read access",
    },
];

/// The names of [`AGENT_CAPABILITIES`], sorted.
pub fn agent_capability_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = AGENT_CAPABILITIES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_has_a_user_and_a_reason_and_appears_once() {
        let mut seen = std::collections::BTreeSet::new();
        for c in AGENT_CAPABILITIES {
            assert!(
                !c.name.is_empty()
                    && c.name == c.name.to_uppercase()
                    && !c.name.starts_with("CAP_"),
                "{:?}: name as Kubernetes writes it (upper case, no CAP_ prefix)",
                c.name
            );
            assert!(c.used_by.len() > 5, "{}: say which code needs it", c.name);
            assert!(c.reason.len() > 20, "{}: say why", c.name);
            assert!(seen.insert(c.name), "{} listed twice", c.name);
        }
    }
}
