//! The wasmtime engine, its linkers, and the cache of compiled guests.
//!
//! One [`Runtime`] per host. Guests are compiled once per distinct content
//! and kept as pre-instantiated images, so a second `runBytes` of the same
//! bytes costs an instantiation, not a compile. The cache is keyed by a fast
//! 128-bit content hash (XXH3) and every hit is confirmed by comparing the
//! bytes themselves, so a crafted collision cannot pass one guest off as
//! another; a cryptographic hash of a large guest cost more than the whole
//! instantiation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, ResourceLimiter,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::format::{self, Format};
use crate::scope::MemoryShare;
use crate::{world, SpawnError};

/// How often the engine's epoch advances. A running guest yields to the host
/// at every tick, so this bounds how long a kill or a deadline waits for a
/// guest stuck in a loop, and it is the unit of the CPU budget.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Most handles (open files, streams, pollables, ...) one guest may hold
/// at once. A guest that opens more traps ("resource table has no free
/// keys"): each open file is a host descriptor, and the host's descriptors
/// are shared by every guest and connection.
pub const MAX_GUEST_HANDLES: usize = 4096;

/// WASI state of a component (preview 2).
pub struct P2Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl P2Wasi {
    pub fn new(ctx: WasiCtx) -> Self {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_GUEST_HANDLES);
        P2Wasi { ctx, table }
    }
}

/// Store data of one running guest.
pub struct CellState<W> {
    pub wasi: W,
    pub limiter: MemoryLimiter,
    /// Epoch ticks this guest has been running for.
    pub ticks: u64,
    pub cpu_budget: Option<u64>,
}

impl WasiView for CellState<P2Wasi> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// Refuses to grow the guest's memories and tables, counted together, past
/// the process's limit, and remembers that it did so the exit status can
/// say "out of memory". wasmtime asks it for every memory and table at
/// creation (from size 0) and at every growth, so `used` is their sum
/// (a growth it admitted that then fails stays counted: the error is on
/// the safe side).
///
/// With a client's [`MemoryShare`], the growth must also fit in what is left
/// of it; the guest's bytes go back to the share when the limiter (the
/// store) is dropped.
pub struct MemoryLimiter {
    pub limit: u64,
    /// Bytes of all memories and tables admitted so far.
    pub used: u64,
    pub refused: bool,
    /// The bound that refused a growth: `limit`, or the share's.
    pub refused_at: u64,
    share: Option<Arc<MemoryShare>>,
}

impl MemoryLimiter {
    pub fn new(limit: u64) -> Self {
        Self::sharing(limit, None)
    }

    /// A limiter that also draws on `share`.
    pub fn sharing(limit: u64, share: Option<Arc<MemoryShare>>) -> Self {
        MemoryLimiter {
            limit,
            used: 0,
            refused: false,
            refused_at: limit,
            share,
        }
    }

    /// Admits one memory or table going from `current` to `desired` bytes
    /// if the total stays within the limit (and the share).
    fn admit(&mut self, current: u64, desired: u64) -> bool {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.refused = true;
            self.refused_at = self.limit;
            return false;
        }
        if let Some(share) = &self.share {
            let more = total.saturating_sub(self.used);
            if !share.take(more) {
                self.refused = true;
                self.refused_at = share.limit();
                return false;
            }
            share.give(self.used.saturating_sub(total));
        }
        self.used = total;
        true
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        if let Some(share) = &self.share {
            share.give(self.used);
        }
    }
}

/// Bytes a table of `elements` references takes: one pointer each.
fn table_bytes(elements: usize) -> u64 {
    (elements as u64).saturating_mul(8)
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.admit(current as u64, desired as u64))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.admit(table_bytes(current), table_bytes(desired)))
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;

    #[test]
    fn memories_and_tables_count_together() {
        let mut l = MemoryLimiter::new(64 << 20);
        assert!(l.memory_growing(0, 40 << 20, None).unwrap());
        // A second 40 MiB memory fits alone, not beside the first.
        assert!(!l.memory_growing(0, 40 << 20, None).unwrap());
        assert!(l.refused);
        assert!(l.memory_growing(40 << 20, 60 << 20, None).unwrap());
        assert!(l.table_growing(0, (4 << 20) / 8, None).unwrap());
        assert!(!l
            .table_growing((4 << 20) / 8, (4 << 20) / 8 + 1, None)
            .unwrap());
        assert_eq!(l.used, 64 << 20);
        let mut huge = MemoryLimiter::new(u64::MAX);
        assert!(huge.memory_growing(0, usize::MAX, None).unwrap());
        assert!(huge.table_growing(0, usize::MAX, None).unwrap());
    }
}

/// The trap raised when a guest has used up its CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("CPU budget exceeded")]
pub struct CpuBudgetExceeded;

/// A guest compiled and linked against the host's WASI, ready to instantiate.
#[derive(Clone)]
pub enum Compiled {
    Component(CommandPre<CellState<P2Wasi>>),
    Module(wasmtime::InstancePre<CellState<WasiP1Ctx>>),
}

