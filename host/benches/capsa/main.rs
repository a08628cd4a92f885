//! `cargo xtask bench`: capsa's performance figures, each beside a peer
//! measured in the same run where one exists. Medians throughout.
//!
//! Needs the guests built by the xtask (`CAPSA_GUESTS`).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa::schema::{byte_sink, executor, process, StdioMode};
use capsa::{Host, HostConfig};

fn guests() -> PathBuf {
    std::env::var_os("CAPSA_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guests/out"))
}

fn guest(name: &str) -> Vec<u8> {
    let p = guests().join(format!("{name}.wasm"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask bench`", p.display()))
}

fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

struct Report {
    rows: Vec<(String, String, String)>,
}

impl Report {
    fn row(&mut self, what: &str, capsa: String, peer: String) {
        println!("{what:<58} {capsa:>18}   {peer}");
        self.rows.push((what.into(), capsa, peer));
    }
}

fn us(ns: f64) -> String {
    format!("{:.1} µs", ns / 1000.0)
}

/// Samples guests reported, by the name they gave them.
type Samples = Rc<RefCell<Vec<(String, Vec<f64>)>>>;

/// The bootstrap PID0 gets in the benchmarks: the root Executor, except that
/// `echo("bench:<name>:<ns>,<ns>,...")` also records the samples a guest took.
struct Recorder {
    root: executor::Client,
    samples: Samples,
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

fn guest_samples(args: &[&str], want: &str) -> Vec<f64> {
    local(async {
        let host = Host::new(HostConfig::default()).unwrap();
        let samples = Rc::new(RefCell::new(Vec::new()));
        let recorder: executor::Client = capnp_rpc::new_client(Recorder {
            root: host.root_executor(),
            samples: samples.clone(),
        });
        let status = host
            .run_pid0_with(
                &guest("pid0"),
                args.iter().map(|s| s.to_string()).collect(),
                recorder.client,
            )
            .await
            .unwrap();
        assert!(status.success(), "bench pid0: {status}");
        let found = samples
            .borrow()
            .iter()
            .find(|(n, _)| n == want)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the guest reported no {want} samples"));
        found
    })
}

/// An Executor that only echoes, for the peer measurements.
struct EchoOnly;

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

/// capnp-rpc between two threads of this process over a Unix socket: the
/// peer for the round-trip and throughput figures.
fn unix_socket_peer<C, F, Fut, T>(server: capnp::capability::Client, client: F) -> T
where
    C: capnp::capability::FromClientHook,
    F: FnOnce(C) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let client_thread = std::thread::spawn(move || {
        local(async move {
            let stream = tokio::net::UnixStream::from_std(b).unwrap();
            let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
            let net = twoparty::VatNetwork::new(r, w, Side::Client, Default::default());
            let mut rpc = RpcSystem::new(Box::new(net), None);
            let cap: C = rpc.bootstrap(Side::Server);
            let disconnect = rpc.get_disconnector();
            tokio::task::spawn_local(rpc);
            let out = client(cap).await;
            let _ = disconnect.await;
            out
        })
    });
    local(async move {
        let stream = tokio::net::UnixStream::from_std(a).unwrap();
        let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
        let net = twoparty::VatNetwork::new(r, w, Side::Server, Default::default());
        let _ = RpcSystem::new(Box::new(net), Some(server)).await;
    });
    client_thread.join().unwrap()
}

use futures::AsyncReadExt as _;

const ECHOES: usize = 20_000;

fn echo_peer() -> Vec<f64> {
    let server: executor::Client = capnp_rpc::new_client(EchoOnly);
    unix_socket_peer(server.client, |exec: executor::Client| async move {
        let mut v = Vec::with_capacity(ECHOES);
        for _ in 0..ECHOES {
            let t = Instant::now();
            let mut req = exec.echo_request();
            req.get().set_message("x");
            req.send().promise.await.unwrap();
            v.push(t.elapsed().as_nanos() as f64);
        }
        v
    })
}

/// The same shape as capsa's stream path without a guest: a Process in
/// another thread, over a Unix socket, whose stdin comes back on its
/// stdout through a bounded queue of the size of capsa's pipes. The
/// client writes through `stdin()`'s ByteSink and reads `stdout()`'s
/// ByteSource at once, as in `throughput_capsa`.
fn throughput_peer(chunk: usize, total: usize) -> f64 {
    let (tx, rx) = tokio::sync::mpsc::channel((256 << 10) / chunk.min(256 << 10));
    let server: process::Client = capnp_rpc::new_client(Loopback {
        stdin: RefCell::new(Some(tx)),
        stdout: Rc::new(tokio::sync::Mutex::new(rx)),
    });
    unix_socket_peer(server.client, move |p: process::Client| async move {
        stream_through(&p, chunk, total).await
    })
}

/// Writes `total` bytes into `p`'s stdin, `chunk` at a time, while reading
/// its stdout to the end: bytes per second.
async fn stream_through(p: &process::Client, chunk: usize, total: usize) -> f64 {
    let sink = capsa_client::stdin(p).await.unwrap();
    let source = p.stdout_request().send().pipeline.get_source();
    let t = Instant::now();
    let writer = tokio::task::spawn_local(async move { feed(&sink, chunk, total).await });
    let mut got = 0;
    loop {
        let mut req = source.read_request();
        req.get().set_max_bytes(chunk as u32);
        let resp = req.send().promise.await.unwrap();
        let r = resp.get().unwrap();
        got += r.get_data().unwrap().len();
        if r.get_eof() {
            break;
        }
    }
    writer.await.unwrap();
    assert_eq!(got, total);
    total as f64 / t.elapsed().as_secs_f64()
}

/// One byte to `hello cat` (data mode) and back, `rounds` times: what a
/// host ⇄ guest round trip costs without Cap'n Proto in the guest (the
/// bench's own calls to the stdio capabilities are local, not serialized).
fn stdio_ping_pong(rounds: usize) -> Vec<f64> {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let p = start_cat(&root).await;
        let sink = capsa_client::stdin(&p).await.unwrap();
        let source = p.stdout_request().send().pipeline.get_source();
        let mut v = Vec::with_capacity(rounds);
        for i in 0..=rounds {
            let t = Instant::now();
            let mut req = sink.write_request();
            req.get().set_data(b"x");
            req.send().await.unwrap();
            let mut req = source.read_request();
            req.get().set_max_bytes(1);
            let resp = req.send().promise.await.unwrap();
            assert_eq!(resp.get().unwrap().get_data().unwrap(), b"x");
            if i > 0 {
                v.push(t.elapsed().as_nanos() as f64);
            }
        }
        sink.close_request().send().promise.await.unwrap();
        host.shutdown().await;
        v
    })
}

/// `hello cat` in data mode on `exec`, its stdout to be pulled.
async fn start_cat(exec: &executor::Client) -> process::Client {
    capsa_client::Spawn {
        args: &["cat"],
        stdio: StdioMode::Data,
        ..Default::default()
    }
    .start(exec, &guest("hello"))
    .await
    .unwrap()
}

/// Writes `total` bytes into `sink`, `chunk` at a time, and closes it.
async fn feed(sink: &byte_sink::Client, chunk: usize, total: usize) {
    let data = vec![7u8; chunk];
    for _ in 0..total / chunk {
        let mut req = sink.write_request();
        req.get().set_data(&data);
        req.send().await.unwrap();
    }
    sink.close_request().send().promise.await.unwrap();
}

type Chunks = tokio::sync::mpsc::Receiver<Vec<u8>>;

/// See `throughput_peer`.
struct Loopback {
    stdin: RefCell<Option<tokio::sync::mpsc::Sender<Vec<u8>>>>,
    stdout: Rc<tokio::sync::Mutex<Chunks>>,
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
            .set_source(capnp_rpc::new_client(QueueSource(self.stdout.clone())));
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

struct QueueSource(Rc<tokio::sync::Mutex<Chunks>>);

impl capsa::schema::byte_source::Server for QueueSource {
    async fn read(
        self: Rc<Self>,
        _: capsa::schema::byte_source::ReadParams,
        mut results: capsa::schema::byte_source::ReadResults,
    ) -> Result<(), capnp::Error> {
        let mut rx = self.0.lock().await;
        match rx.recv().await {
            Some(data) => results.get().set_data(&data),
            None => results.get().set_eof(true),
        }
        Ok(())
    }
}

/// Host → guest → host through `hello cat` in data mode, `chunk` bytes a write.
fn throughput_capsa(chunk: usize, total: usize) -> f64 {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let p = start_cat(&root).await;
        let rate = stream_through(&p, chunk, total).await;
        host.shutdown().await;
        rate
    })
}

/// Counts what is pushed into it; says when it is closed.
struct CountingSink {
    bytes: std::cell::Cell<usize>,
    closed: RefCell<Option<tokio::sync::oneshot::Sender<usize>>>,
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

/// As `throughput_capsa`, with the guest's stdout pushed into a sink of
/// the caller's (`Options.stdoutTo`) instead of pulled.
fn throughput_capsa_pushed(chunk: usize, total: usize) -> f64 {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let rate = pushed_through(&host.root_executor(), chunk, total).await;
        host.shutdown().await;
        rate
    })
}

/// Streams `total` bytes through `hello cat` started on `exec`, its stdout
/// pushed into a sink of ours: bytes per second.
async fn pushed_through(exec: &executor::Client, chunk: usize, total: usize) -> f64 {
    let (tx, closed) = tokio::sync::oneshot::channel();
    let out: byte_sink::Client = capnp_rpc::new_client(CountingSink {
        bytes: std::cell::Cell::new(0),
        closed: RefCell::new(Some(tx)),
    });
    let p = capsa_client::Spawn {
        args: &["cat"],
        stdio: StdioMode::Data,
        stdout_to: Some(&out),
        ..Default::default()
    }
    .start(exec, &guest("hello"))
    .await
    .unwrap();
    let sink = capsa_client::stdin(&p).await.unwrap();
    let t = Instant::now();
    feed(&sink, chunk, total).await;
    let got = closed.await.unwrap();
    let rate = total as f64 / t.elapsed().as_secs_f64();
    assert_eq!(got, total);
    rate
}

/// The same through `capsa serve` from the Rust client, pushed and pulled
/// in the same connection: bytes per second of each.
fn stream_through_serve_rust(
    address: &capsa::serve::Address,
    trust: Option<&capsa::tls::Trust>,
    chunk: usize,
    total: usize,
) -> (f64, f64) {
    local(async move {
        let connection = capsa::serve::connect(address, None, trust).await.unwrap();
        let exec = connection.executor.clone();
        let pushed = pushed_through(&exec, chunk, total).await;
        let p = start_cat(&exec).await;
        let pulled = stream_through(&p, chunk, total).await;
        drop((p, exec));
        connection.close().await;
        (pushed, pulled)
    })
}

/// Answers echo and signals the first call it gets.
struct FirstCall(RefCell<Option<tokio::sync::oneshot::Sender<Instant>>>);

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

/// The arguments that make child-echo call its bootstrap's `echo` as soon
/// as it starts (after its default argv[0], "child-echo").
const FIRST_CALL_ARGS: [&str; 2] = ["bench-echo", "1"];

/// What a spawn starts from.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// `runBytes` with these bytes.
    Bytes(&'a [u8]),
    /// `Program.run` of a program loaded before.
    Program(&'a capsa::schema::program::Client),
}

/// From sending `runBytes(child-echo)` (or `Program.run`) to the child's
/// first RPC call reaching the host (child-echo in `bench-echo` mode calls
/// echo on its bootstrap as soon as it starts).
///
/// Nanoseconds from the spawn request to the child's first call, then
/// from `kill` to the killed child's exit status. The next spawn starts
/// only after that exit, so it does not also pay for this child's
/// teardown (about 60 µs of each measured spawn when it did).
async fn spawn_to_first_call(root: &executor::Client, start: Start<'_>) -> (f64, f64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let probe: executor::Client = capnp_rpc::new_client(FirstCall(RefCell::new(Some(tx))));
    let spawn = capsa_client::Spawn {
        args: &FIRST_CALL_ARGS,
        bootstrap: Some(&probe.client),
        ..Default::default()
    };
    let t = Instant::now();
    // A local call runs as its promise is polled; dropping the promise
    // would cancel it.
    let (p, promise): (_, futures::future::LocalBoxFuture<'static, _>) = match start {
        Start::Bytes(bytes) => {
            let sent = spawn.run_bytes(root, bytes).send();
            let promise = sent.promise;
            (
                sent.pipeline.get_process(),
                Box::pin(async move { promise.await.map(drop) }),
            )
        }
        Start::Program(program) => {
            let sent = spawn.program_run(program).send();
            let promise = sent.promise;
            (
                sent.pipeline.get_process(),
                Box::pin(async move { promise.await.map(drop) }),
            )
        }
    };
    let spawn = tokio::task::spawn_local(promise);
    let arrived = match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(t)) => t,
        _ => {
            let status = p.wait_request().send().promise.await;
            let status = status
                .and_then(|r| capsa::ExitStatus::read_from(r.get()?.get_status()?))
                .map(|s| s.to_string())
                .unwrap_or_else(|e| format!("runBytes failed: {e}"));
            panic!("the child made no call: {status}");
        }
    };
    drop(spawn);
    let ns = (arrived - t).as_nanos() as f64;
    let killed = Instant::now();
    p.kill_request().send().promise.await.unwrap();
    p.wait_request().send().promise.await.unwrap();
    (ns, killed.elapsed().as_nanos() as f64)
}

fn spawn_cold(runs: usize) -> Vec<f64> {
    let bytes = guest("child-echo");
    (0..runs)
        .map(|_| {
            local(async {
                let host = Host::new(HostConfig::default()).unwrap();
                let (ns, _) =
                    spawn_to_first_call(&host.root_executor(), Start::Bytes(&bytes)).await;
                host.shutdown().await;

                ns
            })
        })
        .collect()
}

/// Cached `runBytes` spawns on one host (the bytes in every request,
/// hashed and compared with the cached copy).
fn spawn_cached(runs: usize) -> Vec<f64> {
    let bytes = guest("child-echo");
    local(async {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let start = Start::Bytes(&bytes);
        spawn_to_first_call(&root, start).await;
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(spawn_to_first_call(&root, start).await.0);
        }
        host.shutdown().await;
        v
    })
}

/// Store data of the bare embedding below.
struct BareState {
    ctx: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl wasmtime_wasi::WasiView for BareState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// `Program.run` spawns in capsa and, as their peer, the same child started
/// by a bare wasmtime embedding as its documentation shows one (wasmtime's
/// default engine: no pooling, no epoch checks, no limits; stdio through
/// wasmtime-wasi's async streams over tokio in-memory pipes), its stdio
/// served by a plain capnp-rpc system whose bootstrap is the probe. They
/// alternate in blocks of `per_round`, so a change in the machine's speed
/// hits both alike. Returns (capsa's spawns, capsa's teardowns, the peer's
/// spawns).
fn spawn_program_and_bare(rounds: usize, per_round: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let bytes = guest("child-echo");
    let engine = wasmtime::Engine::default();
    let pre = bare_compile(&engine);
    local(async {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let program = capsa_client::load(&root, &bytes).await.unwrap();
        let start = Start::Program(&program);
        spawn_to_first_call(&root, start).await;
        bare_first_call(&engine, &pre).await;
        let (mut ours, mut teardown, mut bare) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            for _ in 0..per_round {
                let (spawn, torn_down) = spawn_to_first_call(&root, start).await;
                ours.push(spawn);
                teardown.push(torn_down);
            }
            for _ in 0..per_round {
                bare.push(bare_first_call(&engine, &pre).await);
            }
        }
        host.shutdown().await;
        (ours, teardown, bare)
    })
}

/// The cold spawn's peer: compiling child-echo with wasmtime's defaults,
/// then the bare embedding's first call.
fn spawn_cold_in_bare_wasmtime(runs: usize) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let engine = wasmtime::Engine::default();
            let pre = bare_compile(&engine);
            let compiled = t.elapsed().as_nanos() as f64;
            compiled + local(bare_first_call(&engine, &pre))
        })
        .collect()
}

fn bare_compile(engine: &wasmtime::Engine) -> wasmtime_wasi::p2::bindings::CommandPre<BareState> {
    let component = wasmtime::component::Component::new(engine, guest("child-echo")).unwrap();
    let mut linker = wasmtime::component::Linker::<BareState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    wasmtime_wasi::p2::bindings::CommandPre::new(linker.instantiate_pre(&component).unwrap())
        .unwrap()
}

/// Nanoseconds from before the child's pipes are made to its first call.
async fn bare_first_call(
    engine: &wasmtime::Engine,
    pre: &wasmtime_wasi::p2::bindings::CommandPre<BareState>,
) -> f64 {
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    let (tx, rx) = tokio::sync::oneshot::channel();
    let probe: executor::Client = capnp_rpc::new_client(FirstCall(RefCell::new(Some(tx))));
    let t = Instant::now();
    let (stdin_host, stdin_guest) = tokio::io::duplex(64 << 10);
    let (stdout_guest, stdout_host) = tokio::io::duplex(64 << 10);
    let mut wasi = wasmtime_wasi::WasiCtxBuilder::new();
    wasi.arg("child-echo")
        .args(&FIRST_CALL_ARGS)
        .stdin(wasmtime_wasi::cli::AsyncStdinStream::new(stdin_guest))
        .stdout(wasmtime_wasi::cli::AsyncStdoutStream::new(
            64 << 10,
            stdout_guest,
        ));
    let state = BareState {
        ctx: wasi.build(),
        table: Default::default(),
    };
    let network = twoparty::VatNetwork::new(
        stdout_host.compat(),
        stdin_host.compat_write(),
        Side::Server,
        Default::default(),
    );
    let rpc = tokio::task::spawn_local(RpcSystem::new(Box::new(network), Some(probe.client)));
    let (engine, pre) = (engine.clone(), pre.clone());
    let guest = tokio::task::spawn_local(async move {
        let mut store = wasmtime::Store::new(&engine, state);
        let command = pre.instantiate_async(&mut store).await.unwrap();
        let _ = command.wasi_cli_run().call_run(&mut store).await;
    });
    let arrived = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the child in bare wasmtime made no call")
        .unwrap();
    guest.abort();
    rpc.abort();
    let _ = guest.await;
    let _ = rpc.await;
    (arrived - t).as_nanos() as f64
}

/// The whole hello component run to exit, in-process, cached.
fn hello_in_capsa(runs: usize) -> Vec<f64> {
    let bytes = guest("hello");
    local(async {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let mut v = Vec::new();
        for i in 0..=runs {
            let t = Instant::now();
            let mut req = root.run_bytes_request();
            req.get().set_bytes(&bytes);
            req.get().init_options().set_stdio(StdioMode::Data);
            let spawn = req.send();
            let p = spawn.pipeline.get_process();
            let _spawn = tokio::task::spawn_local(spawn.promise);
            let out = p.stdout_request().send().pipeline.get_source();
            loop {
                let resp = out.read_request().send().promise.await.unwrap();
                if resp.get().unwrap().get_eof() {
                    break;
                }
            }
            p.wait_request().send().promise.await.unwrap();
            if i > 0 {
                v.push(t.elapsed().as_nanos() as f64);
            }
        }
        host.shutdown().await;
        v
    })
}

/// `wasmtime run hello.wasm`, the wasmtime CLI as a separate process.
fn hello_in_wasmtime_cli(runs: usize) -> Option<Vec<f64>> {
    let exe = std::env::var_os("CAPSA_PEER_WASMTIME").map(PathBuf::from)?;
    let hello = guests().join("hello.wasm");
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = std::process::Command::new(&exe)
            .arg("run")
            .arg(&hello)
            .output()
            .ok()?;
        assert!(out.status.success());
        v.push(t.elapsed().as_nanos() as f64);
    }
    Some(v)
}

/// `wasmtime run hello.wasm cat` (the wasmtime CLI, a separate process)
/// fed `total` bytes through a pipe in `chunk`-sized writes while its
/// stdout is read from another: bytes per second, the process's start
/// (a few milliseconds) included.
fn throughput_wasmtime_cli(chunk: usize, total: usize) -> Option<f64> {
    use std::io::{Read, Write};
    let exe = std::env::var_os("CAPSA_PEER_WASMTIME").map(PathBuf::from)?;
    let t = Instant::now();
    let mut child = std::process::Command::new(&exe)
        .arg("run")
        .arg(guests().join("hello.wasm"))
        .arg("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let mut stdout = child.stdout.take()?;
    let writer = std::thread::spawn(move || {
        let data = vec![7u8; chunk];
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            stdin.write_all(&data[..n]).expect("write to wasmtime");
            sent += n;
        }
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("read from wasmtime: {e}"),
        }
    }
    writer.join().ok()?;
    assert!(child.wait().ok()?.success());
    assert_eq!(got, total, "wasmtime's cat lost bytes");
    Some(total as f64 / t.elapsed().as_secs_f64())
}

/// `capsa run pid0.wasm` (the demo) twice with a fresh compile cache
/// folder, `rounds` times: the medians of the first and second runs.
fn demo_cold_and_warm(rounds: usize) -> (f64, f64) {
    let capsa = env!("CARGO_BIN_EXE_capsa");
    let pid0 = guests().join("pid0.wasm");
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let cache =
            std::env::temp_dir().join(format!("capsa-bench-cache-{}-{round}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        for times in [&mut first, &mut second] {
            let t = Instant::now();
            let out = std::process::Command::new(capsa)
                .arg("run")
                .arg("--cache-dir")
                .arg(&cache)
                .arg(&pid0)
                .output()
                .expect("capsa run");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            times.push(t.elapsed().as_nanos() as f64);
        }
        let _ = std::fs::remove_dir_all(&cache);
    }
    (median(first), median(second))
}

/// Context switches of this whole process over `window`, read from
/// `/proc/self/task/*/status` (voluntary and not).
fn context_switches() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Wake-ups per second of a host with one live child that waits for calls.
fn idle_wakeups() -> f64 {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let mut req = root.run_bytes_request();
        req.get().set_bytes(&guest("child-echo"));
        let child = req
            .send()
            .promise
            .await
            .unwrap()
            .get()
            .unwrap()
            .get_process()
            .unwrap();
        let exec: executor::Client = capnp::capability::FromClientHook::new(
            child.bootstrap_request().send().pipeline.get_cap().as_cap(),
        );
        let mut e = exec.echo_request();
        e.get().set_message("alive");
        e.send().promise.await.unwrap();
        // Past the ticker's idle stretch.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let window = Duration::from_secs(2);
        let before = context_switches();
        // The measuring thread sleeps in one go: its own switch is one.
        std::thread::sleep(window);
        let per_second = (context_switches() - before) as f64 / window.as_secs_f64();
        drop(child);
        host.shutdown().await;
        per_second
    })
}

/// The peer: a thread that advances an epoch every millisecond for
/// `window`, as the host's ticker did whether or not guests ran; its
/// process's wake-ups per second.
fn always_ticking_wakeups() -> f64 {
    let engine = wasmtime::Engine::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let ticker = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
            engine.increment_epoch();
        }
    });
    // Counted while the thread lives: a joined thread's task is gone.
    std::thread::sleep(Duration::from_millis(100));
    let window = Duration::from_secs(2);
    let before = context_switches();
    std::thread::sleep(window);
    let per_second = (context_switches() - before) as f64 / window.as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.join().unwrap();
    per_second
}

/// Bytes of page tables this process holds (`VmPTE`): what the host pays
/// for mapping guests' memory reservations, beyond their resident pages.
fn page_table_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmPTE:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// This process's mappings: start address, size, resident bytes, name.
fn mappings() -> Vec<(u64, u64, u64, String)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out: Vec<(u64, u64, u64, String)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let name = words.nth(4).unwrap_or("[anon]").to_string();
                out.push((start, end - start, 0, name));
                continue;
            }
        }
        if first == "Rss:" {
            if let (Some(kib), Some(last)) = (words.next(), out.last_mut()) {
                last.2 = kib.parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    out
}

/// Where the memory of `n` new children went: resident bytes per child by
/// size of the mapping holding them (a pool's slots live in one mapping,
/// `malloc`'s arenas in others), and how many mappings were added.
fn print_mappings_grown(
    before: &[(u64, u64, u64, String)],
    after: &[(u64, u64, u64, String)],
    n: usize,
) {
    let mut by_kind: std::collections::BTreeMap<String, (u64, i64)> = Default::default();
    let old: std::collections::HashMap<u64, u64> = before.iter().map(|m| (m.0, m.2)).collect();
    for (start, size, rss, name) in after {
        let grown = *rss as i64 - *old.get(start).unwrap_or(&0) as i64;
        let kind = if name == "[anon]" && *size >= 1 << 30 {
            format!("anonymous, {} GiB", size >> 30)
        } else if name == "[anon]" {
            format!("anonymous, {} KiB", size >> 10)
        } else {
            name.clone()
        };
        let entry = by_kind.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += grown;
    }
    eprintln!(
        "  mappings: {} before, {} after ({:+})",
        before.len(),
        after.len(),
        after.len() as i64 - before.len() as i64
    );
    let mut rows: Vec<_> = by_kind.into_iter().filter(|(_, (_, g))| *g != 0).collect();
    rows.sort_by_key(|(_, (_, g))| -g);
    for (kind, (count, grown)) in rows.iter().take(12) {
        eprintln!(
            "  {:>8.1} KiB per child in {count} mapping(s): {kind}",
            *grown as f64 / 1024.0 / n as f64
        );
    }
}

/// Host memory per idle live child (resident pages and page tables), with
/// `n` children of child-echo started with `args`, each having answered
/// one echo.
fn memory_per_child(n: usize, args: &'static [&'static str]) -> (f64, usize) {
    let config = HostConfig {
        max_children: n as u32 + 1,
        max_cells: n as u32 + 16,
        ..HostConfig::default()
    };
    local(async move {
        let host = Host::new(config).unwrap();
        let root = host.root_executor();
        let bytes = guest("child-echo");
        // Warm the compile cache and the allocator before the baseline.
        let warm = spawn_to_first_call(&root, Start::Bytes(&bytes)).await;
        std::hint::black_box(warm);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = rss_bytes() + page_table_bytes();
        let mappings_before = mappings();
        let mut procs = Vec::with_capacity(n);
        let t = Instant::now();
        for i in 0..n {
            if i % 1000 == 0 && i > 0 {
                eprintln!(
                    "  {i} children alive after {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
            let mut req = root.run_bytes_request();
            req.get().set_bytes(&bytes);
            let mut list = req.get().init_args(args.len() as u32);
            for (i, arg) in args.iter().enumerate() {
                list.set(i as u32, *arg);
            }
            let spawn = req.send();
            let p = spawn.pipeline.get_process();
            let _spawn = tokio::task::spawn_local(spawn.promise);
            let exec: executor::Client = capnp::capability::FromClientHook::new(
                p.bootstrap_request().send().pipeline.get_cap().as_cap(),
            );
            let mut e = exec.echo_request();
            e.get().set_message("alive");
            e.send().promise.await.unwrap();
            procs.push(p);
        }
        let live = host.live_cells();
        let after = rss_bytes() + page_table_bytes();
        if let Some(path) = std::env::var_os("CAPSA_BENCH_SMAPS_DUMP") {
            std::fs::copy("/proc/self/smaps", path).unwrap();
        }
        if std::env::var_os("CAPSA_BENCH_SMAPS").is_some() {
            print_mappings_grown(&mappings_before, &mappings(), n);
        }
        drop(procs);
        host.shutdown().await;
        ((after.saturating_sub(before)) as f64 / n as f64, live)
    })
}

/// [`memory_per_child`] run by this benchmark in a new process: child-echo
/// as `relay` (its echo one call to the host) or as it is (eight at once).
/// `CAPSA_BENCH_CHILDREN` children; 9,000 by default, which fit the
/// kernel's default limit on memory mappings (`vm.max_map_count` 65,530,
/// six per guest slot); 100,000 need it raised first (`sysctl -w
/// vm.max_map_count=700000`).
fn memory_in_own_process(variant: &str) -> (f64, usize) {
    let out = std::process::Command::new(std::env::current_exe().expect("this benchmark"))
        .env("CAPSA_BENCH_MEMORY_ONE", variant)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the benchmark runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("memory-one "))
        .unwrap_or_else(|| panic!("no measurement from {variant}: {text}"));
    let mut words = line.split_whitespace();
    let per = words.next().and_then(|w| w.parse().ok()).expect("bytes");
    let live = words.next().and_then(|w| w.parse().ok()).expect("count");
    (per, live)
}

/// A `capsa serve` on a Unix socket in a thread of this process; stopped
/// when the returned sender is dropped.
fn serve_in_thread(
    dir: &std::path::Path,
) -> (
    capsa::serve::Address,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let address = capsa::serve::Address::Unix(dir.join("capsa.sock"));
    serve_config_in_thread(capsa::serve::ServeConfig::new(address))
}

/// A `capsa serve` configured by `config` in a thread of this process.
fn serve_config_in_thread(
    config: capsa::serve::ServeConfig,
) -> (
    capsa::serve::Address,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
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

/// What TLS costs a remote client: echo and the stream through a `tls:`
/// listener against a plain `tcp:` one, both on loopback in this process,
/// alternating.
fn tls_rows(r: &mut Report) {
    use capsa::serve::{Address, ServeConfig};
    let dir = std::env::temp_dir().join(format!("capsa-bench-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tls = capsa::tls::ServerTls::load_or_generate(&dir, "127.0.0.1").unwrap();
    let trust = capsa::tls::Trust::Fingerprint(tls.fingerprint());
    let (tcp, stop_tcp, tcp_thread) =
        serve_config_in_thread(ServeConfig::new(Address::Tcp("127.0.0.1:0".into())));
    let (tls_address, stop_tls, tls_thread) = serve_config_in_thread(ServeConfig {
        tls: Some(tls),
        ..ServeConfig::new(Address::Tls("127.0.0.1:0".into()))
    });
    let (mut echo_tls, mut echo_tcp) = (Vec::new(), Vec::new());
    let (mut stream_tls, mut stream_tcp) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        echo_tcp.extend(echo_through_serve_rust(&tcp, None));
        echo_tls.extend(echo_through_serve_rust(&tls_address, Some(&trust)));
        stream_tcp.push(stream_through_serve_rust(&tcp, None, 1 << 20, 256 << 20));
        stream_tls.push(stream_through_serve_rust(
            &tls_address,
            Some(&trust),
            1 << 20,
            256 << 20,
        ));
    }
    let (echo_tls, echo_tcp) = (median(echo_tls), median(echo_tcp));
    r.row(
        "echo round trip Rust client <-> capsa serve over TLS (loopback)",
        us(echo_tls),
        format!(
            "plain TCP in the same run: {} (TLS/TCP {:.2})",
            us(echo_tcp),
            echo_tls / echo_tcp
        ),
    );
    for (which, pick) in [("pushed", 0), ("pulled", 1)] {
        let get = |runs: &[(f64, f64)]| {
            median(
                runs.iter()
                    .map(|r| if pick == 0 { r.0 } else { r.1 })
                    .collect(),
            )
        };
        let (tls_rate, tcp_rate) = (get(&stream_tls), get(&stream_tcp));
        r.row(
            &format!(
                "byte stream Rust client -> capsa serve over TLS -> guest cat -> back, {which}"
            ),
            format!("{:.2} GB/s", tls_rate / 1e9),
            format!(
                "plain TCP in the same run: {:.2} GB/s (TCP/TLS time {:.2})",
                tcp_rate / 1e9,
                tcp_rate / tls_rate
            ),
        );
    }
    drop((stop_tcp, stop_tls));
    tcp_thread.join().unwrap();
    tls_thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Echo round trips from a Rust client through `capsa serve`'s socket.
fn echo_through_serve_rust(
    address: &capsa::serve::Address,
    trust: Option<&capsa::tls::Trust>,
) -> Vec<f64> {
    local(async move {
        let connection = capsa::serve::connect(address, None, trust).await.unwrap();
        let exec = connection.executor.clone();
        let mut v = Vec::with_capacity(ECHOES);
        for _ in 0..ECHOES {
            let t = Instant::now();
            let mut req = exec.echo_request();
            req.get().set_message("x");
            req.send().promise.await.unwrap();
            v.push(t.elapsed().as_nanos() as f64);
        }
        drop(exec);
        connection.close().await;
        v
    })
}

/// Runs the Python example (pycapnp) against `address` with `args`, when
/// `CAPSA_PYTHON` names a Python that has it, and returns the numbers it
/// reports after each of `prefixes` (the first word after it).
fn python_example(
    address: &capsa::serve::Address,
    args: &[&str],
    prefixes: &[&str],
) -> Result<Vec<f64>, String> {
    let python = std::env::var_os("CAPSA_PYTHON")
        .ok_or("CAPSA_PYTHON unset (`cargo xtask bench` sets it)")?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/capsa_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--connect")
        .arg(address.to_string())
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    prefixes
        .iter()
        .map(|prefix| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
                .ok_or_else(|| format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        })
        .collect()
}

/// The echo round trip from the Python example: the median it reports, in
/// nanoseconds.
fn echo_through_serve_python(address: &capsa::serve::Address) -> Result<f64, String> {
    let found = python_example(
        address,
        &["--bench-echo", "5000"],
        &["python echo round trip: median "],
    )?;
    Ok(found[0] * 1000.0)
}

/// 256 MiB through `hello cat` from the Python example, its output pushed
/// and pulled: the medians it reports, in MB/s.
fn stream_through_serve_python(address: &capsa::serve::Address) -> Result<(f64, f64), String> {
    let hello = guests().join("hello.wasm");
    let found = python_example(
        address,
        &[
            "--wasm",
            &hello.display().to_string(),
            "--bench-stream",
            "256",
        ],
        &[
            "python stream pushed: median ",
            "python stream pulled: median ",
        ],
    )?;
    Ok((found[0], found[1]))
}

/// Seconds to compile `bytes` (a component) with `config`, median of `runs`.
fn compile_seconds(config: &wasmtime::Config, bytes: &[u8], runs: usize) -> f64 {
    let engine = wasmtime::Engine::new(config).unwrap();
    let samples = (0..runs)
        .map(|_| {
            let t = Instant::now();
            // A core module (version 1) or a component.
            if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
                wasmtime::Module::new(&engine, bytes).unwrap();
            } else {
                wasmtime::component::Component::new(&engine, bytes).unwrap();
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(samples)
}

/// The compile-time cost of each setting capsa's engine differs in from
/// wasmtime's defaults, on the largest guest and on a large real-world
/// program.
fn compile_rows(r: &mut Report) {
    let limits = capsa::Limits::default();
    let capsa_config = capsa::engine::engine_config(limits.memory_bytes, 1024);
    let mut defaults = wasmtime::Config::new();
    defaults.wasm_component_model(true);
    let mut no_epoch = capsa_config.clone();
    no_epoch.epoch_interruption(false);
    // What a host of more than 5,461 cells gets (see `wide_reservations`).
    let mut narrow = capsa_config.clone();
    narrow
        .memory_reservation(limits.memory_bytes)
        .memory_guard_size(64 << 10);
    let mut with_epoch = defaults.clone();
    with_epoch.epoch_interruption(true);
    let compare = Compare {
        defaults: &defaults,
        capsa: &capsa_config,
    };
    // A large real-world program (`cargo xtask bench` fetches
    // StarlingMonkey, the SpiderMonkey-based JS engine of
    // componentize-js, 10 MiB): where the difference is, the epoch checks
    // kill, deadlines and CPU budgets need or not.
    match std::env::var_os("CAPSA_BENCH_LARGE_WASM") {
        Some(path) => {
            let large = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let name = std::path::Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            compare.rows(
                r,
                &name,
                &large,
                3,
                &[("capsa's engine without epoch checks", &no_epoch)],
            );
        }
        None => r.row(
            "compile a large real-world program",
            "not run".to_string(),
            "CAPSA_BENCH_LARGE_WASM unset (`cargo xtask bench` sets it)".to_string(),
        ),
    }
    compare.rows(
        r,
        "pid0.wasm",
        &guest("pid0"),
        5,
        &[
            ("capsa's engine without epoch checks", &no_epoch),
            (
                "capsa's engine, 512 MiB reservation + 64 KiB guard",
                &narrow,
            ),
            ("wasmtime defaults + epoch checks", &with_epoch),
        ],
    );
}

/// Compile times of capsa's engine against wasmtime's defaults (as
/// `wasmtime compile`) on the same bytes.
struct Compare<'a> {
    defaults: &'a wasmtime::Config,
    capsa: &'a wasmtime::Config,
}

impl Compare<'_> {
    /// The headline row for `bytes`, then one row per variant, each
    /// against the defaults.
    fn rows(
        &self,
        r: &mut Report,
        name: &str,
        bytes: &[u8],
        runs: usize,
        variants: &[(&str, &wasmtime::Config)],
    ) {
        let peer = compile_seconds(self.defaults, bytes, runs);
        let ours = compile_seconds(self.capsa, bytes, runs);
        r.row(
            &format!("compile {name} ({} KiB), capsa's engine", bytes.len() >> 10),
            format!("{:.0} ms", ours * 1e3),
            format!(
                "wasmtime defaults (as `wasmtime compile`): {:.0} ms (ratio {:.2}; target <= 1.2)",
                peer * 1e3,
                ours / peer
            ),
        );
        for (what, config) in variants {
            let t = compile_seconds(config, bytes, runs);
            r.row(
                &format!("compile {name}, {what}"),
                format!("{:.0} ms", t * 1e3),
                format!("(vs wasmtime defaults: {:.2})", t / peer),
            );
        }
    }
}

/// `hello` with a custom section making it `mib` MiB: a large program
/// (custom sections are valid anywhere in a component) that still starts
/// as fast as `hello`, so what a repeat run costs is the bytes.
fn large_hello(mib: usize) -> Vec<u8> {
    let mut bytes = guest("hello");
    let name = b"capsa-bench-padding";
    let body = (mib << 20).saturating_sub(bytes.len());
    let mut payload = Vec::with_capacity(body + 32);
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name);
    payload.resize(payload.len() + body, 0xa5);
    bytes.push(0); // custom section id
    leb128(&mut bytes, payload.len() as u64);
    bytes.extend_from_slice(&payload);
    bytes
}

fn leb128(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Repeat runs of `bytes` to exit from a Rust client of `capsa serve`:
/// `runBytes` sending the bytes each time, and `program(hash).run().wait()`
/// pipelined (one round trip, no bytes). Nanoseconds, medians.
fn repeat_runs_through_serve(address: &capsa::serve::Address, bytes: &[u8]) -> (f64, f64) {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    local(async move {
        let connection = capsa::serve::connect(address, None, None).await.unwrap();
        let exec = connection.executor.clone();
        let run_bytes = || {
            let mut req = exec.run_bytes_request();
            let mut p = req.get();
            p.set_bytes(bytes);
            p.reborrow().init_args(1).set(0, "x");
            p.init_options().set_stdio(StdioMode::Data);
            let process = req.send().pipeline.get_process();
            process.wait_request().send().promise
        };
        let by_hash = || {
            let mut req = exec.program_request();
            req.get().set_hash(&hash);
            let program = req.send().pipeline.get_program();
            let mut req = program.run_request();
            let mut p = req.get();
            p.reborrow().init_args(1).set(0, "x");
            p.init_options().set_stdio(StdioMode::Data);
            let process = req.send().pipeline.get_process();
            process.wait_request().send().promise
        };
        // The first run compiles and the load puts it in the table.
        run_bytes().await.unwrap();
        let mut req = exec.load_request();
        req.get().set_bytes(bytes);
        req.send().promise.await.unwrap();
        let (mut sent, mut named) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            let t = Instant::now();
            run_bytes().await.unwrap();
            sent.push(t.elapsed().as_nanos() as f64);
            let t = Instant::now();
            by_hash().await.unwrap();
            named.push(t.elapsed().as_nanos() as f64);
        }
        drop(exec);
        connection.close().await;
        (median(sent), median(named))
    })
}

/// A host that grants `dir` at "/data" to its root Executor.
fn granting(dir: &std::path::Path) -> HostConfig {
    HostConfig {
        directories: vec![capsa::DirGrant {
            path: "/data".into(),
            host_path: dir.to_path_buf(),
            read_only: false,
        }],
        ..HostConfig::default()
    }
}

/// The first directory `host`'s root Executor lists.
async fn first_grant(host: &Host) -> capsa::schema::directory::Client {
    let grants = host
        .root_executor()
        .directories_request()
        .send()
        .promise
        .await
        .unwrap();
    let grants = grants.get().unwrap().get_grants().unwrap();
    grants.get(0).get_directory().unwrap()
}

/// Runs `files ARGS` `runs` times (after one warm-up) with `dir` granted
/// at "/data": a Directory of the same host (`foreign` false: a preopen of
/// the same descriptor) or of a second host in this thread (copied in and
/// written back). The wall time of each run, from `runBytes` to the exit
/// status.
fn files_in_capsa(dir: &std::path::Path, args: &[&str], runs: usize, foreign: bool) -> Vec<f64> {
    let bytes = guest("files");
    local(async {
        let host = Host::new(granting(dir)).unwrap();
        let root = host.root_executor();
        let other = Host::new(granting(dir)).unwrap();
        let data = first_grant(if foreign { &other } else { &host }).await;
        let mut v = Vec::new();
        for i in 0..=runs {
            let t = Instant::now();
            let mut req = root.run_bytes_request();
            {
                let mut p = req.get();
                p.set_bytes(&bytes);
                let mut list = p.reborrow().init_args(args.len() as u32);
                for (i, a) in args.iter().enumerate() {
                    list.set(i as u32, *a);
                }
                let mut options = p.init_options();
                options.set_stdio(StdioMode::Data);
                let mut grant = options.init_directories(1).get(0);
                grant.set_path("/data");
                grant.set_directory(data.clone());
            }
            let p = req.send().pipeline.get_process();
            let out = p.stdout_request().send().pipeline.get_source();
            loop {
                let resp = out.read_request().send().promise.await.unwrap();
                if resp.get().unwrap().get_eof() {
                    break;
                }
            }
            let status = p.wait_request().send().promise.await.unwrap();
            let status = capsa::ExitStatus::read_from(status.get().unwrap().get_status().unwrap());
            assert_eq!(
                status.unwrap(),
                capsa::ExitStatus::Exited(0),
                "files {args:?}"
            );
            if i > 0 {
                v.push(t.elapsed().as_nanos() as f64);
            }
        }
        host.shutdown().await;
        other.shutdown().await;
        v
    })
}

/// `wasmtime run --dir DIR::/data files.wasm ARGS`, `runs` times.
fn files_in_wasmtime_cli(dir: &std::path::Path, args: &[&str], runs: usize) -> Option<Vec<f64>> {
    let exe = std::env::var_os("CAPSA_PEER_WASMTIME").map(PathBuf::from)?;
    let files = guests().join("files.wasm");
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = std::process::Command::new(&exe)
            .arg("run")
            .arg("--dir")
            .arg(format!("{}::/data", dir.display()))
            .arg(&files)
            .args(args)
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        v.push(t.elapsed().as_nanos() as f64);
    }
    Some(v)
}

/// A file workload through a local grant against the same program under
/// `wasmtime run --dir`. Each side's time for `idle` (the same program
/// doing next to nothing) is taken off its time for `work`, so that the
/// row compares the file work, not process start and compilation.
fn files_row(r: &mut Report, what: &str, dir: &std::path::Path, work: &[&str], idle: &[&str]) {
    const RUNS: usize = 7;
    let ours = median(files_in_capsa(dir, work, RUNS, false))
        - median(files_in_capsa(dir, idle, RUNS, false));
    let peer = files_in_wasmtime_cli(dir, work, RUNS)
        .zip(files_in_wasmtime_cli(dir, idle, RUNS))
        .map(|(w, i)| median(w) - median(i));
    let peer = match peer {
        Some(p) => format!(
            "`wasmtime run --dir`: {:.2} ms (capsa/peer {:.2})",
            p / 1e6,
            ours / p
        ),
        None => "`wasmtime run`: not installed (CAPSA_PEER_WASMTIME unset)".into(),
    };
    r.row(what, format!("{:.2} ms", ours / 1e6), peer);
}

/// Reads a 64 MiB file through the Directory capability itself, in 1 MiB
/// reads; bytes per second.
fn read_through_capability(dir: &std::path::Path, file: &str) -> f64 {
    local(async {
        let host = Host::new(granting(dir)).unwrap();
        let data = first_grant(&host).await;
        let t = Instant::now();
        let mut req = data.read_request();
        req.get().set_path(file);
        let source = req.send().pipeline.get_source();
        let mut total = 0usize;
        loop {
            let mut read = source.read_request();
            read.get().set_max_bytes(1 << 20);
            let resp = read.send().promise.await.unwrap();
            let chunk = resp.get().unwrap();
            total += chunk.get_data().unwrap().len();
            if chunk.get_eof() {
                break;
            }
        }
        let rate = total as f64 / t.elapsed().as_secs_f64();
        host.shutdown().await;
        rate
    })
}

fn main() {
    if let Ok(filter) = std::env::var("CAPSA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    // One memory measurement in a process of its own (see `memory`).
    if let Ok(variant) = std::env::var("CAPSA_BENCH_MEMORY_ONE") {
        let n: usize = std::env::var("CAPSA_BENCH_CHILDREN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(9_000);
        let args: &'static [&'static str] = if variant == "relay" { &["relay"] } else { &[] };
        let (per, live) = memory_per_child(n, args);
        println!("memory-one {per} {live}");
        return;
    }
    // `cargo bench` passes `--bench`; anything else narrows the run.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let mut r = Report { rows: Vec::new() };
    println!(
        "capsa bench: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    println!("{:<58} {:>18}   peer (same run)", "what (median)", "capsa");

    let mut in_process_echo = None;
    if want("echo") {
        let pid0 = median(guest_samples(
            &["bench-echo", &ECHOES.to_string()],
            "pid0-echo",
        ));
        let peer = median(echo_peer());
        r.row(
            "echo round trip PID0 <-> host",
            us(pid0),
            format!(
                "capnp-rpc over a Unix socket, two threads: {} (capsa/peer {:.2})",
                us(peer),
                pid0 / peer
            ),
        );
        let nested = median(guest_samples(
            &["bench-nested", &ECHOES.to_string()],
            "nested-echo",
        ));
        r.row(
            "echo round trip grandchild <-> child <-> host (two hops)",
            us(nested),
            format!("(vs PID0: {:.2})", nested / pid0),
        );
        let floor = median(stdio_ping_pong(ECHOES));
        r.row(
            "stdio round trip host <-> guest cat, 1 byte, no RPC in the guest",
            us(floor),
            format!(
                "the part of PID0's echo that is not Cap'n Proto: {:.0}%",
                100.0 * floor / pid0
            ),
        );
        in_process_echo = Some(pid0);
    }
    if want("serve") {
        let dir = std::env::temp_dir().join(format!("capsa-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (address, stop, thread) = serve_in_thread(&dir);
        let beside = |ns: f64| match in_process_echo {
            Some(p) => format!("in-process PID0 <-> host: {} (ratio {:.2})", us(p), ns / p),
            None => String::new(),
        };
        let rust = median(echo_through_serve_rust(&address, None));
        r.row(
            "echo round trip Rust client <-> capsa serve (Unix)",
            us(rust),
            beside(rust),
        );
        match echo_through_serve_python(&address) {
            Ok(py) => r.row(
                "echo round trip Python client <-> capsa serve (Unix)",
                us(py),
                beside(py),
            ),
            Err(e) => r.row(
                "echo round trip Python client <-> capsa serve (Unix)",
                "skipped".into(),
                e.lines().last().unwrap_or_default().to_string(),
            ),
        }
        let runs: Vec<(f64, f64)> = (0..3)
            .map(|_| stream_through_serve_rust(&address, None, 1 << 20, 256 << 20))
            .collect();
        let pushed = median(runs.iter().map(|r| r.0).collect());
        let pulled = median(runs.iter().map(|r| r.1).collect());
        r.row(
            "byte stream Rust client -> capsa serve -> guest cat -> back",
            format!("{:.2} GB/s pushed", pushed / 1e9),
            format!(
                "the same pulled: {:.2} GB/s (ratio {:.2})",
                pulled / 1e9,
                pushed / pulled
            ),
        );
        match stream_through_serve_python(&address) {
            Ok((pushed, pulled)) => r.row(
                "byte stream Python client -> capsa serve -> guest cat -> back",
                format!("{pushed:.0} MB/s pushed"),
                format!(
                    "the same pulled: {pulled:.0} MB/s (ratio {:.2})",
                    pushed / pulled
                ),
            ),
            Err(e) => r.row(
                "byte stream Python client -> capsa serve -> guest cat -> back",
                "skipped".into(),
                e.lines().last().unwrap_or_default().to_string(),
            ),
        }
        drop(stop);
        thread.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
    if want("tls") {
        tls_rows(&mut r);
    }
    if want("compile") {
        compile_rows(&mut r);
    }
    if want("program") {
        let dir = std::env::temp_dir().join(format!("capsa-bench-prog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (address, stop, thread) = serve_in_thread(&dir);
        for mib in [2, 20] {
            let (sent, named) = repeat_runs_through_serve(&address, &large_hello(mib));
            r.row(
                &format!("repeat run of a {mib} MiB program via capsa serve, by hash"),
                format!("{:.2} ms", named / 1e6),
                format!(
                    "runBytes sending the bytes: {:.2} ms (by hash {:.1}x faster)",
                    sent / 1e6,
                    sent / named
                ),
            );
        }
        drop(stop);
        thread.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
    if want("spawn") {
        // Alternating, as the cached rows below.
        let (mut cold, mut cold_peer) = (Vec::new(), Vec::new());
        for _ in 0..6 {
            cold.extend(spawn_cold(1));
            cold_peer.extend(spawn_cold_in_bare_wasmtime(1));
        }
        let (cold, cold_peer) = (median(cold), median(cold_peer));
        let cached = median(spawn_cached(500));
        r.row(
            "runBytes -> child's first RPC call, cold (compile)",
            us(cold),
            format!(
                "bare wasmtime (below), compiling with its defaults first: {} (capsa/peer {:.2})",
                us(cold_peer),
                cold / cold_peer
            ),
        );
        let (program, teardown, bare) = spawn_program_and_bare(10, 100);
        let (program, bare) = (median(program), median(bare));
        r.row(
            "runBytes -> child's first RPC call, cached",
            us(cached),
            format!(
                "Program.run (no bytes sent): {} (ratio {:.2})",
                us(program),
                cached / program
            ),
        );
        r.row(
            "Program.run -> child's first RPC call (loaded once)",
            us(program),
            format!(
                "the same child in a bare wasmtime embedding (default engine, tokio pipes, plain capnp-rpc): {} (capsa/peer {:.2}); target <= 100 µs",
                us(bare),
                program / bare
            ),
        );
        r.row(
            "kill -> the killed child's exit status (its teardown)",
            us(median(teardown)),
            "measured apart: each spawn above starts after the previous child's exit".into(),
        );
        let ours = median(hello_in_capsa(50));
        let peer = match hello_in_wasmtime_cli(20) {
            Some(v) => {
                let p = median(v);
                format!(
                    "`wasmtime run` (wasmtime-cli 48): {} (capsa/peer {:.3})",
                    us(p),
                    ours / p
                )
            }
            None => "`wasmtime run`: not installed (CAPSA_PEER_WASMTIME unset)".into(),
        };
        r.row("hello component run to exit, cached", us(ours), peer);
    }
    if want("throughput") {
        let total = 512 << 20;
        for chunk in [64 << 10, 1 << 20] {
            let ours = median((0..3).map(|_| throughput_capsa(chunk, total)).collect());
            let peer = median((0..3).map(|_| throughput_peer(chunk, total)).collect());
            r.row(
                &format!(
                    "byte stream host -> guest -> host, {} KiB writes",
                    chunk >> 10
                ),
                format!("{:.2} GB/s", ours / 1e9),
                format!(
                    "loopback Process over a Unix socket, no guest: {:.2} GB/s (ratio {:.2})",
                    peer / 1e9,
                    ours / peer
                ),
            );
            let pushed = median(
                (0..3)
                    .map(|_| throughput_capsa_pushed(chunk, total))
                    .collect(),
            );
            r.row(
                &format!(
                    "byte stream, guest stdout pushed, {} KiB writes",
                    chunk >> 10
                ),
                format!("{:.2} GB/s", pushed / 1e9),
                format!(
                    "the same pulled: {:.2} GB/s (ratio {:.2})",
                    ours / 1e9,
                    pushed / ours
                ),
            );
            let cli: Vec<f64> = (0..3)
                .filter_map(|_| throughput_wasmtime_cli(chunk, total))
                .collect();
            r.row(
                &format!(
                    "byte stream, `wasmtime run hello cat` over pipes, {} KiB writes",
                    chunk >> 10
                ),
                if cli.is_empty() {
                    "skipped".to_string()
                } else {
                    format!("{:.2} GB/s", median(cli.clone()) / 1e9)
                },
                if cli.is_empty() {
                    "CAPSA_PEER_WASMTIME is not set".to_string()
                } else {
                    format!(
                        "capsa pulled / wasmtime {:.2}, pushed / wasmtime {:.2}",
                        ours / median(cli.clone()),
                        pushed / median(cli)
                    )
                },
            );
        }
    }
    if want("files") {
        let dir = std::env::temp_dir().join(format!("capsa-bench-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        files_row(
            &mut r,
            "WASM child writes 64 MiB to a granted directory",
            &dir,
            &["fill", "/data/big", "64"],
            &["fill", "/data/empty", "0"],
        );
        files_row(
            &mut r,
            "WASM child reads 64 MiB from a granted directory",
            &dir,
            &["sum", "/data/big"],
            &["sum", "/data/empty"],
        );
        std::fs::create_dir_all(dir.join("many")).unwrap();
        files_in_capsa(&dir, &["touch-many", "/data/many", "10000"], 0, false);
        files_row(
            &mut r,
            "WASM child stats 10,000 small files in a granted directory",
            &dir,
            &["stat-many", "/data/many", "10000"],
            &["stat-many", "/data/many", "0"],
        );
        // The same child with the directory from another host: copied in
        // (the 64 MiB file alone) and checked for changes at its end.
        let alone = dir.join("alone");
        std::fs::create_dir_all(&alone).unwrap();
        std::fs::rename(dir.join("big"), alone.join("big")).unwrap();
        let foreign = median(files_in_capsa(&alone, &["sum", "/data/big"], 3, true));
        let local_run = median(files_in_capsa(&alone, &["sum", "/data/big"], 3, false));
        r.row(
            "WASM child reads 64 MiB, directory from another host",
            format!("{:.1} ms", foreign / 1e6),
            format!(
                "same run with a local grant: {:.1} ms (copy in and back: {:.1}x)",
                local_run / 1e6,
                foreign / local_run
            ),
        );
        let rate = median(
            (0..3)
                .map(|_| read_through_capability(&alone, "big"))
                .collect(),
        );
        r.row(
            "client reads 64 MiB through Directory.read (1 MiB reads)",
            format!("{:.2} GB/s", rate / 1e9),
            String::new(),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    if want("startup") {
        let (first, second) = demo_cold_and_warm(3);
        r.row(
            "second `capsa run` of the demo PID0 (disk compile cache)",
            format!("{:.0} ms", second / 1e6),
            format!(
                "first run, empty cache: {:.0} ms ({:.1}x faster; target >= 20x)",
                first / 1e6,
                first / second
            ),
        );
    }
    if want("idle") {
        r.row(
            "idle host wake-ups (one live child waiting for calls)",
            format!("{:.1} /s", idle_wakeups()),
            format!(
                "a thread ticking every 1 ms, as before: {:.0} /s; target: none while no guest runs",
                always_ticking_wakeups()
            ),
        );
    }
    if want("memory") {
        // `relay`: the child's echo is one call to the host; by default
        // it makes eight at once, and the guest keeps the heap that took
        // (linear memory never shrinks).
        // Each in a fresh process: memory a first run freed stays in
        // `malloc`'s heap and would hide the second run's.
        let (per, live) = memory_in_own_process("relay");
        let (fanned, _) = memory_in_own_process("fan-out");
        r.row(
            &format!(
                "host memory per idle live child, RSS + page tables ({live} live, one echo relayed)"
            ),
            format!("{:.0} KiB", per / 1024.0),
            format!(
                "after an echo of eight concurrent host calls: {:.0} KiB; target <= 200 KiB at 100,000",
                fanned / 1024.0
            ),
        );
    }
    let _ = r.rows;
}
