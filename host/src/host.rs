//! The host as an embedder sees it: created from a [`HostConfig`], it runs
//! PID0 (`run_pid0`), hands out root Executors (`root_executor`, or one per
//! client [`Scope`]) and ends everything (`shutdown`). The work is the
//! [`Spawner`]'s; this is its face.
//!
//! A `Host` is single-threaded (capnp-rpc is): create and use it inside a
//! `tokio::task::LocalSet` on a current-thread runtime.

use std::sync::Arc;

use capsa_schema::capsa_capnp::executor;

use crate::cell::{CellSpec, StdioMode};
use crate::error::SpawnError;
use crate::executor::ExecutorImpl;
use crate::program::Payload;
use crate::scope::Scope;
use crate::spawner::Spawner;
use crate::status::ExitStatus;

pub use crate::spawner::{HostConfig, HostError};

/// A handle on the host; clones share it.
#[derive(Clone)]
pub struct Host(Spawner);

impl Host {
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        Spawner::new(config).map(Host)
    }

    pub fn config(&self) -> &HostConfig {
        self.0.config()
    }

    /// A new root Executor: what PID0 bootstraps. Its children are at
    /// nesting level 1 and run under the host's limits.
    pub fn root_executor(&self) -> executor::Client {
        self.root_executor_in(&Scope::new())
    }

    /// A new root Executor whose processes belong to `scope`: nesting level
    /// 1, the host's limits, and its own live-children quota.
    pub fn root_executor_in(&self, scope: &Scope) -> executor::Client {
        capnp_rpc::new_client(ExecutorImpl::scoped(
            self.0.clone(),
            1,
            self.config().limits.clone(),
            scope.clone(),
            self.0.granted(),
            self.0.network().map(|(_, client)| client),
        ))
    }

    /// Runs `bytes` as PID0 with the root Executor as its bootstrap, waits for
    /// it to exit, then kills whatever it left running.
    pub async fn run_pid0(
        &self,
        bytes: &[u8],
        args: Vec<String>,
    ) -> Result<ExitStatus, SpawnError> {
        self.run_pid0_with(bytes, args, self.root_executor().client)
            .await
    }

    /// Like [`Host::run_pid0`], with the capability PID0 bootstraps chosen by
    /// the embedder (for instance a wrapper around [`Host::root_executor`]).
    pub async fn run_pid0_with(
        &self,
        bytes: &[u8],
        args: Vec<String>,
        bootstrap: capnp::capability::Client,
    ) -> Result<ExitStatus, SpawnError> {
        let spec = CellSpec {
            name: "pid0".into(),
            argv0: "pid0".into(),
            args,
            env: Vec::new(),
            limits: self.config().limits.clone(),
            stdio: StdioMode::Rpc,
            bootstrap: Some(bootstrap),
            want_export: false,
            memory_share: None,
            preopens: self.0.preopens(),
            network: self.0.network().map(|(view, _)| view),
            after_exit: Vec::new(),
        };
        let pid0 = self
            .0
            .spawn(Payload::Bytes(Arc::from(bytes)), spec, None)
            .await?;
        let status = pid0.wait().await;
        self.shutdown().await;
        Ok(status)
    }

    /// Guests (WASM cells and machines) currently running, at every
    /// nesting level.
    pub fn live_guests(&self) -> usize {
        self.0.live_guests()
    }

    /// Distinct compiled guests the host holds in memory.
    pub fn compiled_guests(&self) -> usize {
        self.0.compiled_guests()
    }

    /// Kills every running cell and waits until all have ended. New spawns
    /// are refused from here on.
    pub async fn shutdown(&self) {
        self.0.shutdown().await;
    }
}
