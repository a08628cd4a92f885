//! The microVM boot benchmark that `cargo xtask bench` runs: the project's
//! kernel and initramfs (`CAPSA_KERNEL`, `CAPSA_INITRAMFS`) booted to
//! `Run /init as init process` by capsa's VMM, then by QEMU
//! (`qemu-system-x86_64 -M microvm`, command in `CAPSA_QEMU`) as the
//! reference, with the same kernel command line and, where KVM is emulated,
//! the same CPU feature masks.
//!
//! Figures (each measured once; a boot under an emulating KVM takes minutes):
//! - boot to init: wall time from just before `Vm::start` (or spawning QEMU)
//!   until the line appears on the serial console, polled every 20 ms;
//! - agent ready (hardware KVM only): wall time from just before `Vm::start`
//!   until a vsock connection to the agent's port 1024 is accepted;
//! - VMM RSS per VM: the growth of this process's VmRSS from before
//!   `Vm::start` to the moment init runs, minus the resident part of the
//!   guest RAM mapping (read from /proc/self/smaps). That is what the VMM
//!   itself costs per VM (threads' stacks, device buffers, KVM structures
//!   mapped into the process, the kernel image read into memory), not what
//!   the guest chose to touch. The guest RAM's resident size is printed
//!   beside it;
//! - QEMU RSS: VmRSS of the QEMU process at the same point; it includes the
//!   guest RAM QEMU has touched, so compare it with capsa's VMM plus guest.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capsa_microvm::{compat_kernel_args, probe, CpuProfile, KernelImage, Probe, Vm, VmConfig};

const INIT_LINE: &str = "Run /init as init process";
const DEADLINE: Duration = Duration::from_secs(10 * 60);
const MEMORY_MIB: u32 = 128;
const AGENT_PORT: u32 = 1024;

/// The CPU features QEMU hides under the compatibility profile: the same
/// set capsa's CPUID masks and `clearcpuid=` hide, plus the
/// ARCH_CAPABILITIES MSR, which QEMU fails to set on an emulating backend.
const QEMU_COMPAT_CPU: &str =
    "host,-arch-capabilities,-smap,-smep,-xsave,-popcnt,-avx,-avx2,-avx512f,-pku,-umip,\
                               -movbe,-bmi1,-bmi2,-adx,-rdrand,-rdseed,-fma,-f16c,-aes,-pclmulqdq,\
                               -sha-ni,-invpcid";

fn env_path(var: &str) -> Result<PathBuf, String> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{var} is not set; run this through `cargo xtask bench`"))
}

fn cmdline(probe: &Probe) -> String {
    let mut c = String::from("console=ttyS0 panic=-1 reboot=k");
    if probe.emulated {
        c.push(' ');
        c.push_str(&compat_kernel_args(Some(probe.ns_per_iteration)));
        c.push_str(" no_int3_selftest");
    }
    c
}

fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Start address, size and Rss (KiB) of every mapping of this process.
fn mappings() -> Vec<(String, u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out = Vec::new();
    let (mut start, mut size) = (String::new(), 0);
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let rss = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            out.push((start.clone(), size, rss));
        } else if let Some((s, e)) = line
            .split_whitespace()
            .next()
            .and_then(|range| range.split_once('-'))
        {
            let hex = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_hexdigit());
            if hex(s) && hex(e) {
                start = s.to_string();
            }
        }
    }
    out
}

struct CapsaBoot {
    to_init: Duration,
    agent_ready: Option<Duration>,
    vmm_rss_kib: u64,
    guest_rss_kib: u64,
}

