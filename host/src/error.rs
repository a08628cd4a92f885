//! Why a `runBytes` could not start a process.

use crate::format::FormatError;

/// Why a guest could not be started. Reaches the caller as the text of a
/// Cap'n Proto exception.
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
    /// The machine asked for is larger than the caller may have.
    #[error("microVM too large: {0}")]
    VmTooLarge(String),
    #[error("invalid WebAssembly: {0}")]
    Compile(String),
    #[error("cannot link the guest against this host: {0}")]
    Link(String),
    #[error("nesting depth limit of {0} reached")]
    Depth(u32),
    #[error("live children limit of {0} reached for this executor")]
    Children(u32),
    #[error("the host runs its maximum of {0} guests")]
    HostFull(u32),
    #[error("the host is shutting down")]
    ShuttingDown,
}

impl From<SpawnError> for capnp::Error {
    fn from(e: SpawnError) -> capnp::Error {
        capnp::Error::failed(e.to_string())
    }
}
