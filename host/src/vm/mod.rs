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
//! is the same code either way: this module; each backend's boot and
//! teardown are its own (`kvm`, `process`), and `probe` is what the host
//! learnt of its KVM.

use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::RpcSystem;
use capsa_schema::capsa_capnp::{self, directory, executor, StdioMode};
use capsa_schema::ErrorKind;
use futures::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::error::{SpawnError, VmFailure};
use crate::status::{wait_status, ExitStatus, KillSwitch, Limits};
use crate::transport::{self, FlowLimits};

mod kvm;
mod probe;
mod process;

pub use kvm::report_live_machines;
use kvm::KvmMachine;
pub use probe::Probed;
use process::AgentMachine;

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

/// A running machine, from either backend: the handle `start` drives.
enum Machine {
    Kvm(KvmMachine),
    Agent(AgentMachine),
}

impl Machine {
    /// Resolves when the machine stops on its own, with a description.
    async fn stopped(&mut self) -> String {
        match self {
            Machine::Kvm(vm) => vm.stopped().await,
            Machine::Agent(agent) => agent.stopped().await,
        }
    }

    /// Ends the machine and waits until nothing of it is left.
    async fn tear_down(self) {
        match self {
            Machine::Kvm(vm) => vm.tear_down().await,
            Machine::Agent(agent) => agent.tear_down().await,
        }
    }

    /// What the machine said last, for errors.
    fn console_tail(&self) -> String {
        match self {
            Machine::Kvm(vm) => vm.console_tail(),
            Machine::Agent(_) => String::new(),
        }
    }

    /// The newest records of the guest kernel's log, for errors.
    fn kernel_log_tail(&self) -> String {
        match self {
            Machine::Kvm(vm) => vm.kernel_log_tail(),
            Machine::Agent(_) => String::new(),
        }
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

/// Starts a machine and returns it with a stream to its agent, once the
/// agent answers; a machine that does not within the settings'
/// `ready_timeout` is torn down.
async fn boot(
    settings: &VmSettings,
    probed: &Probed,
    req: &VmRequest,
) -> Result<(Machine, AgentStream), SpawnError> {
    // A timeout too large to add is as good as none: a year.
    let deadline = Instant::now()
        .checked_add(settings.ready_timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let ready = settings.ready_timeout;
    Ok(match &settings.backend {
        VmBackend::Kvm { kernel, initramfs } => {
            let (vm, stream) = kvm::boot(kernel, initramfs, probed, req, deadline, ready).await?;
            (Machine::Kvm(vm), stream)
        }
        VmBackend::AgentProcess { agent } => {
            let (agent, stream) = process::boot(agent, deadline, ready).await?;
            (Machine::Agent(agent), stream)
        }
    })
}

/// A process running in a machine, as the host tracks it.
pub struct VmProcess {
    pub agent: executor::Client,
    pub process: capsa_capnp::process::Client,
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
            let console = machine.console_tail();
            let report = machine.kernel_log_tail();
            machine.tear_down().await;
            return Err(VmFailure::StoppedBeforeRun { why, console, report }.into());
        }
    };
    let process = match answer {
        Ok(resp) => match resp.get().and_then(|r| r.get_process()) {
            Ok(p) => p,
            Err(e) => {
                machine.tear_down().await;
                return Err(VmFailure::Answer(e).into());
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
    /// Runs `f` to completion on a runtime on the calling thread.
    pub(super) fn on_this_thread<F: std::future::Future>(f: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(f)
    }
}
