//! Emulated devices: the legacy PC devices a Linux guest expects to find on
//! port I/O, and virtio devices behind the virtio-mmio transport.

pub mod bus;
pub mod legacy;
pub mod virtio;
