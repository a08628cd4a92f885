//! vCPUs: set-up for the boot protocols and the run loop that dispatches
//! port I/O and MMIO exits to the devices.
//!
//! Each vCPU runs on its own thread. To stop one that is inside `KVM_RUN`,
//! the VMM sets the shared stop flag and sends the thread [`kick_signal`],
//! whose handler does nothing: the signal alone makes `KVM_RUN` return
//! `EINTR`. A signal that lands just before the thread re-enters the guest
//! is not lost for long, because the kicker repeats until the thread exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::cpuid::{filter_cpuid, CpuProfile, HostCaps};
use crate::arch::x86_64::msr::boot_msrs;
use crate::arch::x86_64::regs::{boot_fpu, boot_regs, set_lint, setup_sregs, RegsError};
use crate::boot::BootEntry;

/// A vCPU could not be created or configured.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("creating vCPU: {0}")]
    Create(kvm_ioctls::Error),
    /// A KVM register ioctl failed.
    #[error("configuring vCPU ({what}): {source}")]
    Configure {
        /// Which step.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Writing boot tables failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// Building the MSR list failed.
    #[error("building MSR list: {0:?}")]
    Msrs(vmm_sys_util::fam::Error),
    /// KVM did not accept every boot MSR.
    #[error("KVM accepted only {0} boot MSRs")]
    MsrsPartial(usize),
    /// Registering the kick signal handler failed.
    #[error("registering the vCPU kick signal: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// What a device access asks of the run loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Keep running.
    Continue,
    /// The guest asked to reset the machine.
    Reset,
}

/// The devices a vCPU reaches through exits.
pub trait Bus: Send + Sync {
    /// `in` from `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]) -> BusAction;
    /// Load from unbacked guest-physical `addr`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// Store to unbacked guest-physical `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> BusAction;
}

/// Why a vCPU stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked to power off or reset, halted without an IRQ chip,
    /// or triple-faulted.
    Shutdown(&'static str),
    /// The VMM asked it to stop.
    Stopped,
    /// KVM reported an error.
    Error(String),
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`] (idempotent).
pub fn register_kick_signal() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(VcpuError::Signal)
}

/// Where a vCPU's guest was at one moment: taken by its own thread between
/// two runs, on request (see [`SampleSlot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSample {
    /// The vCPU's index.
    pub vcpu: u8,
    /// The instruction pointer.
    pub rip: u64,
    /// Whether the guest takes interrupts (`rflags.IF`).
    pub interrupts: bool,
    /// The privilege level: 0 for the kernel, 3 for user space.
    pub cpl: u8,
    /// Halted in the in-kernel APIC, waiting for an interrupt.
    pub halted: bool,
}

impl std::fmt::Display for VcpuSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vcpu{} rip {:#x} IF {} CPL {}{}",
            self.vcpu,
            self.rip,
            u8::from(self.interrupts),
            self.cpl,
            if self.halted { " halted" } else { "" }
        )
    }
}

/// A request for a [`VcpuSample`] and its answer, shared between a vCPU's
/// thread and whoever asks. Registers can only be read by the thread that
/// runs the vCPU (KVM holds the vCPU while it is in `KVM_RUN`), so the
/// asker sets the request, kicks the thread out of `KVM_RUN`, and the
/// thread answers before it enters the guest again.
#[derive(Debug, Default)]
pub struct SampleSlot {
    requested: AtomicBool,
    answer: Mutex<Option<VcpuSample>>,
    answered: Condvar,
}

impl SampleSlot {
    /// Asks for a sample; the vCPU thread must then be kicked.
    pub fn request(&self) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.requested.store(true, Ordering::Release);
    }

    /// Waits up to `timeout` for the answer to the last request.
    pub fn wait(&self, timeout: std::time::Duration) -> Option<VcpuSample> {
        let answer = self.answer.lock().unwrap_or_else(|e| e.into_inner());
        let (answer, _) = self
            .answered
            .wait_timeout_while(answer, timeout, |a| a.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *answer
    }

    fn answer_if_asked(&self, vcpu: &Vcpu) {
        if self.requested.swap(false, Ordering::AcqRel) {
            *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(vcpu.sample());
            self.answered.notify_all();
        }
    }
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    /// KVM vCPU fd.
    pub fd: VcpuFd,
    /// Index, also the APIC id.
    pub id: u8,
}

