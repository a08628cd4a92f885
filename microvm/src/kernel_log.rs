//! The guest kernel's log, read from guest memory.
//!
//! A guest that stops answering often says why in its kernel log, and the
//! console does not show it: capsa's kernel runs `quiet`, so only warnings
//! and worse reach the serial port, and a stalled guest cannot be asked for
//! `dmesg`. The kernel keeps every record in its printk ring buffer
//! whatever the console's level, so the VMM reads that ring straight out of
//! guest memory. It needs the address of the kernel's `prb` variable (the
//! ring in use), which the `vmlinux`'s symbol table gives; a `bzImage` has
//! none, and then there is no kernel log to read.
//!
//! The layout read is Linux 6.1's `kernel/printk/printk_ringbuffer.h` on
//! x86-64 (the kernel capsa builds). Nothing read is trusted: every record
//! is checked against its descriptor (id, state, data block bounds, the
//! block's own id) and a record that does not check out is skipped, so a
//! kernel of another layout yields no records or an error, never a wrong
//! record in bounds-checked reads.

use std::fs::File;
use std::path::Path;

use object::{Object, ObjectSymbol};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::KernelImage;

/// Where the kernel's own image is mapped (`__START_KERNEL_map`): a
/// non-relocatable kernel loaded at its physical start sits at this offset
/// from its physical address.
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The direct map of all physical memory (`page_offset_base` without
/// KASLR), where a ring allocated at boot (`log_buf_len=`) lives.
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
/// The end of the direct map (64 TiB with 4-level paging).
const DIRECT_MAP_END: u64 = DIRECT_MAP + (64 << 40);

/// `struct printk_ringbuffer`'s fields, as offsets.
mod rb {
    pub const COUNT_BITS: u64 = 0;
    pub const DESCS: u64 = 8;
    pub const INFOS: u64 = 16;
    pub const HEAD_ID: u64 = 24;
    pub const TAIL_ID: u64 = 32;
    pub const SIZE_BITS: u64 = 48;
    pub const DATA: u64 = 56;
    /// `sizeof(struct prb_desc)`: state, then the text block's begin and
    /// next logical positions.
    pub const DESC_SIZE: u64 = 24;
    /// `sizeof(struct printk_info)`; `text_len` is its `u16` at 16 and
    /// the level the top three bits of the byte at 19.
    pub const INFO_SIZE: u64 = 88;
    pub const INFO_TEXT_LEN: u64 = 16;
    pub const INFO_LEVEL_BYTE: u64 = 19;
}

/// The state bits at the top of a descriptor's `state_var`.
const STATE_SHIFT: u32 = 62;
const ID_MASK: u64 = !(3 << STATE_SHIFT);
/// `desc_committed` and `desc_finalized`: a record whose text is whole.
const COMMITTED: u64 = 1;
const FINALIZED: u64 = 2;
/// The most descriptors or data a ring may claim before it is not believed
/// (the kernel's `log_buf_len` tops out at 2^25 bytes).
const MAX_BITS: u32 = 25;

/// The kernel log could not be read.
#[derive(Clone, Debug, Error)]
pub enum KernelLogError {
    /// The kernel file has no symbol table with `prb` (a `bzImage`, or a
    /// stripped `vmlinux`).
    #[error("the kernel has no `prb` symbol (a bzImage or a stripped vmlinux)")]
    NoSymbol,
    /// The kernel file could not be read for its symbols.
    #[error("reading the kernel's symbols: {0}")]
    Read(String),
    /// An address the ring points at is outside the kernel's mappings or
    /// guest memory.
    #[error("the printk ring points outside guest memory ({what} at {addr:#x})")]
    BadAddress {
        /// Which pointer.
        what: &'static str,
        /// Its value.
        addr: u64,
    },
    /// The ring's sizes are not those of a printk ring.
    #[error("the printk ring claims {what} of 2^{bits}: not a printk ring")]
    BadSize {
        /// Which size.
        what: &'static str,
        /// Its bit count.
        bits: u32,
    },
}

/// One record of the kernel log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The syslog level (0 emergency … 7 debug).
    pub level: u8,
    /// The message, without its newline.
    pub text: String,
}

