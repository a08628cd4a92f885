//! What the host's and the agent's `Program`s share: the hash a program is
//! named by, and the answer of `Program.info`.

use crate::capsa_capnp::program;
use crate::error::error;
use crate::ErrorKind;

/// A program's SHA-256.
pub type Hash = [u8; 32];

/// The `hash` argument of `Executor.program`, or `badRequest`.
pub fn hash_arg(hash: &[u8]) -> Result<Hash, capnp::Error> {
    hash.try_into().map_err(|_| {
        error(
            ErrorKind::BadRequest,
            format_args!("a program hash is 32 bytes (SHA-256), not {}", hash.len()),
        )
    })
}

/// `Executor.program`'s answer for a hash it does not hold; `holder` is
/// "this host" or "this machine".
pub fn not_held(holder: &str) -> capnp::Error {
    error(
        ErrorKind::NotFound,
        format_args!("{holder} holds no program with that hash: load its bytes"),
    )
}

/// Fills `Program.info`'s results.
pub fn set_info(
    mut results: program::info_results::Builder<'_>,
    hash: &Hash,
    size: usize,
    format: &str,
) {
    results.set_hash(hash);
    results.set_size(size as u64);
    results.set_format(format);
}
