//! The servers the rows measure against: capabilities of the bench's own
//! (an Executor that records a guest's samples, one that only echoes, one
//! that signals its first call, a Process that loops its stdin back, a
//! sink that counts) and a `capsa serve` in a thread of this process.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use capsa::schema::{byte_sink, executor, process};
use capsa::{Host, HostConfig};
use capsa_schema::stream::{ByteSourceServer, ByteStream};

use crate::local;

/// Samples guests reported, by the name they gave them.
pub type Samples = Rc<RefCell<Vec<(String, Vec<f64>)>>>;

/// The bootstrap PID0 gets in the benchmarks: the root Executor, except that
/// `echo("bench:<name>:<ns>,<ns>,...")` also records the samples a guest took.
pub struct Recorder {
    pub root: executor::Client,
    pub samples: Samples,
}

impl executor::Server for Recorder {
    async fn run_bytes(
        self: Rc<Self>,
        params: executor::RunBytesParams,
        mut results: executor::RunBytesResults,
    ) -> Result<(), capnp::Error> {
        let mut req = self.root.run_bytes_request();
        req.get().set_bytes(params.get()?.get_bytes()?);
        req.get().set_args(params.get()?.get_args()?)?;
        req.get().set_options(params.get()?.get_options()?)?;
        let resp = req.send().promise.await?;
        results.get().set_process(resp.get()?.get_process()?);
        Ok(())
    }

    async fn echo(
        self: Rc<Self>,
        params: executor::EchoParams,
        mut results: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        let msg = params.get()?.get_message()?.to_str()?;
        if let Some(rest) = msg.strip_prefix("bench:") {
            if let Some((name, list)) = rest.split_once(':') {
                let v = list.split(',').filter_map(|s| s.parse().ok()).collect();
                self.samples.borrow_mut().push((name.to_string(), v));
            }
        }
        results.get().set_response(msg);
        Ok(())
    }
}

/// An Executor that only echoes, for the peer measurements.
pub struct EchoOnly;

impl executor::Server for EchoOnly {
    async fn echo(
        self: Rc<Self>,
        params: executor::EchoParams,
        mut results: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_response(params.get()?.get_message()?);
        Ok(())
    }
}

/// The arguments that make child-echo call its bootstrap's `echo` as soon
/// as it starts (after its default argv[0], "child-echo").
pub const FIRST_CALL_ARGS: [&str; 2] = ["bench-echo", "1"];

/// Answers echo and signals the first call it gets.
pub struct FirstCall(pub RefCell<Option<tokio::sync::oneshot::Sender<Instant>>>);

impl executor::Server for FirstCall {
    async fn echo(
        self: Rc<Self>,
        params: executor::EchoParams,
        mut results: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        if let Some(tx) = self.0.borrow_mut().take() {
            let _ = tx.send(Instant::now());
        }
        results.get().set_response(params.get()?.get_message()?);
        Ok(())
    }
}

type Chunks = tokio::sync::mpsc::Receiver<Vec<u8>>;

/// A Process without a guest whose stdin comes back on its stdout through
/// a bounded queue, read through the `ByteSourceServer` capsa's own
/// streams use (see `peers::throughput_peer`).
pub struct Loopback {
    stdin: RefCell<Option<tokio::sync::mpsc::Sender<Vec<u8>>>>,
    stdout: Rc<Queue>,
}

impl Loopback {
    /// A loopback whose queue holds `chunks` writes.
    pub fn new(chunks: usize) -> Loopback {
        let (tx, rx) = tokio::sync::mpsc::channel(chunks);
        Loopback {
            stdin: RefCell::new(Some(tx)),
            stdout: Rc::new(Queue(tokio::sync::Mutex::new((rx, None)))),
        }
    }
}

