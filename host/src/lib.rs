//! capsa: a capability host for sandboxed code.
//!
//! The host runs one WebAssembly component, PID0, and serves it Cap'n Proto
//! capabilities over PID0's own WASI stdin/stdout. The root capability is an
//! [`Executor`](capsa_schema::capsa_capnp::executor) whose `runBytes` turns
//! bytes into a running `Process`: WASM components and WASI preview 1 modules
//! run as nested children with their own connection; x86-64 ELF executables
//! run in KVM microVMs whose agent's Executor is handed back.
//!
//! Module map:
//! - [`host`]: the [`Host`], its registry of live cells and the embedder's
//!   entry points;
//! - [`executor`], [`program`], [`process`], [`stream`]: the capabilities;
//! - [`cell`]: one running guest and the task that drives it;
//! - [`directory`]: host directories as capabilities, granted to guests;
//! - [`mirror`] (from `capsa-directory`): a Directory from elsewhere,
//!   copied in for a child and back;
//! - [`engine`]: wasmtime configuration and linkers; [`memory_cache`]:
//!   compiled guests in memory; [`cache`]: compiled guests on disk;
//!   [`ticker`]: the thread that advances the engine's epoch; [`lru`]: the
//!   byte-bounded LRU under the compile cache and the program table;
//! - [`world`]: the WIT world guests are linked against (`wit/world.wit`),
//!   and the check that refuses imports outside it;
//! - [`pipe`]: the bounded in-memory pipes behind every guest's stdio;
//! - [`format`]: telling components, modules and ELF files apart;
//! - [`vm`]: ELF payloads in microVMs, through the in-guest agent;
//! - [`transport`]: flow control on every RPC connection the host serves;
//! - [`scope`]: the processes of one client, killed together when it goes;
//! - [`serve`]: `capsa serve`, the root Executor over a Unix, TCP or TLS
//!   socket; [`admission`]: who may take a turn at authenticating, and how
//!   often; [`tls`]: certificates, fingerprints and trust;
//! - [`exec`]: the client behind `capsa exec`;
//! - [`embed`]: a host on its own thread inside another program, for test
//!   harnesses.

pub(crate) mod admission;
pub mod cache;
pub(crate) mod cell;
pub mod directory;
pub mod embed;
pub mod engine;
pub(crate) mod error;
pub mod exec;
pub mod executor;
pub(crate) mod format;
pub(crate) mod host;
pub(crate) mod lru;
pub(crate) mod memory_cache;
pub mod netpolicy;
pub(crate) mod network;
pub mod pipe;
pub(crate) mod process;
pub(crate) mod program;
pub(crate) mod quota;
pub(crate) mod registry;
pub mod scope;
pub mod serve;
pub(crate) mod spawner;
pub(crate) mod status;
pub(crate) mod stream;
pub(crate) mod ticker;
pub mod tls;
pub(crate) mod transport;
pub(crate) mod vm;
pub(crate) mod world;

pub use capsa_client as client;
pub use capsa_directory::mirror;
pub use directory::DirGrant;
pub use embed::Embedded;
pub use error::SpawnError;
pub use host::{Host, HostConfig, HostError};
pub use status::{ExitStatus, Limits};
pub use transport::FlowLimits;
pub use vm::{report_live_machines, VmBackend, VmSettings};

pub use capsa_schema::capsa_capnp as schema;
