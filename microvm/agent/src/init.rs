//! The agent's duties as PID 1 of a microVM: the file systems every program
//! expects, and ending the VM.
//!
//! Ending the VM: the agent calls `reboot(RB_AUTOBOOT)`. The guest kernel has
//! no ACPI, so `RB_POWER_OFF` could only halt the vCPU; a restart instead
//! goes through the kernel's reset path (the i8042 reset line), which capsa's
//! VMM treats as the end of the VM. A capsa microVM is never rebooted.
//! PID 1 must never exit (the kernel would panic), so every way out of the
//! agent, a panic included, ends here.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const MOUNTS: [Mount; 4] = [
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    // The executables the agent is given are written here, so no MS_NOEXEC.
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// Mounts /proc, /sys, /dev and /tmp. A failure is reported on the console
/// and the agent goes on: what it needs most is /tmp, and a missing /tmp
/// shows up as a clear error on the first `runBytes`.
pub fn mount_filesystems() {
    for m in &MOUNTS {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            eprintln!("capsa-agent: cannot create {}: {e}", m.target);
            continue;
        }
        match mount(
            Some(m.source),
            Path::new(m.target),
            Some(m.fstype),
            m.flags,
            m.data,
        ) {
            Ok(()) => eprintln!("capsa-agent: mounted {} on {}", m.fstype, m.target),
            // Already there (the kernel mounts devtmpfs itself on some set-ups).
            Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => eprintln!(
                "capsa-agent: cannot mount {} on {}: {e}",
                m.fstype, m.target
            ),
        }
    }
}

/// Flushes what can be flushed and ends the VM. Never returns.
pub fn power_off() -> ! {
    eprintln!("capsa-agent: powering off");
    nix::unistd::sync();
    let Err(err) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("capsa-agent: reboot failed: {err}");
    // Nothing else to do; exiting would panic the kernel, which also ends the VM.
    loop {
        std::thread::park();
    }
}

/// After the default panic message, ends the VM instead of exiting PID 1.
pub fn power_off_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        power_off();
    }));
}
