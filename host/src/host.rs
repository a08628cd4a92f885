//! The host: one wasmtime runtime, the registry of live cells, and the entry
//! points an embedder uses (`run_pid0`, `root_executor`, `shutdown`).
//!
//! A `Host` is single-threaded (capnp-rpc is): create and use it inside a
//! `tokio::task::LocalSet` on a current-thread runtime.

use std::cell::{Cell as Counter, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use capsa_schema::capsa_capnp::executor;
use tokio::sync::watch;

use crate::cell::{self, Cell, CellSpec, KillSwitch, StdioMode};
use crate::directory::{DirGrant, Directories, Grants, Preopen};
use crate::engine::Runtime;
use crate::error::SpawnError;
use crate::executor::Slot;
use crate::format::Format;
use crate::program::{Hash, Loaded, Payload, ProgramTable};
use crate::scope::Scope;
use crate::status::{ExitStatus, Limits};
use crate::transport::FlowLimits;
use crate::vm::{self, Probed, VmProcess, VmRequest, VmSettings};

/// Host-wide settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Limits of PID0; every descendant's are at most these.
    pub limits: Limits,
    /// Deepest nesting level a child may have (PID0's children are level 1).
    pub max_depth: u32,
    /// Most children one Executor may have running at once.
    pub max_children: u32,
    /// Most guests alive at once in the whole host, PID0 included; the
    /// engine preallocates (virtual) slots for this many.
    pub max_cells: u32,
    /// How ELF payloads run; `None` refuses them.
    pub vm: Option<VmSettings>,
    /// What each RPC connection to a guest, client or agent may hold.
    pub flow: FlowLimits,
    /// Host directories granted to PID0 (as WASI preopens) and to every
    /// root Executor (its `directories`); none by default.
    pub directories: Vec<DirGrant>,
    /// How long one call to a Directory from elsewhere (copied in for a
    /// child, see [`crate::mirror`]) may take.
    pub directory_timeout: std::time::Duration,
    /// Where those copies are kept while their child runs; the system's
    /// temporary folder if unset.
    pub scratch_dir: Option<std::path::PathBuf>,
    /// Whether a WASM guest's file system calls (through its preopens) run
    /// on the host's thread, as `wasmtime run` does: a `stat` then costs a
    /// system call, not a trip through tokio's blocking pool (about 8x
    /// here), but a slow filesystem (network, a cold disk) holds every
    /// guest back for the length of each call. Off moves them to blocking
    /// threads.
    pub files_on_host_thread: bool,
    /// Where compiled guests are kept: in memory (bounded), and on disk if
    /// a folder is given (`capsa` gives one unless `--no-cache`;
    /// embedders choose). See [`crate::cache`].
    pub compile_cache: crate::engine::CacheConfig,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            limits: Limits::default(),
            max_depth: 8,
            max_children: 64,
            max_cells: 1024,
            vm: None,
            flow: FlowLimits::default(),
            directories: Vec::new(),
            directory_timeout: crate::mirror::CALL_TIMEOUT,
            scratch_dir: None,
            files_on_host_thread: true,
            compile_cache: crate::engine::CacheConfig::default(),
        }
    }
}

/// A handle on the host; clones share it.
#[derive(Clone)]
pub struct Host(Rc<Inner>);

struct Inner {
    runtime: Runtime,
    config: HostConfig,
    next_id: Counter<u64>,
    cells: RefCell<HashMap<u64, Live>>,
    closed: Counter<bool>,
    probed: Probed,
    directories: Directories,
    /// MiB of memory the host's running machines hold.
    vm_memory_mib: Rc<Counter<u64>>,
    /// The embedder's grants, opened once.
    granted: Grants,
    /// The same, as PID0's preopens.
    preopens: Vec<Preopen>,
    /// Programs loaded by any Executor, by hash.
    programs: RefCell<ProgramTable>,
}

/// Something running that the host must be able to end: a cell or a VM.
struct Live {
    kill: Rc<KillSwitch>,
    status: watch::Receiver<Option<ExitStatus>>,
}

/// One machine's memory, counted against the host's total for machines
/// from boot to teardown (or to a failed boot).
struct VmMemory {
    in_use: Rc<Counter<u64>>,
    mib: u64,
}

impl VmMemory {
    /// `total` unset is this machine's RAM (unbounded if unknown).
    fn take(
        in_use: &Rc<Counter<u64>>,
        mib: u64,
        total: Option<u64>,
    ) -> Result<VmMemory, SpawnError> {
        let total = total
            .or_else(|| crate::serve::machine_memory_bytes().map(|b| b >> 20))
            .unwrap_or(u64::MAX);
        let used = in_use.get();
        if used.saturating_add(mib) > total {
            return Err(SpawnError::VmMemoryFull {
                asked: mib,
                in_use: used,
                total,
            });
        }
        in_use.set(used + mib);
        Ok(VmMemory {
            in_use: in_use.clone(),
            mib,
        })
    }
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        self.in_use.set(self.in_use.get().saturating_sub(self.mib));
    }
}

