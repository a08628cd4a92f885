//! The guest's Cap'n Proto connection over its own stdin and stdout.

use std::cell::OnceCell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;

use capnp::capability::Client;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa_schema::executor;
use capsa_schema::rpc::SmallFirstSegments;
use futures::future::{self, Either};
use futures::io::{BufReader, BufWriter};

use crate::{block_on, stdio, Error};

/// Buffers between the RPC system and the WASI streams: a message header and
/// its segments leave in one write, and one read takes in whatever arrived.
/// Both are allocated (and so made resident) when the connection opens and
/// stay for the guest's life: at 64 KiB each they were 128 KiB of the
/// ~150 KiB an idle RPC guest kept in its memory. A message larger than a
/// buffer bypasses it (one more write for its header, nothing copied twice).
const BUFFER_BYTES: usize = 8 * 1024;

/// The host's `Executor` as seen by the capability a guest exports.
///
/// The exported capability has to exist before the connection does, and the
/// host's capability only once it does; this handle is filled in between.
#[derive(Clone, Default)]
pub struct HostExecutor(Rc<OnceCell<executor::Client>>);

impl HostExecutor {
    /// The host's `Executor`; fails before the connection is open.
    pub fn client(&self) -> Result<executor::Client, capnp::Error> {
        self.0.get().cloned().ok_or_else(|| {
            capnp::Error::failed("the connection to the host is not open yet".into())
        })
    }
}

/// The guest's side of its connection: what it exports and what the host
/// gave it.
pub struct Connection {
    rpc_system: RpcSystem<Side>,
    host: executor::Client,
}

impl Connection {
    /// Opens the connection on stdin/stdout. `export` makes the capability
    /// this guest offers (what its parent gets from `Process.bootstrap()`);
    /// it may keep the [`HostExecutor`] to call the host later.
    pub fn open(export: impl FnOnce(HostExecutor) -> Option<Client>) -> Self {
        let host_slot = HostExecutor::default();
        let export = export(host_slot.clone());
        let network = SmallFirstSegments(twoparty::VatNetwork::new(
            BufReader::with_capacity(BUFFER_BYTES, stdio::stdin()),
            BufWriter::with_capacity(BUFFER_BYTES, stdio::stdout()),
            Side::Client,
            Default::default(),
        ));
        let mut rpc_system = RpcSystem::new(Box::new(network), export);
        let host: executor::Client = rpc_system.bootstrap(Side::Server);
        let _ = host_slot.0.set(host.clone());
        Self { rpc_system, host }
    }

    /// The host's `Executor`: the capability this guest bootstraps.
    pub fn host(&self) -> executor::Client {
        self.host.clone()
    }

    /// Runs `main` while serving the connection and returns its result as
    /// soon as it ends.
    pub fn run_until<F>(self, main: F) -> Result<(), Error>
    where
        F: Future<Output = Result<(), capnp::Error>>,
    {
        let Self { rpc_system, host } = self;
        drop(host);
        // `main` first: when the host goes away, its own error says more
        // than the connection's end.
        let outcome = block_on(async move {
            match future::select(pin!(main), rpc_system).await {
                Either::Left((result, _)) => result,
                Either::Right((Ok(()), _)) => Err(capnp::Error::disconnected(
                    "the host closed the connection before the guest was done".into(),
                )),
                Either::Right((Err(e), _)) => Err(e),
            }
        })?;
        Ok(outcome?)
    }

    /// Serves the connection until the host closes it.
    pub fn serve(self) -> Result<(), Error> {
        self.serve_with(future::ready(Ok(())))
    }

    /// Serves the connection until the host closes it, running `task`
    /// alongside. A task that fails ends the guest with its error.
    pub fn serve_with<F>(self, task: F) -> Result<(), Error>
    where
        F: Future<Output = Result<(), capnp::Error>>,
    {
        let Self { rpc_system, host } = self;
        drop(host);
        let task = async move {
            task.await?;
            future::pending::<Result<(), capnp::Error>>().await
        };
        let outcome = block_on(async move {
            match future::select(rpc_system, pin!(task)).await {
                Either::Left((result, _)) | Either::Right((result, _)) => result,
            }
        })?;
        Ok(outcome?)
    }
}
