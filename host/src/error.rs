//! Why a `runBytes` could not start a process.

use capsa_schema::ErrorKind;

use capsa_schema::format::FormatError;

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
    #[error("microVM: {0}")]
    Vm(String),
    /// The VMM could not create or start the machine.
    #[error("microVM: {0}")]
    VmStart(#[from] capsa_microvm::VmError),
    /// The machine's agent refused the request, for a reason of this kind.
    #[error("microVM: {1}")]
    Refused(ErrorKind, String),
    /// The machine asked for is larger than the caller may have.
    #[error("microVM too large: {0}")]
    VmTooLarge(String),
    #[error("invalid WebAssembly: {0}")]
    Compile(String),
    #[error("cannot link the guest against this host: {0}")]
    Link(String),
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
    #[error("granted directory {0}")]
    Grant(String),
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
            SpawnError::Vm(_) | SpawnError::VmStart(_) => ErrorKind::Vm,
            SpawnError::Refused(kind, _) => *kind,
            SpawnError::VmTooLarge(_) => ErrorKind::TooLarge,
            SpawnError::Link(_) => ErrorKind::Link,
            SpawnError::Depth(_) | SpawnError::Children(_) | SpawnError::Share(_) => {
                ErrorKind::Quota
            }
            SpawnError::HostFull(_) | SpawnError::VmMemoryFull { .. } => ErrorKind::HostFull,
            SpawnError::ShuttingDown => ErrorKind::ShuttingDown,
            SpawnError::Grant(_) => ErrorKind::Failed,
        }
    }
}

impl From<SpawnError> for capnp::Error {
    fn from(e: SpawnError) -> capnp::Error {
        capsa_schema::error::error(e.kind(), e)
    }
}
