//! ELF payloads: one microVM per process, its agent's Executor handed back.
//!
//! `runBytes(ELF)` boots a machine whose PID 1 is the capsa agent, connects
//! to the agent's Executor over a stream (virtio-vsock for a KVM microVM),
//! asks it to run the ELF, and returns a Process that fronts the agent's:
//! stdio and `wait` are the ELF's, `bootstrap()` is the agent's Executor (so
//! the caller can run more in the same VM, or hand that capability to a WASM
//! child), and `kill` or dropping the Process tears the machine down.
//!
//! The machine is either a KVM microVM booted by capsa's own VMM, or the
//! agent run as an ordinary host process listening on a Unix socket. The
//! second exists for machines whose KVM cannot run Linux user space: the
//! host's half of the path (connection, RPC, process semantics, teardown)
//! is the same code either way.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::RpcSystem;
use capsa_microvm::{CpuProfile, KernelImage, Vm, VmConfig, VmExit};
use capsa_schema::capsa_capnp::{directory, executor, process, StdioMode};
use capsa_schema::ErrorKind;
use futures::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::error::SpawnError;
use crate::status::{wait_status, ExitStatus, KillSwitch, Limits};
use crate::transport::{self, FlowLimits};

/// The vsock port the agent serves its Executor on.
pub const AGENT_PORT: u32 = 1024;

/// How long one connection request to a booting machine's agent may go
/// unanswered before it is asked again. Once the guest's vsock driver is
/// up its kernel answers in milliseconds; the bound is generous because an
/// abandoned request the agent did accept would end the machine (the agent
/// stops when its last connection closes).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(5);

/// How ELF payloads are run.
#[derive(Clone, Debug)]
pub struct VmSettings {
    pub backend: VmBackend,
    /// How long a machine may take from start to an answering agent.
    pub ready_timeout: Duration,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Most memory all machines of the host hold at once, in MiB; `None`:
    /// this machine's RAM. Every caller's share is bounded too, but the
    /// sum of many callers' limits can be more than the machine has.
    pub total_memory_mib: Option<u64>,
}

#[derive(Clone, Debug)]
pub enum VmBackend {
    /// A KVM microVM booting `kernel` (vmlinux or bzImage) with `initramfs`
    /// (whose `/init` is the agent).
    Kvm { kernel: PathBuf, initramfs: PathBuf },
    /// The agent binary as a host process on a Unix socket, for machines
    /// whose KVM cannot run Linux user space.
    AgentProcess { agent: PathBuf },
}

/// The ELF-specific part of a `runBytes` request.
pub struct VmRequest {
    /// Label for the host's log lines.
    pub name: String,
    /// The ELF's argv[0], sent to the agent as its `options.name`.
    pub argv0: String,
    pub bytes: Vec<u8>,
    /// argv[1..].
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: Option<Vec<u8>>,
    pub initramfs: Option<Vec<u8>>,
    /// Directories granted to the ELF, at their guest paths: the agent
    /// copies them into the machine and back (see the agent's `grants`).
    pub directories: Vec<(String, directory::Client)>,
}

/// A running machine, from either backend.
enum Machine {
    Kvm(Rc<Vm>),
    Agent {
        child: Box<AgentProcess>,
        _dir: TempDir,
    },
}

impl Machine {
    /// Resolves when the machine stops on its own, with a description.
    async fn stopped(&mut self) -> String {
        match self {
            Machine::Kvm(vm) => match vm.wait().await {
                VmExit::Panic(lines) => format!("kernel panicked: {lines}"),
                VmExit::Error(e) => format!("the VMM stopped the VM: {e}"),
                VmExit::Shutdown(how) => format!("the VM shut down ({how})"),
                VmExit::Stopped => "the VM was stopped".into(),
            },
            Machine::Agent { child, .. } => match child.0.wait().await {
                Ok(s) => format!("the agent exited: {s}"),
                Err(e) => format!("the agent is gone: {e}"),
            },
        }
    }

