//! How a process ended, from what `waitpid` says, as the schema crate's
//! [`ExitStatus`].

pub use capsa_schema::status::ExitStatus;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

/// Why the agent itself sent SIGKILL to a process group, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// `Process.kill`, the last reference dropped, or the connection closed.
    Killed,
    DeadlineExceeded,
    CpuBudgetExceeded,
}

/// Maps what `waitpid` reported. A SIGKILL the agent sent reads as the
/// reason it was sent; so does SIGXCPU when the process had a CPU budget
/// (its `RLIMIT_CPU` is the budget's backstop, should the agent's own
/// accounting be late); any other signal, a SIGKILL nobody in the agent
/// sent included (the kernel's OOM killer), is a
/// failure naming the signal.
pub fn from_wait(
    status: WaitStatus,
    killed_by_agent: Option<KillReason>,
    cpu_budget: bool,
) -> Option<ExitStatus> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitStatus::Exited(code)),
        WaitStatus::Signaled(_, signal, core_dumped) => Some(match (signal, killed_by_agent) {
            (Signal::SIGKILL, Some(KillReason::Killed)) => ExitStatus::Killed,
            (Signal::SIGKILL, Some(KillReason::DeadlineExceeded)) => ExitStatus::DeadlineExceeded,
            (Signal::SIGKILL, Some(KillReason::CpuBudgetExceeded)) => ExitStatus::CpuBudgetExceeded,
            (Signal::SIGXCPU, None) if cpu_budget => ExitStatus::CpuBudgetExceeded,
            _ => ExitStatus::Failed(format!(
                "killed by signal {} ({}){}",
                signal as i32,
                signal.as_str(),
                if core_dumped { ", core dumped" } else { "" }
            )),
        }),
        // Stopped, continued and the like: the process has not ended.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn maps_wait_statuses() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            from_wait(WaitStatus::Exited(pid, 3), None, false),
            Some(ExitStatus::Exited(3))
        );
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                Some(KillReason::Killed),
                false
            ),
            Some(ExitStatus::Killed)
        );
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                Some(KillReason::DeadlineExceeded),
                false
            ),
            Some(ExitStatus::DeadlineExceeded)
        );
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGSEGV, true),
                None,
                false
            ),
            Some(ExitStatus::Failed(
                "killed by signal 11 (SIGSEGV), core dumped".into()
            ))
        );
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                None,
                false
            ),
            Some(ExitStatus::Failed("killed by signal 9 (SIGKILL)".into()))
        );
        assert_eq!(from_wait(WaitStatus::StillAlive, None, false), None);
    }

    #[test]
    fn a_cpu_budget_reads_as_its_own_status() {
        let pid = Pid::from_raw(42);
        // The agent's own kill, and the kernel's at the RLIMIT_CPU backstop.
        for (signal, by_agent) in [
            (Signal::SIGKILL, Some(KillReason::CpuBudgetExceeded)),
            (Signal::SIGXCPU, None),
        ] {
            assert_eq!(
                from_wait(WaitStatus::Signaled(pid, signal, false), by_agent, true),
                Some(ExitStatus::CpuBudgetExceeded),
                "{signal:?}"
            );
        }
        // Without a budget SIGXCPU is a signal like any other.
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGXCPU, false),
                None,
                false
            ),
            Some(ExitStatus::Failed("killed by signal 24 (SIGXCPU)".into()))
        );
    }
}