fn boot_capsa(kernel: &Path, initramfs: &[u8], probe: &Probe) -> Result<CapsaBoot, String> {
    let before: HashSet<String> = mappings().into_iter().map(|m| m.0).collect();
    let rss_before = status_kib("self", "VmRSS:");
    let start = Instant::now();
    let vm = Vm::start(VmConfig {
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        kernel: KernelImage::Path(kernel.to_path_buf()),
        initramfs: Some(initramfs.to_vec()),
        cmdline: cmdline(probe),
        cid: 3,
        vsock_uds: None,
        profile: if probe.emulated {
            CpuProfile::Compat
        } else {
            CpuProfile::Native
        },
    })
    .map_err(|e| format!("Vm::start: {e}"))?;
    loop {
        if vm.serial_log().contains(INIT_LINE) {
            break;
        }
        if let Some(exit) = vm.exit_status() {
            return Err(format!("the VM ended before init: {exit:?}"));
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("no \"{INIT_LINE}\" within {DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let to_init = start.elapsed();
    let rss_after = status_kib("self", "VmRSS:");
    let guest_rss_kib: u64 = mappings()
        .into_iter()
        .filter(|(s, size, _)| !before.contains(s) && *size == u64::from(MEMORY_MIB) << 10)
        .map(|m| m.2)
        .sum();
    let vmm_rss_kib = rss_after
        .saturating_sub(rss_before)
        .saturating_sub(guest_rss_kib);

    let agent_ready = if probe.emulated {
        None
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            while start.elapsed() < Duration::from_secs(30) {
                let c = tokio::time::timeout(Duration::from_secs(1), vm.connect(AGENT_PORT)).await;
                if let Ok(Ok(_stream)) = c {
                    return Some(start.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None
        })
    };
    vm.shutdown();
    drop(vm);
    Ok(CapsaBoot {
        to_init,
        agent_ready,
        vmm_rss_kib,
        guest_rss_kib,
    })
}

struct QemuBoot {
    to_init: Duration,
    rss_kib: u64,
}

fn boot_qemu(
    qemu: &PathBuf,
    kernel: &PathBuf,
    initramfs: &PathBuf,
    probe: &Probe,
) -> Result<QemuBoot, String> {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        if probe.emulated {
            QEMU_COMPAT_CPU
        } else {
            "host"
        },
        "-m",
        &MEMORY_MIB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(cmdline(probe))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let pid = child.id().to_string();
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(INIT_LINE) {
                let _ = tx.send(());
            }
        }
    });
    let result = match rx.recv_timeout(DEADLINE) {
        Ok(()) => Ok(QemuBoot {
            to_init: start.elapsed(),
            rss_kib: status_kib(&pid, "VmRSS:"),
        }),
        Err(_) => Err(String::new()),
    };
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|_| {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        format!(
            "QEMU did not reach \"{INIT_LINE}\" within {DEADLINE:?}: {}",
            err.trim()
        )
    })
}

fn main() -> ExitCode {
    let run = || -> Result<(), String> {
        let kernel = env_path("CAPSA_KERNEL")?;
        let initramfs_path = env_path("CAPSA_INITRAMFS")?;
        let qemu = std::env::var_os("CAPSA_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| "qemu-system-x86_64".into());
        let initramfs = std::fs::read(&initramfs_path)
            .map_err(|e| format!("{}: {e}", initramfs_path.display()))?;
        let probe = probe().map_err(|e| format!("KVM probe: {e}"))?;
        eprintln!(
            "microVM bench: KVM {} (probe: {:.1} ns per loop iteration), 1 vCPU, {MEMORY_MIB} MiB, \
             kernel {} ({} KiB initramfs)",
            if probe.emulated {
                "emulated, compatibility profile"
            } else {
                "native"
            },
            probe.ns_per_iteration,
            kernel.display(),
            initramfs.len() >> 10
        );

        eprintln!("booting with capsa's VMM ...");
        let capsa = boot_capsa(&kernel, &initramfs, &probe)?;
        println!(
            "capsa VMM: boot to \"{INIT_LINE}\": {:.2} s",
            capsa.to_init.as_secs_f64()
        );
        match capsa.agent_ready {
            Some(t) => println!("capsa VMM: boot to agent ready: {:.3} s", t.as_secs_f64()),
            None if probe.emulated => {
                println!("capsa VMM: boot to agent ready: not measured (user space cannot run on an emulated KVM)")
            }
            None => println!("capsa VMM: agent did not become ready within 30 s"),
        }
        println!(
            "capsa VMM: RSS per VM {:.1} MiB (VMM's own), guest RAM resident {:.1} MiB",
            capsa.vmm_rss_kib as f64 / 1024.0,
            capsa.guest_rss_kib as f64 / 1024.0
        );

        eprintln!("booting the same kernel and initramfs with QEMU -M microvm ...");
        match boot_qemu(&qemu, &kernel, &initramfs_path, &probe) {
            Ok(q) => {
                println!(
                    "QEMU microvm: boot to \"{INIT_LINE}\": {:.2} s, RSS {:.1} MiB (incl. guest RAM)",
                    q.to_init.as_secs_f64(),
                    q.rss_kib as f64 / 1024.0
                );
                println!(
                    "boot time ratio capsa / QEMU: {:.2}",
                    capsa.to_init.as_secs_f64() / q.to_init.as_secs_f64()
                );
            }
            Err(e) => println!("QEMU microvm: failed: {e}"),
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
