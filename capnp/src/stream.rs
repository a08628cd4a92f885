//! `ByteSource`, served the same way for every stream capsa hands out (a
//! process's stdout or stderr, in the host and in the agent; a file read
//! through a Directory), and the push of a stream into a caller's
//! `ByteSink` (`Options.stdoutTo`).
//!
//! A side says how to read its stream ([`ByteStream`]); [`ByteSourceServer`]
//! turns that into the capability, with the schema's rules kept in one
//! place: at most what was asked, reads taken one at a time and in order,
//! `eof` with the last bytes, and `eof` again with no data once given.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;

use crate::capsa_capnp::{byte_sink, byte_source};

/// What a read of `maxBytes` 0 returns at most.
pub const DEFAULT_READ: usize = 64 << 10;

/// The most one read returns for `asked` bytes (0: [`DEFAULT_READ`]) from
/// a source that returns at most `max` at once.
pub fn read_size(asked: u32, max: usize) -> usize {
    match asked {
        0 => DEFAULT_READ.min(max),
        n => usize::try_from(n).unwrap_or(usize::MAX).min(max),
    }
}

/// A stream of bytes, read a chunk at a time.
pub trait ByteStream {
    /// The most one read returns.
    const MAX_READ: usize;
    type Chunk: AsRef<[u8]>;

    /// Up to `max` bytes (at most [`ByteStream::MAX_READ`]), waiting for
    /// the first unless the stream has ended, and whether it has ended
    /// with them: a reader learns that the writer is done with the last
    /// bytes, not one read later. Empty only at the end. Callers never
    /// read one stream twice at once.
    fn read(&self, max: usize) -> impl Future<Output = capnp::Result<(Self::Chunk, bool)>>;
}

impl<S: ByteStream> ByteStream for Rc<S> {
    const MAX_READ: usize = S::MAX_READ;
    type Chunk = S::Chunk;

    fn read(&self, max: usize) -> impl Future<Output = capnp::Result<(Self::Chunk, bool)>> {
        S::read(self, max)
    }
}

/// Another side's `ByteSource`, read over its connection: flow control is
/// end to end.
impl ByteStream for byte_source::Client {
    const MAX_READ: usize = 4 << 20;
    type Chunk = Vec<u8>;

    async fn read(&self, max: usize) -> capnp::Result<(Vec<u8>, bool)> {
        let mut request = self.read_request();
        request
            .get()
            .set_max_bytes(u32::try_from(max).unwrap_or(u32::MAX));
        let response = request.send().promise.await?;
        let response = response.get()?;
        Ok((response.get_data()?.to_vec(), response.get_eof()))
    }
}

/// The `ByteSource` capability on a [`ByteStream`].
pub struct ByteSourceServer<S> {
    stream: S,
    /// Reads are served one at a time, in the order they arrive.
    turn: futures::lock::Mutex<()>,
    /// Set once `eof` has been given.
    ended: Cell<bool>,
}

impl<S: ByteStream + 'static> ByteSourceServer<S> {
    /// `stream` as a capability.
    pub fn client(stream: S) -> byte_source::Client {
        capnp_rpc::new_client(ByteSourceServer {
            stream,
            turn: futures::lock::Mutex::new(()),
            ended: Cell::new(false),
        })
    }
}

impl<S: ByteStream + 'static> byte_source::Server for ByteSourceServer<S> {
    async fn read(
        self: Rc<Self>,
        params: byte_source::ReadParams,
        mut results: byte_source::ReadResults,
    ) -> Result<(), capnp::Error> {
        let max = read_size(params.get()?.get_max_bytes(), S::MAX_READ);
        let _turn = self.turn.lock().await;
        if self.ended.get() {
            results.get().set_eof(true);
            return Ok(());
        }
        let (chunk, ended) = self.stream.read(max).await?;
        self.ended.set(ended);
        let mut r = results.get();
        r.set_eof(ended);
        r.set_data(chunk.as_ref());
        Ok(())
    }
}

