//! The capsa Cap'n Proto schema (`schema/capsa.capnp`), compiled by `build.rs`
//! for every side: the host, the wasm32-wasip2 guests and the microVM agent,
//! with the payload detection and the argv rule every `runBytes`
//! implementation shares.

pub mod argv;
pub mod error;
pub mod format;
pub mod hostile;
pub mod program;
pub mod rpc;
pub mod status;
pub mod stream;

#[allow(clippy::all, missing_docs, unsafe_code)]
pub mod capsa_capnp {
    include!(concat!(env!("OUT_DIR"), "/capsa_capnp.rs"));
}

pub use capsa_capnp::*;