pub struct Runtime {
    engine: Engine,
    components: wasmtime::component::Linker<CellState<P2Wasi>>,
    modules: wasmtime::Linker<CellState<WasiP1Ctx>>,
    cache: RefCell<HashMap<u128, Vec<(Arc<[u8]>, Compiled)>>>,
    _ticker: EpochTicker,
}

impl Runtime {
    /// `max_memory` bounds every guest memory; `max_cells` is how many
    /// guests may be alive at once in this host.
    pub fn new(max_memory: u64, max_cells: u32) -> wasmtime::Result<Runtime> {
        // The pooling allocator keeps memories, tables and fiber stacks in
        // preallocated slots that are reset (not unmapped) between guests:
        // instantiation is then a few system calls instead of dozens, which
        // is most of the cost of a cached `runBytes`.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(max_cells)
            .total_core_instances(max_cells.saturating_mul(4))
            .total_memories(max_cells)
            .total_tables(max_cells.saturating_mul(2))
            .total_stacks(max_cells)
            .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(16 << 10);
        let mut config = Config::new();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let mut config = config;
        config
            .epoch_interruption(true)
            .wasm_component_model(true)
            // Each pool slot reserves (virtually) the largest memory a guest
            // may have; below 4 GiB that means bounds-checked accesses.
            .memory_reservation(max_memory.max(1 << 20))
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .async_stack_size(1 << 20)
            .max_wasm_stack(512 << 10);
        let engine = Engine::new(&config)?;

        Ok(Runtime {
            _ticker: EpochTicker::start(engine.clone()),
            components: component_linker(&engine)?,
            modules: module_linker(&engine)?,
            engine,
            cache: RefCell::new(HashMap::new()),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `bytes` (or finds them in the cache) and links them.
    ///
    /// Compilation runs on a blocking thread so the host keeps serving other
    /// guests meanwhile.
    pub async fn compile(&self, bytes: Arc<[u8]>) -> Result<Compiled, SpawnError> {
        let kind = format::detect(&bytes)?;
        let key = xxhash_rust::xxh3::xxh3_128(&bytes);
        if let Some(bucket) = self.cache.borrow().get(&key) {
            if let Some((_, hit)) = bucket.iter().find(|(b, _)| **b == *bytes) {
                return Ok(hit.clone());
            }
        }
        let engine = self.engine.clone();
        let source = bytes.clone();
        let compiled = match kind {
            Format::Elf => return Err(SpawnError::VmDisabled),
            Format::Component => {
                let component =
                    tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
                        .await
                        .map_err(|e| SpawnError::Compile(e.to_string()))?
                        .map_err(|e| SpawnError::Compile(format!("{e:#}")))?;
                world::check_component(&component, &self.engine)?;
                let pre = self
                    .components
                    .instantiate_pre(&component)
                    .map_err(|e| SpawnError::Link(format!("{e:#}")))?;
                Compiled::Component(
                    CommandPre::new(pre).map_err(|e| SpawnError::Link(format!("{e:#}")))?,
                )
            }
            Format::Module => {
                let module = tokio::task::spawn_blocking(move || Module::new(&engine, &bytes))
                    .await
                    .map_err(|e| SpawnError::Compile(e.to_string()))?
                    .map_err(|e| SpawnError::Compile(format!("{e:#}")))?;
                if module.get_export("_start").is_none() {
                    return Err(SpawnError::NotACommand(
                        "the module exports no `_start`: not a WASI command".into(),
                    ));
                }
                world::check_module(&module)?;
                Compiled::Module(
                    self.modules
                        .instantiate_pre(&module)
                        .map_err(|e| SpawnError::Link(format!("{e:#}")))?,
                )
            }
        };
        self.cache
            .borrow_mut()
            .entry(key)
            .or_default()
            .push((source, compiled.clone()));
        Ok(compiled)
    }

    /// Number of distinct guests compiled so far.
    pub fn cached(&self) -> usize {
        self.cache.borrow().values().map(Vec::len).sum()
    }
}

/// The linker of every component: wasmtime-wasi's WASI 0.2, which is the
/// world `guest` of wit/world.wit (the tests in [`world`] hold the two
/// together).
pub(crate) fn component_linker(
    engine: &Engine,
) -> wasmtime::Result<wasmtime::component::Linker<CellState<P2Wasi>>> {
    let mut linker = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    Ok(linker)
}

/// The linker of every WASI preview 1 module: `wasi_snapshot_preview1` and
/// nothing else.
pub(crate) fn module_linker(
    engine: &Engine,
) -> wasmtime::Result<wasmtime::Linker<CellState<WasiP1Ctx>>> {
    let mut linker = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut CellState<WasiP1Ctx>| {
        &mut s.wasi
    })?;
    Ok(linker)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("capsa-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
