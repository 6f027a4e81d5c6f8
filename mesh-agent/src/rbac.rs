//! What each nodemesh component may do in the Kubernetes API: the one list the chart's RBAC
//! (`charts/nodemesh/templates/{agent,controller}-rbac.yaml`) must grant exactly. A test
//! compares both ways, so a verb the code needs but the chart forgets, or one the chart grants
//! for nothing, fails it. Change a component's API use here first.

/// Some verbs on some resources of one API group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// `""` for the core group.
    pub api_group: &'static str,
    /// Plural resource names; a subresource as `resource/subresource`.
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// What one component's ServiceAccount is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// The component, as in the chart's object names (`<fullname>-<component>`).
    pub component: &'static str,
    /// Through a ClusterRole and ClusterRoleBinding.
    pub cluster: &'static [Grant],
    /// Through a Role and RoleBinding in the release namespace.
    pub release_namespace: &'static [Grant],
}

/// The node agent: list + watch for its reflectors (pods for enrollment and the IP → identity
/// map, nodes for HBONE addresses, namespaces for the enrollment label, services and
/// endpointslices for service addresses, both policy kinds), and in the release namespace the
/// CA's trust bundle ConfigMap (a watch on that one name). It writes nothing.
pub const AGENT: Permissions = Permissions {
    component: "agent",
    cluster: &[
        Grant {
            api_group: "",
            resources: &["pods", "nodes", "namespaces", "services"],
            verbs: &["list", "watch"],
        },
        Grant {
            api_group: "discovery.k8s.io",
            resources: &["endpointslices"],
            verbs: &["list", "watch"],
        },
        Grant {
            api_group: crate::crd::GROUP,
            resources: &["authorizationpolicies", "peerauthentications"],
            verbs: &["list", "watch"],
        },
    ],
    release_namespace: &[Grant {
        api_group: "",
        resources: &["configmaps"],
        verbs: &["list", "watch"],
    }],
};

/// The controller's policy status writer ([`crate::controller`]): every replica lists and
/// watches both policy kinds; the leader patches their status subresource (server-side apply).
pub const CONTROLLER_POLICY_STATUS: [Grant; 2] = [
    Grant {
        api_group: crate::crd::GROUP,
        resources: &["authorizationpolicies", "peerauthentications"],
        verbs: &["list", "watch"],
    },
    Grant {
        api_group: crate::crd::GROUP,
        resources: &["authorizationpolicies/status", "peerauthentications/status"],
        verbs: &["patch"],
    },
];

/// The controller's leader election ([`crate::controller::leader`], `kube-lease-manager`): read
/// the Lease (`get`), make it when missing (`create`), take, renew and release it (`patch`:
/// server-side apply and strategic merge). Only in the release namespace.
pub const CONTROLLER_LEADER_ELECTION: [Grant; 1] = [Grant {
    api_group: "coordination.k8s.io",
    resources: &["leases"],
    verbs: &["create", "get", "patch"],
}];

/// The controller's CA ([`crate::ca`]), cluster-wide: review callers' tokens (TokenReview) and
/// keep a pod reflector (is a token's pod there, which pods run on the caller's node).
pub const CONTROLLER_CA: [Grant; 2] = [
    Grant {
        api_group: "authentication.k8s.io",
        resources: &["tokenreviews"],
        verbs: &["create"],
    },
    Grant {
        api_group: "",
        resources: &["pods"],
        verbs: &["list", "watch"],
    },
];

/// The controller's CA in the release namespace: its root Secret (read, watched by name, created
/// when absent) and the trust bundle ConfigMap (read, created, updated).
pub const CONTROLLER_CA_NAMESPACE: [Grant; 2] = [
    Grant {
        api_group: "",
        resources: &["secrets"],
        verbs: &["get", "list", "watch", "create"],
    },
    Grant {
        api_group: "",
        resources: &["configmaps"],
        verbs: &["get", "create", "update"],
    },
];

/// The controller: the policy status writer, its leader election and the CA, each with its own
/// named list above.
pub const CONTROLLER: Permissions = Permissions {
    component: "controller",
    cluster: &[
        CONTROLLER_POLICY_STATUS[0],
        CONTROLLER_POLICY_STATUS[1],
        CONTROLLER_CA[0],
        CONTROLLER_CA[1],
    ],
    release_namespace: &[
        CONTROLLER_LEADER_ELECTION[0],
        CONTROLLER_CA_NAMESPACE[0],
        CONTROLLER_CA_NAMESPACE[1],
    ],
};

/// Every component with a ServiceAccount in the chart.
pub const COMPONENTS: [Permissions; 2] = [AGENT, CONTROLLER];

/// One `(api group, resource, verb)` triple.
pub type Permission = (String, String, String);

impl Permissions {
    /// The cluster-wide grants as a set of triples.
    pub fn cluster_set(&self) -> std::collections::BTreeSet<Permission> {
        flatten(self.cluster)
    }

    /// The release-namespace grants as a set of triples.
    pub fn release_namespace_set(&self) -> std::collections::BTreeSet<Permission> {
        flatten(self.release_namespace)
    }
}

fn flatten(grants: &[Grant]) -> std::collections::BTreeSet<Permission> {
    let mut set = std::collections::BTreeSet::new();
    for g in grants {
        for r in g.resources {
            for v in g.verbs {
                set.insert((g.api_group.to_owned(), (*r).to_owned(), (*v).to_owned()));
            }
        }
    }
    set
}

#[cfg(test)]
mod tests;
