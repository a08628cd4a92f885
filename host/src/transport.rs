//! Flow control for every RPC connection the host serves to something it
//! does not trust: a guest's stdio, a `capsa serve` socket, a microVM's
//! agent.
//!
//! capnp-rpc's two-party network reads the peer's messages as fast as they
//! come and queues the replies without bound, so a peer that pipelines calls
//! and never reads its replies grows the host for ever. [`bounded`] wraps
//! that network with two rules, checked before each incoming message is
//! read:
//!
//! - while more than [`FlowLimits::queued_bytes`] of outgoing messages wait
//!   to be written, the host stops reading from the peer (back-pressure: the
//!   peer blocks on its own writes);
//! - a peer may have at most [`FlowLimits::open_calls`] questions open:
//!   `Call` and `Bootstrap` messages whose answer the host still keeps,
//!   that is, not yet `Finish`ed by the peer nor answered with a `Return`
//!   that needs no `Finish` (capnp-rpc sends those for results without
//!   capabilities). Past the limit the connection is ended with an error
//!   that says so. The open questions are kept by id, so `Finish` messages
//!   for questions never asked cannot wind the count down.
//!
//! Both rules act on this one connection only: other guests and clients keep
//! being served. When reading fails (a bad message, a broken limit), the
//! replies still queued are dropped rather than flushed: a peer that does
//! not read would otherwise hold the connection open for ever, because
//! capnp-rpc's shutdown waits for the write queue to drain.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp::capability::Promise;
use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp_rpc::rpc_capnp::message;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, Connection, IncomingMessage, OutgoingMessage, VatNetwork};
use capsa_schema::rpc::SmallFirstSegments;
use futures::{AsyncRead, AsyncWrite, FutureExt, TryFutureExt};

/// What one connection may hold in the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    /// Bytes of outgoing messages waiting to be written above which the
    /// host stops reading from the peer.
    pub queued_bytes: usize,
    /// Questions the peer may have open at once.
    pub open_calls: u32,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            queued_bytes: 4 << 20,
            open_calls: 16_384,
        }
    }
}

/// A two-party network on `reader`/`writer` under `limits`.
pub fn bounded<R, W>(reader: R, writer: W, side: Side, limits: FlowLimits) -> Bounded<R>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let flow = Rc::new(RefCell::new(Flow {
        limits,
        blocked_reader: None,
        queued_bytes: 0,
        open_calls: HashSet::new(),
        aborted: false,
        blocked_writer: None,
        failure: None,
    }));
    let writer = Abortable {
        inner: writer,
        flow: flow.clone(),
    };
    Bounded {
        inner: SmallFirstSegments(twoparty::VatNetwork::new(
            reader,
            writer,
            side,
            ReaderOptions::new(),
        )),
        flow,
    }
}

/// A [`twoparty::VatNetwork`] under [`FlowLimits`].
pub struct Bounded<R: AsyncRead + Unpin + 'static> {
    inner: SmallFirstSegments<twoparty::VatNetwork<R>>,
    flow: Rc<RefCell<Flow>>,
}

impl<R: AsyncRead + Unpin + 'static> Bounded<R> {
    /// A handle that tells, once the connection has ended, whether it
    /// failed and why. capnp-rpc's `RpcSystem` resolves `Ok` even when
    /// reading failed, so this is the way to learn it.
    pub fn outcome(&self) -> Outcome {
        Outcome(self.flow.clone())
    }
}

/// See [`Bounded::outcome`].
pub struct Outcome(Rc<RefCell<Flow>>);

impl Outcome {
    /// `result` (what the `RpcSystem` resolved to), or the reason reading
    /// failed if it said nothing of it.
    pub fn of(&self, result: Result<(), capnp::Error>) -> Result<(), capnp::Error> {
        match (result, self.0.borrow().failure.clone()) {
            (Ok(()), Some(why)) => Err(why),
            (result, _) => result,
        }
    }
}

/// The accounting shared by the connection's reader and its messages.
struct Flow {
    limits: FlowLimits,
    /// Bytes of messages handed to the write queue and not yet written:
    /// each message adds its exact serialized size, every write through
    /// [`Abortable`] takes off what it wrote.
    queued_bytes: usize,
    /// The reader's waker while it waits for the queue to drain.
    blocked_reader: Option<Waker>,
    /// Ids of the peer's questions whose answers the host keeps.
    open_calls: HashSet<u32>,
    /// Set once reading failed: every later write fails.
    aborted: bool,
    /// The write queue's waker while the peer is not reading.
    blocked_writer: Option<Waker>,
    /// Why reading failed, first reason only.
    failure: Option<capnp::Error>,
}

impl Flow {
    fn abort(&mut self, why: capnp::Error) {
        self.aborted = true;
        self.failure.get_or_insert(why);
        if let Some(waker) = self.blocked_writer.take() {
            waker.wake();
        }
    }

    /// True while the queue is over the limit; a write that brings it
    /// back under then wakes `cx`.
    fn over_limit(&mut self, cx: &mut Context<'_>) -> bool {
        let over = self.queued_bytes > self.limits.queued_bytes;
        if over {
            self.blocked_reader = Some(cx.waker().clone());
        }
        over
    }

