//! Endpoint choice for services: power of two choices over healthy endpoints, by outstanding
//! connections; an endpoint that could not be reached is ejected for a while (the outbound
//! decides what counts: see `outbound.rs`).
//!
//! Power of two choices keeps load within a small factor of least-loaded without scanning every
//! endpoint or sharing a global ordering; the state is one small map under a mutex held only for
//! the choice itself.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::info;

use super::Endpoint;

#[derive(Default, Debug)]
struct State {
    outstanding: u32,
    ejected_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, State>>,
    ejection_time: Duration,
}

/// Counts one outstanding connection to an endpoint until dropped.
#[derive(Debug)]
pub struct Outstanding {
    balancer: Arc<Balancer>,
    addr: SocketAddr,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let mut eps = self.balancer.lock();
        if let Some(s) = eps.get_mut(&self.addr) {
            s.outstanding = s.outstanding.saturating_sub(1);
        }
    }
}

fn random_index(n: usize) -> usize {
    use rand::RngExt;
    // The thread's generator: no syscall (nor a CryptoProvider built) per choice.
    rand::rng().random_range(0..n.max(1))
}

impl Balancer {
    pub fn new(ejection_time: Duration) -> Arc<Self> {
        Arc::new(Self {
            endpoints: Mutex::new(HashMap::new()),
            ejection_time,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, State>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks an endpoint among `candidates` not in `exclude`; ejected ones only when nothing
    /// else is left (better a likely failure than a certain one).
    pub fn pick(
        self: &Arc<Self>,
        candidates: &[Endpoint],
        exclude: &[SocketAddr],
    ) -> Option<(Endpoint, Outstanding)> {
        let now = Instant::now();
        let mut eps = self.lock();
        let usable: Vec<&Endpoint> = candidates
            .iter()
            .filter(|e| !exclude.contains(&e.addr))
            .collect();
        let healthy: Vec<&Endpoint> = usable
            .iter()
            .copied()
            .filter(|e| {
                eps.get(&e.addr)
                    .and_then(|s| s.ejected_until)
                    .is_none_or(|t| t <= now)
            })
            .collect();
        let pool = if healthy.is_empty() { usable } else { healthy };
        let chosen = match pool.len() {
            0 => return None,
            1 => pool[0],
            n => {
                let a = pool[random_index(n)];
                let b = pool[random_index(n)];
                let load = |e: &Endpoint| eps.get(&e.addr).map_or(0, |s| s.outstanding);
                if load(b) < load(a) { b } else { a }
            }
        };
        let state = eps.entry(chosen.addr).or_default();
        state.outstanding += 1;
        Some((
            chosen.clone(),
            Outstanding {
                balancer: self.clone(),
                addr: chosen.addr,
            },
        ))
    }

    /// Skips `addr` for the ejection time (from now; a repeated failure extends it).
    pub fn eject(&self, addr: SocketAddr, reason: &str) {
        info!(endpoint = %addr, ejected_for = ?self.ejection_time, reason, "endpoint ejected");
        self.lock().entry(addr).or_default().ejected_until =
            Some(Instant::now() + self.ejection_time);
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        self.lock()
            .get(&addr)
            .and_then(|s| s.ejected_until)
            .is_some_and(|t| t > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Location;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            identity: "spiffe://td/ns/a/sa/b".parse().expect("id"),
            location: Location::SameNode,
        }
    }

    #[test]
    fn prefers_less_loaded_and_skips_ejected() {
        let b = Balancer::new(Duration::from_secs(60));
        let eps = [ep(1), ep(2)];
        let (first, _g1) = b.pick(&eps, &[]).expect("pick");
        // With two endpoints and one loaded, power of two choices picks the idle one whenever the
        // two samples differ; over many picks the idle one must win at least once and the loaded
        // one must never be picked when both samples are the idle one.
        let mut other_seen = false;
        for _ in 0..64 {
            let (e, _g) = b.pick(&eps, &[]).expect("pick");
            other_seen |= e.addr != first.addr;
        }
        assert!(other_seen);
        b.eject(eps[1].addr, "test");
        assert!(b.is_ejected(eps[1].addr) && !b.is_ejected(eps[0].addr));
        for _ in 0..16 {
            let (e, _g) = b.pick(&eps, &[]).expect("pick");
            assert_eq!(e.addr, eps[0].addr, "ejected endpoint is skipped");
        }
        // Excluding the only healthy one falls back to the ejected one.
        let (e, _g) = b.pick(&eps, &[eps[0].addr]).expect("fallback");
        assert_eq!(e.addr, eps[1].addr);
        assert!(b.pick(&eps, &[eps[0].addr, eps[1].addr]).is_none());
    }

    #[test]
    fn an_ejection_expires_and_the_endpoint_is_picked_again() {
        let b = Balancer::new(Duration::from_millis(50));
        let eps = [ep(1), ep(2)];
        b.eject(eps[1].addr, "test");
        assert!(b.is_ejected(eps[1].addr));
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.is_ejected(eps[1].addr) {
            assert!(Instant::now() < deadline, "the ejection never expired");
            std::thread::sleep(Duration::from_millis(5));
        }
        let picked_again = (0..64).any(|_| {
            b.pick(&eps, &[])
                .is_some_and(|(e, _g)| e.addr == eps[1].addr)
        });
        assert!(
            picked_again,
            "an endpoint whose ejection expired is a candidate again"
        );
    }
}
