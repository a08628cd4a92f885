//! `ByteSink` and `ByteSource`: a data-mode process's stdio as capabilities.
//!
//! Both sit on the bounded pipes of [`crate::pipe`], so a slow reader holds
//! back the writer instead of growing host memory: `ByteSink.write` is a
//! Cap'n Proto `-> stream` method that completes only once the bytes are in
//! the pipe, and `ByteSource.read` drains at most what was asked.

use std::rc::Rc;

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
        let chunk = self.pipe.read_chunk(max).await;
        let mut r = results.get();
        r.set_eof(chunk.is_empty());
        r.set_data(&chunk);
        Ok(())
    }
}
