//! The KVM VM: its fd, memory slots, in-kernel interrupt controllers and
//! irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// A KVM operation on the VM failed.
#[derive(Debug, Error)]
pub enum KvmVmError {
    /// Opening /dev/kvm failed.
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("creating the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// Setting the TSS or identity-map address failed.
    #[error("setting the TSS address: {0}")]
    Tss(kvm_ioctls::Error),
    /// Creating the IRQ chip or PIT failed.
    #[error("creating the in-kernel IRQ chip: {0}")]
    IrqChip(kvm_ioctls::Error),
    /// Registering a memory slot failed.
    #[error("registering guest memory: {0}")]
    Memory(kvm_ioctls::Error),
    /// Registering an irqfd failed.
    #[error("registering irqfd: {0}")]
    Irqfd(kvm_ioctls::Error),
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
}

impl KvmVm {
    /// Creates a VM. With `irqchip`, KVM emulates the PIC, IOAPIC, LAPICs and
    /// PIT (what Linux needs); without it, `hlt` exits to the VMM, which the
    /// tiny test guests and the probe rely on.
    pub fn new(irqchip: bool) -> Result<Self, KvmVmError> {
        let kvm = Kvm::new().map_err(KvmVmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(KvmVmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(KvmVmError::Tss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(KvmVmError::Tss)?;
        if irqchip {
            fd.create_irq_chip().map_err(KvmVmError::IrqChip)?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(KvmVmError::IrqChip)?;
        }
        Ok(Self { kvm, fd })
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a memory slot. The caller keeps
    /// `mem` alive for as long as this VM exists.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), KvmVmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: `userspace_addr..+memory_size` is a live mapping owned
            // by `mem`'s region; the caller keeps `mem` (and so the mapping)
            // alive until this VM fd is closed, and slots do not overlap
            // because the regions of a GuestMemoryMmap do not.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(KvmVmError::Memory)?;
        }
        Ok(())
    }

    /// Routes writes to `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmVmError> {
        self.fd.register_irqfd(evt, gsi).map_err(KvmVmError::Irqfd)
    }
}