/// The address of `name` in the symbol table of `kernel` (an ELF
/// `vmlinux`), if it has one.
pub fn kernel_symbol(kernel: &KernelImage, name: &str) -> Result<u64, KernelLogError> {
    let read = |e: &dyn std::fmt::Display| KernelLogError::Read(e.to_string());
    match kernel {
        KernelImage::Path(p) => symbol_in_file(p, name),
        KernelImage::Bytes(b) => {
            let file = object::File::parse(b.as_slice()).map_err(|e| read(&e))?;
            find(&file, name)
        }
    }
}

fn symbol_in_file(path: &Path, name: &str) -> Result<u64, KernelLogError> {
    let read = |e: &dyn std::fmt::Display| KernelLogError::Read(format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(|e| read(&e))?;
    // Reads only the headers, the symbol table and its strings, not the
    // whole image.
    let cache = object::ReadCache::new(file);
    let parsed = object::File::parse(&cache).map_err(|e| read(&e))?;
    find(&parsed, name)
}

fn find<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    name: &str,
) -> Result<u64, KernelLogError> {
    file.symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.address())
        .ok_or(KernelLogError::NoSymbol)
}

/// The guest-physical address of kernel virtual address `virt`.
fn physical(virt: u64, what: &'static str) -> Result<GuestAddress, KernelLogError> {
    match virt {
        v if v >= KERNEL_MAP => Ok(GuestAddress(v - KERNEL_MAP)),
        v if (DIRECT_MAP..DIRECT_MAP_END).contains(&v) => Ok(GuestAddress(v - DIRECT_MAP)),
        addr => Err(KernelLogError::BadAddress { what, addr }),
    }
}

fn read_u64(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    what: &'static str,
) -> Result<u64, KernelLogError> {
    mem.read_obj::<u64>(at)
        .map_err(|_| KernelLogError::BadAddress { what, addr: at.0 })
}

fn read_u32(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    what: &'static str,
) -> Result<u32, KernelLogError> {
    mem.read_obj::<u32>(at)
        .map_err(|_| KernelLogError::BadAddress { what, addr: at.0 })
}

/// Reads the kernel log whose ring `prb` (the kernel virtual address of
/// the `prb` pointer variable) names: the records from the oldest kept to
/// the newest, at most `max` of the newest.
pub fn read(mem: &GuestMemoryMmap, prb: u64, max: usize) -> Result<Vec<Record>, KernelLogError> {
    let ring = physical(read_u64(mem, physical(prb, "prb")?, "prb")?, "the ring")?;
    let at = |off: u64| GuestAddress(ring.0 + off);
    let count_bits = read_u32(mem, at(rb::COUNT_BITS), "the ring")?;
    let size_bits = read_u32(mem, at(rb::SIZE_BITS), "the ring")?;
    if count_bits > MAX_BITS {
        return Err(KernelLogError::BadSize {
            what: "descriptors",
            bits: count_bits,
        });
    }
    if !(3..=MAX_BITS).contains(&size_bits) {
        return Err(KernelLogError::BadSize {
            what: "text bytes",
            bits: size_bits,
        });
    }
    let descs = physical(read_u64(mem, at(rb::DESCS), "the ring")?, "descriptors")?;
    let infos = physical(read_u64(mem, at(rb::INFOS), "the ring")?, "infos")?;
    let data = physical(read_u64(mem, at(rb::DATA), "the ring")?, "text data")?;
    let head = read_u64(mem, at(rb::HEAD_ID), "the ring")? & ID_MASK;
    let tail = read_u64(mem, at(rb::TAIL_ID), "the ring")? & ID_MASK;
    let count = 1u64 << count_bits;
    let size = 1u64 << size_bits;

    // Ids count up (modulo the id space) from the tail to the head; more
    // than the descriptors a ring holds means the ids are not believed.
    let span = head.wrapping_sub(tail) & ID_MASK;
    if span >= count {
        return Ok(Vec::new());
    }
    if max == 0 {
        return Ok(Vec::new());
    }
    // At most `max` records, the newest.
    let first = match (max as u64).checked_sub(1) {
        Some(back) if back < span => head.wrapping_sub(back) & ID_MASK,
        _ => tail,
    };
    let mut out = Vec::new();
    let mut id = first;
    loop {
        if let Some(r) = record(mem, descs, infos, data, count, size, id) {
            out.push(r);
        }
        if id == head {
            break;
        }
        id = id.wrapping_add(1) & ID_MASK;
    }
    Ok(out)
}

