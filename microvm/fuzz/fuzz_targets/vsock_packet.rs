//! Arbitrary bytes as a vsock packet header and payload: parsing and
//! validation never panic, and a parsed header re-encodes to the same bytes.
#![no_main]

use capsa_microvm::devices::virtio::vsock::packet::{PacketHeader, HDR_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = PacketHeader::parse(data) {
        assert_eq!(&h.to_bytes()[..], &data[..HDR_SIZE]);
        let _ = h.validate_tx(3, (data.len() - HDR_SIZE) as u64);
        let _ = h.validate_tx(h.src_cid, u64::MAX);
    }
});
