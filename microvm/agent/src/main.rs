//! capsa-agent: PID 1 of a capsa microVM.
//!
//! In the VM it mounts the usual file systems, reaps every zombie, and serves
//! capsa's `Executor` capability over Cap'n Proto on vsock port 1024: ELF
//! bytes given to `runBytes` run as child processes with their stdio exposed
//! as flow-controlled streams. When the last client connection closes it ends
//! the VM. Progress goes to the console (stderr), never to a data stream.
//!
//! With `--listen` the same server runs as an ordinary process on a Unix,
//! loopback TCP or vsock socket, which is how it is tested on machines whose
//! KVM cannot run a guest's user space.

#![expect(
    unsafe_code,
    reason = "PID 1 of a VM: mounting, powering off, raw vsock sockets and the seccomp \
              filter need system calls without safe wrappers; each unsafe block says why \
              it is sound"
)]

mod confine;
mod cpu;
mod executor;
mod format;
mod grants;
mod init;
mod listen;
mod process;
mod reaper;
mod serve;
mod status;
mod stream;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use crate::executor::Runner;
use crate::listen::{Endpoint, Listener};
use crate::reaper::Reaper;
use crate::serve::Lifetime;

/// The vsock port the agent listens on inside a VM.
pub const VSOCK_PORT: u32 = 1024;

const USAGE: &str = "\
usage: capsa-agent [--listen ENDPOINT | --listen-fd N] [--once]

As PID 1 (inside a capsa microVM) it needs no arguments: it mounts /proc,
/sys, /dev and /tmp, serves on vsock:1024 and ends the VM when its last
client disconnects.

  --listen ENDPOINT  serve on unix:PATH (created mode 0600),
                     tcp:127.0.0.1:PORT (loopback only) or vsock:PORT
  --listen-fd N      serve on the already listening socket N
  --once             exit after the first connection closes
  --work-dir DIR     keep the executables it is given in DIR (created
                     mode 0700; default: a new folder under $TMPDIR)";

#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    endpoint: Option<Endpoint>,
    once: bool,
    help: bool,
    work_dir: Option<PathBuf>,
}

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
            let endpoint = match arg.as_str() {
                "--listen" => Endpoint::parse(&value("--listen")?).map_err(|e| e.to_string())?,
                "--listen-fd" => {
                    let n = value("--listen-fd")?;
                    Endpoint::Fd(
                        n.parse()
                            .map_err(|_| format!("{n:?} is not a file descriptor"))?,
                    )
                }
                "--once" => {
                    parsed.once = true;
                    continue;
                }
                "--work-dir" => {
                    parsed.work_dir = Some(PathBuf::from(value("--work-dir")?));
                    continue;
                }
                "-h" | "--help" => {
                    parsed.help = true;
                    continue;
                }
                other => return Err(format!("unknown argument {other:?}")),
            };
            if parsed.endpoint.replace(endpoint).is_some() {
                return Err("give one of --listen and --listen-fd, once".into());
            }
        }
        Ok(parsed)
    }
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::power_off_on_panic();
    }
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) if args.help => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(args) => args,
        Err(e) => {
            eprintln!("capsa-agent: {e}\n\n{USAGE}");
            return finish(pid1, ExitCode::from(2));
        }
    };
    if !pid1 && args.endpoint.is_none() {
        eprintln!("capsa-agent: not running as PID 1: give --listen or --listen-fd\n\n{USAGE}");
        return ExitCode::from(2);
    }
    if pid1 {
        // Before the runtime exists: nothing else runs yet.
        init::mount_filesystems();
    }
    // Before the runtime and any client: programs start from a thread left
    // outside the filter, everything else runs inside it. Without the
    // filter the agent does not serve.
    let spawner = match confine::Spawner::start().and_then(|s| confine::confine().map(|()| s)) {
        Ok(spawner) => spawner,
        Err(e) => {
            eprintln!("capsa-agent: cannot confine itself with seccomp: {e}");
            return finish(pid1, ExitCode::FAILURE);
        }
    };
    let code = match run(args, pid1, spawner) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsa-agent: {e}");
            ExitCode::FAILURE
        }
    };
    finish(pid1, code)
}

/// PID 1 never exits: it ends the VM instead.
fn finish(pid1: bool, code: ExitCode) -> ExitCode {
    if pid1 {
        init::power_off();
    }
    code
}

/// Why the agent could not start serving (or stopped).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot watch {signal}: {why}")]
    Signal {
        signal: &'static str,
        why: std::io::Error,
    },
    #[error("cannot create {}: {why}", .path.display())]
    Folder { path: PathBuf, why: std::io::Error },
    #[error("cannot open the machine's root: {0}")]
    Root(std::io::Error),
    #[error("cannot listen on {endpoint:?}: {why}")]
    Listen {
        endpoint: Endpoint,
        why: std::io::Error,
    },
}

