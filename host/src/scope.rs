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

use capsa_schema::capsa_capnp::executor;
use tokio::sync::watch;

use crate::cell::{self, KillSwitch};
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

    /// A new root Executor of `host` whose processes belong to this scope:
    /// nesting level 1, the host's limits, and its own live-children quota.
    pub fn root_executor(&self, host: &Host) -> executor::Client {
        capnp_rpc::new_client(ExecutorImpl::scoped(
            host.clone(),
            1,
            host.config().limits.clone(),
            Some(self.clone()),
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
        live.retain(Tracked::running);
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
