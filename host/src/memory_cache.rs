//! Compiled guests in memory, by a fast 128-bit content hash (XXH3) of
//! their bytes. Every hit is confirmed by comparing the bytes themselves,
//! so a crafted collision cannot pass one guest off as another. Bounded in
//! bytes (each entry's bytes and compiled code), the least recently used
//! going first.

use std::collections::HashMap;
use std::sync::Arc;

/// Compiled guests in memory, by the XXH3 of their bytes, bounded in bytes.
pub(crate) struct MemoryCache<T> {
    entries: HashMap<u128, Vec<Entry<T>>>,
    /// Sum of the entries' costs.
    bytes: u64,
    /// Bumped at every use, to find the least recently used.
    clock: u64,
}

impl<T> Default for MemoryCache<T> {
    fn default() -> Self {
        MemoryCache {
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }
}

struct Entry<T> {
    source: Arc<[u8]>,
    compiled: T,
    /// Its bytes and its compiled code.
    cost: u64,
    used: u64,
}

impl<T: Clone> MemoryCache<T> {
    pub(crate) fn get(&mut self, key: u128, bytes: &[u8]) -> Option<T> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self
            .entries
            .get_mut(&key)?
            .iter_mut()
            .find(|e| *e.source == *bytes)?;
        entry.used = clock;
        Some(entry.compiled.clone())
    }

    /// Adds an entry, then drops the least recently used ones (never the
    /// new one) while over `budget`.
    pub(crate) fn insert(
        &mut self,
        key: u128,
        source: Arc<[u8]>,
        compiled: T,
        cost: u64,
        budget: u64,
    ) {
        self.clock += 1;
        self.bytes += cost;
        self.entries.entry(key).or_default().push(Entry {
            source,
            compiled,
            cost,
            used: self.clock,
        });
        while self.bytes > budget {
            let oldest = self
                .entries
                .iter()
                .flat_map(|(k, bucket)| {
                    bucket.iter().enumerate().map(move |(i, e)| (*k, i, e.used))
                })
                .filter(|(_, _, used)| *used != self.clock)
                .min_by_key(|(_, _, used)| *used);
            let Some((k, i, _)) = oldest else { break };
            let bucket = self.entries.get_mut(&k).expect("found above");
            self.bytes -= bucket.swap_remove(i).cost;
            if bucket.is_empty() {
                self.entries.remove(&k);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_cache_drops_the_least_recently_used_past_its_budget() {
        let mut cache = MemoryCache::<u32>::default();
        let src = |s: &str| Arc::<[u8]>::from(s.as_bytes());
        cache.insert(1, src("a"), 1, 40, 100);
        cache.insert(2, src("b"), 2, 40, 100);
        assert_eq!(cache.get(1, b"a"), Some(1)); // a is now the newer
        cache.insert(3, src("c"), 3, 40, 100); // 120 > 100: b goes
        assert_eq!(
            (cache.get(2, b"b"), cache.len(), cache.bytes),
            (None, 2, 80)
        );
        assert_eq!(cache.get(1, b"a"), Some(1));
        // Same key, other bytes (a collision): never the other's entry.
        assert_eq!(cache.get(1, b"x"), None);
        // One entry over the whole budget stays until the next comes.
        cache.insert(4, src("d"), 4, 500, 100);
        assert_eq!((cache.len(), cache.get(4, b"d")), (1, Some(4)));
    }
}
