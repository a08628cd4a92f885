//! The nested test machine: a QEMU virtual machine whose own KVM runs
//! capsa's microVMs natively, for machines whose `/dev/kvm` only emulates
//! guests (or that have none).
//!
//! QEMU's TCG emulates AMD SVM with nested paging, so a Linux kernel inside
//! it (the "L1" machine) loads `kvm_amd` and offers a `/dev/kvm` on which
//! capsa's VMM boots its own kernel with guest code running at the speed of
//! the emulation. The L1 machine is
//!
//! - Debian's own `linux-image-*-amd64` kernel, fetched with `apt-get
//!   download` and unpacked (never installed), cached under
//!   `target/nested/l1/<version>/` with the modules it needs;
//! - an initramfs written here: a static busybox, those modules and an
//!   `/init` script that mounts this machine's `/` read-only over 9p, a
//!   writable scratch folder at its own path, fresh `/proc`, `/sys`, `/dev`,
//!   `/run` and `/tmp` (`TMPDIR` is `/run/capsa-tmp`, and `/tmp` stays this
//!   machine's when the workspace is under it), and runs a script from the
//!   scratch folder in a `chroot`.
//!
//! So the binaries already built here run unchanged, at their own paths,
//! against the real KVM of the L1 kernel. Their output streams to this
//! process's stdout over the machine's serial console; their exit status
//! comes back in a file of the scratch folder. The machine always powers
//! off: the script's end powers it off, a deadline kills it, and QEMU runs
//! under `setpriv --pdeathsig KILL`, so it dies with this process (Ctrl-C
//! included). A heartbeat and the kernel's log go to a second serial port;
//! when it stays silent for [`FROZEN_AFTER`] the machine is frozen (seen
//! under QEMU's emulation: every deadline inside it stops with it), and it
//! is killed with a [`MachineFailed`] report of the job, the log's tail and the
//! CPUs' registers asked of QEMU over QMP.
//!
//! What it is not: hardware. Guest code runs under QEMU's emulation, one to
//! two orders of magnitude slower than on a real CPU; absolute times mean
//! little, ratios against a peer run in the same L1 machine do.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{human, run, stdout_of, step};
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

/// How much memory and how many CPUs the L1 machine gets: room for the
/// test binaries and a few 128 MiB microVMs at once.
const L1_MEMORY_MIB: u32 = 4096;
const L1_CPUS: u32 = 2;

/// How long one job may run in the machine before `timeout` ends it: a
/// hung test fails with its name instead of using up the whole deadline.
const JOB_TIMEOUT_SECS: u32 = 20 * 60;

/// Marks the line the `/init` script prints once KVM is there, before it
/// runs the script; what comes before it is boot noise.
const READY_MARKER: &str = "capsa-nested: ready";

/// How long the machine's second serial port (its heartbeat, every 5 s, and
/// its kernel log) may stay silent before the machine counts as frozen: a
/// job that is merely slow keeps the heartbeat going, a machine whose
/// kernel or emulated CPUs stopped does not.
const FROZEN_AFTER: Duration = Duration::from_secs(120);

/// The nested machine itself failed while a job ran, so the job neither
/// passed nor failed: it froze (its heartbeat went silent; the job's own
/// deadlines cannot fire inside a frozen machine), or its own kernel died
/// (an oops or panic in its log and no exit status: seen once, the L1
/// kernel taking a page fault with a nested guest's GS base still loaded
/// and recursing until its stack guard page, on capsa's `vcpu0` thread).
/// Says which job and test were running, the kernel log's tail and, for
/// a freeze, the emulated CPUs' state.
#[derive(Debug)]
pub struct MachineFailed {
    pub report: String,
}

impl std::fmt::Display for MachineFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report)
    }
}

impl std::error::Error for MachineFailed {}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The first line of a kernel log that says the kernel itself failed.
fn kernel_failure(log: &str) -> Option<&str> {
    log.lines().find(|line| {
        ["BUG: ", "Oops", "Kernel panic", "general protection fault"]
            .iter()
            .any(|mark| line.contains(mark))
    })
}

/// The L1 machine's kernel, initramfs and QEMU, ready to boot.
pub struct NestedMachine {
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// Parent of the per-run scratch folders.
    runs: PathBuf,
}

/// One thing to run inside the machine: a command line, the folder it
/// starts in, and what it is called in progress lines.
pub struct Job {
    pub title: String,
    pub dir: PathBuf,
    pub argv: Vec<String>,
}

