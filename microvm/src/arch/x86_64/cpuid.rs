//! CPUID set-up.
//!
//! Starts from `KVM_GET_SUPPORTED_CPUID` and applies the usual fixups: the
//! vCPU's APIC id in leaves 1 and 0xb, the logical-processor count, the
//! hypervisor bit, and the TSC-deadline timer where KVM emulates one (it
//! does not always list it as supported). What the guest is not given, on
//! every profile: a performance-monitoring unit (KVM does not virtualise one
//! under every host, and a guest that finds counters advertised and absent
//! logs unhandled MSR writes), and KVM's asynchronous page faults (see
//! [`KVM_FEATURES_WITHHELD`]); `docs/microvm.md` says why for each.
//! [`CpuProfile::Compat`] additionally hides the features an
//! instruction-emulating KVM backend cannot run (XSAVE and its state leaf,
//! AVX*, POPCNT, SMAP/SMEP and friends); [`compat_kernel_args`] gives the
//! matching kernel parameters, since Linux probes some of these directly.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Which CPU features the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuProfile {
    /// Everything KVM supports (hardware virtualization).
    #[default]
    Native,
    /// A conservative subset for KVM backends that emulate guest
    /// instructions; pair it with [`compat_kernel_args`].
    Compat,
}

// Leaf 1, ECX.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_PCLMUL: u32 = 1 << 1;
const ECX_FMA: u32 = 1 << 12;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_AES: u32 = 1 << 25;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 7.0, EBX.
const EBX7_BMI1: u32 = 1 << 3;
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_SMEP: u32 = 1 << 7;
const EBX7_BMI2: u32 = 1 << 8;
const EBX7_INVPCID: u32 = 1 << 10;
const EBX7_RDSEED: u32 = 1 << 18;
const EBX7_ADX: u32 = 1 << 19;
const EBX7_SMAP: u32 = 1 << 20;
const EBX7_SHA: u32 = 1 << 29;
/// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL.
const EBX7_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
// Leaf 7.0, ECX: AVX-512 VBMI, UMIP, PKU, OSPKE, VBMI2, GFNI, VAES, VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ.
const ECX7_MASK: u32 = (1 << 1)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 6)
    | (1 << 8)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14);
// Leaf 0x8000_0001, ECX: LZCNT/ABM.
const ECX81_ABM: u32 = 1 << 5;
/// Leaf 0x8000_0001, ECX: the AMD core, northbridge and last-level-cache
/// performance counter extensions.
const ECX81_PERFCTR: u32 = (1 << 23) | (1 << 24) | (1 << 28);

/// KVM's paravirtual feature leaf (EAX) and the features of it withheld:
/// asynchronous page faults in all three forms (`ASYNC_PF`, `ASYNC_PF_VMEXIT`,
/// `ASYNC_PF_INT`). They let the host park a guest task while it swaps a
/// page of guest memory in; a capsa machine runs one agent and its
/// children for seconds, so there is nothing to gain, and a "page ready"
/// notification lost on the way would leave exactly the faulting task asleep
/// while the rest of the kernel runs on. The paravirtual clock, EOI, TLB
/// flush, IPIs and steal time stay.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
pub const KVM_FEATURES_WITHHELD: u32 = (1 << 4) | (1 << 10) | (1 << 14);

const COMPAT_ECX1: u32 = ECX_PCLMUL
    | ECX_FMA
    | ECX_MOVBE
    | ECX_POPCNT
    | ECX_AES
    | ECX_XSAVE
    | ECX_OSXSAVE
    | ECX_AVX
    | ECX_F16C
    | ECX_RDRAND;
const COMPAT_EBX7: u32 = EBX7_BMI1
    | EBX7_AVX2
    | EBX7_SMEP
    | EBX7_BMI2
    | EBX7_INVPCID
    | EBX7_RDSEED
    | EBX7_ADX
    | EBX7_SMAP
    | EBX7_SHA
    | EBX7_AVX512;

/// What the host's KVM offers beyond its supported-CPUID list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCaps {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: KVM emulates the local APIC's
    /// TSC-deadline mode (Linux 6.1's KVM has it without listing the CPUID
    /// bit as supported).
    pub tsc_deadline_timer: bool,
}

/// Adjusts `cpuid` for vCPU `vcpu_id` of `vcpu_count`.
pub fn filter_cpuid(
    cpuid: &mut CpuId,
    vcpu_id: u8,
    vcpu_count: u8,
    profile: CpuProfile,
    caps: HostCaps,
) {
    for e in cpuid.as_mut_slice() {
        filter_entry(e, vcpu_id, vcpu_count, profile, caps);
    }
}

fn filter_entry(
    e: &mut kvm_cpuid_entry2,
    vcpu_id: u8,
    vcpu_count: u8,
    profile: CpuProfile,
    caps: HostCaps,
) {
    let compat = profile == CpuProfile::Compat;
    match e.function {
        1 => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors.
            e.ebx = (e.ebx & 0x0000_ffff)
                | (u32::from(vcpu_id) << 24)
                | (u32::from(vcpu_count.max(1)) << 16);
            e.ecx |= ECX_HYPERVISOR;
            if caps.tsc_deadline_timer {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if vcpu_count > 1 {
                e.edx |= 1 << 28; // HTT: the count above is meaningful.
            }
            if compat {
                e.ecx &= !COMPAT_ECX1;
            }
        }
        7 if e.index == 0 && compat => {
            e.ebx &= !COMPAT_EBX7;
            e.ecx &= !ECX7_MASK;
            e.edx = 0;
        }
        0xa | 0x8000_0022 => {
            // Architectural performance monitoring (Intel) and PerfMonV2
            // (AMD): none.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb => {
            // x2APIC id of this vCPU on every topology level.
            e.edx = u32::from(vcpu_id);
        }
        0xd if compat => {
            // No XSAVE state components.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0x8000_0001 => {
            e.ecx &= !ECX81_PERFCTR;
            if compat {
                e.ecx &= !ECX81_ABM;
            }
        }
        KVM_CPUID_FEATURES => {
            e.eax &= !KVM_FEATURES_WITHHELD;
        }
        _ => {}
    }
}

