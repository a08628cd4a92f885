//! The one adapter every capsa guest in RPC mode uses.
//!
//! A guest's stdin and stdout are its Cap'n Proto connection to whoever
//! started it. This crate turns the two WASI streams into `futures::io`
//! streams ([`stdio`]), drives futures on a single thread that sleeps in
//! `wasi:io/poll` when nothing can run ([`executor`], [`reactor`]), and puts
//! the two together into a connection that bootstraps the host's `Executor`
//! and exports the guest's own capability ([`Connection`]).
//!
//! Stdout carries RPC messages, so nothing else may be written to it: guests
//! log with [`log!`], which writes to stderr.
//!
//! The WASI it uses is the world `runtime` of the repository's
//! `wit/world.wit`, part of the world every capsa guest is linked against;
//! its bindings are generated from that file at build time.

mod connection;
pub mod executor;
mod reactor;
pub mod stdio;

/// The imports of the world `runtime` (wasi:io streams and polling, the
/// guest's stdin and stdout).
#[allow(
    unsafe_code,
    clippy::undocumented_unsafe_blocks,
    reason = "generated bindings: the canonical ABI's calls are unsafe"
)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "runtime",
        // The world's interfaces all come from WASI packages; bindings for
        // each are generated here rather than taken from another crate.
        generate_all,
    });
}

use std::fmt;

pub use connection::{Connection, HostExecutor};
pub use executor::block_on;

/// Writes one line to stderr, the guest's log. Never stdout: that is the RPC
/// channel.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        ::std::eprintln!($($arg)*)
    };
}

/// Why a guest's event loop stopped before its work was done.
#[derive(Debug)]
pub enum Error {
    /// The RPC connection or the guest's own logic failed.
    Rpc(capnp::Error),
    /// Nothing could run and no I/O was pending: the guest would wait forever.
    Deadlock,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rpc(e) => write!(f, "{e}"),
            Self::Deadlock => {
                f.write_str("deadlock: no task can make progress and no I/O is pending")
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<capnp::Error> for Error {
    fn from(e: capnp::Error) -> Self {
        Self::Rpc(e)
    }
}
