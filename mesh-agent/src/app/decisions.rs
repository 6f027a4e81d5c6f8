//! A cache of the policy engine's decisions for the tunnel's authorization paths (HBONE inbound
//! and the same-node path both ask [`super::PolicyAuthorizer`]).
//!
//! A decision is a pure function of the model and the connection's source identity, source
//! address, destination address and port. The cache keys on the source identity, the
//! destination (address and port) and the destination workload's address, and on the source
//! address only when some AuthorizationPolicy of the model matches source addresses
//! (`ipBlocks`, `remoteIpBlocks`, `source.ip`): then two clients of one identity can get
//! different answers. Without such policies every connection from one workload to one port of
//! another reuses one entry.
//!
//! Invariants:
//! - Entries belong to one model generation. A new model (any change: policies, labels, mTLS
//!   modes, workloads) empties the cache; a decision computed on an older model is never stored
//!   for a newer one (a lookup or insert names the generation it computed with).
//! - The cache is bounded: when it is full it is emptied (a cluster's distinct
//!   source/destination/port triples on one node are few; a scan of many ports or addresses
//!   must not grow memory).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::RwLock,
};

use crate::{identity::SpiffeId, tunnel::AuthzDecision};

/// Entries kept per model before the cache is emptied.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// What a decision depends on (see the module comment).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    pub source_identity: Option<SpiffeId>,
    /// `Some` only when the model's policies match source addresses.
    pub source_ip: Option<IpAddr>,
    pub destination: SocketAddr,
    pub destination_workload: IpAddr,
}

#[derive(Debug, Default)]
struct Generation {
    id: u64,
    entries: HashMap<DecisionKey, AuthzDecision>,
}

/// Decisions of one model generation at a time.
#[derive(Debug)]
pub struct DecisionCache {
    current: RwLock<Generation>,
    capacity: usize,
}

impl DecisionCache {
    /// A cache of up to `capacity` decisions; 0 disables it (every lookup misses).
    pub fn new(capacity: usize) -> Self {
        Self {
            current: RwLock::new(Generation::default()),
            capacity,
        }
    }

    /// The decision stored for `key` under model `generation`.
    pub fn get(&self, generation: u64, key: &DecisionKey) -> Option<AuthzDecision> {
        if self.capacity == 0 {
            return None;
        }
        let g = self.current.read().unwrap_or_else(|p| p.into_inner());
        if g.id != generation {
            return None;
        }
        g.entries.get(key).cloned()
    }

    /// Stores a decision computed on model `generation`. A newer generation empties the cache
    /// first; a decision of an older one (the model changed meanwhile) is dropped.
    pub fn insert(&self, generation: u64, key: DecisionKey, decision: AuthzDecision) {
        if self.capacity == 0 {
            return;
        }
        let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
        if generation < g.id {
            return;
        }
        if generation > g.id || g.entries.len() >= self.capacity {
            g.entries.clear();
            g.id = generation;
        }
        g.entries.insert(key, decision);
    }

