//! The `Process` capability: a handle on one running WASM cell, or on an ELF
//! running in a machine through its agent.
//!
//! Dropping the last reference to a Process kills what it stands for
//! (`Drop` below), which is how "no orphans" holds for processes nobody can
//! reach any more.

use std::cell::OnceCell;
use std::rc::Rc;

use capsa_client::Pushed;
use futures::future::{FutureExt, Shared};

use capsa_schema::capsa_capnp::{byte_sink, byte_source, process};
use capsa_schema::error::error;
use capsa_schema::ErrorKind;

use crate::cell::{Cell, DataStdio};
use crate::status::{wait_status, ExitStatus};
use capsa_schema::stream::{push, ByteSourceServer};

use crate::stream::{ByteSinkImpl, Source};
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
    /// Which streams are pushed into the caller's sinks
    /// (`Options.stdoutTo`, `stderrTo`), stdout then stderr.
    pushed: [bool; 2],
    /// One per pushed stream: resolves when its sink has been closed.
    pushing: Vec<Shared<futures::channel::oneshot::Receiver<()>>>,
}

/// Which of the three streams.
#[derive(Clone, Copy)]
enum Stdio {
    Stdout,
    Stderr,
}

impl ProcessImpl {
    /// The Process of `cell`, pushing the streams `pushed` names; the
    /// caller has checked that the cell runs in data mode if any is.
    pub fn new(cell: Rc<Cell>, pushed: Pushed) -> Self {
        Self::with_target(Target::Cell(cell), pushed)
    }

    pub fn vm(vm: Rc<VmProcess>, pushed: Pushed) -> Self {
        Self::with_target(Target::Vm(vm), pushed)
    }

    fn with_target(target: Target, pushed: Pushed) -> Self {
        let mut process = ProcessImpl {
            target,
            stdin: OnceCell::new(),
            stdout: OnceCell::new(),
            stderr: OnceCell::new(),
            pushed: [pushed.stdout.is_some(), pushed.stderr.is_some()],
            pushing: Vec::new(),
        };
        for (which, sink) in [
            (Stdio::Stdout, pushed.stdout),
            (Stdio::Stderr, pushed.stderr),
        ] {
            let Some(sink) = sink else { continue };
            let from = match (&process.target, which) {
                (Target::Cell(cell), which) => match &cell.data {
                    Some(data) => Source::Pipe(match which {
                        Stdio::Stdout => data.stdout.clone(),
                        Stdio::Stderr => data.stderr.clone(),
                    }),
                    None => continue,
                },
                (Target::Vm(vm), Stdio::Stdout) => {
                    Source::Remote(vm.process.stdout_request().send().pipeline.get_source())
                }
                (Target::Vm(vm), Stdio::Stderr) => {
                    Source::Remote(vm.process.stderr_request().send().pipeline.get_source())
                }
            };
            let (done, closed) = futures::channel::oneshot::channel::<()>();
            tokio::task::spawn_local(async move {
                push(from, &sink).await;
                drop(done);
            });
            process.pushing.push(closed.shared());
        }
        process
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
        let (index, what) = match which {
            Stdio::Stdout => (0, "stdout"),
            Stdio::Stderr => (1, "stderr"),
        };
        if self.pushed[index] {
            return Err(error(
                ErrorKind::WrongMode,
                format!("{what} is pushed into the sink given at the start ({what}To)"),
            ));
        }
        let source = self.new_source(which)?;
        Ok(cached.get_or_init(|| source).clone())
    }

    fn new_source(&self, which: Stdio) -> Result<byte_source::Client, capnp::Error> {
        Ok(match (&self.target, which) {
            (Target::Cell(cell), Stdio::Stdout) => {
                ByteSourceServer::client(Self::data(cell, "stdout")?.stdout.clone())
            }
            (Target::Cell(cell), Stdio::Stderr) => {
                ByteSourceServer::client(Self::data(cell, "stderr")?.stderr.clone())
            }
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
        // All of the output is in the caller's sinks before it hears the end.
        for closed in &self.pushing {
            let _ = closed.clone().await;
        }
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
