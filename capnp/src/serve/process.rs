//! The `Process` capability, served the same way by the host (a WASM cell,
//! an ELF through its machine's agent) and by the agent (an ELF in the
//! machine).
//!
//! A side says what its process is and how to reach its stdio
//! ([`Running`]); [`ProcessServer`] keeps the schema's rules: dropping the
//! last reference kills the process, each stream is one capability made on
//! first use and handed to every caller (so readers take turns on it
//! rather than race), a stream pushed into the caller's sink
//! (`Options.stdoutTo`) cannot be pulled too, and `wait` answers once every
//! pushed stream has been delivered.

use std::cell::OnceCell;
use std::future::Future;
use std::rc::Rc;

use futures::channel::oneshot;
use futures::future::{FutureExt, LocalBoxFuture, Shared};

use crate::capsa_capnp::{byte_sink, byte_source, process};
use crate::error::error;
use crate::request::Pushed;
use crate::status::ExitStatus;
use crate::stream::{push, ByteSourceServer, ByteStream};
use crate::ErrorKind;

/// One of a process's output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

impl Output {
    /// The stream's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Output::Stdout => "stdout",
            Output::Stderr => "stderr",
        }
    }
}

/// What a Process stands for.
pub trait Running: 'static {
    /// What an output stream is read from.
    type Stream: ByteStream + 'static;

    /// Resolves once the process has ended, with how.
    fn wait(&self) -> impl Future<Output = ExitStatus>;

    /// Ends the process at once, unless it has ended.
    fn kill(&self);

    /// A new sink on its stdin.
    fn stdin(&self) -> impl Future<Output = capnp::Result<byte_sink::Client>>;

    /// Its stdout or stderr, or why it has none.
    fn output(&self, which: Output) -> capnp::Result<Self::Stream>;

    /// A new source on its stdout or stderr: the [`Running::output`] stream
    /// served as it is.
    fn source(&self, which: Output) -> capnp::Result<byte_source::Client> {
        Ok(ByteSourceServer::client(self.output(which)?))
    }

    /// What `Process.bootstrap` returns, or why there is nothing.
    fn export(&self) -> capnp::Result<capnp::capability::Client>;
}

/// How one output stream reaches the caller.
enum Delivery {
    /// Through `Process.stdout` (`stderr`): one source, made on first use.
    Pulled(OnceCell<byte_source::Client>),
    /// Into the caller's sink; resolves once the sink has been closed (or
    /// the push has given up on it).
    Pushed(Shared<oneshot::Receiver<()>>),
}

/// The `Process` capability on a [`Running`] process.
pub struct ProcessServer<R: Running> {
    running: R,
    stdin: OnceCell<byte_sink::Client>,
    /// stdout, then stderr.
    outputs: [Delivery; 2],
}

impl<R: Running> ProcessServer<R> {
    /// `running` as a Process whose streams `pushed` names are pushed into
    /// the caller's sinks, each by a task that `spawn` starts.
    pub fn client(
        running: R,
        pushed: Pushed,
        spawn: impl Fn(LocalBoxFuture<'static, ()>),
    ) -> process::Client {
        let deliver = |which, sink: Option<byte_sink::Client>| {
            let pushing = sink.and_then(|sink| Some((running.output(which).ok()?, sink)));
            let Some((stream, sink)) = pushing else {
                return Delivery::Pulled(OnceCell::new());
            };
            let (done, closed) = oneshot::channel::<()>();
            spawn(Box::pin(async move {
                push(stream, &sink).await;
                drop(done);
            }));
            Delivery::Pushed(closed.shared())
        };
        let outputs = [
            deliver(Output::Stdout, pushed.stdout),
            deliver(Output::Stderr, pushed.stderr),
        ];
        capnp_rpc::new_client(ProcessServer {
            running,
            stdin: OnceCell::new(),
            outputs,
        })
    }

    fn source(&self, which: Output) -> capnp::Result<byte_source::Client> {
        let index = match which {
            Output::Stdout => 0,
            Output::Stderr => 1,
        };
        match &self.outputs[index] {
            Delivery::Pulled(made) => {
                if let Some(source) = made.get() {
                    return Ok(source.clone());
                }
                let source = self.running.source(which)?;
                Ok(made.get_or_init(|| source).clone())
            }
            Delivery::Pushed(_) => {
                let what = which.name();
                Err(error(
                    ErrorKind::WrongMode,
                    format_args!("{what} is pushed into the sink given at the start ({what}To)"),
                ))
            }
        }
    }
}

impl<R: Running> Drop for ProcessServer<R> {
    fn drop(&mut self) {
        self.running.kill();
    }
}

impl<R: Running> process::Server for ProcessServer<R> {
    async fn wait(
        self: Rc<Self>,
        _: process::WaitParams,
        mut results: process::WaitResults,
    ) -> Result<(), capnp::Error> {
        let status = self.running.wait().await;
        // All of the output is in the caller's sinks before it hears the end.
        for delivery in &self.outputs {
            if let Delivery::Pushed(closed) = delivery {
                let _ = closed.clone().await;
            }
        }
        status.write_to(results.get().init_status());
        Ok(())
    }

    async fn kill(
        self: Rc<Self>,
        _: process::KillParams,
        _: process::KillResults,
    ) -> Result<(), capnp::Error> {
        self.running.kill();
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
                let sink = self.running.stdin().await?;
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
        results.get().set_source(self.source(Output::Stdout)?);
        Ok(())
    }

    async fn stderr(
        self: Rc<Self>,
        _: process::StderrParams,
        mut results: process::StderrResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_source(self.source(Output::Stderr)?);
        Ok(())
    }

    async fn bootstrap(
        self: Rc<Self>,
        _: process::BootstrapParams,
        mut results: process::BootstrapResults,
    ) -> Result<(), capnp::Error> {
        let export = self.running.export()?;
        results.get().init_cap().set_as_capability(export.hook);
        Ok(())
    }
}
