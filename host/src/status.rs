//! The limits a process runs under, how it ended (the schema crate's
//! [`ExitStatus`]), and the switch that ends it.

use std::time::Duration;

use tokio::sync::watch;

/// Resource limits of one process. Children inherit their parent's limits
/// and may only tighten them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Upper bound on each linear memory and table of the guest, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock deadline from the start; `None` means no deadline.
    pub deadline: Option<Duration>,
    /// CPU time the guest may spend executing, in epoch ticks; `None` is
    /// unbounded.
    pub cpu_ticks: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            deadline: None,
            cpu_ticks: None,
        }
    }
}

impl Limits {
    /// The limits of a child whose parent runs under `self` and asked for
    /// these (`None` inherits): never looser than the parent's.
    pub fn narrowed(
        &self,
        memory_bytes: Option<u64>,
        deadline: Option<Duration>,
        cpu_ticks: Option<u64>,
    ) -> Limits {
        fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, None) => a,
                (None, b) => b,
            }
        }
        Limits {
            memory_bytes: memory_bytes.map_or(self.memory_bytes, |m| m.min(self.memory_bytes)),
            deadline: min_opt(self.deadline, deadline),
            cpu_ticks: min_opt(self.cpu_ticks, cpu_ticks),
        }
    }
}

pub use capsa_schema::status::ExitStatus;

/// Waits until the process behind `rx` has ended; a task that went away
/// without a word (dropped with its runtime) counts as killed.
pub async fn wait_status(mut rx: watch::Receiver<Option<ExitStatus>>) -> ExitStatus {
    match rx.wait_for(Option::is_some).await {
        Ok(s) => s.clone().unwrap_or(ExitStatus::Killed),
        // The task is gone without a word: it was dropped with the runtime.
        Err(_) => ExitStatus::Killed,
    }
}

/// Ends a process (a cell or a machine) from outside the task that runs it:
/// the first reason fired is the status it ends with.
pub struct KillSwitch(watch::Sender<Option<ExitStatus>>);

impl KillSwitch {
    pub fn new(tx: watch::Sender<Option<ExitStatus>>) -> Self {
        KillSwitch(tx)
    }

    pub fn fire(&self, reason: ExitStatus) {
        self.0.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}
