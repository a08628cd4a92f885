//! Virtio: the MMIO transport, descriptor-chain parsing shared by devices,
//! and the vsock device.

pub mod chain;
pub mod mmio;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device complies with virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// `InterruptStatus` bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// Device status bits (virtio spec §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation finished.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The interrupt line of one virtio-mmio device: the `InterruptStatus`
/// register and the eventfd that raises the guest IRQ (a KVM irqfd when a VM
/// runs, a plain eventfd in tests).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// Wraps an eventfd registered as the device's irqfd.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in `InterruptStatus` and raises the IRQ.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("failed to signal virtio interrupt: {e}");
        }
    }

    /// Current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (the driver's write to `InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd behind the IRQ.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up queue {0} with addresses outside guest memory.
    #[error("queue {0} is not valid for guest memory")]
    InvalidQueue(usize),
    /// The driver activated the device without acknowledging VIRTIO_F_VERSION_1.
    #[error("driver did not acknowledge VIRTIO_F_VERSION_1")]
    LegacyDriver,
}

/// What the MMIO transport needs from a device.
pub trait VirtioDevice: Send {
    /// Virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of the offer).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device-specific configuration space; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver configured.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state (the driver wrote 0 to `Status`).
    fn reset(&mut self);
    /// Whether the device hit a guest error and waits for a reset.
    fn needs_reset(&self) -> bool {
        false
    }
}
