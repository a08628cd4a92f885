//! The machine as a host process: the agent binary listening on a Unix
//! socket in a private folder, for machines whose KVM cannot run Linux user
//! space. It is no isolation boundary; it exists so that the host's half of
//! the ELF path is tested over the real Cap'n Proto connection.
//!
//! The agent leads a session of its own: every process it starts, and every
//! process those fork, is in that session unless it makes one itself. Its
//! end sweeps the session through `/proc`, so nothing an ELF left behind
//! outlives the machine, even when the agent was killed before it could end
//! them (an ELF's `sleep 100 &` outlives its process group's leader and the
//! agent's SIGKILL of that group).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::AgentStream;
use crate::error::VmFailure;

/// How many of an agent process's last lines an early exit reports.
const AGENT_LAST_LINES: usize = 8;
/// How long an agent that exited gets to have its last lines read.
const AGENT_LAST_WORDS: Duration = Duration::from_secs(1);

/// A running agent process and the folder it works in.
pub(super) struct AgentMachine {
    child: Box<AgentProcess>,
    _dir: TempDir,
}

impl AgentMachine {
    /// Resolves when the agent exits on its own, with a description.
    pub(super) async fn stopped(&mut self) -> String {
        match self.child.0.wait().await {
            Ok(s) => format!("the agent exited: {s}"),
            Err(e) => format!("the agent is gone: {e}"),
        }
    }

    /// Ends the agent and everything in its session, and waits for it.
    pub(super) async fn tear_down(mut self) {
        // The agent is not reaped until its session is empty, so the
        // session id stays reserved while it is swept.
        if let Some(pid) = self.child.0.id() {
            end_session(pid);
        }
        let _ = self.child.0.wait().await;
    }
}

/// Starts the agent at `agent` and returns it with a stream to it, once it
/// answers on its socket, by `deadline` (`ready_timeout` from the start).
pub(super) async fn boot(
    agent: &Path,
    deadline: Instant,
    ready_timeout: Duration,
) -> Result<(AgentMachine, AgentStream), VmFailure> {
    let dir = TempDir::new().map_err(VmFailure::TempDir)?;
    let socket = dir.0.join("agent.sock");
    let mut command = tokio::process::Command::new(agent);
    command
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--once")
        // Inside the folder the host removes, even when it has to kill the
        // agent.
        .arg("--work-dir")
        .arg(dir.0.join("work"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and makes
    // only two system calls; it allocates nothing and takes no lock.
    #[expect(unsafe_code, reason = "pre_exec runs code between fork and exec")]
    unsafe {
        command.pre_exec(|| {
            // A session of its own, for `end_session`.
            rustix::process::setsid()?;
            // The agent ends with the host, however the host ends.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| VmFailure::AgentStart {
        agent: agent.to_path_buf(),
        source,
    })?;
    // The agent's console, as a VM's serial log would be: to the host log,
    // never into a data stream; its last lines explain an agent that exits
    // before answering.
    let said = Rc::new(std::cell::RefCell::new(VecDeque::new()));
    let console = child.stderr.take().map(|stderr| {
        let said = said.clone();
        tokio::task::spawn_local(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "capsa::guest", "[agent] {line}");
                let mut said = said.borrow_mut();
                if said.len() == AGENT_LAST_LINES {
                    said.pop_front();
                }
                said.push_back(line);
            }
        })
    });
    let mut machine = AgentMachine {
        child: Box::new(AgentProcess(child)),
        _dir: dir,
    };
    loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => {
                let s = tokio_util::compat::TokioAsyncReadCompatExt::compat(s);
                return Ok((machine, Box::pin(s)));
            }
            Err(e) if Instant::now() >= deadline => {
                machine.tear_down().await;
                return Err(VmFailure::AgentUnanswered {
                    timeout: ready_timeout,
                    source: e,
                });
            }
            Err(_) => {
                if let Ok(Some(s)) = machine.child.0.try_wait() {
                    if let Some(console) = console {
                        let _ = tokio::time::timeout(AGENT_LAST_WORDS, console).await;
                    }
                    let said = Vec::from(std::mem::take(&mut *said.borrow_mut()));
                    return Err(VmFailure::AgentExited {
                        status: s,
                        said: said.join(" / "),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The agent process, leader of its session; dropping it ends the session.
struct AgentProcess(tokio::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Not reaped yet (`id` is `None` once it is): its pid cannot have
        // been given to another process.
        if let Some(pid) = self.0.id() {
            end_session(pid);
        }
    }
}

/// SIGKILLs every live process of session `sid` until none is left. The
/// leader must be unreaped (alive or a zombie), which keeps `sid` from
/// being reused. Bounded: a session that keeps forking faster than this
/// kills gives up after `ROUNDS`.
fn end_session(sid: u32) {
    const ROUNDS: usize = 64;
    for _ in 0..ROUNDS {
        let mut killed = 0;
        for pid in session_members(sid) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                if rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok() {
                    killed += 1;
                }
            }
        }
        if killed == 0 {
            return;
        }
        std::thread::yield_now();
    }
    tracing::warn!("processes of agent session {sid} kept appearing; some may remain");
}

/// The live (not zombie) processes whose session id is `sid`, from /proc.
fn session_members(sid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        (stat_session(&stat)? == (sid, true)).then_some(pid)
    })
    .collect()
}

/// The session id in a `/proc/PID/stat` line, and whether the process is
/// live (neither a zombie nor dead). The command name in parentheses may
/// hold anything, spaces and parentheses too, so fields are counted from
/// the last `)`.
fn stat_session(stat: &str) -> Option<(u32, bool)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    // ppid, pgrp, then session.
    let session = fields.nth(2)?.parse().ok()?;
    Some((session, !matches!(state, "Z" | "X" | "x")))
}

/// A private temporary directory (mode 0700), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "capsa-vm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)?;
        let mut perms = std::fs::metadata(&dir)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        std::fs::set_permissions(&dir, perms)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_is_read_after_the_last_parenthesis() {
        assert_eq!(
            stat_session("42 (sh) S 1 42 40 0 -1 4194560 0"),
            Some((40, true))
        );
        // A command name may hold spaces and parentheses.
        assert_eq!(
            stat_session("7 (a) Z 9 (b)) R 1 7 99 0 -1"),
            Some((99, true))
        );
        assert_eq!(stat_session("8 (x) Z 1 8 8 0"), Some((8, false)));
        assert_eq!(stat_session("8 (x) S 1"), None);
        assert_eq!(stat_session("garbage"), None);
    }

    /// A process that left its process group's leader behind (as `sleep &`
    /// in a shell does when the shell is killed) still ends with its
    /// session.
    #[test]
    fn ending_a_session_ends_the_processes_its_leader_left() {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", "sleep 1000 & sleep 1000 & echo started; wait"])
            .stdout(std::process::Stdio::piped());
        // SAFETY: one system call between fork and exec.
        #[expect(unsafe_code, reason = "pre_exec runs code between fork and exec")]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                rustix::process::setsid()?;
                Ok(())
            });
        }
        let mut leader = command.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let sid = leader.id();
        assert_eq!(session_members(sid).len(), 3, "the shell and two sleeps");
        end_session(sid);
        leader.wait().unwrap();
        let start = Instant::now();
        while !session_members(sid).is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(session_members(sid), Vec::<u32>::new());
    }
}
