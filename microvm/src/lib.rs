//! capsa's VMM: KVM microVMs with a serial console and virtio-vsock.
//!
//! [`Vm::start`] maps guest memory, creates the KVM VM with its in-kernel
//! interrupt controllers, loads a Linux kernel (see [`boot`]), wires the
//! devices (8250 console, i8042 reset line, virtio-vsock behind
//! virtio-mmio) and starts one thread per vCPU plus one device thread.
//! The returned [`Vm`] is the only handle: vsock connections are made
//! through it, [`Vm::wait`] reports how the guest ended, and dropping it
//! stops and joins every thread, closes every fd and unmaps guest memory.
//!
//! Layout: `vstate/` (KVM VM, vCPUs, memory), `arch/x86_64/` (layout, CPU
//! set-up, MP table), `boot.rs` (kernel loading), `devices/` (legacy and
//! virtio devices), `event_loop.rs` (the device thread), `probe.rs` (is KVM
//! native or emulated?).

#![expect(
    unsafe_code,
    reason = "a VMM calls KVM's ioctls, maps guest memory and kicks vCPU threads with \
              signals; each unsafe block says why it is sound"
)]

pub mod arch;
pub mod boot;
pub mod devices;
pub mod event_loop;
pub mod kernel_log;
pub mod probe;
pub mod seccomp;
pub mod vstate;

use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

pub use arch::x86_64::cpuid::{compat_kernel_args, CpuProfile};
pub use boot::KernelImage;
pub use devices::virtio::vsock::{QueueIndices, VsockDeviceState, VsockListener, VsockStream};
pub use probe::{probe, Probe, ProbeError};

use arch::x86_64::layout::{SERIAL_IRQ, VIRTIO_IRQ, VIRTIO_MMIO_START};
use devices::bus::DeviceBus;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::{Serial, SerialLog, DEFAULT_LOG_CAPACITY};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::vsock::muxer::VsockMuxer;
use devices::virtio::vsock::unix::HybridListener;
use devices::virtio::vsock::Vsock;
use devices::virtio::Interrupt;
use event_loop::{lock, Command, DeviceThread};
pub use vstate::vcpu::VcpuSample;
use vstate::vcpu::{kick_signal, register_kick_signal, SampleSlot, Vcpu, VcpuStop};
use vstate::vm::KvmVm;

/// How many console lines a panic report carries.
const PANIC_LINES: usize = 30;

/// What to boot and with what.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1..=64).
    pub vcpus: u8,
    /// Guest RAM in MiB (at least 16).
    pub memory_mib: u32,
    /// The kernel.
    pub kernel: KernelImage,
    /// The initramfs, if any.
    pub initramfs: Option<Vec<u8>>,
    /// Kernel command line. The virtio-mmio device declaration is appended
    /// when missing; with [`CpuProfile::Compat`], append
    /// [`compat_kernel_args`] yourself.
    pub cmdline: String,
    /// The guest's vsock CID (3 or more).
    pub cid: u64,
    /// Optional hybrid-vsock Unix socket (created 0600, removed on drop).
    pub vsock_uds: Option<PathBuf>,
    /// CPU features shown to the guest.
    pub profile: CpuProfile,
}

/// Starting or talking to a VM failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] vstate::memory::MemoryError),
    /// KVM VM set-up.
    #[error(transparent)]
    Kvm(#[from] vstate::vm::KvmVmError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] arch::x86_64::mptable::MptableError),
    /// An OS resource (eventfd, thread, socket) could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being created.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The guest refused the vsock connection (nothing listens on the port).
    #[error("guest refused vsock connection to port {0}")]
    ConnectionRefused(u32),
    /// The VM is not running any more.
    #[error("the VM has stopped")]
    Stopped,
    /// The vCPU threads' seccomp filter could not be built.
    #[error("vCPU seccomp filter: {0}")]
    Seccomp(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest shut down or reset, and how: "i8042 reset", "reset",
    /// "triple fault", "power off" or "hlt".
    Shutdown(&'static str),
    /// The kernel panicked; the last console lines.
    Panic(String),
    /// KVM or the VMM failed; what happened and the last console lines.
    Error(String),
    /// [`Vm::shutdown`] was called.
    Stopped,
}

/// A running microVM. Dropping it tears everything down.
pub struct Vm {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    commands: Mutex<Sender<Command>>,
    vcpu_threads: Vec<JoinHandle<()>>,
    /// vCPU threads that have not ended yet.
    running_vcpus: Arc<AtomicUsize>,
    /// Where each vCPU left the guest, written by its thread as it ends.
    whereabouts: Arc<Mutex<Vec<String>>>,
    /// Each vCPU's requests for samples of where its guest is.
    samples: Vec<Arc<SampleSlot>>,
    /// The kernel file, for its symbols, and the address of its log's
    /// ring once looked up (at start for a kernel given in memory).
    kernel_path: Option<PathBuf>,
    log_ring: OnceLock<Result<u64, kernel_log::KernelLogError>>,
    device_thread: Option<JoinHandle<()>>,
    exit: tokio::sync::watch::Receiver<Option<VmExit>>,
    exit_tx: Arc<tokio::sync::watch::Sender<Option<VmExit>>>,
    serial: SerialLog,
    vsock: Arc<Mutex<MmioTransport<Vsock>>>,
    bus: Arc<DeviceBus>,
    // Dropped after every thread is joined: the VM fd before the memory it maps.
    vm: KvmVm,
    memory: vm_memory::GuestMemoryMmap,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpu_threads.len())
            .finish()
    }
}

