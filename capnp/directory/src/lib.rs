//! Directories as capabilities, for every side that holds files: the host
//! (its grants) and the microVM agent (its machine's filesystem).
//!
//! - [`server`]: a local folder served as a `Directory`, every path
//!   resolved beneath the folder's own descriptor;
//! - [`mirror`]: a `Directory` from elsewhere copied into a local folder
//!   for a program that needs real files, and its changes written back.

pub mod mirror;
pub mod server;

pub use server::{Directories, DirectoryImpl};