fn cfg(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Configure { what, source }
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(VcpuError::Create)?;
        Ok(Self { fd, id })
    }

    /// Sets CPUID, MSRs, FPU, registers and LAPIC for entering the kernel.
    /// Secondary vCPUs only get CPUID, MSRs and LAPIC: they wait for INIT/SIPI.
    pub fn configure(
        &self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        boot: &BootEntry,
        vcpu_count: u8,
        profile: CpuProfile,
    ) -> Result<(), VcpuError> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(cfg("KVM_GET_SUPPORTED_CPUID"))?;
        let caps = HostCaps {
            tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        filter_cpuid(&mut cpuid, self.id, vcpu_count, profile, caps);
        self.fd.set_cpuid2(&cpuid).map_err(cfg("KVM_SET_CPUID2"))?;
        let msrs = boot_msrs().map_err(VcpuError::Msrs)?;
        let n = self.fd.set_msrs(&msrs).map_err(cfg("KVM_SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            return Err(VcpuError::MsrsPartial(n));
        }
        if let Ok(mut lapic) = self.fd.get_lapic() {
            set_lint(&mut lapic);
            self.fd.set_lapic(&lapic).map_err(cfg("KVM_SET_LAPIC"))?;
        }
        if self.id == 0 {
            self.fd.set_fpu(&boot_fpu()).map_err(cfg("KVM_SET_FPU"))?;
            let mut sregs = self.fd.get_sregs().map_err(cfg("KVM_GET_SREGS"))?;
            setup_sregs(mem, boot.protocol, &mut sregs)?;
            self.fd.set_sregs(&sregs).map_err(cfg("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&boot_regs(boot.protocol, boot.entry.0))
                .map_err(cfg("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR`: KVM's sub-error and data words
    /// and where the guest was, so the failing instruction can be found.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel fills the
        // `internal` member of the exit union; every bit pattern is a valid
        // value of its plain integer fields.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let kind = match internal.suberror {
            1 => "instruction emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        let mut msg = format!(
            "KVM internal error {} ({kind}), data {:x?}",
            internal.suberror,
            &internal.data[..ndata]
        );
        msg.push_str(", guest");
        msg.push_str(&self.whereabouts());
        msg
    }

    /// Where the guest is on this vCPU: its instruction and stack pointers,
    /// flags, control registers and whether it is halted (waiting for an
    /// interrupt) or runnable. For reports of a guest that stopped
    /// answering.
    pub fn whereabouts(&self) -> String {
        let mut s = String::new();
        if let Ok(regs) = self.fd.get_regs() {
            s.push_str(&format!(
                " rip {:#x} rsp {:#x} rflags {:#x}",
                regs.rip, regs.rsp, regs.rflags
            ));
        }
        if let Ok(sregs) = self.fd.get_sregs() {
            s.push_str(&format!(
                " cr0 {:#x} cr4 {:#x} efer {:#x} cs {:#x}",
                sregs.cr0, sregs.cr4, sregs.efer, sregs.cs.selector
            ));
        }
        if let Ok(mp) = self.fd.get_mp_state() {
            s.push_str(match mp.mp_state {
                kvm_bindings::KVM_MP_STATE_RUNNABLE => " runnable",
                kvm_bindings::KVM_MP_STATE_HALTED => " halted",
                _ => " mp_state other",
            });
        }
        s
    }

    /// Where the guest is now (call on the vCPU's own thread, between
    /// runs); fields KVM does not give read as zero.
    pub fn sample(&self) -> VcpuSample {
        let regs = self.fd.get_regs().unwrap_or_default();
        let sregs = self.fd.get_sregs().unwrap_or_default();
        let halted = self
            .fd
            .get_mp_state()
            .is_ok_and(|mp| mp.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
        VcpuSample {
            vcpu: self.id,
            rip: regs.rip,
            interrupts: regs.rflags & (1 << 9) != 0,
            cpl: (sregs.cs.selector & 3) as u8,
            halted,
        }
    }

    /// Runs the guest until it shuts down, fails, or `stop` is set.
    pub fn run(&mut self, bus: &dyn Bus, stop: &AtomicBool) -> VcpuStop {
        self.run_sampled(bus, stop, &SampleSlot::default())
    }

    /// [`Vcpu::run`], answering requests for samples in `slot` between
    /// runs.
    pub fn run_sampled(&mut self, bus: &dyn Bus, stop: &AtomicBool, slot: &SampleSlot) -> VcpuStop {
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStop::Stopped;
            }
            slot.answer_if_asked(self);
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
                    VcpuExit::IoOut(port, data) => {
                        if bus.pio_write(port, data) == BusAction::Reset {
                            return VcpuStop::Shutdown("i8042 reset");
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
                    VcpuExit::MmioWrite(addr, data) => {
                        if bus.mmio_write(addr, data) == BusAction::Reset {
                            return VcpuStop::Shutdown("reset");
                        }
                    }
                    VcpuExit::Hlt => return VcpuStop::Shutdown("hlt"),
                    VcpuExit::Shutdown => return VcpuStop::Shutdown("triple fault"),
                    VcpuExit::SystemEvent(kind, _) => match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => return VcpuStop::Shutdown("power off"),
                        KVM_SYSTEM_EVENT_RESET => return VcpuStop::Shutdown("reset"),
                        other => {
                            return VcpuStop::Error(format!("unexpected system event {other}"))
                        }
                    },
                    VcpuExit::Intr => {}
                    VcpuExit::FailEntry(reason, cpu) => {
                        return VcpuStop::Error(format!(
                            "KVM entry failure {reason:#x} on cpu {cpu}"
                        ))
                    }
                    VcpuExit::InternalError => return VcpuStop::Error(self.internal_error()),
                    other => return VcpuStop::Error(format!("unexpected exit {other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VcpuStop::Error(format!("KVM_RUN: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use kvm_bindings::kvm_regs;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::vm::KvmVm;

    /// Records every access; reads from MMIO return 0x5a.
    #[derive(Default)]
    struct RecordingBus {
        log: Mutex<Vec<String>>,
        out: Mutex<Vec<u8>>,
    }

    impl Bus for RecordingBus {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            self.log.lock().unwrap().push(format!("in {port:#x}"));
            data.fill(0x21);
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
            if port == 0x3f8 {
                self.out.lock().unwrap().extend_from_slice(data);
            } else {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("out {port:#x} {data:?}"));
            }
            if port == 0x64 && data == [0xfe] {
                BusAction::Reset
            } else {
                BusAction::Continue
            }
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("mmio read {addr:#x}"));
            data.fill(0x5a);
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) -> BusAction {
            self.log
                .lock()
                .unwrap()
                .push(format!("mmio write {addr:#x} {data:?}"));
            BusAction::Continue
        }
    }

    /// A real-mode vCPU in a VM with 32 KiB of RAM, `code` at 0x1000.
    fn real_mode_vcpu(code: &[u8]) -> (KvmVm, GuestMemoryMmap, Vcpu) {
        let vm = KvmVm::new(false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        vm.register_memory(&mem).unwrap();
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let vcpu = Vcpu::new(vm.fd(), 0).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0;
        sregs.ds.selector = 0;
        vcpu.fd.set_sregs(&sregs).unwrap();
        vcpu.fd
            .set_regs(&kvm_regs {
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            })
            .unwrap();
        (vm, mem, vcpu)
    }

    #[test]
    fn serial_port_io_mmio_and_hlt() {
        let code = [
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'H', 0xee, // mov al, 'H'; out dx, al
            0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
            0xe4, 0x61, // in al, 0x61
            0xee, // out dx, al      (0x21 from the bus)
            0xa2, 0x00, 0x90, // mov [0x9000], al (unbacked: MMIO write)
            0xa0, 0x10, 0x90, // mov al, [0x9010]  (MMIO read -> 0x5a)
            0xee, // out dx, al
            0xf4, // hlt
        ];
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&code);
        let bus = RecordingBus::default();
        let stop = AtomicBool::new(false);
        assert_eq!(vcpu.run(&bus, &stop), VcpuStop::Shutdown("hlt"));
        assert_eq!(&*bus.out.lock().unwrap(), b"Hi!Z");
        let log = bus.log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec!["in 0x61", "mmio write 0x9000 [33]", "mmio read 0x9010"]
        );
    }

    #[test]
    fn i8042_reset_ends_the_run() {
        let code = [
            0xb0, 0xfe, // mov al, 0xfe
            0xe6, 0x64, // out 0x64, al
            0xeb, 0xfe, // jmp $ (never reached)
        ];
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&code);
        let bus = RecordingBus::default();
        let stop = AtomicBool::new(false);
        assert_eq!(vcpu.run(&bus, &stop), VcpuStop::Shutdown("i8042 reset"));
    }

    #[test]
    fn kick_stops_a_spinning_vcpu() {
        use vmm_sys_util::signal::Killable;
        register_kick_signal().unwrap();
        let code = [0xeb, 0xfe]; // jmp $
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&code);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let why = vcpu.run(&RecordingBus::default(), &s);
            (why, vcpu.whereabouts())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.store(true, Ordering::Release);
        while !t.is_finished() {
            let _ = t.kill(kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (why, at) = t.join().unwrap();
        assert_eq!(why, VcpuStop::Stopped);
        // Stopped in its loop: the `jmp $` at the start of the code, not
        // halted.
        assert!(at.contains(" runnable"), "{at}");
        assert!(at.contains(" rip 0x"), "{at}");
    }

    #[test]
    fn a_spinning_vcpu_answers_a_sample_and_goes_on() {
        use vmm_sys_util::signal::Killable;
        register_kick_signal().unwrap();
        let code = [0xeb, 0xfe]; // jmp $
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&code);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let slot = std::sync::Arc::new(SampleSlot::default());
        let (s, sl) = (stop.clone(), slot.clone());
        let t = std::thread::spawn(move || vcpu.run_sampled(&RecordingBus::default(), &s, &sl));
        for _ in 0..3 {
            slot.request();
            let sample = loop {
                let _ = t.kill(kick_signal());
                if let Some(s) = slot.wait(std::time::Duration::from_millis(5)) {
                    break s;
                }
            };
            assert_eq!(
                sample,
                VcpuSample {
                    vcpu: 0,
                    rip: 0x1000,
                    interrupts: false,
                    cpl: 0,
                    halted: false
                }
            );
            assert!(!t.is_finished(), "the sample stopped the vCPU");
        }
        stop.store(true, Ordering::Release);
        while !t.is_finished() {
            let _ = t.kill(kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(t.join().unwrap(), VcpuStop::Stopped);
    }
}
