//! How a process ended: the schema's `ExitStatus`, owned. One type for
//! the host, the agent, the guests and the tests.

use std::fmt;

use crate::capsa_capnp::exit_status;

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
