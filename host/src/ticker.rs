//! The epoch ticker: the thread that advances the wasmtime engine's epoch
//! while guests run.
//!
//! The epoch is what makes a computing guest yield (kill, deadline, CPU
//! budget, fairness); a guest that waits for I/O needs no tick. So the
//! ticker thread parks once no guest has been polled for [`IDLE_TICKS`]
//! ticks, and the next guest to be polled wakes it: an idle host makes no
//! wake-ups at all instead of a thousand a second. It does not park at the
//! first idle moment: a guest answering calls is polled briefly many times
//! a millisecond, and waking a parked thread each time would cost a system
//! call per call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::Engine;

/// Advances an engine's epoch every tick while guests run, and sleeps while
/// none does. Stopped and joined when dropped.
pub struct EpochTicker {
    shared: Arc<TickerState>,
    thread: Option<JoinHandle<()>>,
}

/// Idle ticks after which the ticker parks.
const IDLE_TICKS: u64 = 100;

#[derive(Default)]
struct TickerState {
    stop: AtomicBool,
    /// Guests being polled right now.
    active: AtomicU64,
    /// Polls so far, to tell an idle stretch from a busy one.
    polls: AtomicU64,
    /// The ticker is parked (or about to): the next poll wakes it.
    parked: AtomicBool,
    /// Epochs advanced so far.
    ticks: AtomicU64,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochTicker {
    /// A thread advancing `engine`'s epoch every `tick` while guests are
    /// polled under [`EpochTicker::ticking`].
    pub fn start(engine: Engine, tick: Duration) -> EpochTicker {
        let shared = Arc::new(TickerState::default());
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("capsa-epoch".into())
            .spawn(move || {
                let mut idle = 0u64;
                let mut seen = state.polls.load(Ordering::SeqCst);
                while !state.stop.load(Ordering::SeqCst) {
                    let polls = state.polls.load(Ordering::SeqCst);
                    let busy = polls != seen || state.active.load(Ordering::SeqCst) > 0;
                    seen = polls;
                    idle = if busy { 0 } else { idle + 1 };
                    if idle > IDLE_TICKS {
                        // Announce the park, then look again: a poll that
                        // began meanwhile either is seen here or sees
                        // `parked` and unparks (both sides are SeqCst).
                        state.parked.store(true, Ordering::SeqCst);
                        if state.active.load(Ordering::SeqCst) == 0
                            && state.polls.load(Ordering::SeqCst) == seen
                            && !state.stop.load(Ordering::SeqCst)
                        {
                            std::thread::park();
                        }
                        state.parked.store(false, Ordering::SeqCst);
                        idle = 0;
                        continue;
                    }
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                    state.ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
            .expect("spawning the epoch thread");
        let _ = shared.thread.set(thread.thread().clone());
        EpochTicker {
            shared,
            thread: Some(thread),
        }
    }

    /// `guest` polled under the ticker: while it runs, epochs advance.
    pub fn ticking<F: std::future::Future>(&self, guest: F) -> Ticking<F> {
        Ticking {
            guest,
            state: self.shared.clone(),
        }
    }

    /// Epochs advanced so far.
    pub fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// A guest's future, counted as running while it is polled.
    pub struct Ticking<F> {
        #[pin]
        guest: F,
        state: Arc<TickerState>,
    }
}

impl<F: std::future::Future> std::future::Future for Ticking<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let state = &**this.state;
        state.active.fetch_add(1, Ordering::SeqCst);
        state.polls.fetch_add(1, Ordering::SeqCst);
        if state.parked.swap(false, Ordering::SeqCst) {
            if let Some(thread) = state.thread.get() {
                thread.unpark();
            }
        }
        let result = this.guest.poll(cx);
        state.active.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticker_sleeps_while_no_guest_runs() {
        let ticker = EpochTicker::start(Engine::default(), Duration::from_millis(1));
        let idle_for = |ms| {
            std::thread::sleep(Duration::from_millis(ms));
            ticker.ticks()
        };
        // Past the idle stretch the ticker parks: no more epochs.
        let parked = idle_for(IDLE_TICKS * 3);
        assert_eq!(idle_for(300), parked, "an idle ticker kept ticking");
        // A guest being polled wakes it; a long poll (a computing guest)
        // keeps it ticking.
        let busy = ticker.ticking(async {
            std::thread::sleep(Duration::from_millis(50));
        });
        futures::executor::block_on(busy);
        assert!(ticker.ticks() > parked, "a polled guest got no ticks");
        drop(ticker);
    }
}