fn classify(stop: VcpuStop, log: &SerialLog) -> VmExit {
    let panicked = || log.contents().contains("Kernel panic");
    match stop {
        VcpuStop::Shutdown(_) if panicked() => VmExit::Panic(log.last_lines(PANIC_LINES)),
        VcpuStop::Shutdown(how) => VmExit::Shutdown(how),
        VcpuStop::Stopped => VmExit::Stopped,
        VcpuStop::Error(e) => VmExit::Error(format!("{e}\n{}", log.last_lines(PANIC_LINES))),
    }
}

impl Vm {
    /// Creates the VM, loads the kernel and starts it; returns at once.
    pub fn start(config: VmConfig) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > arch::x86_64::mptable::MAX_VCPUS {
            return Err(VmError::Config(format!("{} vCPUs", config.vcpus)));
        }
        if config.cid < 3 || config.cid > u64::from(u32::MAX) {
            return Err(VmError::Config(format!("CID {}", config.cid)));
        }
        register_kick_signal()?;
        let memory = vstate::memory::create_guest_memory(config.memory_mib)?;
        let vm = KvmVm::new(true)?;
        vm.register_memory(&memory)?;

        let mut cmdline = config.cmdline.clone();
        if !cmdline.contains("virtio_mmio.device=") {
            cmdline.push_str(&format!(
                " virtio_mmio.device=4K@{VIRTIO_MMIO_START:#x}:{VIRTIO_IRQ}"
            ));
        }
        // A kernel given in memory is not kept: its log's address is looked
        // up now.
        let log_ring = OnceLock::new();
        if let KernelImage::Bytes(_) = &config.kernel {
            let _ = log_ring.set(kernel_log::kernel_symbol(&config.kernel, "prb"));
        }
        let entry = boot::load_kernel(
            &memory,
            &config.kernel,
            config.initramfs.as_deref(),
            cmdline.trim(),
        )?;
        arch::x86_64::mptable::setup_mptable(&memory, config.vcpus)?;

