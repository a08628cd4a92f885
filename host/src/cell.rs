//! A cell is one running guest: its store, its stdio pipes, its RPC
//! connection (in RPC mode) and the task that drives it to an exit status.
//!
//! Every guest, PID0 included, is started by [`spawn`]. The task it starts
//! owns the wasmtime `Store`; ending the task (kill, deadline, normal exit)
//! drops the store, closes the guest's ends of its pipes and so ends its RPC
//! connection, which releases every capability the guest held.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::RpcSystem;
use tokio::sync::watch;
use tracing::Instrument;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use crate::directory::Preopen;
use crate::engine::{CellState, Compiled, CpuBudgetExceeded, MemoryLimiter, P2Wasi, Runtime};
use crate::error::SpawnError;
use crate::netpolicy::View;
use crate::pipe::{self, GuestInput, GuestOutput, PipeReader, PipeWriter};
use crate::quota::MemoryShare;
use crate::status::{wait_status, ExitStatus, KillSwitch, Limits};
use crate::transport::{self, FlowLimits};

/// How a child's stdin/stdout are wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdioMode {
    /// stdin/stdout carry the guest's own Cap'n Proto connection.
    Rpc,
    /// stdin/stdout/stderr are plain byte streams reached through the Process.
    Data,
}

/// Everything needed to start a guest besides its compiled code.
pub struct CellSpec {
    /// Label for the guest's log lines.
    pub name: String,
    /// Never empty (see [`capsa_schema::argv::argv0`]).
    pub argv0: String,
    /// argv[1..].
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    pub stdio: StdioMode,
    /// RPC mode: the capability the guest gets when it bootstraps.
    pub bootstrap: Option<capnp::capability::Client>,
    /// RPC mode: whether to ask for the capability the guest exports.
    pub want_export: bool,
    /// The client's memory share the guest also draws on, if any.
    pub memory_share: Option<Arc<MemoryShare>>,
    /// Directories the guest sees as WASI preopens.
    pub preopens: Vec<Preopen>,
    /// The network the guest reaches through wasi:sockets, if it was
    /// granted one of this host.
    pub network: Option<Arc<View>>,
    /// Work done once the guest has ended, before its exit status is
    /// given (writing back directories copied in for it).
    pub after_exit: Vec<futures::future::LocalBoxFuture<'static, ()>>,
}

/// The host's ends of a data-mode guest's stdio.
pub struct DataStdio {
    pub stdin: Rc<PipeWriter>,
    pub stdout: Rc<PipeReader>,
    pub stderr: Rc<PipeReader>,
}

/// The handle on a running (or finished) cell. Dropping it does not kill the
/// cell; the Process capability does that in its own `Drop`.
pub struct Cell {
    pub name: String,
    kill: Rc<KillSwitch>,
    status: watch::Receiver<Option<ExitStatus>>,
    /// Data mode only.
    pub data: Option<DataStdio>,
    /// RPC mode: the capability the guest exports.
    pub export: Option<capnp::capability::Client>,
}

impl Cell {
    /// Ends the cell with `reason`, unless it has already ended.
    pub fn kill(&self, reason: ExitStatus) {
        self.kill.fire(reason);
    }

    /// The exit status, once the cell has ended.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.status.borrow().clone()
    }

    /// Waits for the cell to end.
    pub async fn wait(&self) -> ExitStatus {
        wait_status(self.status.clone()).await
    }

    /// A receiver that resolves with the exit status, for waiting without
    /// holding the cell.
    pub fn status_receiver(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.status.clone()
    }

    pub(crate) fn kill_switch(&self) -> Rc<KillSwitch> {
        self.kill.clone()
    }
}

