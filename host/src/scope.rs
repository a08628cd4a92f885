//! Kill scopes: every process started on behalf of one client, at every
//! nesting level, so that all of them end when that client goes.
//!
//! `capsa serve` and the embedding API give each connection its own root
//! Executor in its own [`Scope`]. The Executors a scoped Executor hands to
//! its children carry the same scope, so grandchildren are tracked too.
//! Dropping every Process capability already kills what it stands for; the
//! scope is the guarantee that holds even when a capability was passed
//! somewhere that outlives the connection.

use std::cell::{Cell as Flag, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capsa_schema::capsa_capnp::executor;
use tokio::sync::watch;

use crate::cell::{self, KillSwitch};
use crate::error::SpawnError;
use crate::executor::ExecutorImpl;
use crate::host::Host;
use crate::status::ExitStatus;

/// The processes of one client. Clones share it.
#[derive(Clone, Default)]
pub struct Scope(Rc<Inner>);

#[derive(Default)]
struct Inner {
    live: RefCell<Vec<Tracked>>,
    closed: Flag<bool>,
    /// Guests of this scope alive or starting, at every nesting level.
    cells: Flag<u32>,
    share: Option<(u32, Arc<MemoryShare>)>,
    /// Length of `live` at which ended processes are next swept out.
    sweep_at: Flag<usize>,
}

/// The shortest list of tracked processes that is swept.
const SWEEP_AT_LEAST: usize = 64;

/// What one client may hold of the host at once, all its processes at every
/// nesting level together, so that one client cannot lock the others out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Guests alive at once (WASM cells and machines).
    pub cells: u32,
    /// Bytes of guest memory: WASM memories and tables as they grow, and
    /// each machine's RAM from boot to teardown.
    pub memory_bytes: u64,
}

/// A memory budget several guests draw on; shared with each guest's
/// memory limiter, which runs wherever its store does.
#[derive(Debug)]
pub struct MemoryShare {
    limit: u64,
    used: AtomicU64,
}

impl MemoryShare {
    pub fn new(limit: u64) -> MemoryShare {
        MemoryShare {
            limit,
            used: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `bytes` if they fit.
    pub fn take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken before.
    pub fn give(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// One guest of a scope with a share, and the machine memory it took;
/// both are given back when it is dropped (when the guest has ended).
pub(crate) struct Seat {
    scope: Rc<Inner>,
    memory: u64,
}

impl Seat {
    /// Takes `bytes` of the scope's memory for a machine's RAM.
    pub(crate) fn take_memory(&mut self, bytes: u64) -> Result<(), SpawnError> {
        if let Some((_, memory)) = &self.scope.share {
            if !memory.take(bytes) {
                return Err(SpawnError::Share(format!(
                    "a machine of {} MiB does not fit in what is left of this client's \
                     memory share of {} MiB",
                    bytes >> 20,
                    memory.limit() >> 20
                )));
            }
            self.memory = self.memory.saturating_add(bytes);
        }
        Ok(())
    }

    /// The budget the guest's memory limiter draws on.
    pub(crate) fn memory_share(&self) -> Option<Arc<MemoryShare>> {
        self.scope.share.as_ref().map(|(_, m)| m.clone())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let inner = &self.scope;
        inner.cells.set(inner.cells.get().saturating_sub(1));
        if let Some((_, memory)) = &inner.share {
            memory.give(self.memory);
        }
    }
}

struct Tracked {
    kill: Weak<KillSwitch>,
    status: watch::Receiver<Option<ExitStatus>>,
}

impl Tracked {
    fn running(&self) -> bool {
        self.status.borrow().is_none()
    }
}

impl Scope {
    pub fn new() -> Scope {
        Scope::default()
    }

    /// A scope whose processes together hold at most `share`.
    pub fn with_share(share: Share) -> Scope {
        Scope(Rc::new(Inner {
            share: Some((share.cells, Arc::new(MemoryShare::new(share.memory_bytes)))),
            ..Inner::default()
        }))
    }

    /// A seat for one more guest, or a refusal once the share's guests are
    /// all alive.
    pub(crate) fn seat(&self) -> Result<Seat, SpawnError> {
        let inner = &self.0;
        if let Some((cells, _)) = &inner.share {
            if inner.cells.get() >= *cells {
                return Err(SpawnError::Share(format!(
                    "this client already runs its share of {cells} guests"
                )));
            }
        }
        inner.cells.set(inner.cells.get() + 1);
        Ok(Seat {
            scope: self.0.clone(),
            memory: 0,
        })
    }

    /// A new root Executor of `host` whose processes belong to this scope:
    /// nesting level 1, the host's limits, and its own live-children quota.
    pub fn root_executor(&self, host: &Host) -> executor::Client {
        capnp_rpc::new_client(ExecutorImpl::scoped(
            host.clone(),
            1,
            host.config().limits.clone(),
            self.clone(),
            host.granted(),
        ))
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
        let mut live = self.0.live.borrow_mut();
        // Ended processes are dropped from the list when it has doubled
        // since the last sweep: amortised O(1) per process, where sweeping
        // at every start made a scope of n children cost O(n^2).
        if live.len() >= self.0.sweep_at.get() {
            live.retain(Tracked::running);
            self.0.sweep_at.set((live.len() * 2).max(SWEEP_AT_LEAST));
        }
        live.push(Tracked {
            kill: Rc::downgrade(&kill),
            status,
        });
    }

    /// Processes of this scope still running.
    pub fn live(&self) -> usize {
        self.0.live.borrow().iter().filter(|t| t.running()).count()
    }

    /// Refuses new processes, kills every running one and waits until all
    /// have ended. Returns how many were still running.
    pub async fn close(&self) -> usize {
        self.0.closed.set(true);
        let live: Vec<Tracked> = std::mem::take(&mut *self.0.live.borrow_mut())
            .into_iter()
            .filter(Tracked::running)
            .collect();
        for t in &live {
            if let Some(kill) = t.kill.upgrade() {
                kill.fire(ExitStatus::Killed);
            }
        }
        let count = live.len();
        for t in live {
            cell::wait_status(t.status).await;
        }
        count
    }
}