        let serial_log = SerialLog::new(DEFAULT_LOG_CAPACITY);
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)?;
        let vsock_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&vsock_evt, VIRTIO_IRQ)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;

        let hybrid = match &config.vsock_uds {
            Some(p) => Some(HybridListener::bind(p).map_err(io_err("binding vsock socket"))?),
            None => None,
        };
        let vsock = Arc::new(Mutex::new(MmioTransport::new(
            Vsock::new(config.cid, VsockMuxer::new(config.cid, hybrid)),
            memory.clone(),
            Arc::new(Interrupt::new(vsock_evt)),
            wake.try_clone().map_err(io_err("eventfd"))?,
        )));
        let bus = Arc::new(DeviceBus {
            serial: Mutex::new(Serial::new(serial_evt, serial_log.clone())),
            i8042: Mutex::new(I8042::new()),
            vsock: (VIRTIO_MMIO_START, vsock.clone()),
        });

        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let v = Vcpu::new(vm.fd(), id)?;
            v.configure(vm.kvm(), &memory, &entry, config.vcpus, config.profile)?;
            vcpus.push(v);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let (exit_tx, exit) = tokio::sync::watch::channel(None);
        let exit_tx = Arc::new(exit_tx);
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();

        let mut this = Vm {
            stop: stop.clone(),
            wake: wake.try_clone().map_err(io_err("eventfd"))?,
            commands: Mutex::new(cmd_tx),
            vcpu_threads: Vec::new(),
            running_vcpus: Arc::new(AtomicUsize::new(usize::from(config.vcpus))),
            whereabouts: Arc::new(Mutex::new(Vec::new())),
            samples: Vec::new(),
            kernel_path: match &config.kernel {
                KernelImage::Path(p) => Some(p.clone()),
                KernelImage::Bytes(_) => None,
            },
            log_ring,
            device_thread: None,
            exit,
            exit_tx: exit_tx.clone(),
            serial: serial_log.clone(),
            vsock: vsock.clone(),
            bus: bus.clone(),
            vm,
            memory,
        };
        let dt = DeviceThread {
            vsock,
            wake,
            stop: stop.clone(),
            commands: cmd_rx,
        };
        // The device thread handles what the guest puts in the vsock
        // queues: it runs under a filter of its own.
        let device_filter =
            seccomp::device_filter().map_err(|e| VmError::Seccomp(e.to_string()))?;
        let device_exit = exit_tx.clone();
        this.device_thread = Some(
            std::thread::Builder::new()
                .name("vmm-devices".into())
                .spawn(move || match seccomp::apply(&device_filter) {
                    Ok(()) => dt.run(),
                    Err(e) => {
                        device_exit.send_if_modified(|exit| {
                            let first = exit.is_none();
                            if first {
                                *exit = Some(VmExit::Error(format!("device thread: {e}")));
                            }
                            first
                        });
                        dt.stop.store(true, Ordering::Release);
                    }
                })
                .map_err(io_err("spawning device thread"))?,
        );
        // Every vCPU thread runs the guest's exits under this filter.
        let filter = seccomp::vcpu_filter().map_err(|e| VmError::Seccomp(e.to_string()))?;
        let siblings: Arc<OnceLock<Vec<libc::pthread_t>>> = Arc::new(OnceLock::new());
        for mut v in vcpus {
            let siblings = siblings.clone();
            let filter = filter.clone();
            let bus = bus.clone();
            let stop = stop.clone();
            let exit_tx = exit_tx.clone();
            let log = serial_log.clone();
            let wake = this.wake.try_clone().map_err(io_err("eventfd"))?;
            let whereabouts = this.whereabouts.clone();
            let running = this.running_vcpus.clone();
            let slot = Arc::new(SampleSlot::default());
            this.samples.push(slot.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id))
                .spawn(move || {
                    let why = match seccomp::apply(&filter) {
                        Ok(()) => v.run_sampled(&*bus, &stop, &slot),
                        Err(e) => VcpuStop::Error(e.to_string()),
                    };
                    let at = format!("vcpu{}:{}", v.id, v.whereabouts());
                    lock(&whereabouts).push(at);
                    if why != VcpuStop::Stopped {
                        let exit = classify(why, &log);
                        exit_tx.send_if_modified(|e| {
                            if e.is_none() {
                                *e = Some(exit);
                                true
                            } else {
                                false
                            }
                        });
                        stop.store(true, Ordering::Release);
                        let _ = wake.write(1);
                        running.fetch_sub(1, Ordering::AcqRel);
                        kick_siblings(&siblings, &running);
                    } else {
                        running.fetch_sub(1, Ordering::AcqRel);
                    }
                })
                .map_err(io_err("spawning vCPU thread"))?;
            this.vcpu_threads.push(t);
        }
        let _ = siblings.set(
            this.vcpu_threads
                .iter()
                .map(JoinHandleExt::as_pthread_t)
                .collect(),
        );
        Ok(this)
    }

    /// vCPU threads still running: 0 soon after the guest stops, whichever
    /// vCPU stopped it.
    pub fn running_vcpus(&self) -> usize {
        self.running_vcpus.load(Ordering::Acquire)
    }

    /// Where each vCPU left the guest, filled by the vCPU threads as they
    /// end (so complete once the `Vm` is dropped): for reports of a guest
    /// that stopped answering.
    pub fn whereabouts(&self) -> Arc<Mutex<Vec<String>>> {
        self.whereabouts.clone()
    }

    /// Where each running vCPU's guest is now: each vCPU thread is kicked
    /// out of `KVM_RUN` and answers before it enters the guest again. A
    /// vCPU that has ended, or does not answer within 100 ms, is left out.
    /// For reports of a guest that stopped answering: samples a second
    /// apart tell a guest spinning in one place from one making progress.
    pub fn sample_vcpus(&self) -> Vec<VcpuSample> {
        const ANSWER_WITHIN: Duration = Duration::from_millis(100);
        let mut out = Vec::new();
        for (slot, thread) in self.samples.iter().zip(&self.vcpu_threads) {
            if thread.is_finished() {
                continue;
            }
            slot.request();
            let start = Instant::now();
            // A kick that lands just before the thread enters the guest is
            // lost: kick again until it answers.
            let sample = loop {
                let _ = thread.kill(kick_signal());
                if let Some(s) = slot.wait(Duration::from_millis(2)) {
                    break Some(s);
                }
                if thread.is_finished() || start.elapsed() > ANSWER_WITHIN {
                    break None;
                }
            };
            out.extend(sample);
        }
        out
    }

    /// The newest `max` records of the guest kernel's log, read from guest
    /// memory (see [`kernel_log`]): what `quiet` kept off the console, and
    /// readable while the guest is stalled.
    pub fn kernel_log(
        &self,
        max: usize,
    ) -> Result<Vec<kernel_log::Record>, kernel_log::KernelLogError> {
        let prb = self
            .log_ring
            .get_or_init(|| match &self.kernel_path {
                Some(p) => kernel_log::kernel_symbol(&KernelImage::Path(p.clone()), "prb"),
                None => Err(kernel_log::KernelLogError::NoSymbol),
            })
            .clone()?;
        kernel_log::read(&self.memory, prb, max)
    }

    /// Everything the guest wrote to its console (the most recent 256 KiB).
    pub fn serial_log(&self) -> String {
        self.serial.contents()
    }

    /// Opens a connection to guest `port` (the guest must listen on it).
    /// Call inside a Tokio runtime; wrap in a timeout if the guest may not
    /// be up yet.
    pub async fn connect(&self, port: u32) -> Result<VsockStream, VmError> {
        let (ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
        let (tx, rx) = futures::channel::oneshot::channel();
        self.command(Command::Connect {
            port,
            stream: ours,
            reply: tx,
        })?;
        match rx.await {
            Ok(Ok(())) => VsockStream::from_std(theirs).map_err(io_err("vsock stream")),
            Ok(Err(_)) => Err(VmError::ConnectionRefused(port)),
            Err(_) => Err(VmError::Stopped),
        }
    }

    /// Accepts guest-initiated connections to host `port`.
    pub fn listen(&self, port: u32) -> Result<VsockListener, VmError> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        self.command(Command::Listen { port, tx })?;
        Ok(VsockListener::new(port, rx))
    }

    fn command(&self, cmd: Command) -> Result<(), VmError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(VmError::Stopped);
        }
        lock(&self.commands)
            .send(cmd)
            .map_err(|_| VmError::Stopped)?;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// What the vsock device has seen of the guest's driver.
    pub fn vsock_state(&self) -> VsockDeviceState {
        let t = lock(&self.vsock);
        let mut s = t.device().state();
        s.device_status = t.status();
        s.interrupt_status = t.interrupt().status();
        s.interrupts_reraised = t.interrupt().reraised();
        s
    }

    /// Stops the guest. [`Vm::wait`] then reports [`VmExit::Stopped`] unless
    /// the guest had already ended.
    pub fn shutdown(&self) {
        self.exit_tx.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(VmExit::Stopped);
                true
            } else {
                false
            }
        });
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        for t in &self.vcpu_threads {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Waits until the VM ends and says how.
    pub async fn wait(&self) -> VmExit {
        let mut rx = self.exit.clone();
        let exit = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().unwrap_or(VmExit::Stopped),
            Err(_) => VmExit::Stopped,
        };
        exit
    }

    /// How the VM ended, if it has.
    pub fn exit_status(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }
}

