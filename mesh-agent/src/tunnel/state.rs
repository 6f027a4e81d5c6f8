//! The tunnel's view of the cluster, replaced as a whole by the control plane.
//!
//! [`TunnelState`] implements [`LocalWorkloads`], [`Resolver`] and [`IdentityIds`] from one
//! [`Snapshot`]. The control plane computes a snapshot from its model (a pure step) and calls
//! [`TunnelState::replace`]; readers take a cheap `Arc` clone under a read lock that is never
//! held across I/O. After a replace, call `Inbound::reauthorize` / `Outbound::reauthorize` if
//! policies changed.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use super::{
    Destination, Endpoint, IdentityIds, LocalWorkload, LocalWorkloads, Location, Resolver,
};
use crate::identity::SpiffeId;

/// Everything the tunnel needs to know, at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Workloads on this node, by pod IP.
    pub local_workloads: HashMap<IpAddr, Arc<LocalWorkload>>,
    /// Destination `ip:port` (pod or service VIP) → endpoints.
    pub destinations: HashMap<SocketAddr, Destination>,
    /// The datapath's numeric identity ids → identities.
    pub identity_ids: HashMap<u32, SpiffeId>,
    /// Workload addresses (pods listen on any port): pod IP → identity and where it runs.
    /// Consulted when `destinations` has no entry for the exact `ip:port`.
    pub workload_addresses: HashMap<IpAddr, (SpiffeId, Location)>,
}

#[derive(Debug, Default)]
pub struct TunnelState {
    current: RwLock<Arc<Snapshot>>,
}

impl TunnelState {
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(snapshot)),
        })
    }

    /// Swaps in a new snapshot. Connections in flight keep what they resolved.
    pub fn replace(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl LocalWorkloads for TunnelState {
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<LocalWorkload>> {
        self.snapshot().local_workloads.get(&ip).cloned()
    }

    fn identity_for_sni(&self, server_name: &str) -> Option<SpiffeId> {
        super::identity_by_sni(self.snapshot().local_workloads.values(), server_name)
    }

    fn identity_of_ip(&self, ip: IpAddr) -> Option<SpiffeId> {
        let snapshot = self.snapshot();
        if let Some(w) = snapshot.local_workloads.get(&ip) {
            return Some(w.identity.clone());
        }
        snapshot
            .workload_addresses
            .get(&ip)
            .map(|(id, _)| id.clone())
    }
}

impl Resolver for TunnelState {
    fn resolve(&self, dst: SocketAddr) -> Option<Destination> {
        let snapshot = self.snapshot();
        if let Some(d) = snapshot.destinations.get(&dst) {
            return Some(d.clone());
        }
        let (identity, location) = snapshot.workload_addresses.get(&dst.ip())?;
        Some(Destination::Workload(Endpoint {
            addr: dst,
            identity: identity.clone(),
            location: location.clone(),
        }))
    }
}

impl IdentityIds for TunnelState {
    fn identity(&self, identity_id: u32) -> Option<SpiffeId> {
        self.snapshot().identity_ids.get(&identity_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_every_view_at_once() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().expect("id");
        let ip: IpAddr = [10, 0, 0, 5].into();
        let dst = SocketAddr::new(ip, 80);
        let state = TunnelState::new(Snapshot::default());
        assert!(state.by_ip(ip).is_none());
        assert!(state.resolve(dst).is_none());
        let w = Arc::new(LocalWorkload {
            name: "b".into(),
            namespace: "a".into(),
            identity: id.clone(),
            ip,
        });
        state.replace(Snapshot {
            local_workloads: [(ip, w.clone())].into_iter().collect(),
            destinations: [(
                dst,
                Destination::Workload(Endpoint {
                    addr: dst,
                    identity: id.clone(),
                    location: Location::SameNode,
                }),
            )]
            .into_iter()
            .collect(),
            identity_ids: [(7, id.clone())].into_iter().collect(),
            workload_addresses: HashMap::new(),
        });
        assert_eq!(state.by_ip(ip), Some(w));
        assert!(matches!(state.resolve(dst), Some(Destination::Workload(_))));
        assert_eq!(state.identity(7), Some(id));
        assert_eq!(state.identity(8), None);
    }
}