fn run(args: Args, pid1: bool, spawner: confine::Spawner) -> Result<(), StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        // Subscribed to SIGCHLD before any child exists.
        let reaper = Reaper::start(pid1, spawner).map_err(|why| StartError::Signal {
            signal: "SIGCHLD",
            why,
        })?;
        // Watched before "listening" is announced: whoever starts the agent
        // may stop it as soon as it reads that line, and a SIGTERM that came
        // first would meet whatever disposition the agent inherited (which
        // may be "ignore").
        // PID 1 is never stopped by a signal: it powers the VM off instead.
        let stop = match pid1 {
            true => None,
            false => Some(stop_signals().map_err(|why| StartError::Signal {
                signal: "SIGTERM",
                why,
            })?),
        };
        let dir = private_dir(pid1, args.work_dir)?;
        // A VM's root is its own; an agent on a host gets a folder instead.
        let root = match pid1 {
            true => PathBuf::from("/"),
            false => {
                let root = dir.join("root");
                std::fs::create_dir(&root).map_err(|why| StartError::Folder {
                    path: root.clone(),
                    why,
                })?;
                root
            }
        };
        let runner = Rc::new(Runner::new(reaper, dir.clone(), root).map_err(StartError::Root)?);
        let endpoint = args.endpoint.unwrap_or(Endpoint::Vsock(VSOCK_PORT));
        let listener = Listener::bind(&endpoint).map_err(|why| StartError::Listen {
            endpoint: endpoint.clone(),
            why,
        })?;
        eprintln!("capsa-agent: listening on {}", listener.describe());

        let lifetime = match (pid1, args.once) {
            (_, true) => Lifetime::Once,
            (true, false) => Lifetime::UntilIdle,
            (false, false) => Lifetime::Forever,
        };
        tokio::select! {
            () = serve::serve(listener, runner, lifetime) => {}
            () = async {
                match stop {
                    Some(stop) => stop.await,
                    None => std::future::pending().await,
                }
            } => {
                eprintln!("capsa-agent: terminated");
            }
        }
        // Whatever is still running goes with the agent (the Process
        // capabilities dropped above have already sent SIGKILL).
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
}

/// Resolves at the first SIGTERM or SIGINT; both are subscribed to at once.
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// A folder only the agent can reach, for the executables it is given:
/// `/tmp/capsa-agent` in the VM, `given` or a new one elsewhere.
///
/// A new one is named by the process id and the time, and another name is
/// tried if it exists: an agent that was killed leaves its folder behind,
/// and process ids come round again.
fn private_dir(pid1: bool, given: Option<PathBuf>) -> Result<PathBuf, StartError> {
    let create = |dir: &Path| std::fs::DirBuilder::new().mode(0o700).create(dir);
    let fail = |dir: &Path, why: std::io::Error| StartError::Folder {
        path: dir.to_path_buf(),
        why,
    };
    if let Some(dir) = given.or_else(|| pid1.then(|| PathBuf::from("/tmp/capsa-agent"))) {
        create(&dir).map_err(|e| fail(&dir, e))?;
        return Ok(dir);
    }
    let mut attempt = 0u32;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "capsa-agent-{}-{nanos:08x}{attempt}",
            std::process::id()
        ));
        match create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(fail(&dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_arguments() {
        assert_eq!(parse(&[]), Ok(Args::default()));
        assert_eq!(
            parse(&["--listen", "unix:/s", "--once", "--work-dir", "/w"]),
            Ok(Args {
                endpoint: Some(Endpoint::Unix("/s".into())),
                once: true,
                help: false,
                work_dir: Some("/w".into()),
            })
        );
        assert_eq!(
            parse(&["--listen-fd", "3"]).map(|a| a.endpoint),
            Ok(Some(Endpoint::Fd(3)))
        );
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--listen", "unix:/a", "--listen-fd", "3"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["--work-dir"]).is_err());
    }

    /// A folder left by an earlier agent with the same process id (killed,
    /// so it could not remove it) does not stop a new one from starting.
    #[test]
    fn a_stale_work_folder_is_no_obstacle() {
        let stale = std::env::temp_dir().join(format!("capsa-agent-{}", std::process::id()));
        let _ = std::fs::create_dir(&stale);
        let a = private_dir(false, None).unwrap();
        let b = private_dir(false, None).unwrap();
        assert_ne!(a, b);
        for dir in [a, b, stale] {
            std::fs::remove_dir(dir).unwrap();
        }
    }
}
