//! Programs: bytes loaded once by an Executor, run any number of times
//! without sending them again, and found again by their content hash.
//!
//! The bytes live in the host's [`ProgramTable`], bounded in bytes and least
//! recently used first, so a client that knows a program's SHA-256 can skip
//! the upload on a later connection. The `Program` capability on a loaded
//! program is the Executor's (`crate::executor`): it runs through the
//! Executor that loaded or found it.

use std::rc::Rc;
use std::sync::Arc;

use crate::engine::Compiled;
use crate::format::Format;
use crate::lru::ByteLru;

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
/// recently loaded or found go first, by the rules of [`ByteLru`]. A
/// Program capability keeps its own bytes alive after its entry is evicted.
pub struct ProgramTable(ByteLru<Hash, Rc<Loaded>>);

impl ProgramTable {
    pub fn new(budget: u64) -> Self {
        ProgramTable(ByteLru::new(budget))
    }

    pub fn get(&mut self, hash: &Hash) -> Option<Rc<Loaded>> {
        self.0.get(hash)
    }

    /// Adds `loaded`, at the cost of its bytes, and returns the program the
    /// table holds for its hash: one loaded before it (the same bytes), or
    /// `loaded` itself (kept, or not when larger than the whole budget).
    pub fn insert(&mut self, loaded: Rc<Loaded>) -> Rc<Loaded> {
        let cost = loaded.bytes.len() as u64;
        self.0.insert(loaded.hash, loaded, cost)
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

    /// The table's own rule: a program costs its bytes; the rest is
    /// `ByteLru`'s.
    #[test]
    fn a_program_costs_its_bytes() {
        let mut table = ProgramTable::new(100);
        table.insert(loaded(1, 60));
        table.insert(loaded(2, 40));
        assert!(table.get(&[1; 32]).is_some() && table.get(&[2; 32]).is_some());
        table.insert(loaded(3, 1));
        assert!(table.get(&[1; 32]).is_none(), "101 bytes kept in 100");
        // The same hash again is the program already there.
        let again = loaded(2, 40);
        assert!(!Rc::ptr_eq(&table.insert(again.clone()), &again));
    }
}