/// Why a host could not be created.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// wasmtime refused the engine's configuration, or the machine cannot
    /// hold as many guests as asked.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    /// A directory the embedder granted cannot be opened.
    #[error("cannot grant {}: {error}", path.display())]
    Grant {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    /// A grant's guest path cannot be a preopen.
    #[error("cannot grant {path:?}: {why}")]
    GuestPath { path: String, why: String },
    /// The thread or runtime an embedded host runs on could not start.
    #[error("cannot start the host's thread: {0}")]
    Thread(String),
}

impl Host {
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        let runtime = Runtime::new(
            config.limits.memory_bytes,
            config.max_cells,
            config.compile_cache.clone(),
        )
        .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let config_budget = config.compile_cache.memory_bytes;
        let directories = Directories::default();
        let mut granted = Vec::new();
        let mut preopens = Vec::new();
        for grant in &config.directories {
            let (client, server) =
                crate::directory::open(&directories, grant).map_err(|error| HostError::Grant {
                    path: grant.host_path.clone(),
                    error,
                })?;
            let preopen = Preopen::of(&server, &grant.path).map_err(|e| HostError::GuestPath {
                path: grant.path.clone(),
                why: e.to_string(),
            })?;
            preopens.push(preopen);
            granted.push((grant.path.clone(), client));
        }
        Ok(Host(Rc::new(Inner {
            runtime,
            config,
            next_id: Counter::new(0),
            cells: RefCell::new(HashMap::new()),
            closed: Counter::new(false),
            probed: Probed::default(),
            directories,
            vm_memory_mib: Rc::new(Counter::new(0)),
            granted: granted.into(),
            preopens,
            programs: RefCell::new(ProgramTable::new(config_budget)),
        })))
    }

    pub fn config(&self) -> &HostConfig {
        &self.0.config
    }

    /// A new root Executor: what PID0 bootstraps. Its children are at
    /// nesting level 1 and run under the host's limits.
    pub fn root_executor(&self) -> executor::Client {
        Scope::new().root_executor(self)
    }

    /// The Directories this host serves, to recognise them in `runBytes`.
    pub(crate) fn directories(&self) -> &Directories {
        &self.0.directories
    }

    /// The embedder's grants, as every root Executor lists them.
    pub(crate) fn granted(&self) -> Grants {
        self.0.granted.clone()
    }

    /// Runs `bytes` as PID0 with the root Executor as its bootstrap, waits for
    /// it to exit, then kills whatever it left running.
    pub async fn run_pid0(
        &self,
        bytes: &[u8],
        args: Vec<String>,
    ) -> Result<ExitStatus, SpawnError> {
        self.run_pid0_with(bytes, args, self.root_executor().client)
            .await
    }

    /// Like [`Host::run_pid0`], with the capability PID0 bootstraps chosen by
    /// the embedder (for instance a wrapper around [`Host::root_executor`]).
    pub async fn run_pid0_with(
        &self,
        bytes: &[u8],
        args: Vec<String>,
        bootstrap: capnp::capability::Client,
    ) -> Result<ExitStatus, SpawnError> {
        let spec = CellSpec {
            name: "pid0".into(),
            argv0: "pid0".into(),
            args,
            env: Vec::new(),
            limits: self.0.config.limits.clone(),
            stdio: StdioMode::Rpc,
            bootstrap: Some(bootstrap),
            want_export: false,
            memory_share: None,
            preopens: self.0.preopens.clone(),
            after_exit: Vec::new(),
        };
        let pid0 = self
            .spawn(Payload::Bytes(Arc::from(bytes)), spec, None)
            .await?;
        let status = pid0.wait().await;
        self.shutdown().await;
        Ok(status)
    }

    /// Checks that `bytes` can run here (compiling WebAssembly, so a later
    /// run finds it compiled), and keeps them in the program table.
    pub(crate) async fn load(&self, bytes: Arc<[u8]>) -> Result<Rc<Loaded>, SpawnError> {
        if self.0.closed.get() {
            return Err(SpawnError::ShuttingDown);
        }
        let format = crate::format::detect(&bytes)?;
        let compiled = match format {
            Format::Elf if self.0.config.vm.is_none() => return Err(SpawnError::VmDisabled),
            Format::Elf => None,
            _ => Some(self.0.runtime.compile(bytes.clone()).await?),
        };
        // Hashing megabytes takes milliseconds: not on the host's thread.
        let hashed = bytes.clone();
        let hash = tokio::task::spawn_blocking(move || crate::cache::key_of(&hashed))
            .await
            .map_err(|e| SpawnError::Compile(format!("hashing the program: {e}")))?;
        let loaded = Rc::new(Loaded {
            bytes,
            hash,
            format,
            compiled,
        });
        Ok(self.0.programs.borrow_mut().insert(loaded))
    }

    /// The program of this hash, if the table holds it.
    pub(crate) fn program(&self, hash: &Hash) -> Option<Rc<Loaded>> {
        self.0.programs.borrow_mut().get(hash)
    }

    /// Compiles (or finds in the cache) and starts a guest.
    pub(crate) async fn spawn(
        &self,
        payload: Payload,
        spec: CellSpec,
        slot: Option<Slot>,
    ) -> Result<Rc<Cell>, SpawnError> {
        if self.0.closed.get() {
            return Err(SpawnError::ShuttingDown);
        }
        // A loaded program carries its compiled code; bytes are looked up
        // in (or added to) the compile cache.
        let held = match &payload {
            Payload::Loaded(loaded) => loaded.compiled.clone(),
            Payload::Bytes(_) => None,
        };
        let compiled = match held {
            Some(compiled) => compiled,
            None => self.0.runtime.compile(payload.bytes().clone()).await?,
        };
        if self.0.closed.get() {
            return Err(SpawnError::ShuttingDown);
        }
        if self.live_cells() >= self.0.config.max_cells as usize {
            return Err(SpawnError::HostFull(self.0.config.max_cells));
        }
        let id = self.0.next_id.get();
        self.0.next_id.set(id + 1);
        let weak = Rc::downgrade(&self.0);
        let flow = self.0.config.flow;
        let on_thread = self.0.config.files_on_host_thread;
        let cell = cell::spawn(
            &self.0.runtime,
            id,
            compiled,
            spec,
            flow,
            on_thread,
            move |_| {
                drop(slot);
                if let Some(inner) = weak.upgrade() {
                    inner.cells.borrow_mut().remove(&id);
                }
            },
        )?;
        // The cell may already have ended (an instant failure): only track
        // it while it runs.
        if cell.try_status().is_none() {
            self.0.cells.borrow_mut().insert(
                id,
                Live {
                    kill: cell.kill_switch(),
                    status: cell.status_receiver(),
                },
            );
        }
        Ok(cell)
    }

    /// Boots a machine and runs an ELF in it through its agent.
    pub(crate) async fn spawn_vm(
        &self,
        req: VmRequest,
        slot: Option<Slot>,
    ) -> Result<Rc<VmProcess>, SpawnError> {
        let settings = self.0.config.vm.as_ref().ok_or(SpawnError::VmDisabled)?;
        if self.0.closed.get() {
            return Err(SpawnError::ShuttingDown);
        }
        if self.live_cells() >= self.0.config.max_cells as usize {
            return Err(SpawnError::HostFull(self.0.config.max_cells));
        }
        let memory = VmMemory::take(
            &self.0.vm_memory_mib,
            u64::from(req.memory_mib),
            settings.total_memory_mib,
        )?;
        let id = self.0.next_id.get();
        self.0.next_id.set(id + 1);
        let weak = Rc::downgrade(&self.0);
        let flow = self.0.config.flow;
        let vm = vm::start(settings, &self.0.probed, req, flow, move || {
            drop(slot);
            drop(memory);
            if let Some(inner) = weak.upgrade() {
                inner.cells.borrow_mut().remove(&id);
            }
        })
        .await?;
        let vm = Rc::new(vm);
        // A boot takes seconds: the host may have begun shutting down
        // meanwhile, and its shutdown did not see this machine.
        if self.0.closed.get() {
            vm.kill(ExitStatus::Killed);
            cell::wait_status(vm.torn_down()).await;
            return Err(SpawnError::ShuttingDown);
        }
        self.0.cells.borrow_mut().insert(
            id,
            Live {
                kill: vm.kill_switch(),
                status: vm.torn_down(),
            },
        );
        Ok(vm)
    }

    /// Cells (and machines) currently running, at every nesting level.
    pub fn live_cells(&self) -> usize {
        self.0.cells.borrow().len()
    }

    /// Distinct guests compiled so far.
    pub fn compiled_guests(&self) -> usize {
        self.0.runtime.cached()
    }

    /// Kills every running cell and waits until all have ended. New spawns
    /// are refused from here on.
    pub async fn shutdown(&self) {
        self.0.closed.set(true);
        loop {
            let live: Vec<Live> = self
                .0
                .cells
                .borrow()
                .values()
                .map(|l| Live {
                    kill: l.kill.clone(),
                    status: l.status.clone(),
                })
                .collect();
            if live.is_empty() {
                return;
            }
            for l in &live {
                l.kill.fire(ExitStatus::Killed);
            }
            for l in live {
                cell::wait_status(l.status).await;
            }
        }
    }
}