    /// Entries held (for tests and `/config_dump`-style reporting).
    pub fn len(&self) -> usize {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> DecisionKey {
        DecisionKey {
            source_identity: Some(
                SpiffeId::new("cluster.local", "shop", "web").expect("an identity"),
            ),
            source_ip: None,
            destination: SocketAddr::from(([10, 1, 0, 5], port)),
            destination_workload: IpAddr::from([10, 1, 0, 5]),
        }
    }

    fn deny(why: &str) -> AuthzDecision {
        AuthzDecision::Deny { reason: why.into() }
    }

    #[test]
    fn a_decision_is_kept_for_its_generation_only() {
        let cache = DecisionCache::new(8);
        cache.insert(1, key(80), AuthzDecision::Allow);
        assert_eq!(cache.get(1, &key(80)), Some(AuthzDecision::Allow));
        assert_eq!(cache.get(1, &key(81)), None);
        assert_eq!(cache.get(2, &key(80)), None, "a newer model misses");

        // A decision computed on model 2 replaces model 1's entries.
        cache.insert(2, key(81), deny("p"));
        assert_eq!(cache.get(2, &key(81)), Some(deny("p")));
        assert_eq!(cache.get(2, &key(80)), None);
        assert_eq!(cache.len(), 1);

        // One computed on model 1 after model 2 arrived is not stored.
        cache.insert(1, key(80), AuthzDecision::Allow);
        assert_eq!(cache.get(1, &key(80)), None);
        assert_eq!(cache.get(2, &key(80)), None);
    }

    #[test]
    fn the_cache_is_bounded_and_can_be_disabled() {
        let cache = DecisionCache::new(3);
        for port in 0..10 {
            cache.insert(1, key(port), AuthzDecision::Allow);
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.get(1, &key(9)), Some(AuthzDecision::Allow));

        let off = DecisionCache::new(0);
        off.insert(1, key(80), AuthzDecision::Allow);
        assert_eq!(off.get(1, &key(80)), None);
        assert!(off.is_empty());
    }
}

/// The cache behind [`super::PolicyAuthorizer`]: the same decisions as without it, a new model
/// honoured at once, source addresses told apart when a policy matches them.
#[cfg(test)]
mod authorizer_tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        app::PolicyAuthorizer,
        local_config::build_from_texts,
        model::ClusterModel,
        tunnel::{Authorizer, AuthzRequest, LocalWorkload, Transport},
    };

    const CLUSTER: &str = "apiVersion: local.nodemesh.io/v1alpha1\nkind: LocalCluster\n\
        thisNode: node-a\nnodes:\n\
        - {name: node-a, address: 10.200.0.1, tunnelAddress: 169.254.200.1}\n\
        - {name: node-b, address: 10.200.0.2, tunnelAddress: 169.254.200.2}\nworkloads:\n\
        - {name: web, namespace: shop, serviceAccount: web, labels: {app: web}, \
           ips: [10.1.0.5], netns: /run/netns/web, node: node-a}\n\
        - {name: client, namespace: shop, serviceAccount: client, labels: {app: client}, \
           ips: [10.1.0.6], netns: /run/netns/client, node: node-b}\n";

    /// Allows `shop/client` to port 8080 of `web`; with `deny_block`, denies that block too.
    fn model(deny_block: Option<&str>) -> Arc<ClusterModel> {
        let mut text = format!(
            "{CLUSTER}---\napiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: allow-client, namespace: shop}}\nspec:\n\
             \x20 selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules:\n\
             \x20 - from:\n    - source: {{principals: [cluster.local/ns/shop/sa/client]}}\n\
             \x20   to:\n    - operation: {{ports: [\"8080\"]}}\n"
        );
        if let Some(block) = deny_block {
            text.push_str(&format!(
                "---\napiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: deny-block, namespace: shop}}\nspec:\n  action: DENY\n\
                 \x20 rules:\n  - from:\n    - source: {{ipBlocks: [\"{block}\"]}}\n"
            ));
        }
        Arc::new(build_from_texts(&[("t.yaml".into(), text)], None).expect("a valid model"))
    }

    fn web() -> LocalWorkload {
        LocalWorkload {
            name: "web".into(),
            namespace: "shop".into(),
            identity: SpiffeId::new("cluster.local", "shop", "web").expect("id"),
            ip: IpAddr::from([10, 1, 0, 5]),
        }
    }

    fn decide(a: &PolicyAuthorizer, sa: Option<&str>, src: [u8; 4], port: u16) -> AuthzDecision {
        let id = sa.map(|sa| SpiffeId::new("cluster.local", "shop", sa).expect("id"));
        let web = web();
        a.authorize(&AuthzRequest {
            source_identity: id.as_ref(),
            source_addr: SocketAddr::from((src, 40000)),
            destination: SocketAddr::from((web.ip, port)),
            destination_workload: &web,
            transport: Transport::Mtls,
        })
    }

    fn allowed(d: &AuthzDecision) -> bool {
        *d == AuthzDecision::Allow
    }

    #[test]
    fn cached_decisions_equal_fresh_ones() {
        for deny in [None, Some("10.1.0.0/24")] {
            let cached = PolicyAuthorizer::new(model(deny));
            let fresh = PolicyAuthorizer::with_cache(model(deny), Default::default(), 0);
            // Twice over: the second pass answers from the cache.
            for _ in 0..2 {
                for sa in [None, Some("client"), Some("other")] {
                    for src in [[10, 1, 0, 6], [10, 7, 0, 1]] {
                        for port in [8080, 9090] {
                            assert_eq!(
                                decide(&cached, sa, src, port),
                                decide(&fresh, sa, src, port),
                                "{deny:?} {sa:?} {src:?} {port}"
                            );
                        }
                    }
                }
            }
            assert!(!cached.decisions.is_empty());
            assert!(fresh.decisions.is_empty());
        }
    }

    #[test]
    fn a_new_model_is_decided_on_at_once() {
        let a = PolicyAuthorizer::new(model(None));
        assert!(allowed(&decide(&a, Some("client"), [10, 1, 0, 6], 8080)));
        assert!(allowed(&decide(&a, Some("client"), [10, 1, 0, 6], 8080)));
        a.replace(model(Some("10.1.0.0/24")));
        assert!(!allowed(&decide(&a, Some("client"), [10, 1, 0, 6], 8080)));
        a.replace(model(None));
        assert!(allowed(&decide(&a, Some("client"), [10, 1, 0, 6], 8080)));
    }

    #[test]
    fn source_addresses_are_keyed_only_when_a_policy_matches_them() {
        let a = PolicyAuthorizer::new(model(Some("10.1.0.0/24")));
        assert!(!allowed(&decide(&a, Some("client"), [10, 1, 0, 6], 8080)));
        assert!(
            allowed(&decide(&a, Some("client"), [10, 7, 0, 1], 8080)),
            "the same identity from outside the denied block"
        );
        assert_eq!(a.decisions.len(), 2);

        let b = PolicyAuthorizer::new(model(None));
        decide(&b, Some("client"), [10, 1, 0, 6], 8080);
        decide(&b, Some("client"), [10, 7, 0, 1], 8080);
        assert_eq!(b.decisions.len(), 1, "one entry per identity and port");
    }
}
