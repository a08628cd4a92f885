//! What a guest may take of the host, counted where it is taken, and the
//! tokens that give it back when they are dropped.
//!
//! Three bounds hold at once for every guest (a WASM cell or a machine):
//!
//! - its Executor's live-children quota ([`Slot`]);
//! - its client's [`Share`] of the host, at every nesting level together
//!   (a [`Seat`] in the client's [`ClientQuota`]): guests alive, and guest
//!   memory as it grows ([`MemoryShare`]);
//! - for machines, the host's total of machine memory ([`VmMemory`]).
//!
//! A [`Slot`] and a [`Seat`] count the same guest in two places: the Slot
//! in the Executor that started it (its live children), the Seat in the
//! client behind that Executor (its share, at every nesting level). A
//! guest started through an Executor holds a Slot, and the Slot holds the
//! guest's Seat; neither is held alone. The host-wide count of live guests
//! (`max_cells`, WASM cells and machines alike) is the spawner's
//! registry's length.

use std::cell::Cell as Count;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{ShareExceeded, SpawnError};

/// What one client may hold of the host at once, all its processes at every
/// nesting level together, so that one client cannot lock the others out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Guests alive at once (WASM cells and machines).
    pub cells: u32,
    /// Bytes of guest memory: WASM memories and tables as they grow, and
    /// each machine's RAM from boot to teardown.
    pub memory_bytes: u64,
}

/// A memory budget several guests draw on; shared with each guest's
/// memory limiter, which runs wherever its store does.
#[derive(Debug)]
pub struct MemoryShare {
    limit: u64,
    used: AtomicU64,
}

impl MemoryShare {
    pub fn new(limit: u64) -> MemoryShare {
        MemoryShare {
            limit,
            used: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `bytes` if they fit.
    pub fn take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken before.
    pub fn give(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// The guests and guest memory one client holds, at every nesting level
/// together; bounded by its [`Share`] if it has one.
#[derive(Default)]
pub(crate) struct ClientQuota {
    /// Guests alive or starting.
    guests: Count<u32>,
    share: Option<(u32, Arc<MemoryShare>)>,
}

impl ClientQuota {
    /// A client bounded by `share`.
    pub(crate) fn with_share(share: Share) -> ClientQuota {
        ClientQuota {
            guests: Count::new(0),
            share: Some((share.cells, Arc::new(MemoryShare::new(share.memory_bytes)))),
        }
    }

    /// A seat for one more guest, or a refusal once the share's guests are
    /// all alive.
    pub(crate) fn seat(self: &Rc<Self>) -> Result<Seat, SpawnError> {
        if let Some((cells, _)) = &self.share {
            if self.guests.get() >= *cells {
                return Err(ShareExceeded::Guests(*cells).into());
            }
        }
        self.guests.set(self.guests.get() + 1);
        Ok(Seat {
            quota: self.clone(),
            memory: 0,
        })
    }
}

/// One guest of a client, and the machine memory it took; both are given
/// back when it is dropped (when the guest has ended). Held inside the
/// guest's [`Slot`].
pub(crate) struct Seat {
    quota: Rc<ClientQuota>,
    memory: u64,
}

impl Seat {
    /// Takes `bytes` of the client's memory for a machine's RAM.
    pub(crate) fn take_memory(&mut self, bytes: u64) -> Result<(), SpawnError> {
        if let Some((_, memory)) = &self.quota.share {
            if !memory.take(bytes) {
                return Err(ShareExceeded::Memory {
                    asked_mib: bytes >> 20,
                    limit_mib: memory.limit() >> 20,
                }
                .into());
            }
            self.memory = self.memory.saturating_add(bytes);
        }
        Ok(())
    }

    /// The budget the guest's memory limiter draws on.
    pub(crate) fn memory_share(&self) -> Option<Arc<MemoryShare>> {
        self.quota.share.as_ref().map(|(_, m)| m.clone())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let quota = &self.quota;
        quota.guests.set(quota.guests.get().saturating_sub(1));
        if let Some((_, memory)) = &quota.share {
            memory.give(self.memory);
        }
    }
}

/// One live child counted against its Executor (`live`) and, through its
/// [`Seat`], its client; both released when dropped.
pub(crate) struct Slot {
    live: Rc<Count<u32>>,
    seat: Seat,
}

impl Slot {
    /// Counts one more child in `live`, holding `seat`.
    pub(crate) fn new(live: Rc<Count<u32>>, seat: Seat) -> Slot {
        live.set(live.get() + 1);
        Slot { live, seat }
    }

    /// Takes a machine's RAM from the client's memory share.
    pub(crate) fn take_memory(&mut self, bytes: u64) -> Result<(), SpawnError> {
        self.seat.take_memory(bytes)
    }

    /// The budget the guest's memory limiter draws on.
    pub(crate) fn memory_share(&self) -> Option<Arc<MemoryShare>> {
        self.seat.memory_share()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.live.set(self.live.get().saturating_sub(1));
    }
}

/// One machine's memory, counted against the host's total for machines
/// from boot to teardown (or to a failed boot).
pub(crate) struct VmMemory {
    in_use: Rc<Count<u64>>,
    mib: u64,
}

impl VmMemory {
    /// `total` unset is this machine's RAM (unbounded if unknown).
    pub(crate) fn take(
        in_use: &Rc<Count<u64>>,
        mib: u64,
        total: Option<u64>,
    ) -> Result<VmMemory, SpawnError> {
        let total = total
            .or_else(|| machine_memory_bytes().map(|b| b >> 20))
            .unwrap_or(u64::MAX);
        let used = in_use.get();
        if used.saturating_add(mib) > total {
            return Err(SpawnError::VmMemoryFull {
                asked: mib,
                in_use: used,
                total,
            });
        }
        in_use.set(used + mib);
        Ok(VmMemory {
            in_use: in_use.clone(),
            mib,
        })
    }
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        self.in_use.set(self.in_use.get().saturating_sub(self.mib));
    }
}

/// This machine's RAM, from `/proc/meminfo`.
pub(crate) fn machine_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}
