//! Loading a Linux kernel into guest memory.
//!
//! An uncompressed `vmlinux` (ELF) is entered through its PVH entry point
//! when it has a `XEN_ELFNOTE_PHYS32_ENTRY` note (32-bit protected mode,
//! `hvm_start_info` in EBX), otherwise through the 64-bit boot protocol
//! (long mode, `boot_params` in RSI). A `bzImage` always uses the 64-bit
//! protocol, entered 0x200 bytes into its protected-mode code. Both get the
//! command line, the initramfs at the top of low RAM, and a memory map that
//! leaves the EBDA/BIOS area and the MMIO hole out of RAM.
//!
//! A kernel file is read straight into guest memory, never copied to the
//! heap first: a VMM that boots many machines would otherwise allocate (and
//! the allocator keep) a buffer the size of the kernel per boot.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use thiserror::Error;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    ReadVolatile,
};

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::regs::BootProtocol;

/// The kernel to boot.
#[derive(Clone, Debug)]
pub enum KernelImage {
    /// A file holding a `vmlinux` ELF or a `bzImage`.
    Path(PathBuf),
    /// The same, in memory.
    Bytes(Vec<u8>),
}

/// Loading failed.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened, or is a directory.
    #[error("reading kernel {path}: {source}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image is neither a usable ELF nor a bzImage.
    #[error("kernel is neither a loadable ELF ({elf}) nor a bzImage ({bzimage})")]
    BadKernel {
        /// Why the ELF loader refused it.
        elf: loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: loader::Error,
    },
    /// The command line is invalid or longer than 2 KiB.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit in guest RAM below the kernel's limit.
    #[error("initramfs of {size} bytes does not fit in guest memory")]
    InitramfsTooLarge {
        /// Its size.
        size: usize,
    },
    /// A guest memory write failed.
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// Entry point.
    pub entry: GuestAddress,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// RAM ranges (start, length) of `mem`, with the area from the EBDA to
/// 1 MiB reserved.
fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        let end = start + r.len();
        let start = start.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Loads `kernel`, `initramfs` and `cmdline` into `mem` and writes the boot
/// structures; returns how to enter the kernel.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &KernelImage,
    initramfs: Option<&[u8]>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let (result, entry) = match kernel {
        KernelImage::Path(p) => {
            let read_error = |source| BootError::ReadKernel {
                path: p.clone(),
                source,
            };
            let mut file = File::open(p).map_err(read_error)?;
            // A directory opens, but every read of it fails; say so rather
            // than that the kernel is no ELF.
            if file.metadata().map_err(read_error)?.is_dir() {
                return Err(read_error(std::io::ErrorKind::IsADirectory.into()));
            }
            load_image(mem, &mut file)?
        }
        KernelImage::Bytes(b) => load_image(mem, &mut Cursor::new(b.as_slice()))?,
    };

    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    let kernel_end = result.kernel_load.raw_value() + result.kernel_end;
    let initrd = match initramfs {
        Some(data) if !data.is_empty() => Some(place_initramfs(mem, data, kernel_end)?),
        _ => None,
    };
    let map = memory_map(mem);

    match entry.protocol {
        BootProtocol::Pvh => {
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            if let Some((addr, size)) = initrd {
                let m = hvm_modlist_entry {
                    paddr: addr,
                    size: size as u64,
                    ..Default::default()
                };
                mem.write_obj(m, GuestAddress(PVH_MODLIST_START))?;
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
            }
            for (i, (addr, size, type_)) in map.iter().enumerate() {
                let e = hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: *type_,
                    reserved: 0,
                };
                mem.write_obj(e, GuestAddress(PVH_MEMMAP_START + 24 * i as u64))?;
            }
            mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
        }
        BootProtocol::Linux64 => {
            let mut params = boot_params::default();
            if let Some(hdr) = result.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            if params.hdr.kernel_alignment == 0 {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (i, (addr, size, type_)) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *type_,
                };
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
        }
    }
    Ok(entry)
}

/// Loads a vmlinux ELF or, failing that, a bzImage from `image` into `mem`.
fn load_image<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
) -> Result<(KernelLoaderResult, BootEntry), BootError> {
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, image, himem) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    protocol: BootProtocol::Pvh,
                    entry: addr,
                },
                _ => BootEntry {
                    protocol: BootProtocol::Linux64,
                    entry: r.kernel_load,
                },
            };
            Ok((r, entry))
        }
        Err(elf) => {
            // BzImage::load seeks to what it reads: no rewind needed.
            let r = BzImage::load(mem, None, image, himem)
                .map_err(|bzimage| BootError::BadKernel { elf, bzimage })?;
            let entry = BootEntry {
                protocol: BootProtocol::Linux64,
                entry: GuestAddress(r.kernel_load.raw_value() + 0x200),
            };
            Ok((r, entry))
        }
    }
}

