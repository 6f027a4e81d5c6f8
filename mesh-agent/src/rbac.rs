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

/// The controller: reads the policies and writes their `status`, reviews agents' tokens, reads
/// pods (does a token's pod run on the node it claims), and in the release namespace elects a
/// leader with a Lease, keeps the CA's root in a Secret (read, watched, created when absent) and
/// publishes the trust bundle ConfigMap (read, created, updated).
pub const CONTROLLER: Permissions = Permissions {
    component: "controller",
    cluster: &[
        Grant {
            api_group: crate::crd::GROUP,
            resources: &["authorizationpolicies", "peerauthentications"],
            verbs: &["get", "list", "watch"],
        },
        Grant {
            api_group: crate::crd::GROUP,
            resources: &["authorizationpolicies/status", "peerauthentications/status"],
            verbs: &["update", "patch"],
        },
        Grant {
            api_group: "authentication.k8s.io",
            resources: &["tokenreviews"],
            verbs: &["create"],
        },
        Grant {
            api_group: "",
            resources: &["pods"],
            verbs: &["get", "list", "watch"],
        },
    ],
    release_namespace: &[
        Grant {
            api_group: "coordination.k8s.io",
            resources: &["leases"],
            verbs: &["create", "get", "update"],
        },
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
