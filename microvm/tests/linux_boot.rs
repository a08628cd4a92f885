//! A real Linux boot: the project's kernel and initramfs (built by
//! `cargo xtask`, paths in `CAPSA_KERNEL` and `CAPSA_INITRAMFS`) under
//! capsa's VMM.
//!
//! The tests need KVM that runs guests natively (`cargo xtask test` runs
//! them in its nested test machine where KVM here is emulated):
//!
//! - under the compatibility CPU profile (the one the host picks where
//!   [`probe`] finds KVM emulating guest instructions: CPUID masks,
//!   `clearcpuid=`, a preset `lpj=`, `no_int3_selftest`), the kernel
//!   reaches `Run /init as init process`, and the vsock device saw the
//!   kernel's virtio-vsock driver negotiate features, set DRIVER_OK and
//!   post RX buffers;
//! - the same kernel as a `bzImage`, through the bzImage loader, up to the
//!   agent running busybox;
//! - the full path: the agent comes up on vsock port 1024, `Executor.echo`
//!   and `runBytes(busybox echo ...)` go through it over Cap'n Proto, the VM
//!   shuts down, and three more boots show that threads, fds and RSS return
//!   to where they were.
//!
//! The compatibility profile is booted here too, not on the emulating KVM it
//! is meant for: a boot there measures the emulator, not capsa (70 s to 3
//! minutes on a quiet machine, and past 8 and 17 minutes without reaching
//! init where the emulator ran 2.1-2.4 times slower, a CI runner and a busy
//! machine, the guest's jiffies advancing 135 times slower than the wall
//! clock).
//!
//! The tests take turns, so nothing else runs in the process while one
//! counts threads and fds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa_microvm::{
    compat_kernel_args, probe, CpuProfile, KernelImage, Probe, Vm, VmConfig, VmExit,
};
use capsa_schema::capsa_capnp::{executor, exit_status};
use futures::AsyncReadExt;

/// How long the kernel may take to reach init: well under a second on
/// hardware, seconds in the nested test machine on a busy two-core host.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the agent may take to answer from `Vm::start` where KVM runs
/// guests natively: well under a second on hardware, 5 to 15 s in the
/// nested test machine on a busy two-core host.
const AGENT_DEADLINE: Duration = Duration::from_secs(120);

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const AGENT_PORT: u32 = 1024;
const INIT_LINE: &str = "Run /init as init process";
const VERSION_LINE: &str = "Linux version";

/// Virtio feature bit VIRTIO_F_VERSION_1.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Virtio device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set: this test boots the project's kernel and initramfs, \
             which `cargo xtask test` builds and passes in; run `cargo xtask test`"
        ),
    }
}

fn config(kernel: &Path, initramfs: &[u8], probe: &Probe, profile: CpuProfile) -> VmConfig {
    let mut cmdline = String::from("console=ttyS0 panic=-1 reboot=k");
    if profile == CpuProfile::Compat {
        cmdline.push(' ');
        cmdline.push_str(&compat_kernel_args(Some(probe.ns_per_iteration)));
        // The kernel's INT3 self-test cannot run on an emulating backend
        // (see the kernel patches).
        cmdline.push_str(" no_int3_selftest");
    }
    VmConfig {
        vcpus: 1,
        memory_mib: 128,
        kernel: KernelImage::Path(kernel.to_path_buf()),
        initramfs: Some(initramfs.to_vec()),
        cmdline,
        cid: 3,
        vsock_uds: None,
        profile,
    }
}

/// When each milestone of the boot appeared on the console, from `Vm::start`.
struct BootTimes {
    linux_version: Duration,
    init: Duration,
}

