//! The machine as a KVM microVM, booted by capsa's own VMM
//! (`capsa-microvm`) from a kernel and an initramfs whose `/init` is the
//! agent; the agent answers on a virtio-vsock port.
//!
//! Dropping a [`Vm`] joins its vCPU and device threads, which can take a
//! while, so a machine is always dropped on a blocking thread, never on the
//! thread that serves every guest.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use capsa_microvm::{CpuProfile, KernelImage, Vm, VmConfig, VmExit};

use super::probe::Probed;
use super::{AgentStream, VmRequest};
use crate::error::{ConnectAttempt, VmFailure};

/// The vsock port the agent serves its Executor on.
pub const AGENT_PORT: u32 = 1024;

/// How long one connection request to a booting machine's agent may go
/// unanswered before it is asked again. Once the guest's vsock driver is
/// up its kernel answers in milliseconds; the bound is generous because an
/// abandoned request the agent did accept would end the machine (the agent
/// stops when its last connection closes).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(5);

/// How many of the guest kernel's newest log records a report carries.
const KERNEL_LOG_RECORDS: usize = 40;
/// How many times a report samples where the vCPUs are, and how far apart.
const SAMPLES: usize = 3;
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Every machine of this process that has not been dropped, for
/// [`report_live_machines`].
static LIVE: Mutex<Vec<Weak<Vm>>> = Mutex::new(Vec::new());

fn register(vm: Vm) -> Arc<Vm> {
    let vm = Arc::new(vm);
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(&vm));
    vm
}

/// What a report says of a machine that stopped answering: where each
/// vCPU is, [`SAMPLES`] times a second apart (a guest spinning in one
/// place, halted, or moving on), and the newest records of its kernel's
/// log, which `quiet` kept off the console. `sleep` waits between samples.
async fn diagnosis<F: std::future::Future<Output = ()>>(
    vm: &Vm,
    sleep: impl Fn(Duration) -> F,
) -> String {
    let mut out = String::new();
    if vm.running_vcpus() > 0 {
        for round in 0..SAMPLES {
            if round > 0 {
                sleep(SAMPLE_INTERVAL).await;
            }
            let samples: Vec<String> = vm.sample_vcpus().iter().map(|s| s.to_string()).collect();
            out.push_str(&format!(
                "; vCPU sample {}: {}",
                round + 1,
                samples.join(", ")
            ));
        }
    }
    out.push_str(&kernel_log_text(vm));
    out
}

/// The newest records of the guest kernel's log, for a report.
fn kernel_log_text(vm: &Vm) -> String {
    match vm.kernel_log(KERNEL_LOG_RECORDS) {
        Ok(records) => {
            let mut out = String::from("; kernel log:");
            for r in records {
                out.push_str(&format!("\n  <{}>{}", r.level, r.text));
            }
            out
        }
        Err(e) => format!("; no kernel log: {e}"),
    }
}

/// A report of every microVM of this process still running, for a
/// watchdog that found a test stalled: each machine's vCPU samples, kernel
/// log and vsock device state. Blocks for about two seconds per machine.
pub fn report_live_machines() -> String {
    let live: Vec<Arc<Vm>> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut out = format!("{} microVM(s) running", live.len());
    for (i, vm) in live.iter().enumerate() {
        let report = futures::executor::block_on(diagnosis(vm, |d| {
            std::thread::sleep(d);
            std::future::ready(())
        }));
        out.push_str(&format!(
            "\nmachine {}: vsock {:?}{report}",
            i + 1,
            vm.vsock_state()
        ));
    }
    out
}

/// A running microVM.
pub(super) struct KvmMachine(Arc<Vm>);

impl KvmMachine {
    /// Resolves when the VM stops on its own, with a description.
    pub(super) async fn stopped(&mut self) -> String {
        describe(&self.0.wait().await)
    }

    /// Stops the VM and waits until its threads are joined, its fds closed
    /// and its memory unmapped.
    pub(super) async fn tear_down(self) {
        let vm = self.0;
        vm.shutdown();
        let _ = vm.wait().await;
        let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
    }

    /// Tears the VM down and says where its vCPUs were while it ran and
    /// where they left the guest (once they are out of it), what its vsock
    /// device saw, and what its kernel logged: for a guest that never
    /// answered.
    pub(super) async fn tear_down_reporting(self) -> String {
        let whereabouts = self.0.whereabouts();
        let vsock = self.0.vsock_state();
        let diagnosis = diagnosis(&self.0, tokio::time::sleep).await;
        self.tear_down().await;
        let vcpus = whereabouts.lock().map(|w| w.join("; ")).unwrap_or_default();
        format!("; vCPUs: {vcpus}; vsock: {vsock:?}{diagnosis}")
    }

    /// What the guest's kernel logged last (after the machine stopped
    /// too: its memory is there until it is dropped).
    pub(super) fn kernel_log_tail(&self) -> String {
        kernel_log_text(&self.0)
    }

