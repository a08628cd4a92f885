//! capsa's own end of a vsock connection: an async byte stream.
//!
//! Each connection is a Unix socket pair; the muxer keeps one end and the
//! caller gets the other wrapped here, so reads and writes never touch the
//! device thread and back-pressure is the socket buffer's.

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::mpsc;
use futures::StreamExt;
use tokio::io::{AsyncRead as TokioRead, AsyncWrite as TokioWrite, ReadBuf};

/// One vsock connection as seen from the host: [`futures::io::AsyncRead`] +
/// [`futures::io::AsyncWrite`] (what `capnp-rpc`'s two-party transport
/// takes). Must be created and used inside a Tokio runtime.
#[derive(Debug)]
pub struct VsockStream {
    inner: tokio::net::UnixStream,
}

impl VsockStream {
    /// Wraps the host end of a connection.
    pub fn from_std(stream: StdUnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            inner: tokio::net::UnixStream::from_std(stream)?,
        })
    }

    /// The underlying Tokio stream (for Tokio's own I/O traits).
    pub fn into_inner(self) -> tokio::net::UnixStream {
        self.inner
    }
}

impl futures::io::AsyncRead for VsockStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures::io::AsyncWrite for VsockStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Guest-initiated connections to one host port.
#[derive(Debug)]
pub struct VsockListener {
    port: u32,
    rx: mpsc::UnboundedReceiver<StdUnixStream>,
}

impl VsockListener {
    pub(crate) fn new(port: u32, rx: mpsc::UnboundedReceiver<StdUnixStream>) -> Self {
        Self { port, rx }
    }

    /// The host port guests connect to.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The next connection; `None` once the VM is gone.
    pub async fn accept(&mut self) -> Option<io::Result<VsockStream>> {
        let s = self.rx.next().await?;
        Some(VsockStream::from_std(s))
    }
}
