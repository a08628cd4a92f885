//! In-memory byte pipes between the host and a guest's stdio.
//!
//! A pipe is a bounded buffer shared by one host end and one guest end. The
//! bound is the flow control: a guest writing to a pipe nobody drains sees
//! `check-write` return 0 and parks, and a host writer waits for the guest to
//! read. Host memory per pipe is therefore at most its capacity (each chunk
//! counting 64 bytes beyond its own for its allocation).
//!
//! The guest ends implement `wasmtime-wasi`'s stdio traits (they serve both
//! WASI preview 2 components and preview 1 modules, which wasmtime runs on
//! top of preview 2 streams); the host ends implement the `futures` I/O traits
//! that capnp-rpc's two-party transport takes.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdinStream, StdoutStream};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{InputStream, OutputStream, StreamError, StreamResult};

/// Default capacity of a pipe, in bytes.
pub const DEFAULT_CAPACITY: usize = 256 * 1024;

/// Reads of chunks smaller than this gather the chunks behind them too
/// (one copy), so a guest's many small writes do not become as many
/// messages; larger chunks are handed on as they were written.
const GATHER_BELOW: usize = 16 * 1024;

/// What one chunk's allocation and bookkeeping count as, in bytes.
const CHUNK_COST: usize = 64;

/// The bytes in a pipe, as the chunks they were written in: a guest's
/// writes arrive as `Bytes` and leave the same way, without being copied
/// into a ring buffer and out again, and nothing is held once read.
#[derive(Default)]
struct Chunks {
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the chunks count against the pipe's capacity: their bytes and
    /// [`CHUNK_COST`] for each, so a guest writing a byte at a time cannot
    /// make the host hold many times the capacity in bookkeeping.
    fn cost(&self) -> usize {
        self.len + self.queue.len() * CHUNK_COST
    }

    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.queue.push_back(chunk);
        }
    }

    fn extend(&mut self, data: &[u8]) {
        self.push(Bytes::copy_from_slice(data));
    }

    /// Up to `max` bytes from the front: the front chunk or a slice of
    /// it, uncopied, unless it is small and more follow (then gathered).
    fn take(&mut self, max: usize) -> Bytes {
        let chunks = self.queue.len();
        let Some(front) = self.queue.front_mut() else {
            return Bytes::new();
        };
        let out = if front.len() >= max {
            front.split_to(max)
        } else if chunks == 1 || front.len() >= GATHER_BELOW {
            self.queue.pop_front().unwrap_or_default()
        } else {
            let mut gathered = Vec::with_capacity(max.min(self.len));
            while gathered.len() < max {
                let Some(chunk) = self.queue.front_mut() else {
                    break;
                };
                let n = chunk.len().min(max - gathered.len());
                gathered.extend_from_slice(&chunk.split_to(n));
                if chunk.is_empty() {
                    self.queue.pop_front();
                }
            }
            Bytes::from(gathered)
        };
        self.len -= out.len();
        out
    }

    /// Moves up to `out.len()` bytes into `out`; how many.
    fn copy_to(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() && !self.is_empty() {
            let chunk = self.take(out.len() - n);
            out[n..n + chunk.len()].copy_from_slice(&chunk);
            n += chunk.len();
        }
        n
    }
}