/// How long a vCPU that stopped the guest kicks its siblings before leaving
/// the rest to [`Vm`]'s drop.
const SIBLINGS_GRACE: Duration = Duration::from_secs(5);

/// Kicks the other vCPU threads of a machine out of `KVM_RUN` (a secondary
/// vCPU waiting for a start-up IPI, or one halted in the in-kernel APIC,
/// would never leave it on its own) until every one has ended, or
/// [`SIBLINGS_GRACE`] has passed. `running` no longer counts the caller.
fn kick_siblings(siblings: &OnceLock<Vec<libc::pthread_t>>, running: &AtomicUsize) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let start = Instant::now();
    while running.load(Ordering::Acquire) > 0 && start.elapsed() < SIBLINGS_GRACE {
        for &t in siblings.get().into_iter().flatten() {
            if t != me {
                // SAFETY: `t` is a vCPU thread of this machine, and none of
                // them is joined while any still runs (see `Vm`'s drop), so
                // it names a thread that has not been joined: pthread_kill
                // on a thread that has ended and not been joined is defined.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
        // Kick until every vCPU is out of KVM_RUN (a signal can land just
        // before a thread re-enters the guest), and join none before all
        // have ended: a vCPU that stopped the guest may still be kicking
        // its siblings by their pthread ids.
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) {
            for t in self.vcpu_threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.vcpu_threads.drain(..) {
            let _ = t.join();
        }
        if let Some(t) = self.device_thread.take() {
            let _ = self.wake.write(1);
            let _ = t.join();
        }
        let _ = &self.bus;
        let _ = &self.vm;
    }
}
