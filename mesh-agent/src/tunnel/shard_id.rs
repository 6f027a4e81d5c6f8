//! Which tunnel shard ([`super::shards`]) the calling thread serves: set once by each shard's
//! thread, read by the pool to key connections by shard. A leaf module, so the pool does not
//! depend on the shards that depend on it.

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
