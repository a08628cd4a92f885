//! Kill scopes: every process started on behalf of one client, at every
//! nesting level, so that all of them end when that client goes.
//!
//! `capsa serve` and the embedding API give each connection its own root
//! Executor in its own [`Scope`]. The Executors a scoped Executor hands to
//! its children carry the same scope, so grandchildren are tracked too.
//! Dropping every Process capability already kills what it stands for; the
//! scope is the guarantee that holds even when a capability was passed
//! somewhere that outlives the connection.

use std::cell::Cell;
use std::rc::Rc;

use tokio::sync::watch;

use crate::error::SpawnError;
use crate::quota::{ClientQuota, Seat};

pub use crate::quota::Share;
use crate::registry::ProcessSet;
use crate::status::{ExitStatus, KillSwitch};

/// The processes of one client. Clones share it.
#[derive(Clone, Default)]
pub struct Scope(Rc<Inner>);

#[derive(Default)]
struct Inner {
    processes: ProcessSet,
    /// Keys for `processes`.
    next_key: Cell<u64>,
    closed: Cell<bool>,
    /// The guests and memory of this client, at every nesting level.
    quota: Rc<ClientQuota>,
}

impl Scope {
    pub fn new() -> Scope {
        Scope::default()
    }

    /// A scope whose processes together hold at most `share`.
    pub fn with_share(share: Share) -> Scope {
        Scope(Rc::new(Inner {
            quota: Rc::new(ClientQuota::with_share(share)),
            ..Inner::default()
        }))
    }

    /// A seat for one more guest, or a refusal once the share's guests are
    /// all alive.
    pub(crate) fn seat(&self) -> Result<Seat, SpawnError> {
        self.0.quota.seat()
    }

    /// Whether [`Scope::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.0.closed.get()
    }

    /// Adds a process that has just started. A scope that is already closed
    /// (its client went while the process was being compiled or booted)
    /// kills it at once.
    pub(crate) fn track(&self, kill: Rc<KillSwitch>, status: watch::Receiver<Option<ExitStatus>>) {
        if self.is_closed() {
            kill.fire(ExitStatus::Killed);
        }
        let key = self.0.next_key.get();
        self.0.next_key.set(key + 1);
        self.0.processes.insert(key, kill, status);
    }

    /// Processes of this scope still running.
    pub fn live(&self) -> usize {
        self.0.processes.running()
    }

    /// Refuses new processes, kills every running one and waits until all
    /// have ended. Returns how many were still running.
    pub async fn close(&self) -> usize {
        self.0.closed.set(true);
        self.0.processes.end_all().await
    }
}
