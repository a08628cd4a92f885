//! The L1 machine's image: Debian's generic kernel (fetched and unpacked,
//! never installed) with the modules the machine loads, and an initramfs
//! written here around a static busybox and [`INIT`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{run, stdout_of};
use crate::initramfs::{Newc, S_IFCHR, S_IFDIR, S_IFREG};
use crate::tools;

/// The modules the L1 kernel loads, in dependency order: virtio-pci for the
/// 9p transport, 9p itself, KVM for AMD (QEMU's `-cpu max` under TCG offers
/// SVM with nested paging, not VMX), and vhost-vsock for the benchmark's
/// QEMU peer, whose agent needs a vsock device to listen on.
const MODULES: [&str; 19] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "irqbypass",
    "kvm",
    "ccp",
    "kvm-amd",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vhost_iotlb",
    "vhost",
    "vhost_vsock",
];

/// Debian's meta-package naming the current generic kernel. The cloud
/// flavour has no 9p.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// Marks the line the `/init` script prints once KVM is there, before it
/// runs the script; what comes before it is boot noise.
pub(super) const READY_MARKER: &str = "capsa-nested: ready";

/// The L1 machine's `/init`, run by the static busybox.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "capsa-nested: $*"; poweroff -f; exit 1; }
for m in $(cat /modules/order); do
  insmod /modules/$m.ko || fail "could not load module $m"
done
[ -e /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd (does the CPU offer SVM?)"
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
  || fail "could not mount the host's root over 9p"
[ -n "$capsa_scratch" ] || fail "no capsa_scratch= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 scratch "/host$capsa_scratch" \
  || fail "could not mount the scratch folder"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mount -t tmpfs tmpfs /host/run || fail "could not mount a tmpfs on /run"
mkdir -p -m 1777 /host/run/capsa-tmp
mkdir -p -m 700 /host/run/capsa-home/.cache
# A fresh /tmp, unless the jobs' own files live under this machine's /tmp.
[ -n "$capsa_keep_tmp" ] || mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t devpts devpts /host/dev/pts
stty -F /dev/console -onlcr 2>/dev/null
# A heartbeat and the whole kernel log on the second serial port, never on
# the console: the host tells a frozen machine from a slow job by it.
( while :; do echo "capsa-nested: alive $(cut -d' ' -f1 /proc/uptime)"; sleep 5; done ) > /dev/ttyS1 2>&1 &
cat /proc/kmsg > /dev/ttyS1 2>&1 &
# A microVM that triple-faults is reset by KVM before its VMM can read its
# registers; KVM's trace still has them. Every guest exit (and every
# exception, interrupt and asynchronous page fault KVM gives a guest) goes to a small
# ring, which stops at the first SHUTDOWN exit (0x7f on SVM: a triple
# fault) so the exits before it stay; a second instance keeps every
# shutdown. Both are printed after the jobs if any guest shut down. A
# test's watchdog reads the same ring to say where a spinning guest is.
t=/sys/kernel/tracing
traced=
if mount -t tracefs tracefs $t 2>/dev/null && [ -d $t/events/kvm/kvm_exit ]; then
  echo 256 > $t/buffer_size_kb
  echo 1 > $t/events/kvm/kvm_exit/enable
  echo 1 > $t/events/kvm/kvm_inj_exception/enable
  echo 1 > $t/events/kvm/kvm_inj_virq/enable
  for e in $t/events/kvm/kvm_async_pf_*; do echo 1 > $e/enable; done
  echo 'traceoff if exit_reason == 0x7f' > $t/events/kvm/kvm_exit/trigger
  mkdir $t/instances/shutdown
  echo 'exit_reason == 0x7f' > $t/instances/shutdown/events/kvm/kvm_exit/filter
  echo 1 > $t/instances/shutdown/events/kvm/kvm_exit/enable
  mount -t tracefs tracefs /host$t
  traced=1
fi
echo "capsa-nested: ready: $(uname -r), $(nproc) CPUs, $(grep -c . /proc/modules) modules, /dev/kvm"
HOME=/tmp chroot /host /bin/sh "$capsa_scratch/run.sh"
code=$?
if [ -n "$traced" ] && grep -q kvm_exit $t/instances/shutdown/trace; then
  echo "capsa-nested: microVM guests that shut down (triple fault), as KVM saw them:"
  grep -v '^#' $t/instances/shutdown/trace
  echo "capsa-nested: the last guest exits before the first of them:"
  grep -v '^#' $t/trace | tail -n 80
fi
echo $code > "/host$capsa_scratch/status"
sync
poweroff -f
"#;

/// Fetches Debian's generic kernel package (not installed: unpacked) and
/// keeps its `vmlinuz` and the modules of [`MODULES`]; returns the folder.
pub(super) fn ensure_l1_kernel(base: &Path) -> Result<PathBuf> {
    let package = l1_kernel_package()?;
    let dir = base.join("l1").join(&package);
    let order = MODULES.join("\n") + "\n";
    let cached = fs::read_to_string(dir.join("modules/order")).is_ok_and(|o| o == order);
    if dir.join("vmlinuz").is_file() && cached {
        eprintln!("==> nested machine kernel is cached: {}", dir.display());
        return Ok(dir);
    }
    let download = base.join("download");
    if download.exists() {
        fs::remove_dir_all(&download)?;
    }
    fs::create_dir_all(&download)?;
    eprintln!("==> downloading {package} (about 70 MB; unpacked, not installed)");
    run(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&download))
    .with_context(|| format!("could not download the Debian package {package}"))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacked = download.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;

    let staging = base.join("l1").join(format!("{package}.tmp"));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(staging.join("modules"))?;
    let vmlinuz = find_file(&unpacked.join("boot"), |n| n.starts_with("vmlinuz-"))?
        .context("the kernel package has no /boot/vmlinuz-*")?;
    fs::copy(&vmlinuz, staging.join("vmlinuz"))?;
    for module in MODULES {
        let file = format!("{module}.ko");
        let found = find_file(&unpacked.join("lib/modules"), |n| n == file)?
            .with_context(|| format!("the kernel package has no module {file}"))?;
        fs::copy(&found, staging.join("modules").join(&file))?;
    }
    fs::write(staging.join("modules/order"), order)?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&staging, &dir)?;
    fs::remove_dir_all(&download)?;
    Ok(dir)
}

