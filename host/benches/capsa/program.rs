//! `program`: a repeat run of a large program through `capsa serve`, named
//! by its hash against sent again.

use std::time::Instant;

use capsa::schema::StdioMode;

use crate::report::{median, Report};
use crate::servers::serve_in_thread;
use crate::{guest, local};

pub fn rows(r: &mut Report) {
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
