//! How a process ended, and the limits it ran under.

use std::fmt;
use std::time::Duration;

use capsa_schema::capsa_capnp::exit_status;

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

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest returned or called `exit` with this code.
    Exited(i32),
    /// A WebAssembly trap (a Rust panic is one); the text says which.
    Trapped(String),
    /// `Process.kill`, the last reference dropped, or the host shut down.
    Killed,
    DeadlineExceeded,
    CpuBudgetExceeded,
    /// The guest trapped after the host refused to grow its memory past this
    /// many bytes.
    OutOfMemory(u64),
    /// The process could not run to completion for a reason outside the
    /// guest's code.
    Failed(String),
}

impl ExitStatus {
    /// Whether the guest exited normally with code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }

    /// The exit code a command-line host reports for this status.
    pub fn code(&self) -> i32 {
        match self {
            ExitStatus::Exited(c) => *c,
            ExitStatus::Killed => 137,
            ExitStatus::DeadlineExceeded | ExitStatus::CpuBudgetExceeded => 124,
            _ => 125,
        }
    }

    pub fn write_to(&self, mut b: exit_status::Builder<'_>) {
        match self {
            ExitStatus::Exited(c) => b.set_exited(*c),
            ExitStatus::Trapped(m) => b.set_trapped(m.as_str()),
            ExitStatus::Killed => b.set_killed(()),
            ExitStatus::DeadlineExceeded => b.set_deadline_exceeded(()),
            ExitStatus::CpuBudgetExceeded => b.set_cpu_budget_exceeded(()),
            ExitStatus::OutOfMemory(l) => b.set_out_of_memory(*l),
            ExitStatus::Failed(m) => b.set_failed(m.as_str()),
        }
    }

    pub fn read_from(r: exit_status::Reader<'_>) -> capnp::Result<ExitStatus> {
        use exit_status::Which;
        Ok(match r.which()? {
            Which::Exited(c) => ExitStatus::Exited(c),
            Which::Trapped(m) => ExitStatus::Trapped(m?.to_string()?),
            Which::Killed(()) => ExitStatus::Killed,
            Which::DeadlineExceeded(()) => ExitStatus::DeadlineExceeded,
            Which::CpuBudgetExceeded(()) => ExitStatus::CpuBudgetExceeded,
            Which::OutOfMemory(l) => ExitStatus::OutOfMemory(l),
            Which::Failed(m) => ExitStatus::Failed(m?.to_string()?),
        })
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exited with code {c}"),
            ExitStatus::Trapped(m) => write!(f, "trapped: {m}"),
            ExitStatus::Killed => write!(f, "killed"),
            ExitStatus::DeadlineExceeded => write!(f, "killed: deadline exceeded"),
            ExitStatus::CpuBudgetExceeded => write!(f, "killed: CPU budget exceeded"),
            ExitStatus::OutOfMemory(l) => write!(f, "out of memory: limit of {l} bytes reached"),
            ExitStatus::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}
