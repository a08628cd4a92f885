//! The microVM boot benchmark that `cargo xtask bench` runs where KVM runs
//! guests natively (here, or in its nested test machine): the project's
//! kernel and initramfs (`CAPSA_KERNEL`, `CAPSA_INITRAMFS`) booted by
//! capsa's VMM and by QEMU (`qemu-system-x86_64 -M microvm`, command in
//! `CAPSA_QEMU`) as the reference, one after the other, in several rounds.
//!
//! Both get the same kernel, initramfs, kernel command line, memory and
//! vCPU count; each VMM appends its own `virtio_mmio.device=` declaration.
//! QEMU's machine is `microvm,acpi=off,x-option-roms=off,rtc=off`: the
//! guest kernel has no ACPI (it reads the MP table, as under capsa), and
//! without ACPI QEMU picks qboot as firmware, which boots the PVH `vmlinux`
//! straight from fw_cfg. With ACPI on, QEMU picks `bios-microvm.bin`, which
//! on Debian is SeaBIOS: it boots a `-kernel` only through the option ROMs
//! that `x-option-roms=off` removes, so the guest never starts and the
//! console stays silent. QEMU's agent gets a vsock device only where
//! `/dev/vhost-vsock` exists (the `vhost_vsock` module).
//!
//! Figures, all wall time from spawning the VMM's process (a fresh process
//! per boot for both; one uncounted boot of each first warms the page
//! cache), medians over the rounds:
//! - boot to init: until `Run /init as init process` is on the console;
//! - agent listening: until the agent's `capsa-agent: listening on` line
//!   is on the console (the same method for both VMMs);
//! - agent connected (capsa): until a vsock connection to the agent is up;
//! - first output (capsa): until the first stdout bytes of
//!   `runBytes(busybox echo ...)` arrive over Cap'n Proto;
//! - RSS minus guest RAM: the process's VmRSS when the agent listens minus
//!   the resident part of its guest RAM mapping (the mapping of exactly the
//!   guest's size in `/proc/<pid>/smaps`): what the VMM process itself costs
//!   per VM, the figure Firecracker's "≤ 5 MiB memory overhead" is about.
//!
//! `--append ARGS` adds kernel parameters for both VMMs, for experiments.
//!
//! Where boot time goes: the command line carries `printk.time=1`, and the
//! five biggest gaps between consecutive kernel console lines are printed.
//! In the nested test machine capsa's boot to the agent takes about 6 s:
//! - the early console flush: the messages buffered before the console is
//!   registered come out in one burst of about 0.75 s (QEMU 1.7 s): every
//!   byte is two VM exits on the 8250 UART, and `quiet` (the host's
//!   command line) saves most of it;
//! - before the kernel's clock starts, 0.4 to 2 s: `Vm::start` (0.2 to
//!   1.6 s, the figure that varies most between boots) and early boot;
//!   QEMU spends about 3.3 s there (its own start-up and firmware);
//! - user space, from init to the agent listening: about 0.15 s.
//!
//! The guest kernel has no i8042 keyboard controller driver: with one, the
//! biggest gap was 1.6 to 2.8 s, since capsa's i8042 is only a reset line
//! and reads as an idle controller, so the driver polled its status port 10,000 times, 50 µs
//! apart, each poll a VM exit, before giving up (QEMU's microvm has no
//! i8042: its ports read 0xff and the driver gives up at once). No
//! `i8042.*` parameter skips that read, so the guest kernel is built
//! without `SERIO_I8042`; `reboot=k` still resets through the port.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa_microvm::{probe, CpuProfile, KernelImage, Vm, VmConfig};
use capsa_schema::capsa_capnp::executor;
use futures::AsyncReadExt;

const INIT_LINE: &str = "Run /init as init process";
/// How the line the agent prints once it listens (`capsa-agent: listening
/// on vsock:1024`) starts. Only the start: the line takes several writes,
/// and a kernel message can land in the middle of it.
const AGENT_LINE: &str = "capsa-agent: listening on";
const AGENT_PORT: u32 = 1024;
const GUEST_CID: u64 = 3;
const MEMORY_MIB: u32 = 128;
const VCPUS: u8 = 1;
/// One boot, agent round trip included: seconds on hardware, tens of
/// seconds in the nested test machine.
const DEADLINE: Duration = Duration::from_secs(5 * 60);
const DEFAULT_ROUNDS: usize = 3;
/// How many times a boot is tried before the benchmark gives up.
const ATTEMPTS: usize = 3;
/// Runs one capsa VM in this (fresh) process and reports on stdout.
const ONE_VM_FLAG: &str = "--one-capsa-vm";
const ECHO_ARGS: [&str; 5] = ["echo", "hello", "from", "a", "microVM"];

