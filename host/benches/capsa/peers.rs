//! The peers: the same work done without capsa, measured in the same run.
//! capnp-rpc between two threads over a Unix socket, a bare wasmtime
//! embedding as its documentation shows one, the wasmtime CLI as a
//! separate process, and a thread that ticks an epoch.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa::schema::{executor, process};
use futures::AsyncReadExt as _;

use crate::clients::{echo_round_trips, stream_through};
use crate::servers::{EchoOnly, FirstCall, Loopback, FIRST_CALL_ARGS};
use crate::{guest, guests, local, procfs};

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

/// Echo round trips to an Executor in another thread.
pub fn echo_peer() -> Vec<f64> {
    let server: executor::Client = capnp_rpc::new_client(EchoOnly);
    unix_socket_peer(server.client, |exec: executor::Client| async move {
        echo_round_trips(&exec).await
    })
}

/// The same shape as capsa's stream path without a guest: a Process in
/// another thread, over a Unix socket, whose stdin comes back on its
/// stdout through a bounded queue of the size of capsa's pipes. The
/// client writes through `stdin()`'s ByteSink and reads `stdout()`'s
/// ByteSource at once, as in `throughput::throughput_capsa`.
pub fn throughput_peer(chunk: usize, total: usize) -> f64 {
    let server: process::Client =
        capnp_rpc::new_client(Loopback::new((256 << 10) / chunk.min(256 << 10)));
    unix_socket_peer(server.client, move |p: process::Client| async move {
        stream_through(&p, chunk, total).await
    })
}

/// Store data of the bare embedding below.
pub struct BareState {
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

/// The cold spawn's peer: compiling child-echo with wasmtime's defaults,
/// then the bare embedding's first call.
pub fn spawn_cold_in_bare_wasmtime(runs: usize) -> Vec<f64> {
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

/// child-echo compiled and linked for the bare embedding.
pub fn bare_compile(
    engine: &wasmtime::Engine,
) -> wasmtime_wasi::p2::bindings::CommandPre<BareState> {
    let component = wasmtime::component::Component::new(engine, guest("child-echo")).unwrap();
    let mut linker = wasmtime::component::Linker::<BareState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    wasmtime_wasi::p2::bindings::CommandPre::new(linker.instantiate_pre(&component).unwrap())
        .unwrap()
}

/// child-echo started by the bare embedding (wasmtime's default engine: no
/// pooling, no epoch checks, no limits; stdio through wasmtime-wasi's
/// async streams over tokio in-memory pipes), its stdio served by a plain
/// capnp-rpc system whose bootstrap is the probe. Nanoseconds from before
/// the child's pipes are made to its first call.
pub async fn bare_first_call(
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

/// The wasmtime CLI the xtask builds, where `CAPSA_PEER_WASMTIME` names it.
fn wasmtime_cli() -> Option<PathBuf> {
    std::env::var_os("CAPSA_PEER_WASMTIME").map(PathBuf::from)
}

/// `wasmtime run ARGS`, `runs` times: the wall time of each.
fn wasmtime_runs(args: &[&OsStr], runs: usize) -> Option<Vec<f64>> {
    let exe = wasmtime_cli()?;
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = std::process::Command::new(&exe)
            .arg("run")
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

/// `wasmtime run hello.wasm`, the wasmtime CLI as a separate process.
pub fn hello_in_wasmtime_cli(runs: usize) -> Option<Vec<f64>> {
    let hello = guests().join("hello.wasm");
    wasmtime_runs(&[hello.as_os_str()], runs)
}

/// `wasmtime run --dir DIR::/data files.wasm ARGS`, `runs` times.
pub fn files_in_wasmtime_cli(dir: &Path, args: &[&str], runs: usize) -> Option<Vec<f64>> {
    let grant = format!("{}::/data", dir.display());
    let files = guests().join("files.wasm");
    let mut all: Vec<&OsStr> = vec!["--dir".as_ref(), grant.as_ref(), files.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    wasmtime_runs(&all, runs)
}

/// `wasmtime run hello.wasm cat` (the wasmtime CLI, a separate process)
/// fed `total` bytes through a pipe in `chunk`-sized writes while its
/// stdout is read from another: bytes per second, the process's start
/// (a few milliseconds) included.
pub fn throughput_wasmtime_cli(chunk: usize, total: usize) -> Option<f64> {
    use std::io::{Read, Write};
    let exe = wasmtime_cli()?;
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

/// The idle host's peer: a thread that advances an epoch every
/// millisecond for a window, as a host ticking whether or not guests
/// run would; its process's wake-ups per second.
pub fn always_ticking_wakeups() -> f64 {
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
    let before = procfs::context_switches();
    std::thread::sleep(window);
    let per_second = (procfs::context_switches() - before) as f64 / window.as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.join().unwrap();
    per_second
}