/// Capacity of stdio pipes.
const PIPE_CAPACITY: usize = pipe::DEFAULT_CAPACITY;
/// stderr lines kept for the exit status of a trapped guest.
const STDERR_TAIL: usize = 4;
/// How long a trapped guest's stderr may take to reach the log.
const STDERR_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// Lets the guest's wasi:sockets open TCP connections the view allows:
/// every connect is checked against the view's ports, ranges and address
/// classes (a view's names need lookups, which wasi:sockets does not do
/// through the view; the guest's connections go to addresses). Nothing
/// else: no listening socket (it would listen on the host's own
/// interfaces; binding is allowed only as a connect does it, to any local
/// address and a port the kernel picks), no UDP, no lookups through the
/// host's DNS.
fn allow_sockets(builder: &mut WasiCtxBuilder, view: Arc<View>) {
    builder.allow_tcp(true);
    builder.socket_addr_check(move |addr, use_| {
        let allowed = match use_ {
            SocketAddrUse::TcpConnect => {
                !view.revoked().is_cancelled()
                    && view
                        .destination(&addr.ip().to_string(), addr.port())
                        .is_ok()
            }
            // What a connect binds first: any local address, a port the
            // kernel picks. `TcpListen` (checked even after such a bind)
            // and UDP fall to the refusal below.
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
            _ => false,
        };
        if !allowed {
            tracing::debug!("wasi:sockets {use_:?} to {addr} refused by the guest's network");
        }
        Box::pin(std::future::ready(allowed))
    });
}

/// Starts `compiled` as a new cell. `on_exit` runs once the cell has ended.
/// `files_on_host_thread`: see [`crate::HostConfig::files_on_host_thread`].
///
/// Must be called inside a `tokio::task::LocalSet`.
pub fn spawn(
    runtime: &Runtime,
    id: u64,
    compiled: Compiled,
    spec: CellSpec,
    flow: FlowLimits,
    files_on_host_thread: bool,
    on_exit: impl FnOnce(&ExitStatus) + 'static,
) -> Result<Rc<Cell>, SpawnError> {
    let (stdin_host, stdin_guest) = pipe::guest_input(PIPE_CAPACITY);
    let (stdout_guest, stdout_host) = pipe::guest_output(PIPE_CAPACITY);
    let (stderr_guest, stderr_host) = pipe::guest_output(PIPE_CAPACITY);
    let label = format!("{}#{}", spec.name, id);

    let mut builder = WasiCtxBuilder::new();
    builder
        .arg(&spec.argv0)
        .args(&spec.args)
        .envs(&spec.env)
        .stdin(stdin_guest.clone())
        .stdout(stdout_guest.clone())
        .stderr(stderr_guest.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .allow_blocking_current_thread(files_on_host_thread);
    if let Some(view) = &spec.network {
        allow_sockets(&mut builder, view.clone());
    }
    for preopen in &spec.preopens {
        let perms = match preopen.read_only {
            true => wasmtime_wasi::FsPerms::ReadOnly,
            false => wasmtime_wasi::FsPerms::ReadWrite,
        };
        builder
            .preopened_dir(preopen.host_path(), &preopen.guest_path, perms)
            .map_err(|source| SpawnError::Grant {
                path: preopen.guest_path.clone(),
                source,
            })?;
    }

    let (kill_tx, kill_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(None);
    let tail = Rc::new(RefCell::new(VecDeque::new()));

    let mut data = None;
    let mut export = None;
    let mut rpc_task = None;
    let mut held_stdio = None;
    let mut outcome = None;
    let mut stderr_drained = None;
    match spec.stdio {
        StdioMode::Data => {
            data = Some(DataStdio {
                stdin: Rc::new(stdin_host),
                stdout: Rc::new(stdout_host),
                stderr: Rc::new(stderr_host),
            });
        }
        StdioMode::Rpc => {
            let label_for_log = label.clone();
            let tail_for_log = tail.clone();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            stderr_drained = Some(done_rx);
            tokio::task::spawn_local(async move {
                log_stderr(label_for_log, stderr_host, tail_for_log).await;
                let _ = done_tx.send(());
            });
            let stdin_host = Rc::new(stdin_host);
            let stdout_host = Rc::new(stdout_host);
            held_stdio = Some((stdin_host.clone(), stdout_host.clone()));
            // The connection never closes the guest's stdin or stdout
            // itself: a guest whose connection broke must still be running
            // when the kill below reaches it, not see EOF or a broken pipe
            // and exit on its own first.
            let network = transport::bounded(
                pipe::KeepOpenReader(stdout_host),
                pipe::KeepOpen(stdin_host),
                Side::Server,
                flow,
            );
            outcome = Some(network.outcome());
            let mut rpc = RpcSystem::new(Box::new(network), spec.bootstrap);
            if spec.want_export {
                export = Some(rpc.bootstrap::<capnp::capability::Client>(Side::Client));
            }
            rpc_task = Some(rpc);
        }
    }

    let kill = Rc::new(KillSwitch::new(kill_tx));
    if let (Some(rpc), Some(outcome)) = (rpc_task, outcome) {
        // A guest that breaks its connection (garbage on stdout, a bad
        // message) is ended with the reason: it can no longer be reached.
        let kill = Rc::downgrade(&kill);
        let label = label.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = outcome.of(rpc.await) {
                tracing::debug!(cell = %label, "RPC connection ended: {e}");
                if let Some(k) = kill.upgrade() {
                    k.fire(ExitStatus::Failed(format!("broken RPC connection: {e}")));
                }
            }
        });
    }

    let limits = spec.limits.clone();
    let run = runtime.ticker().ticking(run_guest(
        runtime,
        compiled,
        builder,
        limits.clone(),
        spec.memory_share.clone(),
    ));
    // Whatever the guest makes the host log (wasmtime-wasi's warnings of a
    // preview 1 call it does not implement, say) carries the guest's label,
    // as its stderr lines do.
    let span = tracing::info_span!(target: "capsa::guest", "guest", process = %label);
    let driven = drive(
        label.clone(),
        run,
        kill_rx,
        limits,
        GuestEnds {
            stdin: stdin_guest,
            stdout: stdout_guest,
            stderr: stderr_guest,
            _held_stdio: held_stdio,
            stderr_drained,
            tail,
        },
        Ending {
            status_tx,
            after_exit: spec.after_exit,
            on_exit,
        },
    );
    tokio::task::spawn_local(driven.instrument(span));

    Ok(Rc::new(Cell {
        name: spec.name,
        kill,
        status: status_rx,
        data,
        export,
    }))
}