/// Polls the console until `INIT_LINE` appears; panics with the console
/// tail if the VM ends first or the deadline passes.
fn wait_for_init(vm: &Vm, start: Instant) -> BootTimes {
    let mut linux_version = None;
    loop {
        let log = vm.serial_log();
        if linux_version.is_none() && log.contains(VERSION_LINE) {
            linux_version = Some(start.elapsed());
        }
        if log.contains(INIT_LINE) {
            let init = start.elapsed();
            return BootTimes {
                linux_version: linux_version.unwrap_or(init),
                init,
            };
        }
        if let Some(exit) = vm.exit_status() {
            panic!(
                "the VM ended before init ran: {exit:?}\nconsole:\n{}",
                tail(&log)
            );
        }
        if start.elapsed() > BOOT_DEADLINE {
            panic!(
                "the kernel did not reach init within {BOOT_DEADLINE:?}\nconsole:\n{}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The kernel's virtio-vsock driver brought the device up.
fn assert_vsock_driver_up(vm: &Vm) {
    let s = vm.vsock_state();
    eprintln!("vsock device state: {s:?}");
    assert_ne!(
        s.acked_features & VIRTIO_F_VERSION_1,
        0,
        "the driver did not ack VIRTIO_F_VERSION_1: {s:?}"
    );
    let want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    assert_eq!(s.device_status & want, want, "device status: {s:?}");
    assert!(s.activated, "the device was not activated: {s:?}");
    assert!(!s.needs_reset, "the device needs a reset: {s:?}");
    assert!(s.rx_buffers_available > 0, "no RX buffers posted: {s:?}");
}

mod native_kvm {
    use super::*;

    /// The project's kernel and initramfs, as `cargo xtask test` passes them.
    fn kernel_and_initramfs() -> (PathBuf, Vec<u8>) {
        let kernel = env_path("CAPSA_KERNEL");
        let initramfs_path = env_path("CAPSA_INITRAMFS");
        let initramfs = std::fs::read(&initramfs_path)
            .unwrap_or_else(|e| panic!("{}: {e}", initramfs_path.display()));
        (kernel, initramfs)
    }

    /// The probe, which must find KVM running guests natively.
    fn native_probe() -> Probe {
        let probe = probe().expect("the KVM probe failed");
        assert!(
            !probe.emulated,
            "this test needs KVM that runs guest code natively, and KVM emulates it here \
             (probe: {:.0} ns per loop iteration); `cargo xtask test` runs it in its nested \
             test machine",
            probe.ns_per_iteration
        );
        probe
    }

    /// The kernel boots under the compatibility profile, whose CPUID masks and
    /// kernel arguments are what an emulating KVM gets.
    #[test]
    fn the_compatibility_profile_boots_to_init_with_vsock_up() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let probe = native_probe();
        let (kernel, initramfs) = kernel_and_initramfs();

        let start = Instant::now();
        let vm =
            Vm::start(config(&kernel, &initramfs, &probe, CpuProfile::Compat)).expect("Vm::start");
        let times = wait_for_init(&vm, start);
        eprintln!(
            "boot: start -> \"{VERSION_LINE}\" {:.2} s, start -> \"{INIT_LINE}\" {:.2} s \
             (\"{VERSION_LINE}\" -> init {:.2} s)",
            times.linux_version.as_secs_f64(),
            times.init.as_secs_f64(),
            (times.init - times.linux_version).as_secs_f64()
        );
        assert_vsock_driver_up(&vm);
        vm.shutdown();
    }

    /// The same kernel as a `bzImage` (the format distributions ship),
    /// through the VMM's bzImage loader and the 64-bit boot protocol, up
    /// to the agent running busybox.
    #[test]
    fn the_bzimage_boots_to_the_agent_too() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let probe = native_probe();
        let (kernel, initramfs) = kernel_and_initramfs();
        // The kernel build keeps both images side by side.
        let bzimage = kernel.with_file_name("bzImage");
        assert!(bzimage.is_file(), "{}: no bzImage", bzimage.display());
        let busybox_path = env_path("CAPSA_BUSYBOX");
        let busybox = std::fs::read(&busybox_path)
            .unwrap_or_else(|e| panic!("{}: {e}", busybox_path.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, one_vm(&bzimage, &initramfs, &probe, &busybox));
    }

    /// A `quiet` kernel's log, which its console does not show, is read
    /// from guest memory while it runs, and each vCPU says where it is.
    #[test]
    fn the_kernel_log_and_the_vcpus_are_read_from_a_running_guest() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let probe = native_probe();
        let (kernel, initramfs) = kernel_and_initramfs();
        let mut config = config(&kernel, &initramfs, &probe, CpuProfile::Native);
        config.cmdline.push_str(" quiet");
        config.vcpus = 2;
        let start = Instant::now();
        let vm = Vm::start(config).expect("Vm::start");
        // "Run /init" is an info message: `quiet` keeps it off the console.
        let log = loop {
            let log = vm.kernel_log(10_000).expect("the kernel log");
            if log.iter().any(|r| r.text.contains(INIT_LINE)) {
                break log;
            }
            if let Some(exit) = vm.exit_status() {
                panic!(
                    "the VM ended before init ran: {exit:?}\n{}",
                    vm.serial_log()
                );
            }
            assert!(
                start.elapsed() < BOOT_DEADLINE,
                "no \"{INIT_LINE}\" in the kernel log within {BOOT_DEADLINE:?}: {log:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(!vm.serial_log().contains(INIT_LINE), "{}", vm.serial_log());
        let version = log
            .iter()
            .find(|r| r.text.starts_with(VERSION_LINE))
            .unwrap_or_else(|| panic!("no \"{VERSION_LINE}\" record: {log:#?}"));
        assert_eq!(version.level, 5, "the banner is a notice: {version:?}");
        eprintln!("{} kernel log records, newest {:?}", log.len(), log.last());
        // Both vCPUs answer, three times.
        for _ in 0..3 {
            let samples = vm.sample_vcpus();
            eprintln!("{samples:?}");
            assert_eq!(
                samples.iter().map(|s| s.vcpu).collect::<Vec<_>>(),
                [0, 1],
                "{samples:?}"
            );
            assert!(
                samples.iter().all(|s| s.rip != 0 && s.cpl <= 3),
                "{samples:?}"
            );
        }
        vm.shutdown();
        // A machine that has stopped has no vCPU to sample.
        let deadline = Instant::now() + Duration::from_secs(10);
        while vm.running_vcpus() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(vm.sample_vcpus(), []);
    }

    /// The agent answers over vsock and runs busybox; boots leave nothing
    /// behind.
    #[test]
    fn the_agent_answers_over_vsock_and_boots_leave_nothing_behind() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let probe = native_probe();
        let (kernel, initramfs) = kernel_and_initramfs();
        full_path(&kernel, &initramfs, &probe);
    }
}

// ---------------------------------------------------------------------------
// The full path, where KVM runs guests natively.

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn full_path(kernel: &Path, initramfs: &[u8], probe: &Probe) {
    let busybox_path = env_path("CAPSA_BUSYBOX");
    let busybox =
        std::fs::read(&busybox_path).unwrap_or_else(|e| panic!("{}: {e}", busybox_path.display()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let one_vm = || local.block_on(&rt, one_vm(kernel, initramfs, probe, &busybox));

    // Warm up once (lazy statics, signal handler, allocator) before counting.
    one_vm();
    let threads = count("/proc/self/task");
    let fds = count("/proc/self/fd");
    let rss = rss_kib();
    for round in 0..3 {
        one_vm();
        eprintln!(
            "round {round}: threads {} (was {threads}), fds {} (was {fds}), RSS {} KiB (was {rss})",
            count("/proc/self/task"),
            count("/proc/self/fd"),
            rss_kib()
        );
    }
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    assert_eq!(count("/proc/self/fd"), fds, "fds leaked");
    // Guest RAM is 128 MiB and the booted guest touches tens of MiB of it:
    // a VM whose memory stayed mapped would show far above this slack.
    let now = rss_kib();
    assert!(
        now <= rss + 10 * 1024,
        "RSS grew from {rss} KiB to {now} KiB over three VMs"
    );
}

/// Boots a VM, waits for the agent, runs `echo` and busybox through it,
/// shuts the VM down.
async fn one_vm(kernel: &Path, initramfs: &[u8], probe: &Probe, busybox: &[u8]) {
    let start = Instant::now();
    let vm = Vm::start(config(kernel, initramfs, probe, CpuProfile::Native)).expect("Vm::start");

    // Connect with retries: the guest refuses (RST) until the agent listens.
    let stream = loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), vm.connect(AGENT_PORT)).await;
        if let Ok(Ok(s)) = attempt {
            break s;
        }
        if let Some(exit) = vm.exit_status() {
            panic!(
                "the VM ended before the agent listened: {exit:?}\nconsole:\n{}",
                tail(&vm.serial_log())
            );
        }
        if start.elapsed() > AGENT_DEADLINE {
            panic!(
                "the agent did not listen on vsock port {AGENT_PORT} within {AGENT_DEADLINE:?}\nconsole:\n{}",
                tail(&vm.serial_log())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "agent ready {:.3} s after Vm::start",
        start.elapsed().as_secs_f64()
    );

    let (r, w) = stream.split();
    let network = twoparty::VatNetwork::new(r, w, Side::Client, Default::default());
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let executor: executor::Client = rpc.bootstrap(Side::Server);
    let rpc_task = tokio::task::spawn_local(rpc);

    let work = async {
        let mut req = executor.echo_request();
        req.get().set_message("ping over vsock");
        let resp = req.send().promise.await.expect("echo");
        assert_eq!(
            resp.get()
                .unwrap()
                .get_response()
                .unwrap()
                .to_str()
                .unwrap(),
            "ping over vsock"
        );

        let args = ["echo", "hello", "from", "a", "microVM"];
        let mut req = executor.run_bytes_request();
        {
            let mut p = req.get();
            p.set_bytes(busybox);
            let mut a = p.reborrow().init_args(args.len() as u32);
            for (i, arg) in args.iter().enumerate() {
                a.set(i as u32, *arg);
            }
            p.reborrow().init_env(0);
            p.init_options().set_name("busybox");
        }
        let process = req
            .send()
            .promise
            .await
            .expect("runBytes(busybox)")
            .get()
            .unwrap()
            .get_process()
            .unwrap();
        let stdout = process.stdout_request().send().pipeline.get_source();
        let mut out = Vec::new();
        loop {
            let mut req = stdout.read_request();
            req.get().set_max_bytes(1 << 16);
            let resp = req.send().promise.await.expect("stdout read");
            let r = resp.get().unwrap();
            out.extend_from_slice(r.get_data().unwrap());
            if r.get_eof() {
                break;
            }
        }
        assert_eq!(String::from_utf8_lossy(&out), "hello from a microVM\n");
        let resp = process.wait_request().send().promise.await.expect("wait");
        let status = resp.get().unwrap().get_status().unwrap();
        assert!(
            matches!(status.which().unwrap(), exit_status::Exited(0)),
            "busybox did not exit 0"
        );
    };
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the agent round trip timed out\nconsole:\n{}",
                tail(&vm.serial_log())
            )
        });

    drop(executor);
    rpc_task.abort();
    let _ = rpc_task.await;
    vm.shutdown();
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait())
        .await
        .expect("the VM stops within 10 s");
    assert!(
        matches!(exit, VmExit::Stopped | VmExit::Shutdown(_)),
        "VM ended with {exit:?}"
    );
    drop(vm);
}
