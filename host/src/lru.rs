//! [`ByteLru`]: a map bounded by what its values cost in bytes, the least
//! recently used going first. The compile cache in memory and the program
//! table are both one, so both keep their budget the same way.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Values by key, their costs summing to at most `budget` bytes.
///
/// The rules, for every user alike:
///
/// - **Too large.** A value costing more than the whole budget is not kept:
///   [`ByteLru::insert`] hands it back and evicts nothing for it. So the
///   costs never sum past the budget.
/// - **Same key.** Inserting a key already present keeps the value there
///   and hands that one back, marked as used; the new value is dropped.
///   Keys name their values' contents (a hash of the bytes), so the two are
///   the same thing, and every caller ends up sharing one.
/// - **Recency.** A hit ([`ByteLru::get`]) and an insert mark the entry
///   most recently used; a miss changes nothing. Every mark takes a fresh
///   stamp from a counter, so no two entries are ever equally recent and
///   the one to evict is always a single entry.
/// - **Eviction.** After an insert, the least recently used other entries
///   go, one at a time, until the costs fit the budget again; the entry
///   just inserted never goes (it fits on its own).
pub(crate) struct ByteLru<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Every key by the stamp of its last use: the first is the least
    /// recently used.
    order: BTreeMap<u64, K>,
    /// Sum of the entries' costs.
    bytes: u64,
    budget: u64,
    /// The last stamp given.
    clock: u64,
}

struct Entry<V> {
    value: V,
    cost: u64,
    /// Its key's place in `order`.
    used: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> ByteLru<K, V> {
    pub(crate) fn new(budget: u64) -> Self {
        ByteLru {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    /// The value of `key`, now the most recently used.
    pub(crate) fn get<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entry = self.entries.get_mut(key)?;
        self.clock += 1;
        let owned = self
            .order
            .remove(&entry.used)
            .expect("every entry has its place in the order");
        entry.used = self.clock;
        self.order.insert(self.clock, owned);
        Some(entry.value.clone())
    }

    /// Keeps `value` under `key` at `cost` bytes, then evicts the least
    /// recently used others while over budget. Returns the value `key` now
    /// stands for: the one already there if there was one, else `value`
    /// (kept, or handed back when it costs more than the whole budget).
    pub(crate) fn insert(&mut self, key: K, value: V, cost: u64) -> V {
        if let Some(known) = self.get(&key) {
            return known;
        }
        if cost > self.budget {
            return value;
        }
        self.clock += 1;
        self.bytes += cost;
        self.order.insert(self.clock, key.clone());
        self.entries.insert(
            key,
            Entry {
                value: value.clone(),
                cost,
                used: self.clock,
            },
        );
        // The new entry fits alone, and it is the last in `order`: the
        // loop ends before reaching it.
        while self.bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes -= gone.cost;
            }
        }
        value
    }

    /// How many entries it holds.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sum of its entries' costs.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(budget: u64, entries: &[(u8, u64)]) -> ByteLru<u8, u8> {
        let mut lru = ByteLru::new(budget);
        for &(key, cost) in entries {
            lru.insert(key, key, cost);
        }
        lru
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let mut lru = filled(100, &[(1, 40), (2, 40)]);
        lru.insert(3, 3, 40);
        assert_eq!(
            (lru.get(&1), lru.get(&2), lru.get(&3)),
            (None, Some(2), Some(3))
        );
        assert_eq!((lru.len(), lru.bytes()), (2, 80));
    }

    #[test]
    fn a_hit_makes_an_entry_the_most_recently_used() {
        let mut lru = filled(100, &[(1, 40), (2, 40)]);
        assert_eq!(lru.get(&1), Some(1));
        lru.insert(3, 3, 40);
        assert_eq!((lru.get(&1), lru.get(&2)), (Some(1), None));
    }

    #[test]
    fn a_miss_changes_nothing() {
        let mut lru = filled(100, &[(1, 40), (2, 40)]);
        assert_eq!(lru.get(&9), None);
        lru.insert(3, 3, 40);
        assert_eq!((lru.get(&1), lru.get(&2)), (None, Some(2)));
    }

    #[test]
    fn a_value_larger_than_the_budget_is_handed_back_and_evicts_nothing() {
        let mut lru = filled(100, &[(1, 40), (2, 40)]);
        assert_eq!(lru.insert(9, 9, 101), 9);
        assert_eq!(lru.get(&9), None);
        assert_eq!((lru.len(), lru.bytes()), (2, 80));
        // Exactly the budget fits, alone.
        lru.insert(8, 8, 100);
        assert_eq!((lru.len(), lru.bytes(), lru.get(&8)), (1, 100, Some(8)));
        // A budget of 0 keeps nothing.
        let mut none = filled(0, &[(1, 1)]);
        assert_eq!((none.len(), none.get(&1)), (0, None));
    }

    #[test]
    fn the_same_key_keeps_the_value_there_and_marks_it_used() {
        let mut lru = ByteLru::new(100);
        lru.insert(1, "first", 40);
        lru.insert(2, "second", 40);
        assert_eq!(lru.insert(1, "again", 50), "first");
        assert_eq!((lru.len(), lru.bytes()), (2, 80));
        // Marked used: 2 is now the oldest.
        lru.insert(3, "third", 40);
        assert_eq!((lru.get(&1), lru.get(&2)), (Some("first"), None));
    }

    #[test]
    fn an_insert_evicts_as_many_as_it_takes_but_never_itself() {
        let mut lru = filled(100, &[(1, 30), (2, 30), (3, 30)]);
        lru.insert(4, 4, 90);
        assert_eq!((lru.len(), lru.bytes(), lru.get(&4)), (1, 90, Some(4)));
    }

    #[test]
    fn looked_up_by_a_borrowed_key() {
        let mut lru: ByteLru<String, u8> = ByteLru::new(10);
        lru.insert("a".to_string(), 1, 1);
        assert_eq!(lru.get("a"), Some(1));
    }
}
