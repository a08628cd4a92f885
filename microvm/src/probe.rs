//! Does this KVM run guest code natively, or emulate it?
//!
//! Some hosts expose `/dev/kvm` backed by an instruction emulator: guests
//! work, but every instruction costs about a microsecond, and some
//! instructions are not emulated at all. [`probe`] times a tiny real-mode
//! loop (`dec ecx; jnz`) at two iteration counts in a fresh VM; the
//! difference cancels VM entry and exit costs. Hardware virtualization runs
//! an iteration in about a nanosecond, emulation in about a thousand; the
//! threshold [`EMULATED_THRESHOLD_NS`] sits in between with a wide margin on
//! both sides (nested virtualization still runs natively).

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use kvm_bindings::kvm_regs;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vstate::vcpu::{Bus, BusAction, Vcpu, VcpuError, VcpuStop};
use crate::vstate::vm::{KvmVm, KvmVmError};

/// Above this many nanoseconds per loop iteration, KVM is emulating.
pub const EMULATED_THRESHOLD_NS: f64 = 50.0;
const SHORT: u32 = 2_000;
const LONG: u32 = 10_000;

/// The probe could not run.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] KvmVmError),
    /// Creating or configuring the vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A KVM ioctl failed.
    #[error("probe: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// The probe guest did not halt as expected.
    #[error("probe guest stopped unexpectedly: {0:?}")]
    Guest(VcpuStop),
    /// Guest memory set-up failed.
    #[error("probe memory: {0}")]
    Memory(String),
}

/// The probe's result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probe {
    /// KVM emulates guest instructions.
    pub emulated: bool,
    /// Measured cost of one guest loop iteration.
    pub ns_per_iteration: f64,
}

struct NoDevices;

impl Bus for NoDevices {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _: u16, _: &[u8]) -> BusAction {
        BusAction::Continue
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) -> BusAction {
        BusAction::Continue
    }
}

/// Runs the probe (a few tens of milliseconds when emulated).
pub fn probe() -> Result<Probe, ProbeError> {
    let vm = KvmVm::new(false)?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)])
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    vm.register_memory(&mem)?;
    // mov ecx, [0x2000]; l: dec ecx; jnz l; hlt
    let code = [0x66, 0x8b, 0x0e, 0x00, 0x20, 0x66, 0x49, 0x75, 0xfc, 0xf4];
    mem.write_slice(&code, GuestAddress(0x1000))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let mut vcpu = Vcpu::new(vm.fd(), 0)?;
    let mut sregs = vcpu.fd.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.fd.set_sregs(&sregs)?;
    let stop = AtomicBool::new(false);
    let mut time = |n: u32| -> Result<f64, ProbeError> {
        mem.write_obj(n, GuestAddress(0x2000))
            .map_err(|e| ProbeError::Memory(e.to_string()))?;
        vcpu.fd.set_regs(&kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })?;
        let t = Instant::now();
        match vcpu.run(&NoDevices, &stop) {
            VcpuStop::Shutdown("hlt") => Ok(t.elapsed().as_secs_f64() * 1e9),
            other => Err(ProbeError::Guest(other)),
        }
    };
    // Warm up, then take the best of three at each size.
    time(SHORT)?;
    let mut best = |n| -> Result<f64, ProbeError> {
        let mut b = f64::MAX;
        for _ in 0..3 {
            b = b.min(time(n)?);
        }
        Ok(b)
    };
    let short = best(SHORT)?;
    let long = best(LONG)?;
    let ns = ((long - short) / f64::from(LONG - SHORT)).max(0.0);
    Ok(Probe {
        emulated: ns > EMULATED_THRESHOLD_NS,
        ns_per_iteration: ns,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_runs() {
        let p = super::probe().unwrap();
        assert!(p.ns_per_iteration.is_finite());
        eprintln!("probe: {p:?}");
    }
}
