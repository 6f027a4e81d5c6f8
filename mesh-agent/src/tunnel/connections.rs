//! Live authorized connections, so a policy change can close those the new policy denies.
//!
//! Every stream the inbound authorizes (and every same-node connection the outbound authorizes)
//! registers what it was authorized on; [`ConnectionManager::reauthorize`] asks the authorizer
//! again for each and closes the ones now denied. The policy engine calls it (through
//! `Inbound::reauthorize` / `Outbound::reauthorize`) after it swaps in new policies.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::oneshot;
use tracing::info;

use super::{Authorizer, AuthzDecision, AuthzRequest, LocalWorkload, Transport};
use crate::identity::SpiffeId;

/// What a connection was authorized on.
#[derive(Clone, Debug)]
pub struct Authorized {
    pub source_identity: Option<SpiffeId>,
    pub source_addr: SocketAddr,
    pub destination: SocketAddr,
    pub workload: Arc<LocalWorkload>,
    pub transport: Transport,
}

impl Authorized {
    fn request(&self) -> AuthzRequest<'_> {
        AuthzRequest {
            source_identity: self.source_identity.as_ref(),
            source_addr: self.source_addr,
            destination: self.destination,
            destination_workload: &self.workload,
            transport: self.transport,
        }
    }
}

type Live = HashMap<u64, (Authorized, oneshot::Sender<String>)>;

#[derive(Debug, Default)]
pub struct ConnectionManager {
    next_id: AtomicU64,
    live: Mutex<Live>,
}

/// A registered connection. `revoked` resolves with the reason when a policy change denies it;
/// dropping the registration removes it.
pub struct Registration {
    id: u64,
    manager: Arc<ConnectionManager>,
    pub revoked: oneshot::Receiver<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.manager.lock().remove(&self.id);
    }
}

impl ConnectionManager {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, authorized: Authorized) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (authorized, tx));
        Registration {
            id,
            manager: self.clone(),
            revoked: rx,
        }
    }

    /// Live registered connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-checks every live connection; closes (signals) those `authorizer` now denies.
    /// Returns how many were closed. The authorizer runs under the registry lock, so it must
    /// not block (policy evaluation is pure).
    pub fn reauthorize(&self, authorizer: &dyn Authorizer) -> usize {
        let mut live = self.lock();
        let denied: Vec<(u64, String)> = live
            .iter()
            .filter_map(|(id, (a, _))| match authorizer.reauthorize(&a.request()) {
                AuthzDecision::Allow => None,
                AuthzDecision::Deny { reason } => Some((*id, reason)),
            })
            .collect();
        for (id, reason) in &denied {
            if let Some((a, tx)) = live.remove(id) {
                info!(src = %a.source_addr, src_identity = ?a.source_identity.as_ref().map(ToString::to_string),
                    dst = %a.destination, reason, "closing connection: the new policy denies it");
                let _ = tx.send(reason.clone());
            }
        }
        denied.len()
    }
}
