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
}

/// Maps what `waitpid` reported. A SIGKILL the agent sent reads as the
/// reason it was sent; any other signal is a failure naming the signal.
pub fn from_wait(status: WaitStatus, killed_by_agent: Option<KillReason>) -> Option<ExitStatus> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitStatus::Exited(code)),
        WaitStatus::Signaled(_, signal, core_dumped) => Some(match (signal, killed_by_agent) {
            (Signal::SIGKILL, Some(KillReason::Killed)) => ExitStatus::Killed,
            (Signal::SIGKILL, Some(KillReason::DeadlineExceeded)) => ExitStatus::DeadlineExceeded,
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
            from_wait(WaitStatus::Exited(pid, 3), None),
            Some(ExitStatus::Exited(3))
        );
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                Some(KillReason::Killed)
            ),
            Some(ExitStatus::Killed)
        );
        assert_eq!(
            from_wait(
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                Some(KillReason::DeadlineExceeded)
            ),
            Some(ExitStatus::DeadlineExceeded)
        );
        assert_eq!(
            from_wait(WaitStatus::Signaled(pid, Signal::SIGSEGV, true), None),
            Some(ExitStatus::Failed(
                "killed by signal 11 (SIGSEGV), core dumped".into()
            ))
        );
        assert_eq!(
            from_wait(WaitStatus::Signaled(pid, Signal::SIGKILL, false), None),
            Some(ExitStatus::Failed("killed by signal 9 (SIGKILL)".into()))
        );
        assert_eq!(from_wait(WaitStatus::StillAlive, None), None);
    }
}