    /// The console's last lines.
    pub(super) fn console_tail(&self) -> String {
        let log = self.0.serial_log();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// Drops `value` on a blocking thread when called inside a runtime: for
/// values whose drop waits (a machine joining its vCPU threads), which must
/// not stall the one thread that serves every guest.
fn drop_off_thread<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}

/// How a VM ended, in words.
fn describe(exit: &VmExit) -> String {
    match exit {
        VmExit::Panic(lines) => format!("kernel panicked: {lines}"),
        VmExit::Error(e) => format!("the VMM stopped the VM: {e}"),
        VmExit::Shutdown(how) => format!("the VM shut down ({how})"),
        VmExit::Stopped => "the VM was stopped".into(),
    }
}

/// A machine still booting. If the boot is abandoned (its future dropped:
/// the caller went away), the machine is ended off the host's thread.
struct Booting(Option<Arc<Vm>>);

/// Why a `Booting` always holds its machine: only `machine`, which consumes
/// it, takes the machine out (the `Option` is for `Drop` to move it).
const HELD: &str = "a Booting holds its machine until `machine` takes it";

impl Booting {
    fn vm(&self) -> &Vm {
        self.0.as_deref().expect(HELD)
    }

    /// The machine, now the host's to tear down.
    fn machine(mut self) -> KvmMachine {
        KvmMachine(self.0.take().expect(HELD))
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            vm.shutdown();
            drop_off_thread(vm);
        }
    }
}

/// Boots a microVM of `kernel` and `initramfs` (or the request's own) and
/// returns it with a stream to its agent, once the agent answers, by
/// `deadline` (`ready_timeout` from the start).
pub(super) async fn boot(
    kernel: &Path,
    initramfs: &Path,
    probed: &Probed,
    req: &VmRequest,
    deadline: Instant,
    ready_timeout: Duration,
) -> Result<(KvmMachine, AgentStream), VmFailure> {
    let boot_started = Instant::now();
    let kernel = match &req.kernel {
        Some(bytes) => KernelImage::Bytes(bytes.clone()),
        None => KernelImage::Path(kernel.to_path_buf()),
    };
    let initramfs = match &req.initramfs {
        Some(bytes) => bytes.clone(),
        None => std::fs::read(initramfs).map_err(|source| VmFailure::Initramfs {
            path: initramfs.to_path_buf(),
            source,
        })?,
    };
    // `random.trust_cpu=on`: the guest seeds its random number generator
    // from the CPU's RDRAND at boot. The machine has no other source (no
    // virtio-rng device, no disk, few interrupts), so without it a program
    // calling `getrandom` waits for the kernel's jitter entropy.
    let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 quiet random.trust_cpu=on");
    let mut profile = CpuProfile::Native;
    if let Some(p) = probed.get().await.filter(|p| p.emulated) {
        profile = CpuProfile::Compat;
        cmdline.push(' ');
        cmdline.push_str(&capsa_microvm::compat_kernel_args(Some(p.ns_per_iteration)));
        cmdline.push_str(" no_int3_selftest");
    }
    let config = VmConfig {
        vcpus: u8::try_from(req.vcpus).unwrap_or(u8::MAX).max(1),
        memory_mib: req.memory_mib,
        kernel,
        initramfs: Some(initramfs),
        cmdline,
        cid: 3,
        vsock_uds: None,
        profile,
    };
    let vm = tokio::task::spawn_blocking(move || Vm::start(config))
        .await
        .map_err(VmFailure::StartThread)??;
    let booting = Booting(Some(register(vm)));
    loop {
        let vm = booting.vm();
        // Until the guest's driver is up a connection request gets no
        // answer at all; after that the guest's kernel answers at once (a
        // RESPONSE if the agent listens, else an RST). So an attempt is
        // bounded by CONNECT_ATTEMPT, and a request that got lost is asked
        // again instead of waiting out the whole deadline; a machine that
        // stops (a kernel panic) ends the wait at once.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(left.min(CONNECT_ATTEMPT), vm.connect(AGENT_PORT));
        let attempt = async {
            tokio::select! {
                r = attempt => Some(r),
                _ = vm.wait() => None,
            }
        };
        let last = match attempt.await {
            None => ConnectAttempt::Stopped,
            Some(r) => match r {
                Ok(Ok(stream)) => {
                    tracing::debug!(
                        "the agent answered {:.2} s after the VM started",
                        boot_started.elapsed().as_secs_f64()
                    );
                    return Ok((booting.machine(), Box::pin(stream)));
                }
                Ok(Err(e)) => ConnectAttempt::Failed(e),
                Err(_) => ConnectAttempt::NoAnswer,
            },
        };
        if let Some(exit) = vm.exit_status() {
            let machine = booting.machine();
            let console = machine.console_tail();
            let report = machine.kernel_log_tail();
            machine.tear_down().await;
            return Err(VmFailure::StoppedBooting {
                why: describe(&exit),
                console,
                report,
            });
        }
        if Instant::now() >= deadline {
            let machine = booting.machine();
            let console = machine.console_tail();
            let report = machine.tear_down_reporting().await;
            return Err(VmFailure::Unanswered {
                timeout: ready_timeout,
                last,
                console,
                report,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use super::*;
    use crate::vm::tests::on_this_thread;

    struct Recorder(Arc<Mutex<Option<ThreadId>>>);

    impl Drop for Recorder {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }

    /// What a machine abandoned mid-boot is dropped with: joining its
    /// threads must not happen on the host's thread.
    #[test]
    fn values_dropped_off_thread_are_dropped_elsewhere() {
        let dropped_on = Arc::new(Mutex::new(None));
        let host_thread = std::thread::current().id();
        on_this_thread(async {
            drop_off_thread(Recorder(dropped_on.clone()));
            while dropped_on.lock().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let thread = dropped_on.lock().unwrap().take();
        assert!(thread.is_some_and(|t| t != host_thread), "{thread:?}");
        // Outside a runtime there is no other thread to use.
        drop_off_thread(Recorder(dropped_on.clone()));
        assert_eq!(dropped_on.lock().unwrap().take(), Some(host_thread));
    }
}