/// Pushes `stream` into `sink` until it ends (or a read fails: there is
/// nothing more to push either way), then closes the sink. Each write
/// waits for the sink's flow control, which holds the writer of the
/// stream back. Once a write fails the rest is still read and dropped, so
/// the writer is never stuck on a sink that went away.
pub async fn push<S: ByteStream>(stream: S, sink: &byte_sink::Client) {
    let mut broken = false;
    loop {
        let Ok((chunk, ended)) = stream.read(S::MAX_READ).await else {
            break;
        };
        let chunk = chunk.as_ref();
        if !broken && !chunk.is_empty() {
            let mut write = sink.write_request();
            write.get().set_data(chunk);
            broken = write.send().await.is_err();
        }
        if ended {
            break;
        }
    }
    if !broken {
        let _ = sink.close_request().send().promise.await;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use futures::executor::block_on;

    use super::*;

    /// A stream of the chunks given, each cut at `max`; it counts its reads.
    #[derive(Default)]
    struct Chunks {
        left: RefCell<VecDeque<Vec<u8>>>,
        reads: Cell<u32>,
    }

    impl Chunks {
        fn of(chunks: &[&[u8]]) -> Rc<Chunks> {
            Rc::new(Chunks {
                left: RefCell::new(chunks.iter().map(|c| c.to_vec()).collect()),
                reads: Cell::new(0),
            })
        }
    }

    impl ByteStream for Chunks {
        const MAX_READ: usize = 4;
        type Chunk = Vec<u8>;

        async fn read(&self, max: usize) -> capnp::Result<(Vec<u8>, bool)> {
            self.reads.set(self.reads.get() + 1);
            let mut left = self.left.borrow_mut();
            let Some(front) = left.front_mut() else {
                return Ok((Vec::new(), true));
            };
            let chunk: Vec<u8> = front.drain(..max.min(front.len())).collect();
            if front.is_empty() {
                left.pop_front();
            }
            Ok((chunk, left.is_empty()))
        }
    }

    fn read(source: &byte_source::Client, max: u32) -> (Vec<u8>, bool) {
        let mut request = source.read_request();
        request.get().set_max_bytes(max);
        let response = block_on(request.send().promise).unwrap();
        let r = response.get().unwrap();
        (r.get_data().unwrap().to_vec(), r.get_eof())
    }

    #[test]
    fn reads_are_bounded_and_the_end_comes_with_the_last_bytes() {
        let stream = Chunks::of(&[b"abcdef", b"gh"]);
        let source = ByteSourceServer::client(stream.clone());
        // At most what was asked, and at most the stream's own bound.
        assert_eq!(read(&source, 1), (b"a".to_vec(), false));
        assert_eq!(read(&source, 100), (b"bcde".to_vec(), false));
        assert_eq!(read(&source, 0), (b"f".to_vec(), false));
        assert_eq!(read(&source, 100), (b"gh".to_vec(), true));
        // Once given, the end is given again without asking the stream.
        let reads = stream.reads.get();
        assert_eq!(read(&source, 100), (Vec::new(), true));
        assert_eq!(read(&source, 100), (Vec::new(), true));
        assert_eq!(stream.reads.get(), reads);
    }

    #[test]
    fn a_read_of_zero_bytes_takes_the_default() {
        assert_eq!(read_size(0, 4 << 20), DEFAULT_READ);
        assert_eq!(read_size(0, 10), 10);
        assert_eq!(read_size(7, 10), 7);
        assert_eq!(read_size(u32::MAX, 10), 10);
    }

    /// A sink that keeps what is written, or fails every write.
    #[derive(Default)]
    struct Kept {
        data: RefCell<Vec<u8>>,
        closed: Cell<bool>,
        failing: bool,
    }

    impl byte_sink::Server for Rc<Kept> {
        async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
            if self.failing {
                return Err(capnp::Error::failed("gone".into()));
            }
            let data = params.get()?.get_data()?;
            self.data.borrow_mut().extend_from_slice(data);
            Ok(())
        }

        async fn close(
            self: Rc<Self>,
            _: byte_sink::CloseParams,
            _: byte_sink::CloseResults,
        ) -> capnp::Result<()> {
            self.closed.set(true);
            Ok(())
        }
    }

    #[test]
    fn a_push_writes_the_whole_stream_then_closes_the_sink() {
        let kept = Rc::new(Kept::default());
        let sink: byte_sink::Client = capnp_rpc::new_client(kept.clone());
        block_on(push(Chunks::of(&[b"hello ", b"world"]), &sink));
        assert_eq!(kept.data.borrow().as_slice(), b"hello world");
        assert!(kept.closed.get());
    }

    #[test]
    fn a_failed_sink_does_not_hold_the_stream_back() {
        let kept = Rc::new(Kept {
            failing: true,
            ..Kept::default()
        });
        let sink: byte_sink::Client = capnp_rpc::new_client(kept.clone());
        let stream = Chunks::of(&[b"abcdefgh", b"ij"]);
        block_on(push(stream.clone(), &sink));
        // Read to its end, nothing written, and not closed.
        assert!(stream.left.borrow().is_empty());
        assert!(kept.data.borrow().is_empty());
        assert!(!kept.closed.get());
    }
}
