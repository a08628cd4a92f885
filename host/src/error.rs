//! Why a `runBytes` could not start a process.
//!
//! A client sees only an error's message, so every message carries its
//! cause's text; the cause itself stays the error's `source()`, for the
//! host's own logs and tests to walk.

use std::path::PathBuf;
use std::time::Duration;

use capsa_schema::format::FormatError;
use capsa_schema::ErrorKind;

/// Why a guest could not be started. Reaches the caller as a Cap'n Proto
/// exception whose description is "<kind>: <this text>".
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The bytes are an ELF executable and this host runs no microVMs.
    #[error(
        "microVMs are not enabled in this host: ELF executables run in microVMs \
         (start the host with --allow-vm)"
    )]
    VmDisabled,
    /// A machine could not be booted, or stopped before its agent took
    /// the ELF.
    #[error("microVM: {0}")]
    Vm(#[from] VmFailure),
    /// The machine's agent refused the request, for a reason of this kind.
    #[error("microVM: {1}")]
    Refused(ErrorKind, String),
    /// The machine asked for is larger than the caller may have.
    #[error("microVM too large: {0}")]
    VmTooLarge(String),
    /// wasmtime could not compile the bytes.
    #[error("invalid WebAssembly: {0:#}")]
    Compile(#[source] wasmtime::Error),
    /// The guest asks for what this host does not give (see `world`).
    #[error("cannot link the guest against this host: {0}")]
    Link(String),
    /// wasmtime could not link the guest against the host's WASI.
    #[error("cannot link the guest against this host: {0:#}")]
    Linker(#[source] wasmtime::Error),
    /// WebAssembly that is not a WASI command (a reactor, a library).
    #[error("{0}")]
    NotACommand(String),
    #[error("nesting depth limit of {0} reached")]
    Depth(u32),
    #[error("live children limit of {0} reached for this executor")]
    Children(u32),
    #[error("the host runs its maximum of {0} guests")]
    HostFull(u32),
    /// The host's machines together already hold what it gives them.
    #[error("the host's microVMs hold {in_use} of {total} MiB; {asked} MiB more do not fit")]
    VmMemoryFull { asked: u64, in_use: u64, total: u64 },
    /// The client's share of the host is in use (see `scope::Share`).
    #[error(transparent)]
    Share(#[from] ShareExceeded),
    #[error("the host is shutting down")]
    ShuttingDown,
    /// A granted directory that cannot be given to the child.
    #[error("granted directory {path:?}: {source:#}")]
    Grant {
        /// Its path in the guest.
        path: String,
        #[source]
        source: wasmtime::Error,
    },
    /// Work the host gave a blocking thread did not come back: the thread
    /// panicked, or the runtime is going away. The host's failure, not the
    /// payload's.
    #[error("{task}: {source}")]
    Blocking {
        /// What the thread was doing.
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Why a machine could not be booted, or could not take the ELF.
#[derive(Debug, thiserror::Error)]
pub enum VmFailure {
    /// The initramfs the host boots cannot be read.
    #[error("reading the initramfs {}: {source}", path.display())]
    Initramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking thread that creates the machine did not come back.
    #[error("the thread starting the machine: {0}")]
    StartThread(#[source] tokio::task::JoinError),
    /// The VMM could not create or start the machine.
    #[error("{0}")]
    Start(#[from] capsa_microvm::VmError),
    /// The machine stopped before its agent answered. `report`: what its
    /// kernel logged last.
    #[error("the VM stopped while booting: {why}; console: {console}{report}")]
    StoppedBooting {
        why: String,
        console: String,
        report: String,
    },
    /// The agent of a microVM did not answer in time. `report`: where the
    /// machine's vCPUs were, what its vsock device saw and what its kernel
    /// logged.
    #[error("the agent did not answer within {timeout:?} ({last}); console: {console}{report}")]
    Unanswered {
        timeout: Duration,
        /// What the last connection attempt got.
        #[source]
        last: ConnectAttempt,
        console: String,
        report: String,
    },
    /// The private folder an agent process works in cannot be made.
    #[error("temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    /// The agent binary cannot be started.
    #[error("starting the agent {}: {source}", agent.display())]
    AgentStart {
        agent: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent process did not answer on its socket in time.
    #[error("the agent did not answer within {timeout:?}: {source}")]
    AgentUnanswered {
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
    /// The agent process exited before it answered; its last lines.
    #[error("the agent exited before answering: {status}; it said: {said}")]
    AgentExited {
        status: std::process::ExitStatus,
        said: String,
    },
    /// The machine stopped after its agent answered and before the agent
    /// took the ELF. `report`: what its kernel logged last.
    #[error("the VM stopped before its agent took the ELF: {why}; console: {console}{report}")]
    StoppedBeforeRun {
        why: String,
        console: String,
        report: String,
    },
    /// The agent's answer to the request could not be read.
    #[error("the agent refused the ELF: {0}")]
    Answer(#[source] capnp::Error),
}

/// What the last connection attempt to a booting microVM's agent got.
#[derive(Debug, thiserror::Error)]
pub enum ConnectAttempt {
    /// Nothing within the attempt's bound: the guest's vsock driver is
    /// not up yet, or the request was lost.
    #[error("no answer")]
    NoAnswer,
    /// The machine stopped during the attempt.
    #[error("the VM stopped")]
    Stopped,
    /// The VMM refused the connection (nothing listens on the port yet).
    #[error("{0}")]
    Failed(#[source] capsa_microvm::VmError),
}

/// What of a client's share a new guest would exceed.
#[derive(Debug, thiserror::Error)]
pub enum ShareExceeded {
    #[error("this client already runs its share of {0} guests")]
    Guests(u32),
    #[error(
        "a machine of {asked_mib} MiB does not fit in what is left of this client's memory \
         share of {limit_mib} MiB"
    )]
    Memory { asked_mib: u64, limit_mib: u64 },
}

impl SpawnError {
    /// The kind a client matches on (see `ErrorKind` in the schema).
    pub fn kind(&self) -> ErrorKind {
        match self {
            SpawnError::Format(_) | SpawnError::Compile(_) | SpawnError::NotACommand(_) => {
                ErrorKind::BadPayload
            }
            SpawnError::VmDisabled => ErrorKind::VmDisabled,
            SpawnError::Vm(_) => ErrorKind::Vm,
            SpawnError::Refused(kind, _) => *kind,
            SpawnError::VmTooLarge(_) => ErrorKind::TooLarge,
            SpawnError::Link(_) | SpawnError::Linker(_) => ErrorKind::Link,
            SpawnError::Depth(_) | SpawnError::Children(_) | SpawnError::Share(_) => {
                ErrorKind::Quota
            }
            SpawnError::HostFull(_) | SpawnError::VmMemoryFull { .. } => ErrorKind::HostFull,
            SpawnError::ShuttingDown => ErrorKind::ShuttingDown,
            SpawnError::Grant { .. } | SpawnError::Blocking { .. } => ErrorKind::Failed,
        }
    }
}

impl From<SpawnError> for capnp::Error {
    fn from(e: SpawnError) -> capnp::Error {
        capsa_schema::error::error(e.kind(), e)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// Every cause down from `e`, `e` first.
    fn chain<'a>(e: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
        let mut causes = vec![e];
        while let Some(cause) = causes[causes.len() - 1].source() {
            causes.push(cause);
        }
        causes
    }

    #[test]
    fn a_vmm_error_stays_the_cause_and_is_in_the_message() {
        let e = SpawnError::from(VmFailure::Start(capsa_microvm::VmError::Stopped));
        let causes = chain(&e);
        assert!(
            causes
                .iter()
                .any(|c| c.downcast_ref::<capsa_microvm::VmError>().is_some()),
            "{causes:?}"
        );
        assert_eq!(e.to_string(), "microVM: the VM has stopped");
        assert_eq!(e.kind(), ErrorKind::Vm);
    }

    #[test]
    fn a_failed_connection_attempt_stays_the_cause() {
        let e = SpawnError::from(VmFailure::Unanswered {
            timeout: Duration::from_secs(1),
            last: ConnectAttempt::Failed(capsa_microvm::VmError::ConnectionRefused(1024)),
            console: "login:".into(),
            report: String::new(),
        });
        assert_eq!(
            e.to_string(),
            "microVM: the agent did not answer within 1s \
             (guest refused vsock connection to port 1024); console: login:"
        );
        assert!(chain(&e)
            .iter()
            .any(|c| c.downcast_ref::<capsa_microvm::VmError>().is_some()));
    }

    #[test]
    fn an_io_error_stays_the_cause() {
        let e = SpawnError::from(VmFailure::AgentStart {
            agent: "/nowhere/capsa-agent".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(e
            .to_string()
            .starts_with("microVM: starting the agent /nowhere/capsa-agent: "));
        let io = chain(&e)
            .into_iter()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        assert_eq!(io, Some(std::io::ErrorKind::NotFound));
    }
}
