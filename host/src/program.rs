//! Programs: bytes loaded once by an Executor, run any number of times
//! without sending them again, and found again by their content hash.
//!
//! The bytes live in the host's [`ProgramTable`], bounded in bytes and least
//! recently used first, so a client that knows a program's SHA-256 can skip
//! the upload on a later connection. The `Program` capability on a loaded
//! program is the Executor's (`crate::executor`): it runs through the
//! Executor that loaded or found it.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::engine::Compiled;
use crate::format::Format;

pub use capsa_schema::program::Hash;

/// Bytes checked to run on this host.
pub struct Loaded {
    pub bytes: Arc<[u8]>,
    pub hash: Hash,
    pub format: Format,
    /// WASM: compiled and linked when loaded. A run starts from it without
    /// looking the bytes up in the compile cache again (hashing and
    /// comparing them: milliseconds for tens of MiB); the code lives as long
    /// as the Program does, like its bytes. `None` for an ELF.
    pub compiled: Option<Compiled>,
}

/// What a run starts from: bytes as sent, or a loaded Program.
pub enum Payload {
    Bytes(Arc<[u8]>),
    Loaded(Rc<Loaded>),
}

impl Payload {
    pub fn bytes(&self) -> &Arc<[u8]> {
        match self {
            Payload::Bytes(bytes) => bytes,
            Payload::Loaded(loaded) => &loaded.bytes,
        }
    }
}

/// Programs by hash, holding at most `budget` bytes of them: the least
/// recently loaded or found go first. A Program capability keeps its own
/// bytes alive after its entry is evicted.
pub struct ProgramTable {
    entries: HashMap<Hash, (Rc<Loaded>, u64)>,
    bytes: u64,
    clock: u64,
    budget: u64,
}

impl ProgramTable {
    pub fn new(budget: u64) -> Self {
        ProgramTable {
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
            budget,
        }
    }

    pub fn get(&mut self, hash: &Hash) -> Option<Rc<Loaded>> {
        self.clock += 1;
        let (loaded, used) = self.entries.get_mut(hash)?;
        *used = self.clock;
        Some(loaded.clone())
    }

    /// Adds `loaded` (or refreshes the entry of the same hash, which holds
    /// the same bytes) and evicts the least recently used others while
    /// over budget. A program larger than the whole budget is not kept.
    pub fn insert(&mut self, loaded: Rc<Loaded>) -> Rc<Loaded> {
        if let Some(known) = self.get(&loaded.hash) {
            return known;
        }
        let cost = loaded.bytes.len() as u64;
        if cost > self.budget {
            return loaded;
        }
        self.clock += 1;
        self.bytes += cost;
        self.entries
            .insert(loaded.hash, (loaded.clone(), self.clock));
        while self.bytes > self.budget {
            let oldest = self
                .entries
                .iter()
                .filter(|(h, _)| **h != loaded.hash)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| *h);
            let Some(hash) = oldest else { break };
            if let Some((gone, _)) = self.entries.remove(&hash) {
                self.bytes -= gone.bytes.len() as u64;
            }
        }
        loaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(tag: u8, len: usize) -> Rc<Loaded> {
        Rc::new(Loaded {
            bytes: Arc::from(vec![tag; len]),
            hash: [tag; 32],
            format: Format::Module,
            compiled: None,
        })
    }

    #[test]
    fn the_table_keeps_its_budget_and_evicts_the_least_recently_used() {
        let mut table = ProgramTable::new(100);
        table.insert(loaded(1, 40));
        table.insert(loaded(2, 40));
        // Finding 1 makes 2 the least recently used.
        assert!(table.get(&[1; 32]).is_some());
        table.insert(loaded(3, 40));
        assert!(table.get(&[2; 32]).is_none(), "2 was the oldest");
        assert!(table.get(&[1; 32]).is_some());
        assert!(table.get(&[3; 32]).is_some());
        assert_eq!(table.bytes, 80);
        // Larger than the whole budget: returned, not kept, nothing evicted.
        let big = table.insert(loaded(4, 101));
        assert_eq!(big.bytes.len(), 101);
        assert!(table.get(&[4; 32]).is_none());
        assert_eq!(table.entries.len(), 2);
        // The same hash again is one entry.
        table.insert(loaded(1, 40));
        assert_eq!((table.entries.len(), table.bytes), (2, 80));
    }
}
