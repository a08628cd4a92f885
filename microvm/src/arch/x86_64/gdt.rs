//! Global descriptor table entries and their `kvm_segment` form.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from its flags (access byte in bits 0-7, flags nibble
/// in bits 12-15), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

/// The `kvm_segment` KVM wants for GDT entry `entry` at `table_index`.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = limit(entry);
    kvm_segment {
        base: base(entry),
        // KVM wants the limit in bytes.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// GDT for the 64-bit boot protocol: null, 64-bit code, data, TSS.
pub const GDT_64: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for PVH (32-bit protected mode): null, 32-bit code, data, TSS.
pub const GDT_32: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_64() {
        let s = kvm_segment_from_gdt(GDT_64[1], 1);
        assert_eq!(
            (s.selector, s.type_, s.l, s.db, s.present),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let d = kvm_segment_from_gdt(GDT_64[2], 2);
        assert_eq!((d.selector, d.type_, d.db, d.s), (16, 3, 1, 1));
    }

    #[test]
    fn code_segment_32() {
        let s = kvm_segment_from_gdt(GDT_32[1], 1);
        assert_eq!((s.l, s.db, s.g), (0, 1, 1));
        assert_eq!(kvm_segment_from_gdt(GDT_32[0], 0).unusable, 1);
    }
}
