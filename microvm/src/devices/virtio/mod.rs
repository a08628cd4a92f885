//! Virtio: the MMIO transport, descriptor-chain parsing shared by devices,
//! and the vsock device.

pub mod chain;
pub mod mmio;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// When the IRQ was last raised, in milliseconds since `epoch`.
    raised_ms: AtomicU64,
    epoch: Instant,
    /// How often a pending status was raised again.
    reraised: AtomicU64,
}

impl Interrupt {
    /// Wraps an eventfd registered as the device's irqfd.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
            raised_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            reraised: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn raise(&self) {
        self.raised_ms.store(self.now_ms(), Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("failed to signal virtio interrupt: {e}");
        }
    }

    /// Sets `bits` in `InterruptStatus` and raises the IRQ.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.raise();
    }

    /// Raises the IRQ again if `InterruptStatus` has been set and
    /// unacknowledged for `after` since it was last raised; returns whether
    /// it did. The line is edge-triggered and raised only when new work
    /// appears, so an edge the guest missed would otherwise leave the
    /// driver waiting for work that is already there. A guest that reads
    /// the status finds it set and handles it; one that has acknowledged is
    /// not raised again.
    pub fn reraise_if_unacknowledged(&self, after: Duration) -> bool {
        if self.status() == 0 {
            return false;
        }
        let since = self
            .now_ms()
            .saturating_sub(self.raised_ms.load(Ordering::SeqCst));
        if u128::from(since) < after.as_millis() {
            return false;
        }
        self.reraised.fetch_add(1, Ordering::Relaxed);
        self.raise();
        true
    }

    /// How many times [`Interrupt::reraise_if_unacknowledged`] raised it.
    pub fn reraised(&self) -> u64 {
        self.reraised.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_and_an_acknowledged_one_is_not() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let evt = irq.eventfd().try_clone().unwrap();
        // Nothing pending: nothing to raise.
        assert!(!irq.reraise_if_unacknowledged(Duration::ZERO));
        irq.trigger(INT_VRING);
        assert_eq!(edges(&evt), 1);
        // Pending, but raised a moment ago.
        assert!(!irq.reraise_if_unacknowledged(Duration::from_secs(60)));
        assert_eq!(edges(&evt), 0);
        // Pending for longer than asked: a second edge, status untouched.
        std::thread::sleep(Duration::from_millis(20));
        assert!(irq.reraise_if_unacknowledged(Duration::from_millis(10)));
        assert_eq!(
            (edges(&evt), irq.status(), irq.reraised()),
            (1, INT_VRING, 1)
        );
        // The driver acknowledged: never again.
        irq.ack(INT_VRING);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!irq.reraise_if_unacknowledged(Duration::from_millis(10)));
        assert_eq!(edges(&evt), 0);
    }
}