/// Features the guest kernel is told to ignore under [`CpuProfile::Compat`],
/// most important first. Linux 6.1 copies the `clearcpuid=` value into a
/// 128-byte buffer and silently drops the rest, so the list must stay below
/// that (a unit test checks). SMAP and SMEP come first: with SMAP left on,
/// the kernel patches CLAC/STAC into its entry code and an emulating backend
/// fails on the first interrupt. The CPUID masks hide the same features;
/// the kernel parameter is kept because some backends do not apply them.
const COMPAT_CLEARCPUID: &str = "smap,smep,xsave,popcnt,avx,avx2,avx512f,pku,umip,movbe,bmi1,bmi2,\
                                 adx,rdrand,rdseed,fma,f16c,aes,pclmulqdq,sha_ni,invpcid";

/// Kernel parameters that go with [`CpuProfile::Compat`].
///
/// `clearcpuid=` hides the features the CPUID masks hide (`noxsave`,
/// `nosmap` and `nosmep` are not used: 6.1 no longer knows the latter two
/// and would pass all three to init as arguments).
///
/// `ns_per_iteration` is the probe's figure for one guest loop iteration;
/// it presets `lpj` (loops per jiffy, assuming HZ=250 and roughly one delay
/// loop per probe iteration) so the kernel skips delay-loop calibration,
/// which takes minutes when every instruction is emulated.
pub fn compat_kernel_args(ns_per_iteration: Option<f64>) -> String {
    let lpj = match ns_per_iteration {
        Some(ns) if ns.is_finite() && ns > 0.0 => ((1e9 / ns) / 250.0).clamp(1000.0, 1e8) as u64,
        _ => 4000,
    };
    format!("clearcpuid={COMPAT_CLEARCPUID} lpj={lpj} tsc=reliable no_timer_check")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        e.ecx = 0;
        filter_entry(&mut e, 3, 4, CpuProfile::Native, HostCaps::default());
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        let mut b = entry(0xb, 0);
        filter_entry(&mut b, 2, 4, CpuProfile::Native, HostCaps::default());
        assert_eq!(b.edx, 2);
    }

    #[test]
    fn compat_masks_features() {
        let mut e = entry(1, 0);
        filter_entry(&mut e, 0, 1, CpuProfile::Compat, HostCaps::default());
        assert_eq!(e.ecx & (ECX_XSAVE | ECX_AVX | ECX_POPCNT), 0);
        let mut s = entry(7, 0);
        filter_entry(&mut s, 0, 1, CpuProfile::Compat, HostCaps::default());
        assert_eq!(s.ebx & (EBX7_SMAP | EBX7_SMEP | EBX7_AVX2 | (1 << 16)), 0);
        let mut n = entry(7, 0);
        filter_entry(&mut n, 0, 1, CpuProfile::Native, HostCaps::default());
        assert_eq!(n.ebx, u32::MAX);
    }

    #[test]
    fn tsc_deadline_follows_kvm_not_the_supported_list() {
        let caps = HostCaps {
            tsc_deadline_timer: true,
        };
        for profile in [CpuProfile::Native, CpuProfile::Compat] {
            let mut e = entry(1, 0);
            e.ecx = 0;
            filter_entry(&mut e, 0, 1, profile, caps);
            assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0, "{profile:?}");
        }
        let mut e = entry(1, 0);
        e.ecx = 0;
        filter_entry(&mut e, 0, 1, CpuProfile::Native, HostCaps::default());
        assert_eq!(e.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn no_pmu_and_no_async_page_faults() {
        for profile in [CpuProfile::Native, CpuProfile::Compat] {
            let mut pmu = entry(0xa, 0);
            filter_entry(&mut pmu, 0, 1, profile, HostCaps::default());
            assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
            let mut ext = entry(0x8000_0001, 0);
            filter_entry(&mut ext, 0, 1, profile, HostCaps::default());
            assert_eq!(ext.ecx & ECX81_PERFCTR, 0);
            let mut kvm = entry(KVM_CPUID_FEATURES, 0);
            kvm.eax = 0x0100_7efb; // Linux 6.1's KVM, nested here.
            filter_entry(&mut kvm, 0, 1, profile, HostCaps::default());
            assert_eq!(kvm.eax & KVM_FEATURES_WITHHELD, 0);
            // The clock (bits 0 and 3) and PV EOI (6) stay.
            assert_eq!(kvm.eax & 0b100_1001, 0b100_1001);
        }
    }

    #[test]
    fn compat_args() {
        let a = compat_kernel_args(Some(1000.0));
        assert!(a.contains("clearcpuid=smap,smep,xsave,") && a.contains("lpj=4000"));
        assert!(compat_kernel_args(None).contains("clearcpuid="));
        // Linux 6.1 reads at most 127 bytes of the clearcpuid= value.
        assert!(COMPAT_CLEARCPUID.len() < 128, "{}", COMPAT_CLEARCPUID.len());
        assert!(!a.contains("nosmap"));
    }
}
