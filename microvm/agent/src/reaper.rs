//! Collecting the exit status of every child, in one place.
//!
//! Design: the agent never uses `tokio::process` or `Child::wait`. It spawns
//! with `std::process::Command` through [`Reaper::spawn`], which starts the
//! program on the unconfined spawning thread (see `confine`) and registers
//! the pid in the same synchronous step (the runtime is single-threaded, so
//! no reaping can run in between), and this module is the only caller of
//! `waitpid`:
//!
//! - as PID 1 it also inherits every orphan in the VM, so on each SIGCHLD it
//!   calls `waitpid(-1, WNOHANG)` until nothing is left, hands the status of
//!   a registered pid to its watcher and discards the others (orphans);
//! - as an ordinary host process it must not reap children that are not its
//!   own business, so it polls only the registered pids.
//!
//! SIGCHLD is subscribed to before the first child is spawned, and a sweep
//! runs at start-up, so no exit goes unnoticed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::rc::Rc;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::confine::Spawner;

pub struct Reaper {
    watchers: RefCell<HashMap<Pid, oneshot::Sender<WaitStatus>>>,
    /// PID 1: reap every child, including orphans re-parented to us.
    adopt_orphans: bool,
    spawner: Spawner,
}

impl Reaper {
    /// Subscribes to SIGCHLD and starts the reaping task on the current `LocalSet`.
    pub fn start(adopt_orphans: bool, spawner: Spawner) -> io::Result<Rc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Rc::new(Reaper {
            watchers: RefCell::new(HashMap::new()),
            adopt_orphans,
            spawner,
        });
        let weak = Rc::downgrade(&reaper);
        tokio::task::spawn_local(async move {
            loop {
                match weak.upgrade() {
                    Some(reaper) => reaper.sweep(),
                    None => break,
                }
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Starts `command` and registers the child before returning; the
    /// receiver gets its final status.
    pub fn spawn(&self, command: Command) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        let child = self.spawner.spawn(command)?;
        let (tx, rx) = oneshot::channel();
        let pid = Pid::from_raw(child.id() as i32);
        self.watchers.borrow_mut().insert(pid, tx);
        Ok((child, rx))
    }

    fn deliver(&self, status: WaitStatus) {
        let Some(pid) = status.pid() else { return };
        if let Some(tx) = self.watchers.borrow_mut().remove(&pid) {
            let _ = tx.send(status);
        }
    }

    fn sweep(&self) {
        if self.adopt_orphans {
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(status) => self.deliver(status),
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        eprintln!("capsa-agent: waitpid failed: {e}");
                        break;
                    }
                }
            }
        } else {
            let pids: Vec<Pid> = self.watchers.borrow().keys().copied().collect();
            for pid in pids {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                        self.deliver(status)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Not our child any more (someone else reaped it):
                        // its watcher learns that through the dropped sender.
                        eprintln!("capsa-agent: waitpid({pid}) failed: {e}");
                        self.watchers.borrow_mut().remove(&pid);
                    }
                }
            }
        }
    }
}
