//! Descriptor-chain parsing.
//!
//! A chain popped from a queue is entirely guest-controlled: addresses,
//! lengths, flags and links. [`ParsedChain::parse`] walks it once (the
//! `virtio-queue` iterator already bounds the walk by the queue size and
//! refuses indirect tables inside indirect tables) and checks what the
//! devices rely on afterwards: every segment lies inside guest memory,
//! device-readable segments come before device-writable ones, and the totals
//! fit in 32 bits. Devices then copy through [`ParsedChain::read_at`] and
//! [`ParsedChain::write_at`], which cannot reach outside the segments.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A chain the device refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain has more than 2^32 - 1 bytes in one direction.
    #[error("descriptor chain longer than 4 GiB")]
    TooLong,
    /// The chain has no descriptors (its head could not be read).
    #[error("empty descriptor chain")]
    Empty,
    /// Guest memory access failed.
    #[error("guest memory access failed")]
    Memory,
}

/// One guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated descriptor chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedChain {
    /// Index of the head descriptor, returned in the used ring.
    pub head: u16,
    /// Device-readable segments, in order.
    pub readable: Vec<Segment>,
    /// Device-writable segments, in order.
    pub writable: Vec<Segment>,
    /// Total bytes in `readable`.
    pub readable_len: u64,
    /// Total bytes in `writable`.
    pub writable_len: u64,
}

impl ParsedChain {
    /// Walks and validates `chain`.
    pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Self, ChainError>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let mut parsed = ParsedChain {
            head: chain.head_index(),
            ..Default::default()
        };
        let mem: GuestMemoryMmap = chain.memory().clone();
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize) {
                return Err(ChainError::OutOfBounds {
                    addr: seg.addr.0,
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                parsed.writable_len += u64::from(seg.len);
                parsed.writable.push(seg);
            } else {
                if !parsed.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                parsed.readable_len += u64::from(seg.len);
                parsed.readable.push(seg);
            }
            if parsed.readable_len > u64::from(u32::MAX)
                || parsed.writable_len > u64::from(u32::MAX)
            {
                return Err(ChainError::TooLong);
            }
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        Ok(parsed)
    }

    /// Copies device-readable bytes starting `offset` bytes into the chain
    /// into `buf`; returns how many were copied.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, ChainError> {
        copy_segments(&self.readable, offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
                .map_err(|_| ChainError::Memory)
        })
    }

    /// Copies `data` into the device-writable part of the chain starting
    /// `offset` bytes in; returns how many bytes fit.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, ChainError> {
        copy_segments(&self.writable, offset, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr)
                .map_err(|_| ChainError::Memory)
        })
    }
}

/// Walks `segs` from byte `offset`, calling `f(guest_addr, buf_range)` for
/// each piece of a `len`-byte transfer.
fn copy_segments(
    segs: &[Segment],
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
) -> Result<usize, ChainError> {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = usize::try_from(seg_len - offset)
            .unwrap_or(usize::MAX)
            .min(len - done);
        // Within the segment, which `parse` checked lies in guest memory.
        let addr = GuestAddress(seg.addr.0 + offset);
        f(addr, done..done + n)?;
        done += n;
        offset = 0;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{Desc, TestQueue, XorShift, F_NEXT, F_WRITE};
    use virtio_queue::QueueT;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn parse_one(mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<Result<ParsedChain, ChainError>> {
        let tq = TestQueue::new(mem, GuestAddress(0x1000), 16);
        tq.add_chain_raw(mem, descs);
        let mut q = tq.queue();
        q.pop_descriptor_chain(mem).map(ParsedChain::parse)
    }

    #[test]
    fn parses_readable_then_writable() {
        let m = mem();
        let c = parse_one(
            &m,
            &[
                Desc::new(0x4000, 44, F_NEXT, 1),
                Desc::new(0x5000, 100, F_NEXT | F_WRITE, 2),
                Desc::new(0x6000, 50, F_WRITE, 0),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.readable_len, 44);
        assert_eq!(c.writable_len, 150);
        let data: Vec<u8> = (0..150u8).collect();
        assert_eq!(c.write_at(&m, 0, &data).unwrap(), 150);
        let mut back = [0u8; 50];
        m.read_slice(&mut back, GuestAddress(0x6000)).unwrap();
        assert_eq!(&back[..], &data[100..]);
        // Writing past the end stops at the end.
        assert_eq!(c.write_at(&m, 140, &data).unwrap(), 10);
    }

    #[test]
    fn rejects_out_of_bounds_and_misordered() {
        let m = mem();
        assert!(matches!(
            parse_one(&m, &[Desc::new(0xfff0, 0x20, 0, 0)]).unwrap(),
            Err(ChainError::OutOfBounds { .. })
        ));
        assert_eq!(
            parse_one(
                &m,
                &[
                    Desc::new(0x4000, 4, F_WRITE | F_NEXT, 1),
                    Desc::new(0x5000, 4, 0, 0)
                ]
            )
            .unwrap(),
            Err(ChainError::ReadableAfterWritable)
        );
    }

    #[test]
    fn loops_are_bounded() {
        let m = mem();
        // Descriptor 0 links to itself forever.
        let tq = TestQueue::new(&m, GuestAddress(0x1000), 16);
        tq.set_desc(&m, 0, Desc::new(0x4000, 8, F_NEXT, 0));
        tq.publish(&m, 0);
        let mut q = tq.queue();
        let c = ParsedChain::parse(q.pop_descriptor_chain(&m).unwrap()).unwrap();
        assert!(c.readable.len() <= 16);
    }

    /// Deterministic stand-in for the descriptor-chain fuzz target: random
    /// descriptor tables (random addresses, lengths, flags, links, indirect
    /// tables) never panic the parser, and whatever parses stays in bounds.
    #[test]
    fn random_chains_never_panic() {
        let m = mem();
        let mut rng = XorShift::new(0xc4a1_0002);
        for _ in 0..100_000 {
            let tq = TestQueue::new(&m, GuestAddress(0x1000), 8);
            for i in 0..8u16 {
                let addr = if rng.next() % 4 == 0 {
                    rng.next()
                } else {
                    rng.next() % 0x11000
                };
                let d = Desc::new(
                    addr,
                    (rng.next() % 0x3000) as u32,
                    (rng.next() % 8) as u16,
                    (rng.next() % 10) as u16,
                );
                tq.set_desc(&m, i, d);
            }
            tq.publish(&m, (rng.next() % 10) as u16);
            let mut q = tq.queue();
            if let Some(chain) = q.pop_descriptor_chain(&m) {
                if let Ok(c) = ParsedChain::parse(chain) {
                    let mut buf = vec![0u8; 64];
                    let _ = c.read_at(&m, rng.next() % 0x100, &mut buf).unwrap();
                    let _ = c.write_at(&m, rng.next() % 0x100, &buf).unwrap();
                }
            }
        }
    }
}