    /// Ends the machine and waits until nothing of it is left.
    async fn tear_down(self) {
        match self {
            Machine::Kvm(vm) => {
                vm.shutdown();
                let _ = vm.wait().await;
                // Dropping the last reference joins the vCPU and device
                // threads, closes the VM's fds and unmaps its memory.
                match Rc::try_unwrap(vm) {
                    Ok(vm) => {
                        let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
                    }
                    Err(_) => tracing::error!("a VM handle outlived its teardown"),
                }
            }
            Machine::Agent { mut child, _dir } => {
                // The agent is not reaped until its session is empty, so
                // the session id stays reserved while it is swept.
                if let Some(pid) = child.0.id() {
                    end_session(pid);
                }
                let _ = child.0.wait().await;
            }
        }
    }

    /// Tears the machine down and says where its vCPUs left the guest and
    /// what its vsock device saw: for a guest that never answered.
    async fn tear_down_reporting(self) -> String {
        let report = match &self {
            Machine::Kvm(vm) => Some((vm.whereabouts(), vm.vsock_state())),
            Machine::Agent { .. } => None,
        };
        self.tear_down().await;
        match report {
            Some((whereabouts, vsock)) => {
                let vcpus = whereabouts.lock().map(|w| w.join("; ")).unwrap_or_default();
                format!("; vCPUs: {vcpus}; vsock: {vsock:?}")
            }
            None => String::new(),
        }
    }

    /// What the machine said last, for errors.
    fn console_tail(&self) -> String {
        match self {
            Machine::Kvm(vm) => {
                let log = vm.serial_log();
                let lines: Vec<&str> = log.lines().rev().take(5).collect();
                lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
            }
            Machine::Agent { .. } => String::new(),
        }
    }
}

/// The agent run as a host process, leader of a session of its own: every
/// process it starts, and every process those fork, is in that session
/// unless it makes one itself. Its end ends them all, even when the agent
/// was killed before it could end them (an ELF's `sleep 100 &` outlives
/// its process group's leader and the agent's SIGKILL of that group).
struct AgentProcess(tokio::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Not reaped yet (`id` is `None` once it is): its pid cannot have
        // been given to another process.
        if let Some(pid) = self.0.id() {
            end_session(pid);
        }
    }
}

/// SIGKILLs every live process of session `sid` until none is left. The
/// leader must be unreaped (alive or a zombie), which keeps `sid` from
/// being reused. Bounded: a session that keeps forking faster than this
/// kills gives up after `ROUNDS`.
fn end_session(sid: u32) {
    const ROUNDS: usize = 64;
    for _ in 0..ROUNDS {
        let mut killed = 0;
        for pid in session_members(sid) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                if rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok() {
                    killed += 1;
                }
            }
        }
        if killed == 0 {
            return;
        }
        std::thread::yield_now();
    }
    tracing::warn!("processes of agent session {sid} kept appearing; some may remain");
}

/// The live (not zombie) processes whose session id is `sid`, from /proc.
fn session_members(sid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        (stat_session(&stat)? == (sid, true)).then_some(pid)
    })
    .collect()
}

/// The session id in a `/proc/PID/stat` line, and whether the process is
/// live (neither a zombie nor dead). The command name in parentheses may
/// hold anything, spaces and parentheses too, so fields are counted from
/// the last `)`.
fn stat_session(stat: &str) -> Option<(u32, bool)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    // ppid, pgrp, then session.
    let session = fields.nth(2)?.parse().ok()?;
    Some((session, !matches!(state, "Z" | "X" | "x")))
}

/// A temporary directory removed on drop.
/// How many of an agent process's last lines an early exit reports.
const AGENT_LAST_LINES: usize = 8;
/// How long an agent that exited gets to have its last lines read.
const AGENT_LAST_WORDS: Duration = Duration::from_secs(1);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "capsa-vm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)?;
        let mut perms = std::fs::metadata(&dir)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        std::fs::set_permissions(&dir, perms)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A byte stream to the agent, whichever machine it runs in.
type AgentStream = Pin<Box<dyn AsyncReadWrite>>;

trait AsyncReadWrite: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncReadWrite for T {}

struct ReadHalf(Rc<std::cell::RefCell<AgentStream>>);
struct WriteHalf(Rc<std::cell::RefCell<AgentStream>>);

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.borrow_mut().as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.borrow_mut().as_mut().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.borrow_mut().as_mut().poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.borrow_mut().as_mut().poll_close(cx)
    }
}