/// The kernel command line of both VMMs, before each appends its devices.
fn cmdline(extra: &str) -> String {
    format!("console=ttyS0 panic=-1 reboot=k printk.time=1 {extra}")
        .trim()
        .to_string()
}

fn env_path(var: &str) -> Result<PathBuf, String> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{var} is not set; run this through `cargo xtask bench`"))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn kib(value: &str) -> Option<u64> {
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// VmRSS of process `pid` (`self` for this one), KiB.
fn vm_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(kib))
        .unwrap_or(0)
}

/// Resident KiB of the mapping of process `pid` that is exactly the guest
/// RAM's size; `None` if there is no such mapping.
fn guest_ram_rss_kib(pid: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let guest_size = u64::from(MEMORY_MIB) << 10;
    let mut size = None;
    let mut found = None;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = kib(v);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if size == Some(guest_size) {
                *found.get_or_insert(0) += kib(v).unwrap_or(0);
            }
        }
    }
    found
}

/// What one boot measured, from spawning the VMM's process.
#[derive(Default)]
struct Boot {
    /// capsa: the process reached `main`.
    in_main: Option<Duration>,
    /// capsa: how long `Vm::start` took (guest memory, KVM VM and vCPUs,
    /// kernel and initramfs loaded, device thread started).
    vm_start_took: Option<Duration>,
    to_init: Option<Duration>,
    agent_listening: Option<Duration>,
    agent_connected: Option<Duration>,
    first_output: Option<Duration>,
    /// VmRSS when the agent listens (or at init without an agent).
    rss_kib: u64,
    guest_ram_rss_kib: Option<u64>,
    console: Vec<String>,
}

impl Boot {
    fn vmm_only_kib(&self) -> Option<u64> {
        self.guest_ram_rss_kib
            .map(|g| self.rss_kib.saturating_sub(g))
    }
}

// ---------------------------------------------------------------------------
// capsa's VMM, one VM in a fresh process.

/// The child's side: boots one VM and prints an event line on stdout at
/// each milestone (the parent timestamps them), then the console.
fn one_capsa_vm(extra: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let mut event = |line: &str| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    event("main");
    let kernel = env_path("CAPSA_KERNEL")?;
    let initramfs = read(&env_path("CAPSA_INITRAMFS")?)?;
    let busybox_path = env_path("CAPSA_BUSYBOX")?;
    let start = Instant::now();
    let vm = Vm::start(VmConfig {
        vcpus: VCPUS,
        memory_mib: MEMORY_MIB,
        kernel: KernelImage::Path(kernel),
        initramfs: Some(initramfs),
        cmdline: cmdline(extra),
        cid: GUEST_CID,
        vsock_uds: None,
        profile: CpuProfile::Native,
    })
    .map_err(|e| format!("Vm::start: {e}"))?;
    event(&format!("vm_start {}", start.elapsed().as_secs_f64()));
    wait_for_agent(&vm, start, &mut event)?;
    event(&format!(
        "rss {} {}",
        vm_rss_kib("self"),
        guest_ram_rss_kib("self").map_or("-".to_string(), |k| k.to_string())
    ));

    let busybox = read(&busybox_path)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let round_trip = local.block_on(&rt, async {
        tokio::time::timeout(
            DEADLINE.saturating_sub(start.elapsed()),
            run_echo(&vm, &busybox, &mut event),
        )
        .await
        .unwrap_or_else(|_| Err("the agent round trip timed out".to_string()))
    });
    vm.shutdown();
    round_trip.map_err(|e| format!("{e}\nconsole:\n{}", tail(&vm.serial_log())))?;
    event("console");
    event(&vm.serial_log());
    Ok(())
}