impl NestedMachine {
    /// Installs QEMU (from bookworm-backports) if needed, fetches and
    /// caches the L1 kernel and writes the initramfs.
    pub fn prepare(target: &Path) -> Result<NestedMachine> {
        let qemu = tools::ensure_nested_qemu()?;
        let base = target.join("nested");
        let l1 = step("preparing the nested test machine's kernel", || {
            ensure_l1_kernel(&base)
        })?;
        let initramfs = step("writing the nested test machine's initramfs", || {
            ensure_l1_initramfs(&base, &l1)
        })?;
        Ok(NestedMachine {
            qemu,
            kernel: l1.join("vmlinuz"),
            initramfs,
            runs: base.join("runs"),
        })
    }

    /// Boots the machine, runs `jobs` one after another with `env` set
    /// (stopping at the first failure), streams their output, powers off.
    /// Returns the exit code of the last job run and what the jobs printed;
    /// fails if the machine
    /// did not finish within `deadline` or stopped without an exit code.
    pub fn run(
        &self,
        env: &[(String, String)],
        jobs: &[Job],
        deadline: Duration,
    ) -> Result<Finished> {
        let scratch = self.runs.join(std::process::id().to_string());
        if scratch.exists() {
            fs::remove_dir_all(&scratch)?;
        }
        fs::create_dir_all(&scratch)
            .with_context(|| format!("could not create {}", scratch.display()))?;
        let result = self.run_in(&scratch, env, jobs, deadline);
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    fn run_in(
        &self,
        scratch: &Path,
        env: &[(String, String)],
        jobs: &[Job],
        deadline: Duration,
    ) -> Result<Finished> {
        let scratch = scratch
            .canonicalize()
            .with_context(|| format!("{}", scratch.display()))?;
        let scratch_str = scratch
            .to_str()
            .context("the scratch folder's path is not UTF-8")?;
        if scratch_str.contains(char::is_whitespace) {
            bail!("the nested machine cannot use a folder whose path has spaces: {scratch_str}");
        }
        fs::write(scratch.join("run.sh"), job_script(env, jobs))?;
        // The machine's heartbeat and kernel log (its second serial port),
        // and QEMU's monitor, asked for the CPUs' state if it freezes.
        let l1_log = scratch.join("l1.log");
        let monitor = scratch.join("qmp.sock");

        let mut qemu = Command::new("setpriv");
        qemu.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.qemu)
            .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args([
                "-smp",
                &L1_CPUS.to_string(),
                "-m",
                &L1_MEMORY_MIB.to_string(),
            ])
            .args(["-display", "none", "-serial", "stdio"])
            .arg("-serial")
            .arg(format!("file:{}", l1_log.display()))
            .args(["-monitor", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .args(["-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet loglevel=3 panic=-1 i8042.noaux i8042.nokbd \
                 capsa_scratch={scratch_str}{}",
                // The workspace under /tmp (a checkout there): keep the
                // host's /tmp visible instead of a fresh one over it.
                if scratch.starts_with("/tmp") {
                    " capsa_keep_tmp=1"
                } else {
                    ""
                }
            ))
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={scratch_str},mount_tag=scratch,security_model=none"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let start = Instant::now();
        let mut child = qemu
            .spawn()
            .context("could not start QEMU for the nested test machine")?;

        // Stream the console: boot noise is kept for an error report, the
        // jobs' output is shown as it comes.
        let stdout = child.stdout.take().expect("piped");
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        let running = Arc::new(Mutex::new(Running::default()));
        let seen = Arc::clone(&running);
        let reader = std::thread::spawn(move || {
            let mut stdout_lock = std::io::stdout();
            let mut ready = false;
            let mut boot_log = Vec::new();
            // The console's last lines once jobs run: where a dying kernel
            // prints its oops.
            let mut tail = std::collections::VecDeque::new();
            // Everything the jobs printed, for the triage of a failure.
            let mut transcript = String::new();
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\r');
                if ready {
                    let _ = writeln!(stdout_lock, "{text}");
                    seen.lock().unwrap_or_else(|e| e.into_inner()).saw(text);
                    transcript.push_str(text);
                    transcript.push('\n');
                    if tail.len() == 200 {
                        tail.pop_front();
                    }
                    tail.push_back(text.to_string());
                } else if text.contains(READY_MARKER) {
                    ready = true;
                    let _ = lines_tx.send(text.to_string());
                } else {
                    boot_log.push(text.to_string());
                }
            }
            (boot_log, tail, transcript)
        });

        let mut announced = false;
        let mut heard = (0, Instant::now());
        let mut frozen = None;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            let size = fs::metadata(&l1_log).map_or(0, |m| m.len());
            if size != heard.0 {
                heard = (size, Instant::now());
            } else if announced && heard.1.elapsed() > FROZEN_AFTER {
                let cpus = ask_qemu_about_cpus(&monitor);
                let _ = child.kill();
                let _ = child.wait();
                frozen = Some(cpus);
                break None;
            }
            if !announced {
                if let Ok(line) = lines_rx.try_recv() {
                    eprintln!(
                        "==> nested machine up in {} ({})",
                        human(start.elapsed()),
                        line.trim_start_matches(READY_MARKER)
                            .trim_start_matches([':', ' '])
                    );
                    announced = true;
                }
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let (boot_log, console_tail, transcript) = reader.join().unwrap_or_default();
        let tail = || {
            let from = boot_log.len().saturating_sub(30);
            boot_log[from..].join("\n")
        };
        let running = || running.lock().unwrap_or_else(|e| e.into_inner()).describe();
        if let Some(cpus) = frozen {
            let l1 = fs::read_to_string(&l1_log).unwrap_or_default();
            return Err(MachineFailed {
                report: format!(
                    "the nested test machine froze: no heartbeat for {} while running {}; \
                     it was killed after {}\n\
                     its kernel log and heartbeat, last lines:\n{}\n\
                     its CPUs (QEMU):\n{}",
                    human(FROZEN_AFTER),
                    running(),
                    human(start.elapsed()),
                    last_lines(&l1, 40),
                    cpus
                ),
            }
            .into());
        }
        let Some(status) = status else {
            bail!(
                "the nested test machine did not finish within {}; it was killed{}",
                human(deadline),
                if announced {
                    String::new()
                } else {
                    format!("\nconsole:\n{}", tail())
                }
            );
        };
        match fs::read_to_string(scratch.join("status")) {
            Ok(code) => Ok(Finished {
                code: code
                    .trim()
                    .parse::<i32>()
                    .with_context(|| format!("unreadable exit status {code:?}"))?,
                transcript,
            }),
            Err(_) => {
                let l1 = fs::read_to_string(&l1_log).unwrap_or_default();
                let console = Vec::from(console_tail).join("\n");
                if let Some(line) = kernel_failure(&l1).or_else(|| kernel_failure(&console)) {
                    return Err(MachineFailed {
                        report: format!(
                            "the nested test machine's kernel failed ({}) while running {}; \
                             its kernel log, last lines:\n{}",
                            line.trim(),
                            running(),
                            last_lines(&l1, 40),
                        ),
                    }
                    .into());
                }
                bail!(
                    "the nested test machine stopped ({status}) before its jobs ended{}",
                    if announced {
                        String::new()
                    } else {
                        format!("\nconsole:\n{}", tail())
                    }
                )
            }
        }
    }
}

/// How the machine's jobs ended.
pub struct Finished {
    /// The exit code of the last job run.
    pub code: i32,
    /// Everything the jobs printed on the console.
    pub transcript: String,
}

/// What the console last said: the job running and its last whole line (a
/// test's name is printed before it ends, on the line it ends on, which
/// shows above the report once the machine is killed).
#[derive(Default)]
struct Running {
    job: Option<String>,
    line: Option<String>,
}

impl Running {
    /// "JOB (its console's last whole line: LINE)", for reports.
    fn describe(&self) -> String {
        format!(
            "{} (its console's last whole line: {})",
            self.job.as_deref().unwrap_or("no job yet"),
            self.line.as_deref().unwrap_or("none")
        )
    }

    fn saw(&mut self, line: &str) {
        if let Some(job) = line.strip_prefix("==> [nested] ") {
            self.job = Some(job.to_string());
        }
        if !line.trim().is_empty() {
            self.line = Some(line.to_string());
        }
    }
}

/// Asks QEMU (over QMP at `socket`) where the machine's CPUs are, twice a
/// few seconds apart (a CPU spinning in a loop moves or stays put, a halted
/// one says so), and for their general registers; or says why it could not.
/// A frozen machine's QEMU still answers: QMP runs on QEMU's main loop, not
/// on a vCPU.
fn ask_qemu_about_cpus(socket: &Path) -> String {
    let ask = || -> Result<String> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line)?; // the greeting
        let mut call = |command: &str| -> Result<String> {
            let request = if command == "qmp_capabilities" {
                serde_json::json!({ "execute": command })
            } else {
                serde_json::json!({
                    "execute": "human-monitor-command",
                    "arguments": { "command-line": command },
                })
            };
            writeln!(writer, "{request}")?;
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    bail!("QEMU closed its monitor");
                }
                let answer: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(r) = answer.get("return") {
                    return Ok(r.as_str().unwrap_or_default().to_string());
                }
                if let Some(e) = answer.get("error") {
                    bail!("{e}");
                }
                // An event: read on.
            }
        };
        call("qmp_capabilities")?;
        let first = call("info cpus")?;
        std::thread::sleep(Duration::from_secs(3));
        let second = call("info cpus")?;
        let registers = call("info registers -a")?;
        // The general registers tell where and in what mode; the FPU and
        // vector registers are noise here.
        let general: Vec<&str> = registers
            .lines()
            .filter(|l| {
                !["FPR", "YMM", "XMM", "FCW", "DR", "ZMM", "Opmask"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        Ok(format!(
            "info cpus:\n{first}3 s later:\n{second}registers:\n{}",
            general.join("\n")
        ))
    };
    ask().unwrap_or_else(|e| format!("could not ask QEMU: {e:#}"))
}

/// The script the L1 machine runs in its chroot: the environment, then each
/// job in its folder, stopping at the first failure; the exit code goes to
/// `$capsa_scratch/status`.
fn job_script(env: &[(String, String)], jobs: &[Job]) -> String {
    // Temporary files, HOME and so capsa's compile cache go to the
    // machine's own memory: /tmp is the host's, read-only, when the
    // workspace lives there.
    let mut s = format!(
        "#!/bin/sh\nexport TMPDIR=/run/capsa-tmp\n\
         export HOME={MACHINE_HOME} XDG_CACHE_HOME={MACHINE_HOME}/.cache\n"
    );
    for (key, value) in env {
        let _ = writeln!(s, "export {key}={}", quote(value));
    }
    s.push_str("code=0\n");
    for job in jobs {
        let argv: Vec<String> = job.argv.iter().map(|a| quote(a)).collect();
        let _ = writeln!(
            s,
            "if [ $code = 0 ]; then\n  echo {}\n  cd {} && timeout -k 10 {JOB_TIMEOUT_SECS} {}\n  \
             code=$?\n  [ $code = 124 ] && echo {}\nfi",
            quote(&format!("==> [nested] {}", job.title)),
            quote(&job.dir.to_string_lossy()),
            argv.join(" "),
            quote(&format!(
                "==> [nested] {} did not finish within {JOB_TIMEOUT_SECS} s and was killed",
                job.title
            ))
        );
    }
    s.push_str("exit $code\n");
    s
}

/// The jobs' home folder in the L1 machine, on its /run tmpfs ([`INIT`]
/// makes it).
const MACHINE_HOME: &str = "/run/capsa-home";

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

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
fn ensure_l1_kernel(base: &Path) -> Result<PathBuf> {
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
fn ensure_l1_initramfs(base: &Path, l1: &Path) -> Result<PathBuf> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dying_kernel_is_told_from_test_output() {
        let log = "test native_kvm::twenty_boots_leave_nothing_behind ... \
                   [  204.924301] BUG: TASK stack guard page was hit at 000000009a1f5592\n\
                   [  204.924943] stack guard page: 0000 [#1] PREEMPT SMP NOPTI";
        assert!(kernel_failure(log).is_some_and(|line| line.contains("stack guard page was hit")));
        assert!(kernel_failure("test native_kvm::a ... ok\ntest result: ok.").is_none());
    }

    #[test]
    fn the_job_script_quotes_everything_and_stops_at_the_first_failure() {
        let env = [("CAPSA_X".to_string(), "it's $HOME".to_string())];
        let jobs = [
            Job {
                title: "one".into(),
                dir: "/a b".into(),
                argv: vec!["/bin/echo".into(), "$(reboot)".into()],
            },
            Job {
                title: "two".into(),
                dir: "/".into(),
                argv: vec!["/bin/false".into()],
            },
        ];
        let script = job_script(&env, &jobs);
        assert!(
            script.contains(r"export CAPSA_X='it'\''s $HOME'"),
            "{script}"
        );
        assert!(
            script.contains("cd '/a b' && timeout -k 10 1200 '/bin/echo' '$(reboot)'"),
            "{script}"
        );
        assert_eq!(script.matches("if [ $code = 0 ]").count(), 2, "{script}");
        // The compile cache is writable whatever /tmp is.
        assert!(
            script.contains("export HOME=/run/capsa-home XDG_CACHE_HOME=/run/capsa-home/.cache"),
            "{script}"
        );
        assert!(script.ends_with("exit $code\n"));
    }

    #[test]
    fn the_job_script_runs_under_sh() {
        let dir = std::env::temp_dir().join(format!("capsa-nested-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let jobs = [
            Job {
                title: "first".into(),
                dir: dir.clone(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("printf '%s' \"$CAPSA_X\" > {}", out.display()),
                ],
            },
            Job {
                title: "fails".into(),
                dir: dir.clone(),
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
            },
            Job {
                title: "never".into(),
                dir: dir.clone(),
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 9".into()],
            },
        ];
        let env = [("CAPSA_X".to_string(), "a 'b' $c".to_string())];
        let script = dir.join("run.sh");
        fs::write(&script, job_script(&env, &jobs)).unwrap();
        let status = Command::new("/bin/sh")
            .arg(&script)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let written = fs::read_to_string(&out).unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(written, "a 'b' $c");
        assert_eq!(status.code(), Some(3));
    }
}
