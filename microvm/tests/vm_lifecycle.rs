//! Whole-VM tests with a tiny hand-made kernel: boot through the real
//! loader and CPU set-up, console output, i8042 reset, and teardown that
//! returns threads and fds to where they were. One test in this file, so
//! nothing else runs in the process while it counts threads and fds.

use std::time::Duration;

use capsa_microvm::{CpuProfile, KernelImage, Vm, VmConfig, VmExit};

/// A minimal ELF64 with one PT_LOAD at 1 MiB holding `code`, and optionally
/// a Xen PVH entry note (so the kernel is entered in 32-bit protected mode).
fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let load: u64 = 0x10_0000;
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off: u64 = 64 + 56 * u64::from(phnum) + if pvh { 24 } else { 0 };
    let mut f = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&0x3eu16.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&load.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, phnum, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64, align: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes());
        for v in [off, addr, addr, size, size, align] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, code_off, load, code.len() as u64, 0x1000);
    if pvh {
        phdr(&mut f, 4, 64 + 56 * 2, 0, 24, 4);
        for v in [4u32, 8, 18] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&load.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// Prints "K\n" on COM1, then pulses the i8042 reset line. The same bytes
/// mean the same in 32-bit and 64-bit mode.
const RESET_GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
];

/// Spins forever after printing.
const SPIN_GUEST: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'S', 0xee, 0xeb, 0xfe];

fn config(code: &[u8], pvh: bool, vcpus: u8) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 32,
        kernel: KernelImage::Bytes(tiny_elf(code, pvh)),
        initramfs: Some(vec![0u8; 4096]),
        cmdline: "console=ttyS0".into(),
        cid: 3,
        vsock_uds: None,
        profile: CpuProfile::Compat,
    }
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn boot_reset_and_teardown_leave_nothing_behind() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wait = |vm: &Vm| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), vm.wait()).await })
            .expect("guest ends within a minute")
    };

    // Warm up once (lazy statics, signal handler) before counting.
    let vm = Vm::start(config(RESET_GUEST, false, 1)).unwrap();
    assert_eq!(wait(&vm), VmExit::Shutdown("i8042 reset"));
    drop(vm);
    let threads = count("/proc/self/task");
    let fds = count("/proc/self/fd");

    for round in 0..4 {
        // 64-bit boot protocol and PVH, one and two vCPUs.
        let pvh = round % 2 == 1;
        let vm = Vm::start(config(RESET_GUEST, pvh, 1 + (round / 2) as u8)).unwrap();
        assert_eq!(wait(&vm), VmExit::Shutdown("i8042 reset"), "round {round}");
        assert_eq!(vm.serial_log(), "K\n");
        assert!(!vm.vsock_state().activated);
        drop(vm);

        // A guest that never stops is torn down by drop.
        let vm = Vm::start(config(SPIN_GUEST, pvh, 1)).unwrap();
        for _ in 0..1000 {
            if vm.serial_log() == "S" {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(vm.serial_log(), "S");
        assert!(vm.exit_status().is_none());
        vm.shutdown();
        assert_eq!(wait(&vm), VmExit::Stopped);
        drop(vm);
    }
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    assert_eq!(count("/proc/self/fd"), fds, "fds leaked");

    // The hybrid socket is 0600 while the VM lives and gone after.
    let dir = std::env::temp_dir().join(format!("capsa-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vsock.sock");
    let mut cfg = config(SPIN_GUEST, false, 1);
    cfg.vsock_uds = Some(sock.clone());
    let vm = Vm::start(cfg).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    drop(vm);
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tests of this file count the process's threads and fds: one at a
/// time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Tests that mean something only where KVM runs guests natively (an
/// emulating KVM lets a waiting secondary vCPU out of `KVM_RUN` on its own).
mod native_kvm {
    use super::*;

    #[test]
    fn a_vcpu_that_stops_the_guest_stops_its_siblings() {
        let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // vCPU 0 resets the machine; vCPU 1 waits for a start-up IPI that never
        // comes, inside KVM_RUN, where no exit of its own would end it.
        let vm = Vm::start(config(RESET_GUEST, false, 2)).unwrap();
        let exit = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), vm.wait()).await })
            .expect("guest ends within a minute");
        assert_eq!(exit, VmExit::Shutdown("i8042 reset"));
        let start = std::time::Instant::now();
        while vm.running_vcpus() > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            vm.running_vcpus(),
            0,
            "a vCPU still runs {:?} after the guest stopped, with the VM alive",
            start.elapsed()
        );
    }
}
