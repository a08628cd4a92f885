//! Running one ELF executable and the `Process` capability on it.
//!
//! The bytes become a fresh file (mode 0700) in the agent's private temporary
//! folder, which is executed in its own process group with exactly the
//! arguments and environment the caller gave and pipes for stdin, stdout and
//! stderr. Its argv is `argv0` then the caller's arguments: the file's path
//! is an internal detail, never the program's name. A task per process
//! waits for the exit reported by the [`Reaper`](crate::reaper::Reaper),
//! kills what is left of the process group, removes the file, writes back
//! the directories granted to it and publishes the status to every waiter.
//!
//! Dropping the last reference to a Process kills its process group (the
//! schema crate's `ProcessServer`, over [`Elf`]).

use std::cell::Cell;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;

use capsa_schema::capsa_capnp::{byte_sink, process};
use capsa_schema::request::{Limits, Pushed};
use capsa_schema::serve::process::{Output, ProcessServer, Running};
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use tokio::sync::watch;

use crate::grants::Granted;
use crate::reaper::Reaper;
use crate::status::{from_wait, ExitStatus, KillReason};
use crate::stream::{ByteSinkImpl, InputPipe, OutputPipe};

/// Size the agent asks for each stdio pipe: the bound on what a child can
/// write ahead of its reader.
const PIPE_SIZE: i32 = 1 << 20;

/// What `Executor.runBytes` asked for.
pub struct Spec<'a> {
    pub bytes: &'a [u8],
    /// Label for the agent's log lines and the executable's file name.
    pub name: String,
    /// Never empty (see [`capsa_schema::argv::argv0`]).
    pub argv0: String,
    /// argv[1..].
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The memory limit, the deadline and the CPU time the process group
    /// may use (see [`crate::cpu`]).
    pub limits: Limits,
    /// The program's working directory: the machine's root.
    pub cwd: &'a Path,
    /// Directories copied in for it, written back when it ends.
    pub granted: Vec<Granted>,
}

/// One running (or ended) child, shared by its `Process` capability and the
/// task that waits for it.
pub struct Child {
    pub name: String,
    pid: Pid,
    status: watch::Sender<Option<ExitStatus>>,
    kill_reason: Cell<Option<KillReason>>,
    stdin: Rc<InputPipe>,
    stdout: Rc<OutputPipe>,
    stderr: Rc<OutputPipe>,
}

impl Child {
    /// SIGKILLs the process group unless the child has already ended. The
    /// first reason given is the one its status reports.
    pub fn kill(&self, reason: KillReason) {
        if self.status.borrow().is_some() {
            return;
        }
        if self.kill_reason.get().is_none() {
            self.kill_reason.set(Some(reason));
        }
        // The leader is not reaped yet, so the group id cannot have been reused.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }

    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.subscribe();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(status) => status.clone().unwrap_or(ExitStatus::Killed),
            Err(_) => ExitStatus::Killed,
        };
        status
    }
}

