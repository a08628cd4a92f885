//! Arbitrary bytes as guest memory holding a 16-entry split virtqueue (its
//! descriptor table, available ring and buffers): walking every available
//! chain, validating it and reading a vsock TX packet out of it never panics
//! and never touches memory outside the guest's.
#![no_main]

use capsa_microvm::devices::virtio::chain::ParsedChain;
use capsa_microvm::devices::virtio::vsock::read_tx_packet;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&data[..data.len().min(MEM)], GuestAddress(0))
        .unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let Ok(iter) = q.iter(&mem) else {
        return;
    };
    for chain in iter.take(32) {
        if let Ok(c) = ParsedChain::parse(chain) {
            let _ = read_tx_packet(&mem, &c, 3);
            let mut buf = [0u8; 64];
            let _ = c.write_at(&mem, 0, &buf);
            let _ = c.read_at(&mem, 7, &mut buf);
        }
    }
});
