//! `ByteSink` and `ByteSource`: a data-mode process's stdio as capabilities.
//!
//! Both sit on the bounded pipes of [`crate::pipe`], so a slow reader holds
//! back the writer instead of growing host memory: `ByteSink.write` is a
//! Cap'n Proto `-> stream` method that completes only once the bytes are in
//! the pipe, and `ByteSource.read` drains at most what was asked.

use std::rc::Rc;

use bytes::Bytes;
use capsa_schema::capsa_capnp::{byte_sink, byte_source};

use crate::pipe::{PipeReader, PipeWriter};

/// Largest chunk one `ByteSource.read` returns.
pub const MAX_READ: usize = 4 << 20;

pub struct ByteSinkImpl {
    pipe: Rc<PipeWriter>,
    /// Writes are applied one at a time, in order.
    turn: tokio::sync::Mutex<()>,
}

impl ByteSinkImpl {
    pub fn new(pipe: Rc<PipeWriter>) -> Self {
        ByteSinkImpl {
            pipe,
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl byte_sink::Server for ByteSinkImpl {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> Result<(), capnp::Error> {
        let _turn = self.turn.lock().await;
        let data = params.get()?.get_data()?;
        self.pipe
            .write_all(data)
            .await
            .map_err(|_| capnp::Error::disconnected("the process no longer reads its stdin".into()))
    }

    async fn close(
        self: Rc<Self>,
        _: byte_sink::CloseParams,
        _: byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        let _turn = self.turn.lock().await;
        self.pipe.close();
        Ok(())
    }
}

pub struct ByteSourceImpl {
    pipe: Rc<PipeReader>,
    turn: tokio::sync::Mutex<()>,
}

impl ByteSourceImpl {
    pub fn new(pipe: Rc<PipeReader>) -> Self {
        ByteSourceImpl {
            pipe,
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl byte_source::Server for ByteSourceImpl {
    async fn read(
        self: Rc<Self>,
        params: byte_source::ReadParams,
        mut results: byte_source::ReadResults,
    ) -> Result<(), capnp::Error> {
        let max = capsa_schema::stream::read_size(params.get()?.get_max_bytes(), MAX_READ);
        let _turn = self.turn.lock().await;
        let (chunk, ended) = self.pipe.read_with_end(max).await;
        let mut r = results.get();
        r.set_eof(ended);
        r.set_data(&chunk);
        Ok(())
    }
}

/// Where a pushed stream comes from.
pub enum Source {
    /// A cell's output pipe, read directly.
    Pipe(Rc<PipeReader>),
    /// A stream of the agent's, pulled over the machine's connection.
    Remote(byte_source::Client),
}

impl Source {
    /// The next chunk; empty at the end of the stream (or when a remote
    /// source fails: there is nothing more to push either way).
    async fn next(&self) -> Bytes {
        match self {
            Source::Pipe(pipe) => pipe.read_chunk(MAX_READ).await,
            Source::Remote(source) => {
                let mut request = source.read_request();
                request.get().set_max_bytes(MAX_READ as u32);
                let Ok(response) = request.send().promise.await else {
                    return Bytes::new();
                };
                match response.get().and_then(|r| r.get_data()) {
                    Ok(data) => Bytes::copy_from_slice(data),
                    Err(_) => Bytes::new(),
                }
            }
        }
    }
}

/// Pushes `from` into the caller's `sink` until the stream ends, then
/// closes it (`Options.stdoutTo`; see [`capsa_client::push`]).
pub async fn push(from: Source, sink: byte_sink::Client) {
    capsa_client::push(|| from.next(), &sink).await;
}
