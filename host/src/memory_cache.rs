//! Compiled guests in memory, by a fast 128-bit content hash (XXH3) of
//! their bytes. Every hit is confirmed by comparing the bytes themselves,
//! so a crafted collision cannot pass one guest off as another. Bounded in
//! bytes (each entry's bytes and compiled code), the least recently used
//! going first, by the rules of [`ByteLru`].

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::lru::ByteLru;

/// A guest's bytes as the cache's key: hashed by their XXH3, equal only to
/// the same bytes.
#[derive(Clone)]
pub(crate) struct Source {
    hash: u128,
    bytes: Arc<[u8]>,
}

impl Source {
    pub(crate) fn new(bytes: Arc<[u8]>) -> Source {
        Source {
            hash: xxhash_rust::xxh3::xxh3_128(&bytes),
            bytes,
        }
    }
}

impl PartialEq for Source {
    fn eq(&self, other: &Source) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.bytes, &other.bytes) || *self.bytes == *other.bytes)
    }
}

impl Eq for Source {}

impl Hash for Source {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.hash.hash(state);
    }
}

/// Compiled guests by their bytes, at most `budget` bytes of bytes and code.
pub(crate) struct MemoryCache<T>(ByteLru<Source, T>);

impl<T: Clone> MemoryCache<T> {
    pub(crate) fn new(budget: u64) -> Self {
        MemoryCache(ByteLru::new(budget))
    }

    pub(crate) fn get(&mut self, source: &Source) -> Option<T> {
        self.0.get(source)
    }

    /// Keeps `compiled`, whose code takes `code_bytes`, for `source`;
    /// returns what the cache holds for it (see [`ByteLru::insert`]).
    pub(crate) fn insert(&mut self, source: Source, compiled: T, code_bytes: u64) -> T {
        let cost = code_bytes.saturating_add(source.bytes.len() as u64);
        self.0.insert(source, compiled, cost)
    }

    /// How many guests it holds.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two byte strings whose keys collide: the same hash, other bytes.
    fn colliding(a: &str, b: &str) -> (Source, Source) {
        let a = Source::new(Arc::from(a.as_bytes()));
        let b = Source {
            hash: a.hash,
            bytes: Arc::from(b.as_bytes()),
        };
        (a, b)
    }

    #[test]
    fn a_collision_never_finds_the_other_guest() {
        let mut cache = MemoryCache::new(100);
        let (a, b) = colliding("a", "b");
        cache.insert(a.clone(), 1, 10);
        assert_eq!(cache.get(&b), None);
        // Both are kept, each under its own bytes.
        cache.insert(b.clone(), 2, 10);
        assert_eq!(
            (cache.get(&a), cache.get(&b), cache.len()),
            (Some(1), Some(2), 2)
        );
    }

    #[test]
    fn the_same_bytes_sent_again_are_found() {
        let mut cache = MemoryCache::new(100);
        cache.insert(Source::new(Arc::from(&b"guest"[..])), 1, 10);
        // Another copy of the bytes, not the same allocation.
        assert_eq!(cache.get(&Source::new(Arc::from(&b"guest"[..]))), Some(1));
    }

    #[test]
    fn an_entry_costs_its_bytes_and_its_code() {
        let mut cache = MemoryCache::new(100);
        // 90 of code and 10 of bytes fit; one more byte of code does not.
        cache.insert(Source::new(Arc::from(&[0u8; 10][..])), 1, 90);
        assert_eq!(cache.len(), 1);
        cache.insert(Source::new(Arc::from(&[1u8; 10][..])), 2, 91);
        assert_eq!(cache.get(&Source::new(Arc::from(&[1u8; 10][..]))), None);
    }
}
