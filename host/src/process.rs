//! The `Process` capability: a handle on one running WASM cell, or on an ELF
//! running in a machine through its agent.
//!
//! Dropping the last reference to a Process kills what it stands for
//! (`Drop` below), which is how "no orphans" holds for processes nobody can
//! reach any more.

use std::cell::OnceCell;
use std::rc::Rc;

use capsa_schema::capsa_capnp::{byte_sink, byte_source, process};
use capsa_schema::error::error;
use capsa_schema::ErrorKind;

use crate::cell::{wait_status, Cell, DataStdio};
use crate::status::ExitStatus;
use crate::stream::{ByteSinkImpl, ByteSourceImpl};
use crate::vm::VmProcess;

/// What a Process stands for.
enum Target {
    Cell(Rc<Cell>),
    Vm(Rc<VmProcess>),
}

pub struct ProcessImpl {
    target: Target,
    /// One capability per stream, made on first use and handed to every
    /// caller: concurrent readers (or writers) then take turns on one
    /// stream instead of racing for the pipe's single waker.
    stdin: OnceCell<byte_sink::Client>,
    stdout: OnceCell<byte_source::Client>,
    stderr: OnceCell<byte_source::Client>,
}

/// Which of the three streams.
#[derive(Clone, Copy)]
enum Stdio {
    Stdout,
    Stderr,
}

impl ProcessImpl {
    pub fn new(cell: Rc<Cell>) -> Self {
        Self::with_target(Target::Cell(cell))
    }

    pub fn vm(vm: Rc<VmProcess>) -> Self {
        Self::with_target(Target::Vm(vm))
    }

    fn with_target(target: Target) -> Self {
        ProcessImpl {
            target,
            stdin: OnceCell::new(),
            stdout: OnceCell::new(),
            stderr: OnceCell::new(),
        }
    }

    /// A cell's data-mode stdio, or why there is none.
    fn data<'a>(cell: &'a Cell, what: &str) -> Result<&'a DataStdio, capnp::Error> {
        cell.data.as_ref().ok_or_else(|| {
            error(
                ErrorKind::WrongMode,
                format!(
                    "{} runs in RPC mode: its stdin/stdout carry its Cap'n Proto connection and \
                 its stderr goes to the host log, so there is no {what} stream; start it in \
                 data mode",
                    cell.name
                ),
            )
        })
    }

    fn source(&self, which: Stdio) -> Result<byte_source::Client, capnp::Error> {
        let cached = match which {
            Stdio::Stdout => &self.stdout,
            Stdio::Stderr => &self.stderr,
        };
        if let Some(source) = cached.get() {
            return Ok(source.clone());
        }
        let source = self.new_source(which)?;
        Ok(cached.get_or_init(|| source).clone())
    }

    fn new_source(&self, which: Stdio) -> Result<byte_source::Client, capnp::Error> {
        Ok(match (&self.target, which) {
            (Target::Cell(cell), Stdio::Stdout) => capnp_rpc::new_client(ByteSourceImpl::new(
                Self::data(cell, "stdout")?.stdout.clone(),
            )),
            (Target::Cell(cell), Stdio::Stderr) => capnp_rpc::new_client(ByteSourceImpl::new(
                Self::data(cell, "stderr")?.stderr.clone(),
            )),
            // The agent's streams, proxied: flow control is end to end.
            (Target::Vm(vm), Stdio::Stdout) => {
                vm.process.stdout_request().send().pipeline.get_source()
            }
            (Target::Vm(vm), Stdio::Stderr) => {
                vm.process.stderr_request().send().pipeline.get_source()
            }
        })
    }

    fn kill(&self) {
        match &self.target {
            Target::Cell(cell) => cell.kill(ExitStatus::Killed),
            Target::Vm(vm) => vm.kill(ExitStatus::Killed),
        }
    }
}

impl Drop for ProcessImpl {
    fn drop(&mut self) {
        self.kill();
    }
}

impl process::Server for ProcessImpl {
    async fn wait(
        self: Rc<Self>,
        _: process::WaitParams,
        mut results: process::WaitResults,
    ) -> Result<(), capnp::Error> {
        let status = match &self.target {
            Target::Cell(cell) => wait_status(cell.status_receiver()).await,
            Target::Vm(vm) => vm.wait().await,
        };
        status.write_to(results.get().init_status());
        Ok(())
    }

    async fn kill(
        self: Rc<Self>,
        _: process::KillParams,
        _: process::KillResults,
    ) -> Result<(), capnp::Error> {
        ProcessImpl::kill(&self);
        Ok(())
    }

    async fn stdin(
        self: Rc<Self>,
        _: process::StdinParams,
        mut results: process::StdinResults,
    ) -> Result<(), capnp::Error> {
        let sink = match self.stdin.get() {
            Some(sink) => sink.clone(),
            None => {
                let sink: byte_sink::Client = match &self.target {
                    Target::Cell(cell) => capnp_rpc::new_client(ByteSinkImpl::new(
                        Self::data(cell, "stdin")?.stdin.clone(),
                    )),
                    // Waited for, so the caller's writes reach the agent's
                    // sink in order (see `capsa_client::stdin`).
                    Target::Vm(vm) => capsa_client::stdin(&vm.process).await?,
                };
                self.stdin.get_or_init(|| sink).clone()
            }
        };
        results.get().set_sink(sink);
        Ok(())
    }

    async fn stdout(
        self: Rc<Self>,
        _: process::StdoutParams,
        mut results: process::StdoutResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_source(self.source(Stdio::Stdout)?);
        Ok(())
    }

    async fn stderr(
        self: Rc<Self>,
        _: process::StderrParams,
        mut results: process::StderrResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_source(self.source(Stdio::Stderr)?);
        Ok(())
    }

    async fn bootstrap(
        self: Rc<Self>,
        _: process::BootstrapParams,
        mut results: process::BootstrapResults,
    ) -> Result<(), capnp::Error> {
        let export = match &self.target {
            // The agent's Executor: more processes in the same machine.
            Target::Vm(vm) => &vm.agent.client,
            Target::Cell(cell) => cell.export.as_ref().ok_or_else(|| {
                error(
                    ErrorKind::WrongMode,
                    format!(
                    "{} runs in data mode: it has no Cap'n Proto connection and exports nothing",
                    cell.name
                ),
                )
            })?,
        };
        results
            .get()
            .init_cap()
            .set_as_capability(export.hook.clone());
        Ok(())
    }
}
