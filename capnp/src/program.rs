//! How a loaded program is named, the same in the host and the agent.

/// A program's SHA-256.
pub type Hash = [u8; 32];
