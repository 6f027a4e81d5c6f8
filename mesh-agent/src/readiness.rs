//! Readiness as drop guards: each component registers a [`Gate`] at start and drops it (or calls
//! [`Gate::ready`]) once it can serve. `/readyz` answers 200 when no gate is pending and 503
//! with the pending names otherwise. Gates the agent registers: `bpf-attached`,
//! `certificates`, `config-synced`, `listeners-bound`, `workloads-enrolled`, and `draining` during
//! shutdown (names are free text; duplicates allowed).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

#[derive(Debug, Default)]
struct Pending {
    next_id: u64,
    gates: BTreeMap<u64, String>,
}

/// The set of pending gates; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pending: Arc<Mutex<Pending>>,
}

/// One pending condition; clears when dropped.
#[derive(Debug)]
#[must_use = "a gate clears when dropped: keep it until the component is ready"]
pub struct Gate {
    id: u64,
    pending: Arc<Mutex<Pending>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new pending gate named `name`.
    pub fn register(&self, name: impl Into<String>) -> Gate {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let id = p.next_id;
        p.next_id += 1;
        p.gates.insert(id, name.into());
        Gate {
            id,
            pending: self.pending.clone(),
        }
    }

    /// Names of the pending gates, sorted (a name registered twice appears twice).
    pub fn pending(&self) -> Vec<String> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = p.gates.values().cloned().collect();
        names.sort();
        names
    }

    pub fn is_ready(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gates
            .is_empty()
    }
}

impl Gate {
    /// Clears the gate (same as dropping it; reads better at the call site).
    pub fn ready(self) {}
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gates
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_clear_on_ready_and_drop() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let bpf = r.register("bpf-attached");
        let certs = r.register("certificates");
        let certs2 = r.register("certificates");
        assert_eq!(
            r.pending(),
            ["bpf-attached", "certificates", "certificates"]
        );
        bpf.ready();
        drop(certs);
        assert_eq!(r.pending(), ["certificates"]);
        drop(certs2);
        assert!(r.is_ready());
    }
}