#[derive(Default)]
struct State {
    buf: Chunks,
    capacity: usize,
    /// The writing end is gone: once drained, readers see end of stream.
    write_closed: bool,
    /// The reading end is gone: writers see a closed stream.
    read_closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl State {
    fn space(&self) -> usize {
        self.capacity.saturating_sub(self.buf.cost())
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn take(&mut self, max: usize) -> Bytes {
        let out = self.buf.take(max);
        self.wake_writer();
        out
    }
}

#[derive(Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding it;
        // the buffer itself is always consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if !s.buf.is_empty() || s.write_closed {
            Poll::Ready(())
        } else {
            s.reader = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.space() > 0 || s.read_closed {
            Poll::Ready(())
        } else {
            s.writer = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

fn shared(capacity: usize) -> Shared {
    Shared(Arc::new(Mutex::new(State {
        capacity: capacity.max(1),
        ..State::default()
    })))
}

/// Creates a pipe of `capacity` bytes between two host tasks.
pub fn pipe(capacity: usize) -> (PipeWriter, PipeReader) {
    let s = shared(capacity);
    (PipeWriter(s.clone()), PipeReader(s))
}

/// A pipe the host writes and a guest reads: the guest's stdin.
pub(crate) fn guest_input(capacity: usize) -> (PipeWriter, GuestInput) {
    let s = shared(capacity);
    (PipeWriter(s.clone()), GuestInput(s))
}

/// A pipe a guest writes and the host reads: the guest's stdout or stderr.
pub(crate) fn guest_output(capacity: usize) -> (GuestOutput, PipeReader) {
    let s = shared(capacity);
    (GuestOutput(s.clone()), PipeReader(s))
}

/// The reading end of a pipe. Dropping it closes the pipe for the writer.
pub struct PipeReader(Shared);

/// The writing end of a pipe. Dropping it signals end of stream to the reader.
pub struct PipeWriter(Shared);

impl PipeReader {
    /// Reads up to `max` bytes, waiting until at least one is there. An empty
    /// result means end of stream.
    pub async fn read_chunk(&self, max: usize) -> Bytes {
        self.read_with_end(max).await.0
    }

    /// As [`PipeReader::read_chunk`], and whether the stream has ended
    /// with these bytes: the writer is gone and nothing is left, so a
    /// reader learns of the end with the last data, not one call later.
    pub async fn read_with_end(&self, max: usize) -> (Bytes, bool) {
        futures::future::poll_fn(|cx| self.0.poll_readable(cx)).await;
        let mut s = self.0.lock();
        let chunk = s.take(max.max(1));
        (chunk, s.buf.is_empty() && s.write_closed)
    }
}

impl PipeWriter {
    /// Writes all of `data`, waiting for room as the reader drains the pipe.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            futures::future::poll_fn(|cx| self.0.poll_writable(cx)).await;
            let mut s = self.0.lock();
            if s.read_closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = s.space().min(data.len());
            s.buf.extend(&data[..n]);
            s.wake_reader();
            data = &data[n..];
        }
        Ok(())
    }

    /// Signals end of stream; further writes fail.
    pub fn close(&self) {
        let mut s = self.0.lock();
        s.write_closed = true;
        s.wake_reader();
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.read_closed = true;
        s.buf = Chunks::default();
        s.wake_writer();
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        self.close();
    }
}

impl PipeReader {
    fn poll_read_shared(&self, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        futures::ready!(self.0.poll_readable(cx));
        let mut s = self.0.lock();
        let n = s.buf.copy_to(out);
        if n > 0 {
            s.wake_writer();
        }
        Poll::Ready(Ok(n))
    }
}

impl futures::io::AsyncRead for PipeReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_read_shared(cx, out)
    }
}

/// A reader that never closes the pipe: the writer keeps blocking, not
/// failing, while whoever owns the [`PipeReader`] still holds it.
pub struct KeepOpenReader(pub std::rc::Rc<PipeReader>);

impl futures::io::AsyncRead for KeepOpenReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_read_shared(cx, out)
    }
}

impl PipeWriter {
    fn poll_write_shared(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        futures::ready!(self.0.poll_writable(cx));
        let mut s = self.0.lock();
        if s.read_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.write_closed {
            return Poll::Ready(Err(io::Error::other("pipe closed by the host")));
        }
        let n = s.space().min(data.len());
        s.buf.extend(&data[..n]);
        s.wake_reader();
        Poll::Ready(Ok(n))
    }
}

impl futures::io::AsyncWrite for PipeWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_shared(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close();
        Poll::Ready(Ok(()))
    }
}

/// A writer that never closes the pipe: end of stream is left to whoever
/// owns the [`PipeWriter`].
pub struct KeepOpen(pub std::rc::Rc<PipeWriter>);

impl futures::io::AsyncWrite for KeepOpen {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_shared(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The guest's view of a pipe it reads (its stdin).
///
/// Cloned whenever the guest asks for its stdin again; closing is the host
/// end's business, so dropping a clone changes nothing.
#[derive(Clone)]
pub(crate) struct GuestInput(Shared);

/// The guest's view of a pipe it writes (its stdout or stderr).
#[derive(Clone)]
pub(crate) struct GuestOutput(Shared);

impl GuestOutput {
    /// Marks the guest's side finished: the host reader sees end of stream
    /// once it has drained what the guest wrote.
    pub(crate) fn close(&self) {
        let mut s = self.0.lock();
        s.write_closed = true;
        s.wake_reader();
    }
}

impl GuestInput {
    /// Marks the guest's side finished: a host writer sees a closed pipe.
    pub(crate) fn close(&self) {
        let mut s = self.0.lock();
        s.read_closed = true;
        s.buf = Chunks::default();
        s.wake_writer();
    }
}

#[async_trait::async_trait]
impl Pollable for GuestInput {
    async fn ready(&mut self) {
        futures::future::poll_fn(|cx| self.0.poll_readable(cx)).await
    }
}

#[async_trait::async_trait]
impl InputStream for GuestInput {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        let mut s = self.0.lock();
        if s.buf.is_empty() && s.write_closed {
            return Err(StreamError::Closed);
        }
        Ok(s.take(size))
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {
        futures::future::poll_fn(|cx| self.0.poll_writable(cx)).await
    }
}

#[async_trait::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut s = self.0.lock();
        if s.read_closed {
            return Err(StreamError::Closed);
        }
        // `check-write` granted at most `space()`; a guest that writes more
        // than it was granted is told so rather than growing the buffer.
        if bytes.len() > s.space() {
            return Err(StreamError::Trap(wasmtime::format_err!(
                "write of {} bytes exceeds the {} bytes permitted by check-write",
                bytes.len(),
                s.space()
            )));
        }
        s.buf.push(bytes);
        s.wake_reader();
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        if self.0.lock().read_closed {
            return Err(StreamError::Closed);
        }
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let s = self.0.lock();
        if s.read_closed {
            return Err(StreamError::Closed);
        }
        Ok(s.space())
    }
}