/// Polls the console until the agent listens, reporting `init` when init
/// runs (unless `quiet` keeps the kernel from saying so) and `agent`.
fn wait_for_agent(vm: &Vm, start: Instant, event: &mut impl FnMut(&str)) -> Result<(), String> {
    let mut init = false;
    loop {
        let log = vm.serial_log();
        if !init && log.contains(INIT_LINE) {
            init = true;
            event("init");
        }
        if log.contains(AGENT_LINE) {
            event("agent");
            return Ok(());
        }
        if let Some(exit) = vm.exit_status() {
            return Err(format!(
                "the VM ended before the agent listened: {exit:?}\nconsole:\n{}",
                tail(&log)
            ));
        }
        if start.elapsed() > DEADLINE {
            return Err(format!(
                "the agent did not listen within {DEADLINE:?}\nconsole:\n{}",
                tail(&log)
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Connects to the agent, runs `busybox echo` through it and reads its
/// output, reporting `connected` and `output` as they happen.
async fn run_echo(vm: &Vm, busybox: &[u8], event: &mut impl FnMut(&str)) -> Result<(), String> {
    let stream = loop {
        match vm.connect(AGENT_PORT).await {
            Ok(s) => break s,
            Err(capsa_microvm::VmError::ConnectionRefused(_)) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => return Err(format!("connecting to the agent: {e}")),
        }
    };
    event("connected");
    let (r, w) = stream.split();
    let network = twoparty::VatNetwork::new(r, w, Side::Client, Default::default());
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let executor: executor::Client = rpc.bootstrap(Side::Server);
    let rpc_task = tokio::task::spawn_local(rpc);

    let mut req = executor.run_bytes_request();
    {
        let mut p = req.get();
        p.set_bytes(busybox);
        let mut a = p.reborrow().init_args(ECHO_ARGS.len() as u32);
        for (i, arg) in ECHO_ARGS.iter().enumerate() {
            a.set(i as u32, *arg);
        }
        p.reborrow().init_env(0);
        p.init_options().set_name("busybox");
    }
    let rpc_err = |what: &str| {
        let what = what.to_string();
        move |e: capnp::Error| format!("{what}: {e}")
    };
    let response = req.send().promise.await.map_err(rpc_err("runBytes"))?;
    let process = response
        .get()
        .and_then(|r| r.get_process())
        .map_err(rpc_err("runBytes"))?;
    let stdout = process.stdout_request().send().pipeline.get_source();
    let mut out = Vec::new();
    loop {
        let mut req = stdout.read_request();
        req.get().set_max_bytes(1 << 16);
        let resp = req.send().promise.await.map_err(rpc_err("stdout read"))?;
        let r = resp.get().map_err(rpc_err("stdout read"))?;
        let data = r.get_data().map_err(rpc_err("stdout read"))?;
        if out.is_empty() && !data.is_empty() {
            event("output");
        }
        out.extend_from_slice(data);
        if r.get_eof() {
            break;
        }
    }
    let want = ECHO_ARGS[1..].join(" ") + "\n";
    if out != want.as_bytes() {
        return Err(format!(
            "busybox echo printed {:?}, not {want:?}",
            String::from_utf8_lossy(&out)
        ));
    }
    drop(executor);
    rpc_task.abort();
    Ok(())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The parent's side: runs this program again with [`ONE_VM_FLAG`] and
/// timestamps its event lines.
fn boot_capsa(extra: &str) -> Result<Boot, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let start = Instant::now();
    let mut child = Command::new(&exe)
        .args([ONE_VM_FLAG, "--append", extra])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut boot = Boot::default();
    let mut console = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let at = Some(start.elapsed());
        if console {
            boot.console.push(line);
            continue;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("main") => boot.in_main = at,
            Some("vm_start") => {
                boot.vm_start_took = words
                    .next()
                    .and_then(|s| s.parse().ok())
                    .map(Duration::from_secs_f64);
            }
            Some("init") => boot.to_init = at,
            Some("agent") => boot.agent_listening = at,
            Some("connected") => boot.agent_connected = at,
            Some("output") => boot.first_output = at,
            Some("rss") => {
                boot.rss_kib = words.next().and_then(|k| k.parse().ok()).unwrap_or(0);
                boot.guest_ram_rss_kib = words.next().and_then(|k| k.parse().ok());
            }
            Some("console") => console = true,
            _ => {}
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!(
            "the capsa VM failed ({status}): {}",
            stderr_of(&mut child)
        ));
    }
    Ok(boot)
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err.trim().to_string()
}

// ---------------------------------------------------------------------------
// QEMU, the reference.

fn boot_qemu(
    qemu: &Path,
    kernel: &Path,
    initramfs: &Path,
    extra: &str,
    vsock: bool,
) -> Result<Boot, String> {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        &MEMORY_MIB.to_string(),
        "-smp",
        &VCPUS.to_string(),
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
    .arg(cmdline(extra));
    if vsock {
        cmd.args([
            "-device",
            &format!("vhost-vsock-device,guest-cid={GUEST_CID}"),
        ]);
    }
    cmd.stdin(Stdio::null())
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
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut boot = Boot::default();
    let result = loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let (at, line) = match rx.recv_timeout(left) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("no \"{INIT_LINE}\" or agent within {DEADLINE:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child
                    .wait()
                    .map_or("unknown".to_string(), |s| s.to_string());
                break Err(format!("QEMU stopped ({status}) before the agent listened"));
            }
        };
        let done = if line.contains(INIT_LINE) {
            boot.to_init = Some(at);
            !vsock
        } else if line.contains(AGENT_LINE) {
            boot.agent_listening = Some(at);
            true
        } else {
            false
        };
        boot.console.push(line);
        if done {
            boot.rss_kib = vm_rss_kib(&pid);
            boot.guest_ram_rss_kib = guest_ram_rss_kib(&pid);
            break Ok(());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Ok(()) => Ok(boot),
        Err(e) => Err(format!(
            "{e}; QEMU's stderr: {}\nconsole:\n{}",
            stderr_of(&mut child),
            tail(&boot.console.join("\n"))
        )),
    }
}

// ---------------------------------------------------------------------------
// Reporting.

/// `[   1.234567] text` as (seconds, text).
fn printk_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (time, text) = rest.split_once(']')?;
    Some((time.trim().parse().ok()?, text.trim()))
}

/// The `n` biggest gaps between consecutive timestamped console lines:
/// (gap in seconds, the line before, the line after).
fn biggest_gaps(console: &[String], n: usize) -> Vec<(f64, String, String)> {
    let lines: Vec<(f64, &str)> = console.iter().filter_map(|l| printk_line(l)).collect();
    let mut gaps: Vec<(f64, String, String)> = lines
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[0].1.to_string(), w[1].1.to_string()))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    gaps.truncate(n);
    gaps
}