/// Record `id`, if its descriptor says it is whole and its data block
/// checks out.
fn record(
    mem: &GuestMemoryMmap,
    descs: GuestAddress,
    infos: GuestAddress,
    data: GuestAddress,
    count: u64,
    size: u64,
    id: u64,
) -> Option<Record> {
    let index = id & (count - 1);
    let desc = GuestAddress(descs.0 + index * rb::DESC_SIZE);
    let state_var = mem.read_obj::<u64>(desc).ok()?;
    let state = state_var >> STATE_SHIFT;
    if state_var & ID_MASK != id || !(state == COMMITTED || state == FINALIZED) {
        return None;
    }
    let begin = mem.read_obj::<u64>(GuestAddress(desc.0 + 8)).ok()?;
    let next = mem.read_obj::<u64>(GuestAddress(desc.0 + 16)).ok()?;
    // A record without text keeps odd positions.
    if begin & 1 == 1 || next & 1 == 1 {
        return None;
    }
    let wraps = |lpos: u64| lpos / size;
    let (block, len) = if wraps(begin) == wraps(next) && begin < next {
        (begin % size, next - begin)
    } else if wraps(begin.wrapping_add(size)) == wraps(next) {
        // The block did not fit before the end: it starts at 0.
        (0, next % size)
    } else {
        return None;
    };
    if len < 8 || len > size - block {
        return None;
    }
    let block = GuestAddress(data.0 + block);
    if mem.read_obj::<u64>(block).ok()? != id {
        return None;
    }
    let info = GuestAddress(infos.0 + index * rb::INFO_SIZE);
    let text_len = u64::from(
        mem.read_obj::<u16>(GuestAddress(info.0 + rb::INFO_TEXT_LEN))
            .ok()?,
    );
    let level = mem
        .read_obj::<u8>(GuestAddress(info.0 + rb::INFO_LEVEL_BYTE))
        .ok()?
        >> 5;
    let n = text_len.min(len - 8) as usize;
    let mut text = vec![0u8; n];
    mem.read_slice(&mut text, GuestAddress(block.0 + 8)).ok()?;
    Some(Record {
        level,
        text: String::from_utf8_lossy(&text).trim_end().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a printk ring in guest memory as the kernel lays it out:
    /// the `prb` pointer at kernel address `PRB`, the ring behind it, and
    /// `records` written one after another from logical position `start`.
    struct Ring {
        mem: GuestMemoryMmap,
    }

    const PRB: u64 = KERNEL_MAP + 0x10_0000;
    const RING: u64 = KERNEL_MAP + 0x10_0100;
    const DESCS: u64 = KERNEL_MAP + 0x11_0000;
    const INFOS: u64 = KERNEL_MAP + 0x12_0000;
    const DATA: u64 = DIRECT_MAP + 0x13_0000;
    const COUNT_BITS: u32 = 4;
    const SIZE_BITS: u32 = 8;

    impl Ring {
        fn new(records: &[(u8, &str)], first_id: u64, start: u64) -> Ring {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
            let w = |addr: u64, v: u64| mem.write_obj(v, physical(addr, "").unwrap()).unwrap();
            w(PRB, RING);
            mem.write_obj(COUNT_BITS, physical(RING, "").unwrap())
                .unwrap();
            mem.write_obj(SIZE_BITS, physical(RING + rb::SIZE_BITS, "").unwrap())
                .unwrap();
            w(RING + rb::DESCS, DESCS);
            w(RING + rb::INFOS, INFOS);
            w(RING + rb::DATA, DATA);
            let size = 1u64 << SIZE_BITS;
            let count = 1u64 << COUNT_BITS;
            let mut lpos = start;
            for (i, (level, text)) in records.iter().enumerate() {
                let id = first_id + i as u64;
                let len = (8 + text.len() as u64 + 7) & !7;
                let mut begin = lpos;
                // A block that would cross the end starts again at 0.
                if begin % size + len > size {
                    begin = lpos;
                    lpos = (lpos / size + 1) * size;
                }
                let block = lpos % size;
                let next = lpos + len;
                let index = id & (count - 1);
                let desc = DESCS + index * rb::DESC_SIZE;
                w(desc, id | (FINALIZED << STATE_SHIFT));
                w(desc + 8, begin);
                w(desc + 16, next);
                w(DATA + block, id);
                mem.write_slice(text.as_bytes(), physical(DATA + block + 8, "").unwrap())
                    .unwrap();
                let info = INFOS + index * rb::INFO_SIZE;
                mem.write_obj(
                    text.len() as u16,
                    physical(info + rb::INFO_TEXT_LEN, "").unwrap(),
                )
                .unwrap();
                mem.write_obj(
                    level << 5,
                    physical(info + rb::INFO_LEVEL_BYTE, "").unwrap(),
                )
                .unwrap();
                lpos = next;
            }
            w(RING + rb::TAIL_ID, first_id);
            w(RING + rb::HEAD_ID, first_id + records.len() as u64 - 1);
            Ring { mem }
        }
    }

    fn texts(records: &[Record]) -> Vec<&str> {
        records.iter().map(|r| r.text.as_str()).collect()
    }

    #[test]
    fn records_are_read_oldest_first_with_their_levels() {
        let ring = Ring::new(
            &[(6, "Linux version 6.1"), (4, "a warning"), (7, "debug\n")],
            100,
            0,
        );
        let got = read(&ring.mem, PRB, 100).unwrap();
        assert_eq!(texts(&got), ["Linux version 6.1", "a warning", "debug"]);
        assert_eq!(got.iter().map(|r| r.level).collect::<Vec<_>>(), [6, 4, 7]);
    }

    #[test]
    fn only_the_newest_are_kept_when_asked_for_fewer() {
        let ring = Ring::new(&[(6, "one"), (6, "two"), (6, "three")], 7, 0);
        assert_eq!(texts(&read(&ring.mem, PRB, 2).unwrap()), ["two", "three"]);
        assert_eq!(texts(&read(&ring.mem, PRB, 1).unwrap()), ["three"]);
    }

    #[test]
    fn a_block_that_wrapped_is_read_from_the_start_of_the_data() {
        // 256 bytes of data: start near the end so the second record wraps.
        let ring = Ring::new(
            &[(6, "before the end"), (6, "after the wrap")],
            3,
            256 * 5 + 224,
        );
        assert_eq!(
            texts(&read(&ring.mem, PRB, 10).unwrap()),
            ["before the end", "after the wrap"]
        );
    }

    #[test]
    fn records_that_do_not_check_out_are_skipped() {
        let ring = Ring::new(&[(6, "kept"), (6, "lost"), (6, "kept too")], 40, 0);
        // The second record's data block names another id.
        let desc = DESCS + (41 & 15) * rb::DESC_SIZE;
        let begin: u64 = ring.mem.read_obj(physical(desc + 8, "").unwrap()).unwrap();
        ring.mem
            .write_obj(999u64, physical(DATA + begin % 256, "").unwrap())
            .unwrap();
        assert_eq!(
            texts(&read(&ring.mem, PRB, 10).unwrap()),
            ["kept", "kept too"]
        );
        // A descriptor still being written (reserved) is skipped too.
        ring.mem
            .write_obj(
                42u64,
                physical(DESCS + (42 & 15) * rb::DESC_SIZE, "").unwrap(),
            )
            .unwrap();
        assert_eq!(texts(&read(&ring.mem, PRB, 10).unwrap()), ["kept"]);
    }

    #[test]
    fn garbage_is_an_error_or_nothing_never_a_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        // A `prb` outside the kernel's mappings.
        assert!(matches!(
            read(&mem, 0x1000, 10),
            Err(KernelLogError::BadAddress { .. })
        ));
        // A `prb` pointing at zeroes: the ring's pointers are not kernel
        // addresses.
        assert!(read(&mem, PRB, 10).is_err());
        // A well-formed ring whose descriptors, infos, text and ids are
        // then overwritten with random bytes, for many seeds.
        let ring = Ring::new(&[(6, "one"), (6, "two"), (6, "three")], 5, 0);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |len: usize| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        for round in 0..2_000 {
            let (addr, len) = match round % 4 {
                0 => (DESCS, 16 * rb::DESC_SIZE),
                1 => (INFOS, 16 * rb::INFO_SIZE),
                2 => (DATA, 256),
                _ => (RING, 80),
            };
            ring.mem
                .write_slice(&random(len as usize), physical(addr, "").unwrap())
                .unwrap();
            let _ = read(&ring.mem, PRB, 10);
        }
    }
}
