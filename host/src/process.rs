//! The `Process` capability: a handle on one running WASM cell, or on an ELF
//! running in a machine through its agent.
//!
//! The capability is the schema crate's
//! [`ProcessServer`](capsa_schema::serve::process::ProcessServer), shared with the
//! agent; this module says what a Process stands for here ([`Target`]).
//! Dropping the last reference to a Process kills what it stands for, which
//! is how "no orphans" holds for processes nobody can reach any more.

use std::rc::Rc;

use capsa_schema::capsa_capnp::{byte_sink, byte_source, process};
use capsa_schema::error::error;
use capsa_schema::request::Pushed;
use capsa_schema::serve::process::{Output, ProcessServer, Running};
use capsa_schema::stream::ByteSourceServer;
use capsa_schema::ErrorKind;

use crate::cell::{Cell, DataStdio};
use crate::pipe::PipeReader;
use crate::status::ExitStatus;
use crate::stream::{ByteSinkImpl, Source};
use crate::vm::VmProcess;

/// What a Process stands for.
pub enum Target {
    Cell(Rc<Cell>),
    Vm(Rc<VmProcess>),
}

impl Target {
    /// Its Process, pushing the streams `pushed` names (a cell that has
    /// them runs in data mode: the request is refused otherwise).
    pub fn client(self, pushed: Pushed) -> process::Client {
        ProcessServer::client(self, pushed, |push| {
            tokio::task::spawn_local(push);
        })
    }
}

/// A cell's data-mode stdio, or why there is none.
fn data<'a>(cell: &'a Cell, what: &str) -> Result<&'a DataStdio, capnp::Error> {
    cell.data.as_ref().ok_or_else(|| {
        error(
            ErrorKind::WrongMode,
            format_args!(
                "{} runs in RPC mode: its stdin/stdout carry its Cap'n Proto connection and its \
                 stderr goes to the host log, so there is no {what} stream; start it in data mode",
                cell.name
            ),
        )
    })
}

/// A cell's stdout or stderr pipe.
fn pipe(cell: &Cell, which: Output) -> Result<Rc<PipeReader>, capnp::Error> {
    let data = data(cell, which.name())?;
    Ok(match which {
        Output::Stdout => data.stdout.clone(),
        Output::Stderr => data.stderr.clone(),
    })
}

/// The agent's stdout or stderr of an ELF.
fn remote(vm: &VmProcess, which: Output) -> byte_source::Client {
    match which {
        Output::Stdout => vm.process.stdout_request().send().pipeline.get_source(),
        Output::Stderr => vm.process.stderr_request().send().pipeline.get_source(),
    }
}

impl Running for Target {
    type Stream = Source;

    async fn wait(&self) -> ExitStatus {
        match self {
            Target::Cell(cell) => cell.wait().await,
            Target::Vm(vm) => vm.wait().await,
        }
    }

    fn kill(&self) {
        match self {
            Target::Cell(cell) => cell.kill(ExitStatus::Killed),
            Target::Vm(vm) => vm.kill(ExitStatus::Killed),
        }
    }

    async fn stdin(&self) -> capnp::Result<byte_sink::Client> {
        Ok(match self {
            Target::Cell(cell) => {
                capnp_rpc::new_client(ByteSinkImpl::new(data(cell, "stdin")?.stdin.clone()))
            }
            // Waited for, so the caller's writes reach the agent's sink in
            // order (see `capsa_client::stdin`).
            Target::Vm(vm) => capsa_client::stdin(&vm.process).await?,
        })
    }

    fn output(&self, which: Output) -> capnp::Result<Source> {
        Ok(match self {
            Target::Cell(cell) => Source::Pipe(pipe(cell, which)?),
            Target::Vm(vm) => Source::Remote(remote(vm, which)),
        })
    }

    fn source(&self, which: Output) -> capnp::Result<byte_source::Client> {
        Ok(match self {
            Target::Cell(cell) => ByteSourceServer::client(pipe(cell, which)?),
            // The agent's stream, proxied: flow control is end to end.
            Target::Vm(vm) => remote(vm, which),
        })
    }

    fn export(&self) -> capnp::Result<capnp::capability::Client> {
        match self {
            // The agent's Executor: more processes in the same machine.
            Target::Vm(vm) => Ok(vm.agent.client.clone()),
            Target::Cell(cell) => cell.export.clone().ok_or_else(|| {
                error(
                    ErrorKind::WrongMode,
                    format_args!(
                        "{} runs in data mode: it has no Cap'n Proto connection and exports \
                         nothing",
                        cell.name
                    ),
                )
            }),
        }
    }
}
