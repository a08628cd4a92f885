//! The microVM path through the host on real KVM: a real Linux boot whose
//! agent does not answer in time, and (where KVM runs guests natively) the
//! whole path end to end. Thread and fd counts are compared, so the tests
//! in this file run one at a time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use capsa::{ExitStatus, HostConfig, VmBackend, VmSettings};
use capsa_tests::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn elf(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The guest kernel and initramfs built by the xtask.
fn kvm_config(ready: Duration) -> HostConfig {
    let var = |name: &str| {
        PathBuf::from(std::env::var_os(name).unwrap_or_else(|| {
            panic!("{name} is not set: run the tests with `cargo xtask test`, which builds the guest kernel and initramfs")
        }))
    };
    HostConfig {
        vm: Some(VmSettings {
            backend: VmBackend::Kvm {
                kernel: var("CAPSA_KERNEL"),
                initramfs: var("CAPSA_INITRAMFS"),
            },
            ready_timeout: ready,
            vcpus: 1,
            memory_mib: 128,
        }),
        ..HostConfig::default()
    }
}

/// A real microVM whose agent does not answer in time (here: the kernel is
/// still booting) fails `runBytes` with the console's last lines, and the VM
/// is gone afterwards: no vCPU thread or fd is left.
#[test]
fn a_microvm_whose_agent_never_answers_fails_cleanly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut baseline = None;
    // The first round also sets up what a process keeps for good (the
    // runtime's signal pipe, the KVM probe); later rounds must not add.
    for _ in 0..2 {
        with_host(kvm_config(Duration::from_secs(3)), |host| async move {
            let root = host.root_executor();
            let err = run(&root, &elf("/bin/true"), Run::default())
                .await
                .err()
                .expect("runBytes should fail");
            assert!(err.contains("the agent did not answer within 3s"), "{err}");
            assert!(err.contains("console:"), "{err}");
            assert_eq!(host.live_cells(), 0);
        });
        let now = (count("/proc/self/task"), open_fds());
        match &baseline {
            None => baseline = Some(now),
            Some(b) => {
                assert_eq!(now.0, b.0, "threads left behind");
                assert_eq!(now.1, b.1, "fds left behind");
            }
        }
    }
}

fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| !p.starts_with("/proc/"))
        .collect();
    fds.sort();
    fds
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The whole path on hardware KVM: boot, agent ready, `runBytes(ELF)`
/// through the host's root Executor, output back, teardown, and no leak
/// over several boots. Where KVM only emulates guests (Linux user space
/// cannot run there), it says so and skips.
#[test]
fn full_microvm_path_on_native_kvm() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let probe = match capsa_microvm::probe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED: no usable KVM here ({e})");
            return;
        }
    };
    if probe.emulated {
        eprintln!(
            "SKIPPED: KVM is emulated here (probe: {:.0} ns per loop iteration; native runs ~1 ns); \
             the full microVM path needs hardware KVM",
            probe.ns_per_iteration
        );
        return;
    }
    let busybox = std::env::var("CAPSA_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into());
    let busybox = elf(&busybox);
    let mut baseline = None;
    for round in 0..3 {
        let busybox = busybox.clone();
        with_host(kvm_config(Duration::from_secs(10)), |host| async move {
            let root = host.root_executor();
            let p = run(
                &root,
                &busybox,
                Run {
                    args: &["echo", "hello from a microVM"],
                    ..Run::default()
                },
            )
            .await
            .expect("boot and run busybox");
            assert_eq!(stdout_of(&p).await, b"hello from a microVM\n");
            assert_eq!(wait(&p).await, ExitStatus::Exited(0));
            let agent = exported_executor(&p);
            assert_eq!(echo(&agent, "agent").await.unwrap(), "agent");
        });
        let now = (count("/proc/self/task"), count("/proc/self/fd"), rss_kib());
        match baseline {
            None => baseline = Some(now),
            Some((t, f, rss)) => {
                assert_eq!(now.0, t, "threads after boot {round}");
                assert_eq!(now.1, f, "fds after boot {round}");
                assert!(
                    now.2 < rss + 8 * 1024,
                    "RSS grew from {rss} KiB to {} KiB",
                    now.2
                );
            }
        }
    }
}
