//! Stable `u32` numbers for names (workloads, identities), for eBPF map keys.
//!
//! A number is the 32-bit FNV-1a hash of the name; names are numbered in sorted order and a
//! collision takes the next free number, so the result depends only on the set of names. 0 is
//! never given out: the maps use it for "unknown".

use std::collections::{BTreeMap, BTreeSet};

fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Numbers every name of `names` (sorted, deduplicated by the `BTreeSet`).
pub(crate) fn number<T: Ord + Clone>(
    names: &BTreeSet<T>,
    text: impl Fn(&T) -> String,
) -> BTreeMap<T, u32> {
    let mut used = BTreeSet::new();
    let mut out = BTreeMap::new();
    for name in names {
        let mut id = fnv1a32(text(name).as_bytes());
        while id == 0 || used.contains(&id) {
            id = id.wrapping_add(1);
        }
        used.insert(id);
        out.insert(name.clone(), id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_nonzero_and_unique() {
        let names: BTreeSet<String> = (0..5000).map(|i| format!("ns/w{i}")).collect();
        let a = number(&names, |s| s.clone());
        let b = number(&names, |s| s.clone());
        assert_eq!(a, b);
        let ids: BTreeSet<u32> = a.values().copied().collect();
        assert_eq!(ids.len(), names.len());
        assert!(!ids.contains(&0));
        // Removing one name leaves every other number as it was (no collision among these).
        let mut fewer = names.clone();
        fewer.remove("ns/w7");
        let c = number(&fewer, |s| s.clone());
        assert!(c.iter().all(|(k, v)| a[k] == *v));
    }

    #[test]
    fn collisions_take_the_next_free_number() {
        // Every name hashes to the same value: numbers follow sorted order.
        let names: BTreeSet<&str> = ["b", "a", "c"].into_iter().collect();
        let ids = number(&names, |_| "same".to_owned());
        let base = fnv1a32(b"same");
        assert_eq!(ids["a"], base);
        assert_eq!(ids["b"], base.wrapping_add(1));
        assert_eq!(ids["c"], base.wrapping_add(2));
    }
}
