//! The limits a process runs under, and how it ended (the schema crate's
//! [`ExitStatus`]).

use std::time::Duration;

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
    /// `requested` (zero meaning "inherit"): never looser than the parent's.
    pub fn narrowed(&self, memory_bytes: u64, deadline_ms: u64, cpu_ticks: u64) -> Limits {
        fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, None) => a,
                (None, b) => b,
            }
        }
        let memory_bytes = match memory_bytes {
            0 => self.memory_bytes,
            m => m.min(self.memory_bytes),
        };
        Limits {
            memory_bytes,
            deadline: min_opt(
                self.deadline,
                (deadline_ms > 0).then(|| Duration::from_millis(deadline_ms)),
            ),
            cpu_ticks: min_opt(self.cpu_ticks, (cpu_ticks > 0).then_some(cpu_ticks)),
        }
    }
}

pub use capsa_schema::status::ExitStatus;