/// What the host learnt about this machine's KVM, once per host. The probe
/// runs a guest for a while, so it runs on a blocking thread, never on the
/// thread that serves every guest.
pub struct Probed {
    result: tokio::sync::OnceCell<Option<capsa_microvm::Probe>>,
    probe: fn() -> Result<capsa_microvm::Probe, capsa_microvm::ProbeError>,
}

impl Default for Probed {
    fn default() -> Self {
        Probed {
            result: tokio::sync::OnceCell::new(),
            probe: capsa_microvm::probe,
        }
    }
}

impl Probed {
    async fn get(&self) -> Option<capsa_microvm::Probe> {
        let probe = self.probe;
        *self
            .result
            .get_or_init(|| async move {
                match tokio::task::spawn_blocking(probe).await {
                    Ok(result) => Self::report(result),
                    Err(e) => {
                        tracing::warn!("KVM probe failed: {e}");
                        None
                    }
                }
            })
            .await
    }

    fn report(
        result: Result<capsa_microvm::Probe, capsa_microvm::ProbeError>,
    ) -> Option<capsa_microvm::Probe> {
        match result {
            Ok(p) => {
                tracing::info!(
                    "KVM probe: {:.1} ns per loop iteration ({})",
                    p.ns_per_iteration,
                    if p.emulated {
                        "emulated: compatibility CPU profile"
                    } else {
                        "native"
                    }
                );
                Some(p)
            }
            Err(e) => {
                tracing::warn!("KVM probe failed: {e}");
                None
            }
        }
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

fn gone() -> SpawnError {
    SpawnError::Vm("the machine is gone".into())
}

/// A machine still booting. If the boot is abandoned (its future dropped:
/// the caller went away), the machine is ended off the host's thread.
struct Booting(Option<Vm>);

impl Booting {
    fn vm(&self) -> Result<&Vm, SpawnError> {
        self.0.as_ref().ok_or_else(gone)
    }

    /// The machine, now the host's to tear down.
    fn machine(mut self) -> Option<Machine> {
        self.0.take().map(|vm| Machine::Kvm(Rc::new(vm)))
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

/// Starts a machine and returns it with a stream to its agent.
async fn boot(
    settings: &VmSettings,
    probed: &Probed,
    req: &VmRequest,
) -> Result<(Machine, AgentStream), SpawnError> {
    // A timeout too large to add is as good as none: a year.
    let deadline = Instant::now()
        .checked_add(settings.ready_timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    match &settings.backend {
        VmBackend::Kvm { kernel, initramfs } => {
            let boot_started = Instant::now();
            let kernel = match &req.kernel {
                Some(bytes) => KernelImage::Bytes(bytes.clone()),
                None => KernelImage::Path(kernel.clone()),
            };
            let initramfs = match &req.initramfs {
                Some(bytes) => bytes.clone(),
                None => std::fs::read(initramfs).map_err(|e| {
                    SpawnError::Vm(format!(
                        "reading the initramfs {}: {e}",
                        initramfs.display()
                    ))
                })?,
            };
            let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 quiet");
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
                .map_err(|e| SpawnError::Vm(format!("the thread starting the machine: {e}")))??;
            let booting = Booting(Some(vm));
            loop {
                let vm = booting.vm()?;
                // Until the guest's driver is up a connection request gets
                // no answer at all; after that the guest's kernel answers
                // at once (a RESPONSE if the agent listens, else an RST). So
                // an attempt is bounded by CONNECT_ATTEMPT, and a request
                // that got lost is asked again instead of waiting out the
                // whole deadline; a machine that stops (a kernel panic)
                // ends the wait at once.
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt =
                    tokio::time::timeout(left.min(CONNECT_ATTEMPT), vm.connect(AGENT_PORT));
                let attempt = async {
                    tokio::select! {
                        r = attempt => Some(r),
                        _ = vm.wait() => None,
                    }
                };
                let why = match attempt.await {
                    None => "the VM stopped".to_string(),
                    Some(r) => match r {
                        Ok(Ok(stream)) => {
                            tracing::debug!(
                                "the agent answered {:.2} s after the VM started",
                                boot_started.elapsed().as_secs_f64()
                            );
                            let machine = booting.machine().ok_or_else(gone)?;
                            return Ok((machine, Box::pin(stream)));
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "no answer".to_string(),
                    },
                };
                if let Some(exit) = vm.exit_status() {
                    let why = match exit {
                        VmExit::Panic(lines) => format!("the kernel panicked: {lines}"),
                        VmExit::Shutdown(how) => format!("the guest shut down ({how})"),
                        other => format!("{other:?}"),
                    };
                    let machine = booting.machine().ok_or_else(gone)?;
                    let tail = machine.console_tail();
                    machine.tear_down().await;
                    return Err(SpawnError::Vm(format!(
                        "the VM stopped while booting: {why}; console: {tail}"
                    )));
                }
                if Instant::now() >= deadline {
                    let machine = booting.machine().ok_or_else(gone)?;
                    let tail = machine.console_tail();
                    let state = machine.tear_down_reporting().await;
                    return Err(SpawnError::Vm(format!(
                        "the agent did not answer within {:?} ({why}); console: {tail}{state}",
                        settings.ready_timeout
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        VmBackend::AgentProcess { agent } => {
            let dir =
                TempDir::new().map_err(|e| SpawnError::Vm(format!("temporary directory: {e}")))?;
            let socket = dir.0.join("agent.sock");
            let mut command = tokio::process::Command::new(agent);
            command
                .arg("--listen")
                .arg(format!("unix:{}", socket.display()))
                .arg("--once")
                // Inside the folder the host removes, even when it has to
                // kill the agent.
                .arg("--work-dir")
                .arg(dir.0.join("work"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            // SAFETY: the closure runs in the forked child before exec and
            // makes only two system calls; it allocates nothing and takes
            // no lock.
            #[expect(unsafe_code, reason = "pre_exec runs code between fork and exec")]
            unsafe {
                command.pre_exec(|| {
                    // A session of its own, for `end_session`.
                    rustix::process::setsid()?;
                    // The agent ends with the host, however the host ends.
                    rustix::process::set_parent_process_death_signal(Some(
                        rustix::process::Signal::KILL,
                    ))?;
                    Ok(())
                });
            }
            let child = command.spawn().map_err(|e| {
                SpawnError::Vm(format!("starting the agent {}: {e}", agent.display()))
            })?;
            let mut child = child;
            // The agent's console, as a VM's serial log would be: to the
            // host log, never into a data stream; its last lines explain an
            // agent that exits before answering.
            let said = Rc::new(std::cell::RefCell::new(VecDeque::new()));
            let console = child.stderr.take().map(|stderr| {
                let said = said.clone();
                tokio::task::spawn_local(async move {
                    use tokio::io::AsyncBufReadExt;
                    let mut lines = tokio::io::BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!(target: "capsa::guest", "[agent] {line}");
                        let mut said = said.borrow_mut();
                        if said.len() == AGENT_LAST_LINES {
                            said.pop_front();
                        }
                        said.push_back(line);
                    }
                })
            });
            let mut machine = Machine::Agent {
                child: Box::new(AgentProcess(child)),
                _dir: dir,
            };
            loop {
                match tokio::net::UnixStream::connect(&socket).await {
                    Ok(s) => {
                        let s = tokio_util::compat::TokioAsyncReadCompatExt::compat(s);
                        return Ok((machine, Box::pin(s)));
                    }
                    Err(e) if Instant::now() >= deadline => {
                        machine.tear_down().await;
                        return Err(SpawnError::Vm(format!(
                            "the agent did not answer within {:?}: {e}",
                            settings.ready_timeout
                        )));
                    }
                    Err(_) => {
                        if let Machine::Agent { child, .. } = &mut machine {
                            if let Ok(Some(s)) = child.0.try_wait() {
                                if let Some(console) = console {
                                    let _ = tokio::time::timeout(AGENT_LAST_WORDS, console).await;
                                }
                                let said = Vec::from(std::mem::take(&mut *said.borrow_mut()));
                                return Err(SpawnError::Vm(format!(
                                    "the agent exited before answering: {s}; it said: {}",
                                    said.join(" / ")
                                )));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    }
}

/// A process running in a machine, as the host tracks it.
pub struct VmProcess {
    pub agent: executor::Client,
    pub process: process::Client,
    kill: Rc<KillSwitch>,
    status: watch::Receiver<Option<ExitStatus>>,
    torn_down: watch::Receiver<Option<ExitStatus>>,
}

impl VmProcess {
    pub fn kill(&self, reason: ExitStatus) {
        self.kill.fire(reason);
    }

    pub async fn wait(&self) -> ExitStatus {
        wait_status(self.status.clone()).await
    }

    pub(crate) fn kill_switch(&self) -> Rc<KillSwitch> {
        self.kill.clone()
    }

    /// Resolves once the machine is gone.
    pub(crate) fn torn_down(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.torn_down.clone()
    }
}

/// Boots a machine, runs `req` in it through the agent, and returns the
/// host's handle on it. `on_exit` runs once the machine is torn down.
pub(crate) async fn start(
    settings: &VmSettings,
    probed: &Probed,
    req: VmRequest,
    flow: FlowLimits,
    on_exit: impl FnOnce() + 'static,
) -> Result<VmProcess, SpawnError> {
    tracing::debug!(
        "{}: booting a machine of {} MiB and {} vCPU(s)",
        req.name,
        req.memory_mib,
        req.vcpus
    );
    let (mut machine, stream) = boot(settings, probed, &req).await?;
    tracing::debug!("{}: the machine's agent answered", req.name);
    let stream = Rc::new(std::cell::RefCell::new(stream));
    // The agent runs inside the machine: the guest's kernel is as
    // untrusted as any guest, so its connection is bounded like theirs.
    let network = transport::bounded(
        ReadHalf(stream.clone()),
        WriteHalf(stream),
        Side::Client,
        flow,
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let agent: executor::Client = rpc.bootstrap(Side::Server);
    let rpc = tokio::task::spawn_local(rpc);

    // The agent counts CPU time in milliseconds, the host in ticks.
    let tick_ms = u64::try_from(crate::engine::EPOCH_TICK.as_millis()).unwrap_or(1);
    let args: Vec<&str> = req.args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = req
        .env
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let dirs: Vec<(&str, &directory::Client)> = req
        .directories
        .iter()
        .map(|(path, dir)| (path.as_str(), dir))
        .collect();
    // The deadline is the host's to keep (it tears the machine down);
    // the agent keeps the memory limit and the CPU budget.
    let run = capsa_client::Spawn {
        args: &args,
        env: &env,
        stdio: StdioMode::Data,
        name: &req.argv0,
        memory_limit: req.limits.memory_bytes,
        cpu_ms: req
            .limits
            .cpu_ticks
            .map_or(0, |ticks| ticks.saturating_mul(tick_ms).max(1)),
        dirs: &dirs,
        ..capsa_client::Spawn::default()
    }
    .run_bytes(&agent, &req.bytes);
    // The machine can stop after its agent answered the connection and
    // before it answers the call (a guest that resets, a vCPU that fails):
    // its connection does not close while the machine's handle lives, so
    // the call is raced against the machine.
    let answer = tokio::select! {
        answer = run.send().promise => answer,
        why = machine.stopped() => {
            let tail = machine.console_tail();
            machine.tear_down().await;
            return Err(SpawnError::Vm(format!(
                "the VM stopped before its agent took the ELF: {why}; console: {tail}"
            )));
        }
    };
    let process = match answer {
        Ok(resp) => match resp.get().and_then(|r| r.get_process()) {
            Ok(p) => p,
            Err(e) => {
                machine.tear_down().await;
                return Err(SpawnError::Vm(format!("the agent refused the ELF: {e}")));
            }
        },
        Err(e) => {
            let tail = machine.console_tail();
            machine.tear_down().await;
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!("; console: {tail}")
            };
            // What the agent found wrong with the request is the caller's
            // to know; anything else is the machine's failure.
            let kind = match capsa_schema::error::kind(&e) {
                kind @ (ErrorKind::BadPayload | ErrorKind::BadRequest) => kind,
                _ => ErrorKind::Vm,
            };
            let message = capsa_schema::error::message_of(&e.extra);
            return Err(SpawnError::Refused(
                kind,
                format!("the agent refused the ELF: {message}{tail}"),
            ));
        }
    };

    let (kill_tx, mut kill_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(None);
    let (down_tx, down_rx) = watch::channel(None);
    let waiter = process.clone();
    let deadline = req.limits.deadline;
    tokio::task::spawn_local(async move {
        let elf_done = async {
            match waiter.wait_request().send().promise.await {
                Ok(resp) => match resp.get().and_then(|r| r.get_status()) {
                    Ok(s) => ExitStatus::read_from(s).unwrap_or_else(|e| {
                        ExitStatus::Failed(format!("bad status from the agent: {e}"))
                    }),
                    Err(e) => ExitStatus::Failed(format!("bad status from the agent: {e}")),
                },
                Err(e) => ExitStatus::Failed(format!("lost the agent: {e}")),
            }
        };
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let (status, keep) = tokio::select! {
            biased;
            r = kill_rx.wait_for(Option::is_some) => (match r {
                Ok(r) => r.clone().unwrap_or(ExitStatus::Killed),
                Err(_) => ExitStatus::Killed,
            }, false),
            _ = timer => (ExitStatus::DeadlineExceeded, false),
            why = machine.stopped() => (ExitStatus::Failed(why), false),
            s = elf_done => (s, true),
        };
        status_tx.send_replace(Some(status.clone()));
        if keep {
            // The ELF is done, the machine is not: the agent's Executor may
            // still be in use through `bootstrap()`. It goes with the
            // Process (kill or drop) or when it stops on its own.
            tokio::select! {
                _ = kill_rx.wait_for(Option::is_some) => {}
                _ = machine.stopped() => {}
            }
        }
        rpc.abort();
        machine.tear_down().await;
        on_exit();
        down_tx.send_replace(Some(status));
    });

    Ok(VmProcess {
        agent,
        process,
        kill: Rc::new(KillSwitch::new(kill_tx)),
        status: status_rx,
        torn_down: down_rx,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use super::*;

    fn on_this_thread<F: std::future::Future>(f: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(f)
    }

    #[test]
    fn a_session_id_is_read_after_the_last_parenthesis() {
        assert_eq!(
            stat_session("42 (sh) S 1 42 40 0 -1 4194560 0"),
            Some((40, true))
        );
        // A command name may hold spaces and parentheses.
        assert_eq!(
            stat_session("7 (a) Z 9 (b)) R 1 7 99 0 -1"),
            Some((99, true))
        );
        assert_eq!(stat_session("8 (x) Z 1 8 8 0"), Some((8, false)));
        assert_eq!(stat_session("8 (x) S 1"), None);
        assert_eq!(stat_session("garbage"), None);
    }

    /// A process that left its process group's leader behind (as `sleep &`
    /// in a shell does when the shell is killed) still ends with its
    /// session.
    #[test]
    fn ending_a_session_ends_the_processes_its_leader_left() {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", "sleep 1000 & sleep 1000 & echo started; wait"])
            .stdout(std::process::Stdio::piped());
        // SAFETY: one system call between fork and exec.
        #[expect(unsafe_code, reason = "pre_exec runs code between fork and exec")]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                rustix::process::setsid()?;
                Ok(())
            });
        }
        let mut leader = command.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let sid = leader.id();
        assert_eq!(session_members(sid).len(), 3, "the shell and two sleeps");
        end_session(sid);
        leader.wait().unwrap();
        let start = Instant::now();
        while !session_members(sid).is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(session_members(sid), Vec::<u32>::new());
    }

    static PROBED_ON: Mutex<Option<ThreadId>> = Mutex::new(None);

    fn recording_probe() -> Result<capsa_microvm::Probe, capsa_microvm::ProbeError> {
        *PROBED_ON.lock().unwrap() = Some(std::thread::current().id());
        Ok(capsa_microvm::Probe {
            emulated: true,
            ns_per_iteration: 1000.0,
        })
    }

    /// The probe runs a guest for a while; on the host's thread it would
    /// stall every guest meanwhile.
    #[test]
    fn the_kvm_probe_runs_off_the_host_thread_once() {
        let probed = Probed {
            result: tokio::sync::OnceCell::new(),
            probe: recording_probe,
        };
        let host_thread = std::thread::current().id();
        let first = on_this_thread(probed.get());
        assert!(first.is_some_and(|p| p.emulated));
        let probed_on = PROBED_ON.lock().unwrap().take();
        assert!(probed_on.is_some_and(|t| t != host_thread), "{probed_on:?}");
        on_this_thread(probed.get());
        assert_eq!(*PROBED_ON.lock().unwrap(), None, "probed twice");
    }

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
