//! `ByteSink` and `ByteSource`: a process's stdio pipes as capabilities.
//!
//! Flow control is the kernel pipe itself: its buffer is bounded, a
//! `ByteSink.write` (a Cap'n Proto `-> stream` method) completes only once its
//! bytes are in the pipe, and `ByteSource.read` takes at most what was asked
//! from the pipe only when asked. A child writing gigabytes to a slow reader
//! blocks in `write(2)`; the agent never buffers more than one read.

use std::io::{self, ErrorKind};
use std::rc::Rc;

use capsa_schema::capsa_capnp::{byte_sink, byte_source};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

/// Largest chunk one `ByteSource.read` returns.
pub const MAX_READ: usize = 1 << 20;

/// The write end of a child's stdin. Closed by `ByteSink.close` or when the
/// process handle goes.
pub struct InputPipe(tokio::sync::Mutex<Option<pipe::Sender>>);

impl InputPipe {
    pub fn new(sender: pipe::Sender) -> Self {
        InputPipe(tokio::sync::Mutex::new(Some(sender)))
    }
}

/// The read end of a child's stdout or stderr, shared by every `ByteSource`
/// handed out for it; reads are served one at a time, in order.
pub struct OutputPipe(tokio::sync::Mutex<OutputState>);

struct OutputState {
    receiver: pipe::Receiver,
    eof: bool,
}

impl OutputPipe {
    pub fn new(receiver: pipe::Receiver) -> Self {
        OutputPipe(tokio::sync::Mutex::new(OutputState {
            receiver,
            eof: false,
        }))
    }

    /// The next chunk of at most [`MAX_READ`] bytes for a push into a
    /// caller's sink; empty at the end of the stream or on an error.
    pub async fn next_chunk(&self) -> Vec<u8> {
        self.read(MAX_READ)
            .await
            .map(|(chunk, _)| chunk)
            .unwrap_or_default()
    }

    /// Up to `max` bytes, waiting for the first, and whether the stream
    /// has ended with them (the writer closed and nothing is left); empty
    /// at end of stream.
    async fn read(&self, max: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut state = self.0.lock().await;
        if state.eof {
            return Ok((Vec::new(), true));
        }
        let mut buf = vec![0u8; max];
        let mut n = loop {
            state.receiver.readable().await?;
            match state.receiver.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            state.eof = true;
        }
        // Take what else is already in the pipe, without waiting for more.
        while n > 0 && n < buf.len() {
            match state.receiver.try_read(&mut buf[n..]) {
                Ok(0) => {
                    state.eof = true;
                    break;
                }
                Ok(m) => n += m,
                Err(_) => break,
            }
        }
        buf.truncate(n);
        Ok((buf, state.eof))
    }
}

pub struct ByteSinkImpl {
    pipe: Rc<InputPipe>,
}

impl ByteSinkImpl {
    pub fn new(pipe: Rc<InputPipe>) -> Self {
        ByteSinkImpl { pipe }
    }
}

impl byte_sink::Server for ByteSinkImpl {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut sender = self.pipe.0.lock().await;
        let sender = sender
            .as_mut()
            .ok_or_else(|| capnp::Error::failed("stdin was already closed".into()))?;
        sender.write_all(data).await.map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe => {
                capnp::Error::disconnected("the process no longer reads its stdin".into())
            }
            _ => capnp::Error::failed(format!("writing to the process's stdin: {e}")),
        })
    }

    async fn close(
        self: Rc<Self>,
        _: byte_sink::CloseParams,
        _: byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        self.pipe.0.lock().await.take();
        Ok(())
    }
}

pub struct ByteSourceImpl {
    pipe: Rc<OutputPipe>,
}

impl ByteSourceImpl {
    pub fn new(pipe: Rc<OutputPipe>) -> Self {
        ByteSourceImpl { pipe }
    }
}

impl byte_source::Server for ByteSourceImpl {
    async fn read(
        self: Rc<Self>,
        params: byte_source::ReadParams,
        mut results: byte_source::ReadResults,
    ) -> Result<(), capnp::Error> {
        let max = capsa_schema::stream::read_size(params.get()?.get_max_bytes(), MAX_READ);
        let (chunk, ended) = self
            .pipe
            .read(max)
            .await
            .map_err(|e| capnp::Error::failed(format!("reading the process's output: {e}")))?;
        let mut r = results.get();
        r.set_eof(ended);
        r.set_data(&chunk);
        Ok(())
    }
}