struct GuestEnds {
    stdin: GuestInput,
    stdout: GuestOutput,
    stderr: GuestOutput,
    /// RPC mode: the host's ends of stdin and stdout, kept open until the
    /// cell ends.
    _held_stdio: Option<(Rc<PipeWriter>, Rc<PipeReader>)>,
    /// RPC mode: resolves once the stderr logger has seen end of stream.
    stderr_drained: Option<tokio::sync::oneshot::Receiver<()>>,
    tail: Rc<RefCell<VecDeque<String>>>,
}

impl GuestEnds {
    fn close(&self) {
        self.stdin.close();
        self.stdout.close();
        self.stderr.close();
    }
}

/// What happens once a cell's status is known, in this order: the work
/// that must finish first (`after_exit`), `on_exit`, then the status is
/// published to its waiters.
struct Ending<F> {
    status_tx: watch::Sender<Option<ExitStatus>>,
    after_exit: Vec<futures::future::LocalBoxFuture<'static, ()>>,
    on_exit: F,
}

impl<F: FnOnce(&ExitStatus)> Ending<F> {
    async fn finish(self, status: ExitStatus) {
        for work in self.after_exit {
            work.await;
        }
        (self.on_exit)(&status);
        self.status_tx.send_replace(Some(status));
    }
}

/// Runs the guest until it exits, is killed, or passes its deadline.
async fn drive(
    label: String,
    run: impl std::future::Future<Output = Outcome>,
    mut kill_rx: watch::Receiver<Option<ExitStatus>>,
    limits: Limits,
    mut ends: GuestEnds,
    ending: Ending<impl FnOnce(&ExitStatus)>,
) {
    let deadline = async {
        match limits.deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        biased;
        reason = kill_rx.wait_for(Option::is_some) => match reason {
            Ok(r) => Err(r.clone().unwrap_or(ExitStatus::Killed)),
            Err(_) => Err(ExitStatus::Killed),
        },
        _ = deadline => Err(ExitStatus::DeadlineExceeded),
        outcome = run => Ok(outcome),
    };
    // The store is gone with `run`; closing the pipes ends the RPC
    // connection and tells data-mode readers the streams are over.
    ends.close();
    let status = match outcome {
        Err(status) => status,
        Ok(outcome) => {
            // A trapped guest's last stderr lines (a panic message) belong
            // in its status: let the logger drain what the guest wrote.
            if outcome.result.is_err() {
                if let Some(drained) = ends.stderr_drained.take() {
                    let _ = tokio::time::timeout(STDERR_DRAIN, drained).await;
                }
            }
            classify(outcome, &ends.tail)
        }
    };
    tracing::debug!(cell = %label, "{status}");
    ending.finish(status).await;
}

/// What running a guest to its end gave, before it is named an exit status.
struct Outcome {
    result: wasmtime::Result<i32>,
    /// The memory bound that refused a growth, if one did.
    memory_refused: Option<u64>,
}

