//! x86-64: the guest physical memory layout, CPU set-up (CPUID, MSRs,
//! registers, descriptor tables, page tables) and the MP table.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
