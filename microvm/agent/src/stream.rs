//! `ByteSink` and `ByteSource`: a process's stdio pipes as capabilities.
//!
//! Flow control is the kernel pipe itself: its buffer is bounded, a
//! `ByteSink.write` (a Cap'n Proto `-> stream` method) completes only once its
//! bytes are in the pipe, and `ByteSource.read` takes at most what was asked
//! from the pipe only when asked. A child writing gigabytes to a slow reader
//! blocks in `write(2)`; the agent never buffers more than one read.

use std::io::{self, ErrorKind};
use std::rc::Rc;

use capsa_schema::capsa_capnp::byte_sink;
use capsa_schema::stream::ByteStream;
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

/// The read end of a child's stdout or stderr: served by one `ByteSource`
/// or pushed into the caller's sink, never both.
pub struct OutputPipe(pipe::Receiver);

impl OutputPipe {
    pub fn new(receiver: pipe::Receiver) -> Self {
        OutputPipe(receiver)
    }
}

impl ByteStream for OutputPipe {
    const MAX_READ: usize = MAX_READ;
    type Chunk = Vec<u8>;

    /// What is in the pipe, up to `max` bytes, once there is something (or
    /// the writer is gone).
    async fn read(&self, max: usize) -> capnp::Result<(Vec<u8>, bool)> {
        let failed =
            |e: io::Error| capnp::Error::failed(format!("reading the process's output: {e}"));
        let mut buf = vec![0u8; max];
        let mut n = loop {
            self.0.readable().await.map_err(failed)?;
            match self.0.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(failed(e)),
            }
        };
        let mut ended = n == 0;
        // Take what else is already in the pipe, without waiting for more.
        while n > 0 && n < buf.len() {
            match self.0.try_read(&mut buf[n..]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(m) => n += m,
                Err(_) => break,
            }
        }
        buf.truncate(n);
        Ok((buf, ended))
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