/// Puts the initramfs page-aligned at the top of RAM below 4 GiB and
/// `INITRD_ADDR_MAX`, above the kernel; returns (address, size).
fn place_initramfs(
    mem: &GuestMemoryMmap,
    data: &[u8],
    kernel_end: u64,
) -> Result<(u64, usize), BootError> {
    let too_large = || BootError::InitramfsTooLarge { size: data.len() };
    let low = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .ok_or_else(too_large)?;
    let top = low.min(INITRD_ADDR_MAX + 1);
    let addr = top.checked_sub(data.len() as u64).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.write_slice(data, GuestAddress(addr))?;
    Ok((addr, data.len()))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use super::*;

    /// The system allocator, noting the largest block each thread asks for:
    /// the lib's tests allocate through it, so one can tell whether a call
    /// copied something large to the heap.
    struct Recording;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        // Fails only while the thread's locals are torn down: nothing to note.
        let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
    }

    // SAFETY: every method hands its arguments unchanged to the system
    // allocator and returns what it returns; noting a size allocates nothing
    // (a const-initialized thread-local `Cell` needs no lazy set-up).
    unsafe impl GlobalAlloc for Recording {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: the caller keeps `GlobalAlloc::alloc`'s contract.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: the caller keeps `GlobalAlloc::alloc_zeroed`'s contract.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: the caller keeps `GlobalAlloc::realloc`'s contract, and
            // `ptr` came from `System` through this allocator.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller keeps `GlobalAlloc::dealloc`'s contract, and
            // `ptr` came from `System` through this allocator.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static RECORDING: Recording = Recording;

    /// A file in the temporary folder, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!("capsa-{name}-{}", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A minimal ELF64 executable: one PT_LOAD at 1 MiB holding `code`, and
    /// optionally a Xen PVH entry note pointing at the same code.
    pub(crate) fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
        let load: u64 = HIMEM_START;
        let phnum: u16 = if pvh { 2 } else { 1 };
        let code_off: u64 = 64 + 56 * u64::from(phnum) + if pvh { 24 } else { 0 };
        let mut f = Vec::new();
        f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&load.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&56u16.to_le_bytes());
        f.extend_from_slice(&phnum.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&7u32.to_le_bytes());
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&align.to_le_bytes());
        };
        phdr(&mut f, 1, code_off, load, code.len() as u64, 0x1000);
        if pvh {
            phdr(&mut f, 4, 64 + 56 * 2, 0, 24, 4);
            // namesz 4, descsz 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
            f.extend_from_slice(&4u32.to_le_bytes());
            f.extend_from_slice(&8u32.to_le_bytes());
            f.extend_from_slice(&18u32.to_le_bytes());
            f.extend_from_slice(b"Xen\0");
            f.extend_from_slice(&load.to_le_bytes());
        }
        assert_eq!(f.len() as u64, code_off);
        f.extend_from_slice(code);
        f
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn elf_without_note_uses_64_bit_protocol() {
        let m = mem();
        let e = load_kernel(
            &m,
            &KernelImage::Bytes(tiny_elf(&[0xf4], false)),
            Some(&[1, 2, 3]),
            "console=ttyS0",
        )
        .unwrap();
        assert_eq!(e.protocol, BootProtocol::Linux64);
        assert_eq!(e.entry, GuestAddress(HIMEM_START));
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_size }, 3);
        assert_eq!(p.e820_entries, 3);
        let rd = { p.hdr.ramdisk_image } as u64;
        assert_eq!(rd % 0x1000, 0);
        let mut b = [0u8; 3];
        m.read_slice(&mut b, GuestAddress(rd)).unwrap();
        assert_eq!(b, [1, 2, 3]);
        let mut c = [0u8; 14];
        m.read_slice(&mut c, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
    }

    #[test]
    fn elf_with_pvh_note_uses_pvh() {
        let m = mem();
        let e = load_kernel(
            &m,
            &KernelImage::Bytes(tiny_elf(&[0xf4], true)),
            Some(&[9; 5000]),
            "x",
        )
        .unwrap();
        assert_eq!(e.protocol, BootProtocol::Pvh);
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(module.size, 5000);
        assert_eq!(info.memmap_entries, 3);
    }

    #[test]
    fn a_kernel_file_goes_to_guest_memory_without_a_heap_copy() {
        let code: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let file = TempFile::new("kernel", &tiny_elf(&code, false));
        let m = mem();
        LARGEST.with(|largest| largest.set(0));
        let entry = load_kernel(&m, &KernelImage::Path(file.0.clone()), None, "x").unwrap();
        let largest = LARGEST.with(Cell::get);
        assert!(
            largest < 64 << 10,
            "loading a {} byte kernel allocated {largest} bytes at once",
            code.len()
        );
        assert_eq!(entry.entry, GuestAddress(HIMEM_START));
        let mut loaded = vec![0u8; code.len()];
        m.read_slice(&mut loaded, GuestAddress(HIMEM_START))
            .unwrap();
        assert!(
            loaded == code,
            "the kernel in guest memory differs from the file"
        );
    }

    #[test]
    fn an_unreadable_kernel_file_is_named() {
        let m = mem();
        let missing = std::env::temp_dir().join(format!("capsa-no-kernel-{}", std::process::id()));
        for path in [missing, std::env::temp_dir()] {
            match load_kernel(&m, &KernelImage::Path(path.clone()), None, "") {
                Err(e @ BootError::ReadKernel { .. }) => {
                    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}")
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    #[test]
    fn garbage_and_oversized_inputs_are_errors() {
        let m = mem();
        assert!(matches!(
            load_kernel(&m, &KernelImage::Bytes(vec![0u8; 100]), None, ""),
            Err(BootError::BadKernel { .. })
        ));
        let elf = KernelImage::Bytes(tiny_elf(&[0xf4], false));
        assert!(matches!(
            load_kernel(&m, &elf, None, &"a".repeat(5000)),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(
            load_kernel(&m, &elf, Some(&vec![0u8; 70 << 20]), ""),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }
}