    /// Follows the questions an incoming `message` opens or closes.
    fn observe(&mut self, message: &dyn IncomingMessage) -> Result<(), capnp::Error> {
        let Ok(body) = message.get_body() else {
            return Ok(());
        };
        let Ok(message) = body.get_as::<message::Reader>() else {
            return Ok(());
        };
        let opened = match message.which() {
            Ok(message::Call(Ok(call))) => Some(call.get_question_id()),
            Ok(message::Bootstrap(Ok(bootstrap))) => Some(bootstrap.get_question_id()),
            Ok(message::Finish(Ok(finish))) => {
                self.open_calls.remove(&finish.get_question_id());
                None
            }
            _ => None,
        };
        if let Some(question) = opened {
            self.open_calls.insert(question);
            if self.open_calls.len() > self.limits.open_calls as usize {
                return Err(capnp::Error::failed(format!(
                    "the peer has more than {} calls open at once (calls it has not \
                         finished); the connection is closed",
                    self.limits.open_calls
                )));
            }
        }
        Ok(())
    }

    /// Forgets the question an outgoing `Return` ends for good.
    fn answered(&mut self, message: &dyn OutgoingMessage) {
        let Ok(body) = message.get_body_as_reader() else {
            return;
        };
        let Ok(message) = body.get_as::<message::Reader>() else {
            return;
        };
        if let Ok(message::Return(Ok(ret))) = message.which() {
            if ret.get_no_finish_needed() {
                self.open_calls.remove(&ret.get_answer_id());
            }
        }
    }
}

impl<R: AsyncRead + Unpin + 'static> VatNetwork<Side> for Bounded<R> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn Connection<Side>>> {
        let inner = self.inner.connect(host_id)?;
        Some(Box::new(BoundedConnection {
            inner,
            flow: self.flow.clone(),
        }))
    }

    fn accept(&mut self) -> Promise<Box<dyn Connection<Side>>, capnp::Error> {
        let flow = self.flow.clone();
        Promise::from_future(self.inner.accept().map_ok(move |inner| {
            Box::new(BoundedConnection { inner, flow }) as Box<dyn Connection<Side>>
        }))
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
        self.inner.drive_until_shutdown()
    }
}

struct BoundedConnection {
    inner: Box<dyn Connection<Side>>,
    flow: Rc<RefCell<Flow>>,
}

impl Connection<Side> for BoundedConnection {
    fn get_peer_vat_id(&self) -> Side {
        self.inner.get_peer_vat_id()
    }

    fn new_outgoing_message(&mut self, first_segment_word_size: u32) -> Box<dyn OutgoingMessage> {
        Box::new(Counted {
            inner: self.inner.new_outgoing_message(first_segment_word_size),
            flow: self.flow.clone(),
        })
    }

    fn receive_incoming_message(
        &mut self,
    ) -> Promise<Option<Box<dyn IncomingMessage>>, capnp::Error> {
        let flow = self.flow.clone();
        let mut read = self.inner.receive_incoming_message();
        let mut reading = false;
        Promise::from_future(async move {
            // Keep forgetting written messages while the read waits, so the
            // list stays as short as the write queue.
            let received = futures::future::poll_fn(|cx| {
                let over = flow.borrow_mut().over_limit(cx);
                if over && !reading {
                    return Poll::Pending;
                }
                reading = true;
                read.poll_unpin(cx)
            })
            .await;
            let mut flow = flow.borrow_mut();
            let observed = match &received {
                Ok(Some(message)) => flow.observe(message.as_ref()),
                Ok(None) => Ok(()),
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = observed {
                flow.abort(e.clone());
                return Err(e);
            }
            received
        })
    }

    fn new_stream(
        &mut self,
    ) -> (
        Box<dyn capnp_rpc::FlowController>,
        Promise<(), capnp::Error>,
    ) {
        self.inner.new_stream()
    }

    fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), capnp::Error> {
        self.inner.shutdown(result)
    }
}

/// The connection's writer, failing every write once reading has failed.
struct Abortable<W> {
    inner: W,
    flow: Rc<RefCell<Flow>>,
}

impl<W> Abortable<W> {
    fn check(&self) -> Result<(), io::Error> {
        if self.flow.borrow().aborted {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection failed; its unsent replies are dropped",
            ));
        }
        Ok(())
    }

    /// Keeps the write queue's waker while the peer is not reading, so an
    /// abort can end the wait.
    fn note_blocked<T>(&self, result: &Poll<T>, cx: &Context<'_>) {
        if result.is_pending() {
            self.flow.borrow_mut().blocked_writer = Some(cx.waker().clone());
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Abortable<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_blocked(&written, cx);
        if let Poll::Ready(Ok(n)) = written {
            let mut flow = self.flow.borrow_mut();
            flow.queued_bytes = flow.queued_bytes.saturating_sub(n);
            if flow.queued_bytes <= flow.limits.queued_bytes {
                if let Some(reader) = flow.blocked_reader.take() {
                    reader.wake();
                }
            }
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_blocked(&flushed, cx);
        flushed
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// An outgoing message whose bytes count as queued until it is written.
struct Counted {
    inner: Box<dyn OutgoingMessage>,
    flow: Rc<RefCell<Flow>>,
}

impl OutgoingMessage for Counted {
    fn get_body(&mut self) -> capnp::Result<capnp::any_pointer::Builder<'_>> {
        self.inner.get_body()
    }

    fn get_body_as_reader(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.inner.get_body_as_reader()
    }

    fn send(self: Box<Self>) -> (Promise<(), capnp::Error>, Rc<Builder<HeapAllocator>>) {
        self.flow.borrow_mut().answered(self.inner.as_ref());
        let (written, message) = self.inner.send();
        let bytes = capnp::serialize::compute_serialized_size_in_words(&message).saturating_mul(8);
        let mut flow = self.flow.borrow_mut();
        flow.queued_bytes = flow.queued_bytes.saturating_add(bytes);
        (written, message)
    }

    fn take(self: Box<Self>) -> Builder<HeapAllocator> {
        self.inner.take()
    }

    fn size_in_words(&self) -> usize {
        self.inner.size_in_words()
    }
}
