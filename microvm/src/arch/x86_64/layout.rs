//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT                        0x0000_6000  PVH start info, module list, memory map
//! 0x0000_7000  Linux zero page            0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD (identity map of the first GiB)
//! 0x0002_0000  kernel command line        0x0009_fc00  MP table (EBDA), reserved to 1 MiB
//! 0x0010_0000  kernel                     ...          initramfs at the top of low RAM
//! 0xc000_0000  MMIO hole to 4 GiB: virtio-mmio devices at 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above the hole, when the VM has more than 3 GiB
//! ```

/// Start of the GDT.
pub const GDT_START: u64 = 0x500;
/// Start of the (empty) IDT.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line (the x86 kernel's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) just below the identity-map page.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page (needed by real-mode emulation on Intel).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the first virtio-mmio device.
pub const VIRTIO_IRQ: u32 = 5;
/// Highest address the initramfs may end at (`initrd_addr_max` default).
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
