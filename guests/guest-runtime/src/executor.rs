//! A single-threaded executor that sleeps in `wasi:io/poll`.
//!
//! [`block_on`] polls one future (a guest combines its work into one with
//! `select`/`join`; the RPC system runs its own tasks inside it). When the
//! future is pending and nothing woke it, the thread blocks in the reactor
//! until some parked I/O is ready. There is no busy loop: with no runnable
//! work and no parked I/O the guest can never continue, which is reported as
//! [`Error::Deadlock`] instead.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::{reactor, Error};

/// Remembers that the future asked to be polled again.
#[derive(Default)]
struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `future` to completion on this thread.
pub fn block_on<F: Future>(future: F) -> Result<F::Output, Error> {
    let mut future = pin!(future);
    let flag = Arc::new(WakeFlag::default());
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    loop {
        flag.0.store(false, Ordering::Release);
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Ok(output);
        }
        if flag.0.load(Ordering::Acquire) {
            continue;
        }
        reactor::wait().map_err(|reactor::NothingParked| Error::Deadlock)?;
    }
}