impl IsTerminal for GuestInput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for GuestInput {
    fn p2_stream(&self) -> Box<dyn InputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncRead for GuestInput {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        futures::ready!(self.0.poll_readable(cx));
        let mut s = self.0.lock();
        let n = buf.remaining().min(s.buf.len());
        let chunk = s.take(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        futures::ready!(self.0.poll_writable(cx));
        let mut s = self.0.lock();
        if s.read_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = s.space().min(data.len());
        s.buf.extend(&data[..n]);
        s.wake_reader();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncReadExt;

    #[test]
    fn chunks_pass_large_writes_on_uncopied_and_gather_small_ones() {
        let mut c = Chunks::default();
        let big = Bytes::from(vec![1u8; 64 << 10]);
        c.push(big.clone());
        c.extend(b"tail");
        // The same memory, not a copy.
        let first = c.take(1 << 20);
        assert_eq!(first.as_ptr(), big.as_ptr());
        assert_eq!(first.len(), 64 << 10);
        assert_eq!(&c.take(1 << 20)[..], b"tail");
        assert!(c.is_empty());

        for piece in [&b"a"[..], b"bc", b"def"] {
            c.extend(piece);
        }
        assert_eq!(&c.take(4)[..], b"abcd");
        assert_eq!(c.len(), 2);
        let mut out = [0u8; 8];
        assert_eq!(c.copy_to(&mut out), 2);
        assert_eq!(&out[..2], b"ef");
        assert_eq!(c.take(8).len(), 0);
    }

    #[tokio::test]
    async fn byte_at_a_time_writes_count_their_bookkeeping() {
        let (mut out, r) = guest_output(1024);
        let mut written = 0;
        while out.check_write().unwrap() > 0 {
            out.write(Bytes::from_static(b"x")).unwrap();
            written += 1;
        }
        // Each one-byte chunk costs 65: the pipe holds 16 of them (the last
        // one granted while 49 were left), not 1,024.
        assert_eq!(written, 1024_usize.div_ceil(1 + CHUNK_COST));
        assert_eq!(r.read_chunk(1 << 20).await.len(), written);
    }

    #[tokio::test]
    async fn bounded_and_ordered() {
        let (w, mut guest) = guest_input(4);
        let writer = tokio::spawn(async move { w.write_all(b"abcdefghij").await });
        let mut got = Vec::new();
        while got.len() < 10 {
            guest.ready().await;
            let chunk = guest.read(3).unwrap();
            assert!(chunk.len() <= 3);
            got.extend_from_slice(&chunk);
        }
        writer.await.unwrap().unwrap();
        assert_eq!(got, b"abcdefghij");
    }

    #[tokio::test]
    async fn check_write_is_the_budget() {
        // Room for one chunk of 8 bytes.
        let (mut out, r) = guest_output(8 + CHUNK_COST);
        assert_eq!(out.check_write().unwrap(), 8 + CHUNK_COST);
        out.write(Bytes::from_static(b"12345")).unwrap();
        assert_eq!(out.check_write().unwrap(), 3);
        assert!(matches!(
            out.write(Bytes::from_static(b"6789")),
            Err(StreamError::Trap(_))
        ));
        assert_eq!(r.read_chunk(100).await.as_ref(), b"12345");
        assert_eq!(out.check_write().unwrap(), 8 + CHUNK_COST);
    }

    #[tokio::test]
    async fn the_end_comes_with_the_last_bytes() {
        let (w, r) = pipe(64);
        w.write_all(b"abc").await.unwrap();
        assert_eq!(r.read_with_end(2).await, (Bytes::from_static(b"ab"), false));
        // Open: more may come.
        assert_eq!(r.read_with_end(8).await, (Bytes::from_static(b"c"), false));
        w.write_all(b"de").await.unwrap();
        w.close();
        assert_eq!(r.read_with_end(1).await, (Bytes::from_static(b"d"), false));
        assert_eq!(r.read_with_end(8).await, (Bytes::from_static(b"e"), true));
        assert_eq!(r.read_with_end(8).await, (Bytes::new(), true));
    }

    #[tokio::test]
    async fn end_of_stream_both_ways() {
        let (w, mut r) = pipe(16);
        w.write_all(b"hi").await.unwrap();
        w.close();
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hi");

        let (mut out, r2) = guest_output(16);
        drop(r2);
        assert!(matches!(out.check_write(), Err(StreamError::Closed)));
    }
}
