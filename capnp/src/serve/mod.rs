//! The capabilities every `runBytes` implementation hands out, served once
//! for the host and the microVM agent, each over a small trait a side
//! implements, so the two cannot drift apart:
//!
//! - [`executor`]: the Executor, over [`Executes`](executor::Executes);
//! - [`program`]: the Program, a loaded program bound to its Executor;
//! - [`process`]: the Process, over [`Running`](process::Running).
//!
//! The `ByteSource` they hand out is [`crate::stream`]'s.

pub mod executor;
pub mod process;
pub mod program;
