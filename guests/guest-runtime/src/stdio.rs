//! `futures::io` streams over WASI streams, for the guest's stdin and stdout.
//!
//! Reads and writes never block: a read that finds no data, or a write that
//! finds no budget (`check-write` returns 0), parks the task on the stream's
//! pollable and lets the executor sleep in `wasi:io/poll`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::io::{AsyncRead, AsyncWrite};

use crate::bindings::wasi::cli::{stdin::get_stdin, stdout::get_stdout};
use crate::bindings::wasi::io::streams::{InputStream, OutputStream, StreamError};
use crate::reactor::Registration;

/// The guest's stdin as an [`AsyncRead`].
pub fn stdin() -> AsyncInputStream {
    AsyncInputStream::new(get_stdin())
}

/// The guest's stdout as an [`AsyncWrite`].
pub fn stdout() -> AsyncOutputStream {
    AsyncOutputStream::new(get_stdout())
}

fn io_error(e: StreamError) -> io::Error {
    match e {
        StreamError::Closed => io::Error::from(io::ErrorKind::BrokenPipe),
        StreamError::LastOperationFailed(e) => io::Error::other(e.to_debug_string()),
    }
}

/// A WASI input stream read without blocking. A closed stream reads as EOF.
pub struct AsyncInputStream {
    // Before `stream`: the pollable must be dropped before its stream.
    registration: Registration,
    stream: InputStream,
}

impl AsyncInputStream {
    pub fn new(stream: InputStream) -> Self {
        Self {
            registration: Registration::new(),
            stream,
        }
    }
}

impl AsyncRead for AsyncInputStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        match this.stream.read(buf.len() as u64) {
            Ok(bytes) if bytes.is_empty() => {
                this.registration
                    .park(|| this.stream.subscribe(), cx.waker());
                Poll::Pending
            }
            Ok(bytes) => {
                this.registration.unpark();
                buf[..bytes.len()].copy_from_slice(&bytes);
                Poll::Ready(Ok(bytes.len()))
            }
            Err(StreamError::Closed) => {
                this.registration.unpark();
                Poll::Ready(Ok(0))
            }
            Err(e) => {
                this.registration.unpark();
                Poll::Ready(Err(io_error(e)))
            }
        }
    }
}

/// A WASI output stream written without blocking and within the budget
/// `check-write` grants.
pub struct AsyncOutputStream {
    // Before `stream`: the pollable must be dropped before its stream.
    registration: Registration,
    stream: OutputStream,
    flushing: bool,
}

impl AsyncOutputStream {
    pub fn new(stream: OutputStream) -> Self {
        Self {
            registration: Registration::new(),
            stream,
            flushing: false,
        }
    }

    /// How many bytes may be written now, or `None` after parking the task.
    fn budget(&self, cx: &mut Context<'_>) -> io::Result<Option<u64>> {
        match self.stream.check_write() {
            Ok(0) => {
                self.registration
                    .park(|| self.stream.subscribe(), cx.waker());
                Ok(None)
            }
            Ok(budget) => {
                self.registration.unpark();
                Ok(Some(budget))
            }
            Err(e) => {
                self.registration.unpark();
                Err(io_error(e))
            }
        }
    }
}

impl AsyncWrite for AsyncOutputStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let budget = match this.budget(cx) {
            Ok(Some(budget)) => budget,
            Ok(None) => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let len = buf.len().min(usize::try_from(budget).unwrap_or(usize::MAX));
        Poll::Ready(
            this.stream
                .write(&buf[..len])
                .map(|()| len)
                .map_err(io_error),
        )
    }

    /// Asks the stream to flush and waits until it has: a stream that is
    /// flushing grants no write budget until it is done.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.flushing {
            if let Err(e) = this.stream.flush() {
                return Poll::Ready(Err(io_error(e)));
            }
            this.flushing = true;
        }
        match this.budget(cx) {
            Ok(None) => Poll::Pending,
            Ok(Some(_)) => {
                this.flushing = false;
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                this.flushing = false;
                Poll::Ready(Err(e))
            }
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