fn refused(limiter: &MemoryLimiter) -> Option<u64> {
    limiter.refused.then_some(limiter.refused_at)
}

fn run_guest(
    runtime: &Runtime,
    compiled: Compiled,
    mut builder: WasiCtxBuilder,
    limits: Limits,
    share: Option<Arc<MemoryShare>>,
) -> impl std::future::Future<Output = Outcome> {
    let engine = runtime.engine().clone();
    async move {
        match compiled {
            Compiled::Component(pre) => {
                let wasi = P2Wasi::new(builder.build());
                let mut store = new_store(&engine, wasi, &limits, share);
                let result = async {
                    let command = pre.instantiate_async(&mut store).await?;
                    command.wasi_cli_run().call_run(&mut store).await
                }
                .await;
                Outcome {
                    result: result.map(|r| if r.is_ok() { 0 } else { 1 }),
                    memory_refused: refused(&store.data().limiter),
                }
            }
            Compiled::Module(pre) => {
                let mut wasi: WasiP1Ctx = builder.build_p1();
                wasmtime_wasi::WasiView::ctx(&mut wasi)
                    .table
                    .set_max_capacity(crate::engine::MAX_GUEST_HANDLES);
                let mut store = new_store(&engine, wasi, &limits, share);
                let result = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await?;
                    Ok(0)
                }
                .await;
                Outcome {
                    result,
                    memory_refused: refused(&store.data().limiter),
                }
            }
        }
    }
}

fn new_store<W: Send + 'static>(
    engine: &wasmtime::Engine,
    wasi: W,
    limits: &Limits,
    share: Option<Arc<MemoryShare>>,
) -> Store<CellState<W>> {
    let mut store = Store::new(
        engine,
        CellState {
            wasi,
            limiter: MemoryLimiter::sharing(limits.memory_bytes, share),
            ticks: 0,
            cpu_budget: limits.cpu_ticks,
        },
    );
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| {
        let state = ctx.data_mut();
        state.ticks += 1;
        if state.cpu_budget.is_some_and(|b| state.ticks > b) {
            return Err(wasmtime::Error::new(CpuBudgetExceeded));
        }
        // Yield to the host at every tick: this is what lets a kill, a
        // deadline or another guest get in while this one computes.
        Ok(UpdateDeadline::Yield(1))
    });
    store
}

/// Turns the outcome of running a guest into its exit status.
fn classify(outcome: Outcome, tail: &RefCell<VecDeque<String>>) -> ExitStatus {
    let err = match outcome.result {
        Ok(code) => return ExitStatus::Exited(code),
        Err(e) => e,
    };
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return ExitStatus::Exited(exit.0);
    }
    if err.downcast_ref::<CpuBudgetExceeded>().is_some() {
        return ExitStatus::CpuBudgetExceeded;
    }
    if let Some(bound) = outcome.memory_refused {
        return ExitStatus::OutOfMemory(bound);
    }
    let mut message = match err.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{err:#}"),
    };
    let tail = tail.borrow();
    if !tail.is_empty() {
        message.push_str("; stderr: ");
        message.push_str(&tail.iter().cloned().collect::<Vec<_>>().join(" | "));
    }
    ExitStatus::Trapped(message)
}

/// Copies an RPC-mode guest's stderr to the host log, line by line, labelled
/// with the cell, and keeps the last lines for its exit status.
async fn log_stderr(label: String, stderr: PipeReader, tail: Rc<RefCell<VecDeque<String>>>) {
    let mut line = Vec::new();
    loop {
        let chunk = stderr.read_chunk(8192).await;
        let eof = chunk.is_empty();
        line.extend_from_slice(&chunk);
        while let Some(pos) = line.iter().position(|&b| b == b'\n') {
            let rest = line.split_off(pos + 1);
            emit(&label, &line[..pos], &tail);
            line = rest;
        }
        // A guest that never ends its line must not grow the host.
        if line.len() > 4096 || (eof && !line.is_empty()) {
            emit(&label, &line, &tail);
            line.clear();
        }
        if eof {
            return;
        }
    }
}

fn emit(label: &str, line: &[u8], tail: &RefCell<VecDeque<String>>) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    tracing::info!(target: "capsa::guest", "[{label}] {text}");
    let mut tail = tail.borrow_mut();
    if tail.len() == STDERR_TAIL {
        tail.pop_front();
    }
    tail.push_back(text.to_string());
}
