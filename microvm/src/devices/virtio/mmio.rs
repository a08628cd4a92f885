//! The virtio-mmio transport, version 2 ("modern"; virtio spec 1.2, §4.2.2).
//!
//! One 4 KiB register window per device, declared to Linux on the kernel
//! command line (`virtio_mmio.device=4K@0xd0000000:5`). vCPU threads call
//! [`MmioTransport::read`] and [`MmioTransport::write`] on MMIO exits; a queue
//! notification only wakes the device thread, which does the queue work.
//!
//! The driver owns the register writes, so every value is checked: features
//! the device did not offer are dropped, queue sizes must be powers of two no
//! larger than the maximum, queue registers are frozen once a queue is ready,
//! and a device that cannot start with the driver's queues reports
//! DEVICE_NEEDS_RESET instead of running on bad addresses.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};

/// Size of the register window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5041_5343; // "CSPA"

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Register file of one virtio-mmio device.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    wake: EventFd,
    status: u32,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    activated: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        .map(|&s| Queue::new(s).unwrap_or_default())
        .collect()
}

/// A copy of the driver's queue configuration for the device.
fn copy_queue(q: &Queue) -> Queue {
    let mut n = Queue::new(q.max_size()).unwrap_or_default();
    n.set_size(q.size());
    n.set_desc_table_address(
        Some(q.desc_table() as u32),
        Some((q.desc_table() >> 32) as u32),
    );
    n.set_avail_ring_address(
        Some(q.avail_ring() as u32),
        Some((q.avail_ring() >> 32) as u32),
    );
    n.set_used_ring_address(
        Some(q.used_ring() as u32),
        Some((q.used_ring() >> 32) as u32),
    );
    n.set_ready(q.ready());
    n
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`. `interrupt` raises the device's IRQ; `wake` is written
    /// on every queue notification.
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>, wake: EventFd) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        Self {
            device,
            mem,
            interrupt,
            wake,
            status: 0,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            activated: false,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The driver's `Status`, with DEVICE_NEEDS_RESET when the device set it.
    pub fn status(&self) -> u32 {
        if self.device.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The interrupt line.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Whether queue registers may change (the queue is not live yet).
    fn queue_writable(&mut self) -> bool {
        !self.activated && self.selected_queue().is_some_and(|q| !q.ready())
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map(|q| q.max_size()).unwrap_or(0) as u32,
            reg::QUEUE_READY => self.selected_queue().map(|q| q.ready()).unwrap_or(false) as u32,
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_phase = self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if self.queue_writable() => {
                if let Some(q) = self.selected_queue() {
                    let size = u16::try_from(v).unwrap_or(0);
                    // Invalid sizes are ignored by virtio-queue and caught by
                    // `is_valid` at activation.
                    q.set_size(size);
                }
            }
            reg::QUEUE_READY if !self.activated => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW if self.queue_writable() => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            reg::QUEUE_DESC_HIGH if self.queue_writable() => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            reg::QUEUE_DRIVER_LOW if self.queue_writable() => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            reg::QUEUE_DRIVER_HIGH if self.queue_writable() => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_DEVICE_LOW if self.queue_writable() => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            reg::QUEUE_DEVICE_HIGH if self.queue_writable() => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            reg::QUEUE_NOTIFY => {
                if self.activated {
                    let _ = self.wake.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: ignored write of {v:#x} at {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order the spec gives.
        let added = v & !self.status;
        if v & self.status != self.status {
            return;
        }
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and fails.
                self.status |= v & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        self.status |= v & !status::DEVICE_NEEDS_RESET;
        if added & status::DRIVER_OK != 0
            && self.status & status::FEATURES_OK != 0
            && !self.activated
        {
            let queues = self.queues.iter().map(copy_queue).collect();
            match self
                .device
                .activate(self.mem.clone(), queues, self.interrupt.clone())
            {
                Ok(()) => self.activated = true,
                Err(e) => {
                    tracing::warn!("virtio-mmio: activation failed: {e}");
                    self.status |= status::DEVICE_NEEDS_RESET;
                    self.interrupt.trigger(INT_CONFIG);
                }
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = new_queues(self.device.queue_max_sizes());
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    /// Whether the driver set DRIVER_OK and the device started.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Features the driver wrote (whether or not they were accepted).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }
}
