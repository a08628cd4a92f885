//! Prints what this machine's KVM offers a guest that bears on its timers
//! and paravirtual features: the TSC-deadline timer (capability and CPUID
//! leaf 1 ECX bit 24 in `KVM_GET_SUPPORTED_CPUID`), the KVM paravirtual
//! leaf 0x40000001, and the architectural PMU leaf 0xa. A diagnostic for
//! the microVM's boot (run it here, or in the nested test machine with
//! `cargo xtask nested target/release/examples/kvm_caps`).

use std::process::ExitCode;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};

fn main() -> ExitCode {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("error: cannot open /dev/kvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "KVM_CAP_TSC_DEADLINE_TIMER: {}",
        kvm.check_extension(Cap::TscDeadlineTimer)
    );
    let cpuid = match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
        Ok(cpuid) => cpuid,
        Err(e) => {
            eprintln!("error: KVM_GET_SUPPORTED_CPUID: {e}");
            return ExitCode::FAILURE;
        }
    };
    for entry in cpuid.as_slice() {
        match (entry.function, entry.index) {
            (1, 0) => println!(
                "leaf 0x1: ecx {:#010x} (TSC-deadline bit 24: {}, hypervisor bit 31: {})",
                entry.ecx,
                (entry.ecx >> 24) & 1,
                (entry.ecx >> 31) & 1
            ),
            (0xa, 0) => println!(
                "leaf 0xa (PMU): eax {:#010x} (version {}, {} counters)",
                entry.eax,
                entry.eax & 0xff,
                (entry.eax >> 8) & 0xff
            ),
            (0x4000_0001, _) => println!("leaf 0x40000001 (KVM features): eax {:#010x}", entry.eax),
            (0x8000_0001, 0) => println!(
                "leaf 0x80000001: ecx {:#010x} (AMD perfctr_core bit 23: {})",
                entry.ecx,
                (entry.ecx >> 23) & 1
            ),
            _ => {}
        }
    }
    ExitCode::SUCCESS
}
