//! Guest memory: anonymous private mappings laid around the 32-bit MMIO hole.

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory could not be created.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// A VM needs at least 16 MiB; {0} MiB was asked for.
    #[error("guest memory of {0} MiB is too small (16 MiB minimum)")]
    TooSmall(u32),
    /// mmap failed.
    #[error("mapping guest memory: {0}")]
    Mmap(String),
}

/// `(start, length)` of each RAM region for a guest of `size` bytes.
pub fn regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `mib` MiB of guest memory.
pub fn create_guest_memory(mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    if mib < 16 {
        return Err(MemoryError::TooSmall(mib));
    }
    GuestMemoryMmap::from_ranges(&regions(u64::from(mib) << 20))
        .map_err(|e| MemoryError::Mmap(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_hole() {
        assert_eq!(regions(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = regions(4 << 30);
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30)));
        assert!(create_guest_memory(8).is_err());
    }
}
