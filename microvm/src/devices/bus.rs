//! The VM's device map: which device answers which port or MMIO address.

use std::sync::{Arc, Mutex};

use super::legacy::i8042::{COMMAND_PORT, DATA_PORT, I8042};
use super::legacy::serial::{Serial, COM1_BASE, COM1_LEN};
use super::virtio::mmio::{MmioTransport, MMIO_WINDOW};
use super::virtio::vsock::Vsock;
use crate::event_loop::lock;
use crate::vstate::vcpu::{Bus, BusAction};

/// The devices of one VM.
#[derive(Debug)]
pub struct DeviceBus {
    /// COM1.
    pub serial: Mutex<Serial>,
    /// The reset line.
    pub i8042: Mutex<I8042>,
    /// The vsock device and the base of its MMIO window.
    pub vsock: (u64, Arc<Mutex<MmioTransport<Vsock>>>),
}

impl Bus for DeviceBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - COM1_BASE) as u8);
            }
            DATA_PORT | COMMAND_PORT if data.len() == 1 => data[0] = lock(&self.i8042).read(port),
            // Nothing there: the bus floats high.
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) && data.len() == 1 => {
                lock(&self.serial).write((p - COM1_BASE) as u8, data[0]);
            }
            DATA_PORT | COMMAND_PORT
                if data.len() == 1 && lock(&self.i8042).write(port, data[0]) =>
            {
                return BusAction::Reset;
            }
            _ => {}
        }
        BusAction::Continue
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let (base, dev) = &self.vsock;
        match addr.checked_sub(*base) {
            Some(off) if off < MMIO_WINDOW => lock(dev).read(off, data),
            _ => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> BusAction {
        let (base, dev) = &self.vsock;
        if let Some(off) = addr.checked_sub(*base) {
            if off < MMIO_WINDOW {
                lock(dev).write(off, data);
            }
        }
        BusAction::Continue
    }
}
