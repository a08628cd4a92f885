//! Serving the Executor: one capnp-rpc two-party connection per accepted
//! stream, the agent on the server side and its Executor as the bootstrap.
//!
//! A connection that sends garbage ends with an RPC error; the others go on.
//! Each connection's capabilities, and so its processes, go with it.

use std::cell::Cell;
use std::rc::Rc;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa_schema::capsa_capnp::executor;
use capsa_schema::rpc::SmallFirstSegments;
use tokio::sync::Notify;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::executor::{ExecutorImpl, Runner};
use crate::listen::Listener;

/// When the accept loop stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Serve until killed.
    Forever,
    /// Serve one connection; stop when it closes.
    Once,
    /// Stop when the last open connection closes, once at least one was
    /// served: the VM's client is gone.
    UntilIdle,
}

/// Accepts and serves connections until `lifetime` says to stop.
pub async fn serve(listener: Listener, runner: Rc<Runner>, lifetime: Lifetime) {
    let open = Rc::new(Cell::new(0usize));
    let idle = Rc::new(Notify::new());
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = idle.notified() => return,
        };
        let (reader, writer) = match accepted {
            Ok(halves) => halves,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                eprintln!("capsa-agent: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        open.set(open.get() + 1);
        eprintln!("capsa-agent: connection {id} opened");

        let network = SmallFirstSegments(twoparty::VatNetwork::new(
            reader.compat(),
            writer.compat_write(),
            Side::Server,
            capnp::message::ReaderOptions::new(),
        ));
        let bootstrap: executor::Client = capnp_rpc::new_client(ExecutorImpl::new(runner.clone()));
        let rpc = RpcSystem::new(Box::new(network), Some(bootstrap.client));
        let (task_open, task_idle) = (open.clone(), idle.clone());
        tokio::task::spawn_local(async move {
            let (open, idle) = (task_open, task_idle);
            match rpc.await {
                Ok(()) => eprintln!("capsa-agent: connection {id} closed"),
                Err(e) => eprintln!("capsa-agent: connection {id} dropped: {e}"),
            }
            open.set(open.get() - 1);
            if open.get() == 0 && lifetime != Lifetime::Forever {
                idle.notify_one();
            }
        });
        if lifetime == Lifetime::Once {
            idle.notified().await;
            return;
        }
    }
}
