//! A set of running processes that can all be ended together: the host's
//! (every guest at every level, for shutdown and its `max_cells` count) and
//! each client scope's (what one connection started, for when it goes).

use std::cell::{Cell as Count, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use tokio::sync::watch;

use crate::status::{wait_status, ExitStatus, KillSwitch};

/// Processes by key, with what ends them and what says they have ended.
#[derive(Default)]
pub(crate) struct ProcessSet {
    entries: RefCell<HashMap<u64, Entry>>,
    /// Size at which ended processes are next swept out.
    sweep_at: Count<usize>,
}

struct Entry {
    kill: Rc<KillSwitch>,
    status: watch::Receiver<Option<ExitStatus>>,
}

impl Entry {
    fn running(&self) -> bool {
        self.status.borrow().is_none()
    }
}

/// The smallest set that is swept.
const SWEEP_AT_LEAST: usize = 64;

impl ProcessSet {
    /// Adds a process under `key`. Ended processes are dropped from the set
    /// when it has doubled since the last sweep: amortised O(1) per process
    /// for owners that never remove (sweeping at every insert made n
    /// processes cost O(n^2)).
    pub(crate) fn insert(
        &self,
        key: u64,
        kill: Rc<KillSwitch>,
        status: watch::Receiver<Option<ExitStatus>>,
    ) {
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= self.sweep_at.get() {
            entries.retain(|_, e| e.running());
            self.sweep_at.set((entries.len() * 2).max(SWEEP_AT_LEAST));
        }
        entries.insert(key, Entry { kill, status });
    }

    /// Forgets the process under `key` (it has ended).
    pub(crate) fn remove(&self, key: u64) {
        self.entries.borrow_mut().remove(&key);
    }

    /// Processes held: running, or ended and not yet removed or swept.
    pub(crate) fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Processes still running.
    pub(crate) fn running(&self) -> usize {
        self.entries
            .borrow()
            .values()
            .filter(|e| e.running())
            .count()
    }

    /// Kills every running process and waits until each has ended, again
    /// for any added meanwhile, until none runs. Returns how many were
    /// running when it was called.
    pub(crate) async fn end_all(&self) -> usize {
        let mut first = None;
        loop {
            let running: Vec<(Rc<KillSwitch>, watch::Receiver<Option<ExitStatus>>)> = self
                .entries
                .borrow()
                .values()
                .filter(|e| e.running())
                .map(|e| (e.kill.clone(), e.status.clone()))
                .collect();
            let count = *first.get_or_insert(running.len());
            if running.is_empty() {
                return count;
            }
            for (kill, _) in &running {
                kill.fire(ExitStatus::Killed);
            }
            for (_, status) in running {
                wait_status(status).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> (Rc<KillSwitch>, watch::Receiver<Option<ExitStatus>>) {
        let (tx, rx) = watch::channel(None);
        (Rc::new(KillSwitch::new(tx)), rx)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn end_all_kills_what_runs_and_counts_it() {
        let set = ProcessSet::default();
        let (a, a_status) = process();
        let (b, b_status) = process();
        set.insert(1, a.clone(), a_status.clone());
        set.insert(2, b.clone(), b_status);
        b.fire(ExitStatus::Exited(0));
        assert_eq!((set.len(), set.running()), (2, 1));
        assert_eq!(set.end_all().await, 1);
        assert_eq!(*a_status.borrow(), Some(ExitStatus::Killed));
        assert_eq!(set.running(), 0);
        set.remove(1);
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn ended_processes_are_swept_as_the_set_grows() {
        let set = ProcessSet::default();
        let mut keep = Vec::new();
        for key in 0..10 * SWEEP_AT_LEAST as u64 {
            let (kill, status) = process();
            kill.fire(ExitStatus::Exited(0));
            set.insert(key, kill, status);
            keep.push(key);
        }
        assert!(set.len() <= SWEEP_AT_LEAST + 1, "{}", set.len());
    }
}