/// Writes the executable, starts it and the task that waits for it.
pub fn spawn(
    reaper: &Rc<Reaper>,
    dir: &Path,
    serial: u64,
    spec: Spec<'_>,
) -> io::Result<Rc<Child>> {
    let path = dir.join(format!("{serial}-{}", file_safe(&spec.name)));
    write_executable(&path, spec.bytes)?;

    let mut cmd = Command::new(&path);
    cmd.arg0(&spec.argv0)
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let memory_limit = spec.limits.memory_bytes;
    let cpu_seconds = spec.limits.cpu_budget.map(crate::cpu::rlimit_seconds);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, setrlimit); it allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            // A child must not outlive the agent that can report and kill it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if let Some(limit) = memory_limit {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_AS,
                    limit,
                    limit,
                )?;
            }
            if let Some(seconds) = cpu_seconds {
                // SIGXCPU at the soft limit, SIGKILL a second later.
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_CPU,
                    seconds,
                    seconds.saturating_add(1),
                )?;
            }
            Ok(())
        });
    }
    let (mut child, exited) = match reaper.spawn(cmd) {
        Ok(started) => started,
        Err(e) => {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
    };
    let pid = Pid::from_raw(child.id() as i32);

    let pipes = (|| {
        let stdin = child
            .stdin
            .take()
            .map(OwnedFd::from)
            .ok_or_else(missing_pipe)?;
        let stdout = child
            .stdout
            .take()
            .map(OwnedFd::from)
            .ok_or_else(missing_pipe)?;
        let stderr = child
            .stderr
            .take()
            .map(OwnedFd::from)
            .ok_or_else(missing_pipe)?;
        for fd in [&stdin, &stdout, &stderr] {
            // A larger pipe only saves wake-ups; the default size is fine too.
            let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        io::Result::Ok((
            pipe::Sender::from_owned_fd(stdin)?,
            pipe::Receiver::from_owned_fd(stdout)?,
            pipe::Receiver::from_owned_fd(stderr)?,
        ))
    })();
    let (stdin, stdout, stderr) = match pipes {
        Ok(pipes) => pipes,
        Err(e) => {
            let _ = killpg(pid, Signal::SIGKILL);
            return Err(e);
        }
    };

    let child = Rc::new(Child {
        name: spec.name,
        pid,
        status: watch::channel(None).0,
        kill_reason: Cell::new(None),
        stdin: Rc::new(InputPipe::new(stdin)),
        stdout: Rc::new(OutputPipe::new(stdout)),
        stderr: Rc::new(OutputPipe::new(stderr)),
    });

    let task_child = child.clone();
    let deadline = spec.limits.deadline;
    let cpu_budget = spec.limits.cpu_budget;
    let granted = spec.granted;
    tokio::task::spawn_local(async move {
        let child = task_child;
        let deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let over_budget = async {
            match cpu_budget {
                Some(budget) => crate::cpu::exceeded(pid, budget).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(exited);
        let wait_status = tokio::select! {
            status = &mut exited => status,
            () = deadline => {
                child.kill(KillReason::DeadlineExceeded);
                exited.await
            }
            () = over_budget => {
                child.kill(KillReason::CpuBudgetExceeded);
                exited.await
            }
        };
        let status = match wait_status {
            Ok(ws) => from_wait(ws, child.kill_reason.get(), cpu_budget.is_some())
                .unwrap_or_else(|| ExitStatus::Failed(format!("unexpected wait status {ws:?}"))),
            Err(_) => ExitStatus::Failed("the agent lost track of the process".into()),
        };
        // Whatever the leader left running in its group ends with it. The
        // group id is still reserved while any member is alive.
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = fs::remove_file(&path);
        eprintln!("capsa-agent: {} (pid {pid}) ended: {status:?}", child.name);
        // Its files are back where they came from before anyone hears it
        // ended.
        for grant in granted {
            grant.finish().await;
        }
        child.status.send_replace(Some(status));
    });
    Ok(child)
}

fn missing_pipe() -> io::Error {
    io::Error::other("the child's stdio pipe is missing")
}

fn write_executable(path: &PathBuf, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(path)?;
    file.write_all(bytes)?;
    // Closed here: executing a file still open for writing fails with ETXTBSY.
    drop(file);
    Ok(())
}

/// A file name made from a process name: no slashes, nothing odd, not too long.
fn file_safe(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    match cleaned.trim_start_matches('.') {
        "" => "program".to_string(),
        s => s.to_string(),
    }
}

/// An ELF process as its Process serves it (the schema crate's
/// [`ProcessServer`]).
pub struct Elf {
    child: Rc<Child>,
    /// The Executor of the machine the process runs in: its `bootstrap()`.
    machine: capnp::capability::Client,
}

impl Elf {
    /// The Process of `child`, which runs in the machine `machine` is the
    /// Executor of, pushing the streams `pushed` names.
    pub fn client(
        child: Rc<Child>,
        machine: capnp::capability::Client,
        pushed: Pushed,
    ) -> process::Client {
        ProcessServer::client(Elf { child, machine }, pushed, |push| {
            tokio::task::spawn_local(push);
        })
    }
}

impl Running for Elf {
    type Stream = Rc<OutputPipe>;

    async fn wait(&self) -> ExitStatus {
        self.child.wait().await
    }

    fn kill(&self) {
        self.child.kill(KillReason::Killed);
    }

    async fn stdin(&self) -> capnp::Result<byte_sink::Client> {
        Ok(capnp_rpc::new_client(ByteSinkImpl::new(
            self.child.stdin.clone(),
        )))
    }

    fn output(&self, which: Output) -> capnp::Result<Rc<OutputPipe>> {
        Ok(match which {
            Output::Stdout => self.child.stdout.clone(),
            Output::Stderr => self.child.stderr.clone(),
        })
    }

    /// An ELF executable has no Cap'n Proto connection of its own; what it
    /// "exports" is the machine it runs in, as the host's ELF processes do:
    /// the Executor to run more in the same machine.
    fn export(&self) -> capnp::Result<capnp::capability::Client> {
        Ok(self.machine.clone())
    }
}
