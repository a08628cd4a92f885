//! The spawner: one wasmtime runtime, the program table, and the registry
//! of every live guest (WASM cells and machines) at every nesting level;
//! it compiles, loads and starts guests for the Executors above it, under
//! the host-wide bounds (`max_cells`, machine memory), and ends them all at
//! shutdown. [`crate::host::Host`] is its face to embedders.
//!
//! Single-threaded (capnp-rpc is): used inside a `tokio::task::LocalSet`
//! on a current-thread runtime.

use std::cell::{Cell as Counter, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::cell::{self, Cell, CellSpec};
use crate::directory::{DirGrant, Directories, Grants, Preopen};
use crate::engine::{Runtime, RuntimeError};
use crate::error::SpawnError;
use crate::format::Format;
use crate::netpolicy::View;
use crate::network::{NetworkImpl, Networks};
use crate::program::{Hash, Loaded, Payload, ProgramTable};
use crate::quota::{Slot, VmMemory};
use crate::registry::ProcessSet;
use crate::status::{wait_status, ExitStatus, Limits};
use crate::transport::FlowLimits;
use crate::vm::{self, Probed, VmProcess, VmRequest, VmSettings};
use capsa_schema::capsa_capnp::network;

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
    /// The network PID0 and every root Executor are granted (their
    /// Executor's `network`, and PID0's wasi:sockets); none by default.
    pub network: Option<crate::netpolicy::Rules>,
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
            network: None,
            directory_timeout: crate::mirror::CALL_TIMEOUT,
            scratch_dir: None,
            files_on_host_thread: true,
            compile_cache: crate::engine::CacheConfig::default(),
        }
    }
}

/// A handle on the spawner; clones share it.
#[derive(Clone)]
pub(crate) struct Spawner(Rc<Inner>);

struct Inner {
    runtime: Runtime,
    config: HostConfig,
    next_id: Counter<u64>,
    /// Every guest running, by id.
    guests: ProcessSet,
    closed: std::cell::Cell<bool>,
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
    /// The Network views this host serves, to recognise them in
    /// `runBytes`.
    networks: Networks,
    /// The embedder's network and its server, kept for as long as the
    /// host runs.
    network: Option<(Arc<View>, network::Client)>,
}

/// Why a host could not be created.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The engine cannot be set up, or this system cannot hold as many
    /// guests as asked.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
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

impl Spawner {
    pub(crate) fn new(config: HostConfig) -> Result<Spawner, HostError> {
        let runtime = Runtime::new(
            config.limits.memory_bytes,
            config.max_cells,
            config.compile_cache.clone(),
        )?;
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
        let networks = Networks::default();
        let network = config.network.clone().map(|rules| {
            let view = View::root(rules);
            (view.clone(), NetworkImpl::client(view, &networks))
        });
        Ok(Spawner(Rc::new(Inner {
            runtime,
            config,
            networks,
            network,
            next_id: Counter::new(0),
            guests: ProcessSet::default(),
            closed: std::cell::Cell::new(false),
            probed: Probed::default(),
            directories,
            vm_memory_mib: Rc::new(Counter::new(0)),
            granted: granted.into(),
            preopens,
            programs: RefCell::new(ProgramTable::new(config_budget)),
        })))
    }

    pub(crate) fn config(&self) -> &HostConfig {
        &self.0.config
    }

    /// The Directories this host serves, to recognise them in `runBytes`.
    pub(crate) fn directories(&self) -> &Directories {
        &self.0.directories
    }

    /// The embedder's grants, as every root Executor lists them.
    pub(crate) fn granted(&self) -> Grants {
        self.0.granted.clone()
    }

    /// The Network views this host serves.
    pub(crate) fn networks(&self) -> &Networks {
        &self.0.networks
    }

    /// The embedder's network, if it granted one, as a capability and as
    /// the view PID0's wasi:sockets go through.
    pub(crate) fn network(&self) -> Option<(Arc<View>, network::Client)> {
        self.0.network.clone()
    }

    /// The embedder's grants, as PID0's preopens.
    pub(crate) fn preopens(&self) -> Vec<Preopen> {
        self.0.preopens.clone()
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
            .map_err(|source| SpawnError::Blocking {
                task: "hashing the program",
                source,
            })?;
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
        if self.live_guests() >= self.0.config.max_cells as usize {
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
                    inner.guests.remove(id);
                }
            },
        )?;
        // The cell may already have ended (an instant failure): only track
        // it while it runs.
        if cell.try_status().is_none() {
            self.0
                .guests
                .insert(id, cell.kill_switch(), cell.status_receiver());
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
        if self.live_guests() >= self.0.config.max_cells as usize {
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
                inner.guests.remove(id);
            }
        })
        .await?;
        let vm = Rc::new(vm);
        // A boot takes seconds: the host may have begun shutting down
        // meanwhile, and its shutdown did not see this machine.
        if self.0.closed.get() {
            vm.kill(ExitStatus::Killed);
            wait_status(vm.torn_down()).await;
            return Err(SpawnError::ShuttingDown);
        }
        self.0.guests.insert(id, vm.kill_switch(), vm.torn_down());
        Ok(vm)
    }

    /// Guests (WASM cells and machines) currently running, at every
    /// nesting level.
    pub(crate) fn live_guests(&self) -> usize {
        self.0.guests.len()
    }

    /// Distinct compiled guests the host holds in memory.
    pub(crate) fn compiled_guests(&self) -> usize {
        self.0.runtime.cached()
    }

    /// Kills every running cell and waits until all have ended. New spawns
    /// are refused from here on.
    pub(crate) async fn shutdown(&self) {
        self.0.closed.set(true);
        self.0.guests.end_all().await;
    }
}
