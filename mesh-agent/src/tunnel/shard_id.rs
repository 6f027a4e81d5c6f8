//! Which tunnel shard ([`super::shards`]) the calling thread serves, set once by each shard's
//! thread, read by the pool to key connections by shard; and how many live connections each
//! shard serves ([`Loads`]), read by a shard before it hands a new connection to another. A leaf
//! module, so the pool and the inbound do not depend on the shards that depend on them.

use std::cell::Cell;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread serves (0 on any thread that is not a shard's, e.g. tests and
/// an unsharded tunnel).
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// Marks the calling thread as shard `index` (each shard's thread, before it serves).
pub(super) fn enter(index: usize) {
    SHARD.with(|s| s.set(index));
}

/// Makes the calling thread act as shard `index` (tests of shard-keyed state).
#[cfg(test)]
pub(crate) fn act_as(index: usize) {
    enter(index);
}

/// Live connections per shard, indexed by shard: what a shard consults before handing a new
/// inbound HBONE connection to another ([`Loads::pick`]).
#[derive(Clone)]
pub(super) struct Loads(std::sync::Arc<[std::sync::atomic::AtomicUsize]>);

impl Loads {
    pub(super) fn new(shards: usize) -> Self {
        Self(
            (0..shards)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
        )
    }

    /// The shard with the fewest live connections; `own` when it is among them (no hand-over).
    pub(super) fn pick(&self, own: usize) -> usize {
        let load = |i: usize| self.load(i).unwrap_or(usize::MAX);
        let least = (0..self.0.len()).min_by_key(|&i| load(i)).unwrap_or(own);
        if load(own) <= load(least) { own } else { least }
    }

    /// Counts one more live connection on `shard` until the returned claim is dropped.
    pub(super) fn claim(&self, shard: usize) -> Claim {
        if let Some(l) = self.0.get(shard) {
            l.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Claim {
            loads: self.clone(),
            shard,
        }
    }

    /// The live connections of `shard` (`None` for a shard that does not exist).
    pub(super) fn load(&self, shard: usize) -> Option<usize> {
        self.0
            .get(shard)
            .map(|l| l.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// One live connection counted on its shard ([`Loads::claim`]); the count drops with it.
pub(super) struct Claim {
    loads: Loads,
    shard: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(l) = self.loads.0.get(self.shard) {
            l.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_loaded_shard_is_picked_preferring_the_own_one() {
        let loads = |v: &[usize]| {
            let l = Loads::new(v.len());
            let claims: Vec<Claim> = v
                .iter()
                .enumerate()
                .flat_map(|(shard, &n)| (0..n).map(move |_| shard))
                .map(|shard| l.claim(shard))
                .collect();
            (l, claims)
        };
        assert_eq!(loads(&[0, 0]).0.pick(0), 0);
        assert_eq!(loads(&[0, 0]).0.pick(1), 1);
        let (l, _claims) = loads(&[1, 0]);
        assert_eq!(l.pick(0), 1);
        let (l, _claims) = loads(&[2, 2, 1]);
        assert_eq!(l.pick(1), 2);
        let (l, _claims) = loads(&[2, 2, 2]);
        assert_eq!(l.pick(2), 2);
    }

    #[test]
    fn a_claim_counts_until_it_is_dropped() {
        let l = Loads::new(2);
        let a = l.claim(1);
        let b = l.claim(1);
        assert_eq!((l.load(0), l.load(1)), (Some(0), Some(2)));
        drop(a);
        assert_eq!(l.load(1), Some(1));
        drop(b);
        assert_eq!(l.load(1), Some(0));
        assert_eq!(l.load(2), None, "no third shard");
        drop(l.claim(7));
    }
}
