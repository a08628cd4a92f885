//! The client side the rows share: echo round trips, `hello cat` started
//! in data mode, and a byte stream written through it and read back,
//! pulled or pushed.

use std::time::Instant;

use capsa::schema::{byte_sink, byte_source, executor, process, StdioMode};

use crate::guest;
use crate::servers::CountingSink;

/// Round trips run by the echo rows and their peers.
pub const ECHOES: usize = 20_000;

/// `ECHOES` echo calls on `exec`, one at a time: nanoseconds each.
pub async fn echo_round_trips(exec: &executor::Client) -> Vec<f64> {
    let mut v = Vec::with_capacity(ECHOES);
    for _ in 0..ECHOES {
        let t = Instant::now();
        let mut req = exec.echo_request();
        req.get().set_message("x");
        req.send().promise.await.unwrap();
        v.push(t.elapsed().as_nanos() as f64);
    }
    v
}

/// `hello cat` in data mode on `exec`, its stdout to be pulled.
pub async fn start_cat(exec: &executor::Client) -> process::Client {
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
pub async fn feed(sink: &byte_sink::Client, chunk: usize, total: usize) {
    let data = vec![7u8; chunk];
    for _ in 0..total / chunk {
        let mut req = sink.write_request();
        req.get().set_data(&data);
        req.send().await.unwrap();
    }
    sink.close_request().send().promise.await.unwrap();
}

/// Reads `source` to its end, throwing the bytes away.
pub async fn drain(source: &byte_source::Client) {
    loop {
        let resp = source.read_request().send().promise.await.unwrap();
        if resp.get().unwrap().get_eof() {
            break;
        }
    }
}

/// Writes `total` bytes into `p`'s stdin, `chunk` at a time, while reading
/// its stdout to the end: bytes per second.
pub async fn stream_through(p: &process::Client, chunk: usize, total: usize) -> f64 {
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

/// Streams `total` bytes through `hello cat` started on `exec`, its stdout
/// pushed into a sink of ours: bytes per second.
pub async fn pushed_through(exec: &executor::Client, chunk: usize, total: usize) -> f64 {
    let (counter, closed) = CountingSink::new();
    let out: byte_sink::Client = capnp_rpc::new_client(counter);
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
