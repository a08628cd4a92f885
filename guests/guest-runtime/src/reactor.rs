//! The pollables that parked futures wait on.
//!
//! An I/O object owns a [`Registration`]: a slot in this thread's reactor
//! holding the object's pollable (created on first park and reused after) and
//! the waker of the task that waits on it. When the executor runs out of work
//! it calls [`wait`], which blocks in `wasi:io/poll` on every slot somebody
//! waits on and wakes those that became ready.
//!
//! A pollable is a child resource of the stream it came from, and dropping a
//! stream while one of its pollables is alive traps. Dropping a
//! `Registration` drops its pollable, so an I/O object declares its
//! registration before its stream: fields drop in declaration order.

use std::cell::RefCell;
use std::task::Waker;

use crate::bindings::wasi::io::poll::{poll, Pollable};

#[derive(Default)]
struct Slot {
    pollable: Option<Pollable>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Reactor {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

thread_local! {
    static REACTOR: RefCell<Reactor> = RefCell::default();
}

/// An I/O object's slot in the reactor.
pub(crate) struct Registration {
    index: usize,
}

impl Registration {
    pub(crate) fn new() -> Self {
        let index = REACTOR.with_borrow_mut(|reactor| match reactor.free.pop() {
            Some(index) => {
                reactor.slots[index] = Some(Slot::default());
                index
            }
            None => {
                reactor.slots.push(Some(Slot::default()));
                reactor.slots.len() - 1
            }
        });
        Self { index }
    }

    /// Wakes `waker` once the pollable made by `subscribe` is ready. The
    /// pollable is made on the first call and kept for the next ones.
    pub(crate) fn park(&self, subscribe: impl FnOnce() -> Pollable, waker: &Waker) {
        REACTOR.with_borrow_mut(|reactor| {
            let slot = reactor.slots[self.index]
                .as_mut()
                .expect("a live registration has a slot");
            if slot.pollable.is_none() {
                slot.pollable = Some(subscribe());
            }
            match &mut slot.waker {
                Some(parked) => parked.clone_from(waker),
                None => slot.waker = Some(waker.clone()),
            }
        });
    }

    /// Withdraws interest after the I/O made progress without waiting, so
    /// that a stale slot neither causes spurious wake-ups nor hides a
    /// deadlock.
    pub(crate) fn unpark(&self) {
        REACTOR.with_borrow_mut(|reactor| {
            if let Some(slot) = reactor.slots[self.index].as_mut() {
                slot.waker = None;
            }
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // During thread teardown the reactor may already be gone, and its
        // pollables with it.
        let _ = REACTOR.try_with(|reactor| {
            let mut reactor = reactor.borrow_mut();
            let slot = reactor.slots[self.index].take();
            reactor.free.push(self.index);
            slot
        });
    }
}

/// Nothing is parked: waiting would block forever.
#[derive(Debug)]
pub(crate) struct NothingParked;

/// Blocks until at least one parked pollable is ready and wakes the tasks
/// waiting on the ready ones.
pub(crate) fn wait() -> Result<(), NothingParked> {
    let ready: Vec<Waker> = REACTOR.with_borrow_mut(|reactor| {
        let parked: Vec<(usize, &Pollable)> = reactor
            .slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| match slot {
                Some(Slot {
                    pollable: Some(pollable),
                    waker: Some(_),
                }) => Some((index, pollable)),
                _ => None,
            })
            .collect();
        if parked.is_empty() {
            return Err(NothingParked);
        }
        let pollables: Vec<&Pollable> = parked.iter().map(|(_, p)| *p).collect();
        let ready_indices = poll(&pollables);
        let ready_slots: Vec<usize> = ready_indices
            .into_iter()
            .map(|i| parked[i as usize].0)
            .collect();
        Ok(ready_slots
            .into_iter()
            .filter_map(|index| reactor.slots[index].as_mut()?.waker.take())
            .collect())
    })?;
    // Woken outside the borrow: a waker may run code that parks again.
    for waker in ready {
        waker.wake();
    }
    Ok(())
}