impl process::Server for Loopback {
    async fn stdin(
        self: Rc<Self>,
        _: process::StdinParams,
        mut results: process::StdinResults,
    ) -> Result<(), capnp::Error> {
        let tx = self.stdin.borrow_mut().take();
        let tx = tx.ok_or_else(|| capnp::Error::failed("stdin taken".into()))?;
        results
            .get()
            .set_sink(capnp_rpc::new_client(QueueSink(RefCell::new(Some(tx)))));
        Ok(())
    }

    async fn stdout(
        self: Rc<Self>,
        _: process::StdoutParams,
        mut results: process::StdoutResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_source(ByteSourceServer::client(self.stdout.clone()));
        Ok(())
    }
}

struct QueueSink(RefCell<Option<tokio::sync::mpsc::Sender<Vec<u8>>>>);

impl byte_sink::Server for QueueSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> Result<(), capnp::Error> {
        let tx = self.0.borrow().clone();
        let tx = tx.ok_or_else(|| capnp::Error::failed("closed".into()))?;
        tx.send(params.get()?.get_data()?.to_vec())
            .await
            .map_err(|_| capnp::Error::failed("reader gone".into()))
    }

    async fn close(
        self: Rc<Self>,
        _: byte_sink::CloseParams,
        _: byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        self.0.borrow_mut().take();
        Ok(())
    }
}

/// The loopback's queue read as a stream, a write at a time (what a read
/// asking for less leaves is the next read's).
struct Queue(tokio::sync::Mutex<(Chunks, Option<Vec<u8>>)>);

impl ByteStream for Queue {
    const MAX_READ: usize = 4 << 20;
    type Chunk = Vec<u8>;

    async fn read(&self, max: usize) -> capnp::Result<(Vec<u8>, bool)> {
        let mut queue = self.0.lock().await;
        let (rx, rest) = &mut *queue;
        let mut chunk = match rest.take() {
            Some(chunk) => chunk,
            None => loop {
                match rx.recv().await {
                    Some(chunk) if chunk.is_empty() => continue,
                    Some(chunk) => break chunk,
                    None => return Ok((Vec::new(), true)),
                }
            },
        };
        if chunk.len() > max {
            *rest = Some(chunk.split_off(max));
        }
        Ok((chunk, false))
    }
}

/// Counts what is pushed into it; says when it is closed.
pub struct CountingSink {
    bytes: Cell<usize>,
    closed: RefCell<Option<tokio::sync::oneshot::Sender<usize>>>,
}

impl CountingSink {
    /// The sink and what says, once it is closed, how many bytes it got.
    pub fn new() -> (CountingSink, tokio::sync::oneshot::Receiver<usize>) {
        let (tx, closed) = tokio::sync::oneshot::channel();
        let sink = CountingSink {
            bytes: Cell::new(0),
            closed: RefCell::new(Some(tx)),
        };
        (sink, closed)
    }
}

impl byte_sink::Server for CountingSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> Result<(), capnp::Error> {
        let n = params.get()?.get_data()?.len();
        self.bytes.set(self.bytes.get() + n);
        Ok(())
    }

    async fn close(
        self: Rc<Self>,
        _: byte_sink::CloseParams,
        _: byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        if let Some(tx) = self.closed.borrow_mut().take() {
            let _ = tx.send(self.bytes.get());
        }
        Ok(())
    }
}

/// A `capsa serve` in a thread of this process: its address, what stops
/// it when dropped, and its thread.
pub type Serving = (
    capsa::serve::Address,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
);

/// A `capsa serve` on a Unix socket in `dir`.
pub fn serve_in_thread(dir: &std::path::Path) -> Serving {
    let address = capsa::serve::Address::Unix(dir.join("capsa.sock"));
    serve_config_in_thread(capsa::serve::ServeConfig::new(address))
}

/// A `capsa serve` configured by `config`.
pub fn serve_config_in_thread(config: capsa::serve::ServeConfig) -> Serving {
    let server = capsa::serve::Server::bind(config).unwrap();
    let address = server.address().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        local(async move {
            let host = Host::new(HostConfig::default()).unwrap();
            server
                .run(&host, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        })
    });
    (address, stop, thread)
}
