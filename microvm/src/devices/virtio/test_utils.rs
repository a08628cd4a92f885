//! Test helpers: a guest-side view of a split virtqueue that writes
//! descriptors and the available ring into guest memory the way a Linux
//! driver does, and a tiny deterministic PRNG for randomized tests.
#![cfg(test)]

use std::cell::Cell;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;

/// xorshift64*: seeded, deterministic, good enough for test inputs.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One split-ring descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }
}

/// The driver's side of one split virtqueue living in guest memory.
pub struct TestQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: Cell<u16>,
    avail_idx: Cell<u16>,
    used_seen: Cell<u16>,
}

impl TestQueue {
    /// Lays a queue out at `base` and zeroes it.
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(base.0 + 16 * u64::from(size));
        let used_unaligned = avail.0 + 6 + 2 * u64::from(size);
        let used = GuestAddress((used_unaligned + 3) & !3);
        let total = used.0 + 6 + 8 * u64::from(size) - base.0;
        mem.write_slice(&vec![0u8; total as usize], base).unwrap();
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: Cell::new(0),
            avail_idx: Cell::new(0),
            used_seen: Cell::new(0),
        }
    }

    pub fn set_desc(&self, mem: &GuestMemoryMmap, index: u16, d: Desc) {
        let at = GuestAddress(self.desc.0 + 16 * u64::from(index));
        mem.write_obj(d.addr.to_le(), at).unwrap();
        mem.write_obj(d.len.to_le(), GuestAddress(at.0 + 8))
            .unwrap();
        mem.write_obj(d.flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        mem.write_obj(d.next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// Puts `head` in the available ring and bumps `idx`.
    pub fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx.get();
        let slot = GuestAddress(self.avail.0 + 4 + 2 * u64::from(idx % self.size));
        mem.write_obj(head.to_le(), slot).unwrap();
        let idx = idx.wrapping_add(1);
        mem.write_obj(idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
        self.avail_idx.set(idx);
    }

    /// Writes `descs` as one chain at consecutive free indices (rewriting
    /// their `next` fields) and publishes it; returns the head index.
    pub fn add_chain(&self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let n = descs.len() as u16;
        let head = self.next_desc.get() % self.size;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= F_NEXT;
                d.next = (index + 1) % self.size;
            } else {
                d.flags &= !F_NEXT;
            }
            self.set_desc(mem, index, d);
        }
        self.next_desc.set(head.wrapping_add(n) % self.size);
        self.publish(mem, head);
        head
    }

    /// Writes `descs` verbatim at indices 0.. and publishes index 0.
    pub fn add_chain_raw(&self, mem: &GuestMemoryMmap, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            self.set_desc(mem, i as u16, *d);
        }
        self.publish(mem, 0);
    }

    /// A device-side queue configured to match (as the MMIO transport would).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap())
    }

    /// Used elements the device added since the last call: `(id, len)`.
    pub fn take_used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen.get() != end {
            let i = self.used_seen.get();
            let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(i % self.size));
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen.set(i.wrapping_add(1));
        }
        out
    }
}
