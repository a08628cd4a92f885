//! `ByteSink` and `ByteSource`: a data-mode process's stdio as capabilities.
//!
//! Both sit on the bounded pipes of [`crate::pipe`], so a slow reader holds
//! back the writer instead of growing host memory: `ByteSink.write` is a
//! Cap'n Proto `-> stream` method that completes only once the bytes are in
//! the pipe, and `ByteSource.read` drains at most what was asked (the
//! schema crate's [`ByteSourceServer`](capsa_schema::stream::ByteSourceServer)
//! over the pipe's [`ByteStream`]). A pushed stream (`Options.stdoutTo`)
//! is a [`Source`], pushed by [`capsa_schema::stream::push`].

use std::rc::Rc;

use bytes::Bytes;
use capsa_schema::capsa_capnp::{byte_sink, byte_source};
use capsa_schema::stream::ByteStream;

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

/// A cell's stdout or stderr, read as it is written.
impl ByteStream for PipeReader {
    const MAX_READ: usize = MAX_READ;
    type Chunk = Bytes;

    async fn read(&self, max: usize) -> capnp::Result<(Bytes, bool)> {
        Ok(self.read_with_end(max).await)
    }
}

/// Where a pushed stream comes from.
pub enum Source {
    /// A cell's output pipe, read directly.
    Pipe(Rc<PipeReader>),
    /// A stream of the agent's, pulled over the machine's connection.
    Remote(byte_source::Client),
}

impl ByteStream for Source {
    const MAX_READ: usize = MAX_READ;
    type Chunk = Bytes;

    async fn read(&self, max: usize) -> capnp::Result<(Bytes, bool)> {
        match self {
            Source::Pipe(pipe) => pipe.read(max).await,
            Source::Remote(source) => source
                .read(max)
                .await
                .map(|(chunk, ended)| (Bytes::from(chunk), ended)),
        }
    }
}
