//! `spawn`: from a spawn request to the child's first RPC call, cold,
//! cached and from a loaded Program, beside a bare wasmtime embedding;
//! a kill's teardown; `hello` run to exit beside `wasmtime run`.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use capsa::schema::{executor, StdioMode};
use capsa::{Host, HostConfig};

use crate::clients::drain;
use crate::report::{median, us, Report};
use crate::servers::{FirstCall, FIRST_CALL_ARGS};
use crate::{guest, local, peers};

pub fn rows(r: &mut Report) {
    // Alternating, as the cached rows below.
    let (mut cold, mut cold_peer) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        cold.extend(spawn_cold(1));
        cold_peer.extend(peers::spawn_cold_in_bare_wasmtime(1));
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
    let peer = match peers::hello_in_wasmtime_cli(20) {
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

/// What a spawn starts from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
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
pub async fn spawn_to_first_call(root: &executor::Client, start: Start<'_>) -> (f64, f64) {
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

/// Spawns on a fresh host each, so each compiles.
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

/// `Program.run` spawns in capsa and, as their peer, the same child started
/// by a bare wasmtime embedding (`peers::bare_first_call`). They alternate
/// in blocks of `per_round`, so a change in the machine's speed hits both
/// alike. Returns (capsa's spawns, capsa's teardowns, the peer's spawns).
fn spawn_program_and_bare(rounds: usize, per_round: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let bytes = guest("child-echo");
    let engine = wasmtime::Engine::default();
    let pre = peers::bare_compile(&engine);
    local(async {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let program = capsa_client::load(&root, &bytes).await.unwrap();
        let start = Start::Program(&program);
        spawn_to_first_call(&root, start).await;
        peers::bare_first_call(&engine, &pre).await;
        let (mut ours, mut teardown, mut bare) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            for _ in 0..per_round {
                let (spawn, torn_down) = spawn_to_first_call(&root, start).await;
                ours.push(spawn);
                teardown.push(torn_down);
            }
            for _ in 0..per_round {
                bare.push(peers::bare_first_call(&engine, &pre).await);
            }
        }
        host.shutdown().await;
        (ours, teardown, bare)
    })
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
            drain(&p.stdout_request().send().pipeline.get_source()).await;
            p.wait_request().send().promise.await.unwrap();
            if i > 0 {
                v.push(t.elapsed().as_nanos() as f64);
            }
        }
        host.shutdown().await;
        v
    })
}