/// The kernel's own clock when it ran init.
fn printk_init_time(console: &[String]) -> Option<f64> {
    console
        .iter()
        .filter(|l| l.contains(INIT_LINE))
        .find_map(|l| printk_line(l))
        .map(|(t, _)| t)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// One row of the summary: a figure for both VMMs over all rounds.
fn figure(boots: &[Boot], f: impl Fn(&Boot) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = boots.iter().filter_map(&f).collect();
    (values.len() == boots.len())
        .then(|| median(values))
        .flatten()
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

fn mib(k: Option<u64>) -> Option<f64> {
    k.map(|k| k as f64 / 1024.0)
}

fn show(value: Option<f64>, unit: &str) -> String {
    match value {
        Some(v) if unit == "s" => format!("{v:.3} s"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "-".to_string(),
    }
}

fn print_where_time_goes(who: &str, boot: &Boot) {
    if let (Some(main), Some(vm_start)) = (boot.in_main, boot.vm_start_took) {
        println!(
            "{who}: process start to main {:.3} s; Vm::start (guest memory, KVM VM and vCPU, \
             kernel and initramfs loaded) {:.3} s",
            main.as_secs_f64(),
            vm_start.as_secs_f64()
        );
    }
    println!("{who}: the 5 biggest gaps between consecutive kernel console lines:");
    for (gap, before, after) in biggest_gaps(&boot.console, 5) {
        println!("  {gap:>7.3} s  after \"{before}\"");
        println!("             before \"{after}\"");
    }
    if let (Some(kernel), Some(wall)) = (printk_init_time(&boot.console), boot.to_init) {
        println!(
            "  init ran at {kernel:.3} s on the kernel's clock, {:.3} s after the process \
             started: {:.3} s went before the kernel's clock started (process and VMM \
             set-up, firmware, early boot)",
            wall.as_secs_f64(),
            wall.as_secs_f64() - kernel
        );
    }
    if let (Some(init), Some(agent)) = (boot.to_init, boot.agent_listening) {
        println!(
            "  init to agent listening (user space): {:.3} s",
            (agent - init).as_secs_f64()
        );
    }
}

/// Runs `boot` again when it fails, up to [`ATTEMPTS`] times, saying so:
/// under the nested test machine's emulation a guest now and then resets
/// mid-boot (seen with QEMU), which says nothing about the VMM's speed.
fn retried(who: &str, mut boot: impl FnMut() -> Result<Boot, String>) -> Result<Boot, String> {
    let mut attempt = 1;
    loop {
        match boot() {
            Ok(b) => return Ok(b),
            Err(e) if attempt < ATTEMPTS => {
                println!(
                    "{who}: boot failed, booting again: {}",
                    e.lines().next().unwrap_or("")
                );
                eprintln!("{e}");
                attempt += 1;
            }
            Err(e) => return Err(format!("{who}: {e}")),
        }
    }
}

fn run(rounds: usize, extra: &str) -> Result<(), String> {
    let kernel = env_path("CAPSA_KERNEL")?;
    let initramfs = env_path("CAPSA_INITRAMFS")?;
    env_path("CAPSA_BUSYBOX")?;
    let qemu = std::env::var_os("CAPSA_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    let probe = probe().map_err(|e| format!("KVM probe: {e}"))?;
    if probe.emulated {
        return Err(format!(
            "KVM emulates guest code here ({:.0} ns per loop iteration): boot times would say \
             nothing; `cargo xtask bench` runs this benchmark in its nested test machine",
            probe.ns_per_iteration
        ));
    }
    let vsock = Path::new("/dev/vhost-vsock").exists();
    println!(
        "microVM boot: native KVM ({:.1} ns per loop iteration), {VCPUS} vCPU, {MEMORY_MIB} MiB, \
         {rounds} rounds (medians), kernel {}, command line \"{}\"",
        probe.ns_per_iteration,
        kernel.display(),
        cmdline(extra)
    );
    if !vsock {
        println!(
            "QEMU gets no vsock device: /dev/vhost-vsock is missing (load vhost_vsock), so \
             its agent cannot listen; QEMU's figures stop at init"
        );
    }

    // A first boot of each, not counted, reads the binaries, kernel and
    // initramfs into the page cache (over 9p in the nested test machine).
    retried("capsa", || boot_capsa(extra))?;
    retried("QEMU", || {
        boot_qemu(&qemu, &kernel, &initramfs, extra, vsock)
    })?;
    let (mut capsa, mut reference) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let c = retried("capsa", || boot_capsa(extra))?;
        println!(
            "round {round}: capsa: init {}, agent listening {}, connected {}, first output {}, \
             RSS {} (guest RAM {})",
            show(secs(c.to_init), "s"),
            show(secs(c.agent_listening), "s"),
            show(secs(c.agent_connected), "s"),
            show(secs(c.first_output), "s"),
            show(mib(Some(c.rss_kib)), "MiB"),
            show(mib(c.guest_ram_rss_kib), "MiB"),
        );
        capsa.push(c);
        let q = retried("QEMU", || {
            boot_qemu(&qemu, &kernel, &initramfs, extra, vsock)
        })?;
        println!(
            "round {round}: QEMU:  init {}, agent listening {}, RSS {} (guest RAM {})",
            show(secs(q.to_init), "s"),
            show(secs(q.agent_listening), "s"),
            show(mib(Some(q.rss_kib)), "MiB"),
            show(mib(q.guest_ram_rss_kib), "MiB"),
        );
        reference.push(q);
    }

    type Row<'a> = (&'a str, &'a str, &'a dyn Fn(&Boot) -> Option<f64>);
    let rows: [Row; 6] = [
        ("boot to \"Run /init\"", "s", &|b| secs(b.to_init)),
        ("boot to agent listening", "s", &|b| secs(b.agent_listening)),
        ("boot to agent connected", "s", &|b| secs(b.agent_connected)),
        ("boot to first output", "s", &|b| secs(b.first_output)),
        ("RSS minus guest RAM", "MiB", &|b| mib(b.vmm_only_kib())),
        ("RSS, guest RAM included", "MiB", &|b| mib(Some(b.rss_kib))),
    ];
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "median", "capsa VMM", "QEMU", "capsa/QEMU"
    );
    for (name, unit, f) in rows {
        let (c, q) = (figure(&capsa, f), figure(&reference, f));
        let ratio = match (c, q) {
            (Some(c), Some(q)) if q > 0.0 => format!("{:.2}", c / q),
            _ => "-".to_string(),
        };
        println!(
            "{name:<28} {:>12} {:>12} {ratio:>12}",
            show(c, unit),
            show(q, unit)
        );
    }
    if let Some(last) = capsa.last() {
        print_where_time_goes("capsa VMM", last);
    }
    if let Some(last) = reference.last() {
        print_where_time_goes("QEMU", last);
    }
    Ok(())
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: boot_bench [--rounds N] [--append KERNEL-ARGS]\n\
         (KERNEL-ARGS go on both VMMs' kernel command line, for experiments)"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut one_vm, mut rounds, mut extra) = (false, DEFAULT_ROUNDS, String::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            ONE_VM_FLAG => one_vm = true,
            "--rounds" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => rounds = n,
                _ => return usage(),
            },
            "--append" => match args.next() {
                Some(a) => extra = a,
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    let result = if one_vm {
        one_capsa_vm(&extra)
    } else {
        run(rounds, &extra)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