/// The versioned package `linux-image-amd64` depends on, e.g.
/// `linux-image-6.1.0-57-amd64`; updates the package lists once if apt
/// does not know it.
fn l1_kernel_package() -> Result<String> {
    let depends = || {
        stdout_of(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]))
            .ok()
            .and_then(|out| {
                out.lines()
                    .filter_map(|l| l.trim().strip_prefix("Depends: "))
                    .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
                    .map(str::to_string)
            })
    };
    if let Some(p) = depends() {
        return Ok(p);
    }
    tools::apt_update()?;
    depends().with_context(|| {
        format!("apt does not know {KERNEL_META_PACKAGE}: the nested test machine's kernel comes from it")
    })
}

/// The first file under `dir` (recursively) whose name satisfies `want`.
fn find_file(dir: &Path, want: impl Fn(&str) -> bool + Copy) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if let Some(found) = find_file(&path, want)? {
                return Ok(Some(found));
            }
        } else if entry.file_name().to_str().is_some_and(want) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Writes `initramfs.cpio` beside the kernel unless it is there already
/// with the same busybox and init script.
pub(super) fn ensure_l1_initramfs(base: &Path, l1: &Path) -> Result<PathBuf> {
    let busybox_path = tools::ensure_busybox()?;
    let busybox = fs::read(&busybox_path)
        .with_context(|| format!("could not read {}", busybox_path.display()))?;
    let mut modules = Vec::new();
    for module in MODULES {
        let path = l1.join("modules").join(format!("{module}.ko"));
        modules.push((
            module,
            fs::read(&path).with_context(|| format!("{}", path.display()))?,
        ));
    }
    let out = base.join("initramfs.cpio");
    let key_path = base.join("initramfs.cpio.key");
    let mut key_input = busybox.clone();
    key_input.extend_from_slice(INIT.as_bytes());
    for (name, bytes) in &modules {
        key_input.extend_from_slice(name.as_bytes());
        key_input.extend_from_slice(bytes);
    }
    let key = format!("{:016x}", crate::initramfs::fnv64(&key_input));
    if out.is_file() && fs::read_to_string(&key_path).is_ok_and(|k| k == key) {
        return Ok(out);
    }
    let mut cpio = Newc::default();
    for dir in ["bin", "dev", "proc", "sys", "modules", "tmp"] {
        cpio.entry(dir, S_IFDIR | 0o755, (0, 0), &[]);
    }
    cpio.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[]);
    cpio.entry("bin/busybox", S_IFREG | 0o755, (0, 0), &busybox);
    for (name, bytes) in &modules {
        cpio.entry(
            &format!("modules/{name}.ko"),
            S_IFREG | 0o644,
            (0, 0),
            bytes,
        );
    }
    let order = MODULES.join("\n") + "\n";
    cpio.entry("modules/order", S_IFREG | 0o644, (0, 0), order.as_bytes());
    cpio.entry("init", S_IFREG | 0o755, (0, 0), INIT.as_bytes());
    let archive = cpio.finish();
    let staging = base.join("initramfs.cpio.tmp");
    fs::write(&staging, &archive)?;
    fs::rename(&staging, &out)?;
    fs::write(&key_path, key)?;
    eprintln!(
        "==> nested machine initramfs: {} ({} KiB)",
        out.display(),
        archive.len() >> 10
    );
    Ok(out)
}
