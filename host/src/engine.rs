//! The wasmtime engine: its configuration (epoch interruption, the pooling
//! allocator sized by the host's bounds), its linkers, each guest's store
//! data and memory limiter, and the [`Runtime`] that compiles guests.
//!
//! One [`Runtime`] per host. Guests are compiled once per distinct content
//! and kept as pre-instantiated images, so a second `runBytes` of the same
//! bytes costs an instantiation, not a compile: the compile cache in memory
//! ([`crate::memory_cache`]) is looked in first, then the disk cache
//! ([`crate::cache`]), which keeps compiled code across host starts. Bytes
//! that are not a WASI command are refused before anything is compiled. The
//! epoch ticker ([`crate::ticker`]) advances the engine's epoch while
//! guests run.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, ResourceLimiter,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::cache::{self, DiskCache};
use crate::format::{self, Format};
use crate::memory_cache::{MemoryCache, Source};
use crate::quota::MemoryShare;
use crate::ticker::EpochTicker;
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
    cache: RefCell<MemoryCache<Compiled>>,
    disk: Option<Arc<DiskCache>>,
    ticker: EpochTicker,
}

/// Where compiled guests are kept.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The folder of compiled guests on disk; `None` keeps them in memory
    /// only.
    pub dir: Option<std::path::PathBuf>,
    /// Bytes of guests (their bytes and compiled code) kept in memory; the
    /// least recently used go first.
    pub memory_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: None,
            memory_bytes: 512 << 20,
        }
    }
}

/// A guest compiled, or loaded from the disk cache.
enum Artifact {
    Component(Component),
    Module(Module),
}

impl Artifact {
    /// Bytes of its compiled code.
    fn code_bytes(&self) -> u64 {
        let range = match self {
            Artifact::Component(c) => c.image_range(),
            Artifact::Module(m) => m.image_range(),
        };
        (range.end as usize).saturating_sub(range.start as usize) as u64
    }

    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        match self {
            Artifact::Component(c) => c.serialize(),
            Artifact::Module(m) => m.serialize(),
        }
    }
}

/// Loads `bytes`' code from `disk` if it holds it, else compiles them (and
/// stores the result there). Runs on a blocking thread.
fn build(
    engine: &Engine,
    disk: Option<&DiskCache>,
    kind: Format,
    bytes: &[u8],
) -> wasmtime::Result<Artifact> {
    let key = disk.map(|_| cache::key_of(bytes));
    if let (Some(disk), Some(key)) = (disk, &key) {
        if let Some(code) = disk.load(key) {
            // SAFETY: wasmtime runs deserialized code as it is, so it must
            // be what `serialize` produced for a compatible engine. The
            // entry is this user's own (a private folder, checked when
            // opened), was written whole by `DiskCache::store` from
            // `serialize`'s output for this engine's configuration (the
            // folder is named by its compatibility hash), and its key and
            // checksum were checked by `load`; wasmtime checks the header
            // against the engine again. See `crate::cache`.
            #[expect(unsafe_code, reason = "wasmtime's deserialize trusts its input")]
            let loaded = unsafe {
                match kind {
                    Format::Module => Module::deserialize(engine, &code).map(Artifact::Module),
                    _ => Component::deserialize(engine, &code).map(Artifact::Component),
                }
            };
            match loaded {
                Ok(artifact) => {
                    tracing::debug!(
                        "{kind:?} of {} bytes loaded from the compile cache",
                        bytes.len()
                    );
                    return Ok(artifact);
                }
                Err(e) => tracing::warn!("a compile cache entry did not load ({e:#}); compiling"),
            }
        }
    }
    let started = std::time::Instant::now();
    let artifact = match kind {
        Format::Module => Module::new(engine, bytes).map(Artifact::Module),
        _ => Component::new(engine, bytes).map(Artifact::Component),
    }?;
    tracing::debug!(
        "{kind:?} of {} bytes compiled in {:.1} ms",
        bytes.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    if let (Some(disk), Some(key)) = (disk, &key) {
        match artifact.serialize() {
            Ok(code) => disk.store(key, &code),
            Err(e) => tracing::warn!("cannot serialize a compiled guest for the cache: {e:#}"),
        }
    }
    Ok(artifact)
}

/// A slot's reservation when the whole 32-bit index space is reserved:
/// then Cranelift emits no bounds check for a memory access.
const WIDE_RESERVATION: u64 = 4 << 30;
/// The guard after it, covering any static offset of an access.
const WIDE_GUARD: u64 = 2 << 30;
/// The address space all pool slots together may reserve with wide
/// reservations: a quarter of x86-64's 128 TiB of user space.
const WIDE_ADDRESS_SPACE: u64 = 32 << 40;

/// Whether every pool slot can reserve 4 GiB plus a 2 GiB guard: true for
/// up to 5,461 cells. Bounds checks on every memory access roughly double
/// compile time (a 3 MiB guest: 1.92x wasmtime's defaults with a 512 MiB
/// reservation and 64 KiB guard, 1.15x with these) and cost at run time;
/// past that count the slots reserve only the memory limit, and bounds
/// checks come back: address space bounds how many guests one host holds.
pub fn wide_reservations(max_memory: u64, max_cells: u32) -> bool {
    max_memory <= WIDE_RESERVATION
        && u64::from(max_cells).saturating_mul(WIDE_RESERVATION + WIDE_GUARD) <= WIDE_ADDRESS_SPACE
}

/// Memory mappings one guest slot can cost the process: the stack pool
/// splits each slot's fiber stack from its guard page (2, from the start),
/// and a live guest's linear memory splits the memory pool into the part
/// before its copy-on-write image, the image, the rest and the reserved
/// tail (4). Measured with 100,000 live guests: 2 per slot, 4 per guest.
pub const MAPPINGS_PER_CELL: u64 = 6;
/// Mappings left for everything else in the process: libraries, thread
/// stacks, `malloc`'s arenas, microVMs.
pub const MAPPINGS_BESIDE_CELLS: u64 = 8192;

/// Refuses a `max_cells` whose guests could need more memory mappings
/// than the kernel lets one process have (`vm.max_map_count`, read from
/// `/proc`; `limit` is that value, `None` when it cannot be read). Past
/// the limit every `mmap` of the process fails, `malloc`'s included, and
/// the process aborts: with 20,016 cells and the default 65,530 a host
/// died at its 6,000th guest ("memory allocation of 3584 bytes failed").
pub fn check_mapping_limit(max_cells: u32, limit: Option<u64>) -> Result<(), TooManyMappings> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let needed = u64::from(max_cells)
        .saturating_mul(MAPPINGS_PER_CELL)
        .saturating_add(MAPPINGS_BESIDE_CELLS);
    if needed <= limit {
        return Ok(());
    }
    Err(TooManyMappings {
        max_cells,
        needed,
        limit,
        fits: limit.saturating_sub(MAPPINGS_BESIDE_CELLS) / MAPPINGS_PER_CELL,
    })
}

/// A host asked to hold more guests than this system's memory-mapping
/// limit allows one process.
#[derive(Debug, thiserror::Error)]
#[error(
    "{max_cells} guests may need {needed} memory mappings, and this system allows a \
     process {limit} (vm.max_map_count): lower the number of guests to at most {fits}, \
     or raise the limit (sysctl -w vm.max_map_count={needed})"
)]
pub struct TooManyMappings {
    pub max_cells: u32,
    /// Mappings that many guests may need.
    pub needed: u64,
    /// `vm.max_map_count`.
    pub limit: u64,
    /// Most guests the limit holds.
    pub fits: u64,
}

/// Why a [`Runtime`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Mappings(#[from] TooManyMappings),
    /// wasmtime refused the engine's configuration or a linker.
    #[error("cannot set up the WebAssembly engine: {0:#}")]
    Engine(#[from] wasmtime::Error),
}

/// This system's `vm.max_map_count`, if it can be read.
pub fn mapping_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The engine configuration of a host whose guests have at most
/// `max_memory` bytes of memory each, `max_cells` of them at once.
pub fn engine_config(max_memory: u64, max_cells: u32) -> Config {
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
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .wasm_component_model(true)
        .memory_reservation_for_growth(0)
        .async_stack_size(1 << 20)
        .max_wasm_stack(512 << 10);
    // For profiling guests with `perf`: name the compiled functions in
    // /tmp/perf-PID.map. Code generation does not change.
    if std::env::var_os("CAPSA_PERF_MAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if wide_reservations(max_memory, max_cells) {
        config
            .memory_reservation(WIDE_RESERVATION)
            .memory_guard_size(WIDE_GUARD);
    } else {
        // Each slot reserves (virtually) the largest memory a guest may
        // have; below 4 GiB that means bounds-checked accesses.
        config
            .memory_reservation(max_memory.max(1 << 20))
            .memory_guard_size(64 << 10);
    }
    config
}

impl Runtime {
    /// `max_memory` bounds every guest memory; `max_cells` is how many
    /// guests may be alive at once in this host.
    pub fn new(
        max_memory: u64,
        max_cells: u32,
        cache: CacheConfig,
    ) -> Result<Runtime, RuntimeError> {
        check_mapping_limit(max_cells, mapping_limit())?;
        let engine = Engine::new(&engine_config(max_memory, max_cells))?;

        // Without its disk cache the host still works, only slower to start.
        let disk = cache.dir.as_deref().and_then(|dir| {
            DiskCache::open(dir, &engine)
                .map_err(|e| {
                    tracing::warn!(
                        "not using the compile cache {}: {e}; guests are compiled at every start",
                        dir.display()
                    )
                })
                .ok()
                .map(Arc::new)
        });
        Ok(Runtime {
            ticker: EpochTicker::start(engine.clone(), EPOCH_TICK),
            components: component_linker(&engine)?,
            modules: module_linker(&engine)?,
            engine,
            cache: RefCell::new(MemoryCache::new(cache.memory_bytes)),
            disk,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The epoch ticker, under which guests run ([`EpochTicker::ticking`]).
    pub fn ticker(&self) -> &EpochTicker {
        &self.ticker
    }

    /// Compiles `bytes` (or finds them in a cache) and links them.
    ///
    /// Bytes that are not a WASI command are refused before anything is
    /// compiled. Compilation runs on a blocking thread so the host keeps
    /// serving other guests meanwhile.
    pub async fn compile(&self, bytes: Arc<[u8]>) -> Result<Compiled, SpawnError> {
        let kind = format::detect(&bytes)?;
        let source = Source::new(bytes.clone());
        if let Some(hit) = self.cache.borrow_mut().get(&source) {
            return Ok(hit);
        }
        if kind == Format::Elf {
            return Err(SpawnError::VmDisabled);
        }
        format::check_command(kind, &bytes)?;
        let engine = self.engine.clone();
        let disk = self.disk.clone();
        let artifact =
            tokio::task::spawn_blocking(move || build(&engine, disk.as_deref(), kind, &bytes))
                .await
                .map_err(|source| SpawnError::Blocking {
                    task: "compiling the guest",
                    source,
                })?
                .map_err(SpawnError::Compile)?;
        let code_bytes = artifact.code_bytes();
        let compiled = match artifact {
            Artifact::Component(component) => {
                world::check_component(&component, &self.engine)?;
                let pre = self
                    .components
                    .instantiate_pre(&component)
                    .map_err(SpawnError::Linker)?;
                Compiled::Component(CommandPre::new(pre).map_err(SpawnError::Linker)?)
            }
            Artifact::Module(module) => {
                if module.get_export("_start").is_none() {
                    return Err(SpawnError::NotACommand(
                        "the module exports no `_start`: not a WASI command".into(),
                    ));
                }
                world::check_module(&module)?;
                Compiled::Module(
                    self.modules
                        .instantiate_pre(&module)
                        .map_err(SpawnError::Linker)?,
                )
            }
        };
        Ok(self.cache.borrow_mut().insert(source, compiled, code_bytes))
    }

    /// Distinct guests the compile cache in memory holds.
    pub fn cached(&self) -> usize {
        self.cache.borrow().len()
    }

    /// The compile cache's folder on disk, if there is one.
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        self.disk.as_deref().map(DiskCache::dir)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_must_fit_in_the_kernels_mapping_limit() {
        // The default limit holds the default host and about 9,500 guests.
        assert!(check_mapping_limit(1024, Some(65_530)).is_ok());
        assert!(check_mapping_limit(9_556, Some(65_530)).is_ok());
        let e = check_mapping_limit(20_016, Some(65_530))
            .unwrap_err()
            .to_string();
        assert!(e.contains("65530") && e.contains("at most 9556"), "{e}");
        assert!(e.contains("vm.max_map_count=128288"), "{e}");
        // 100,000 guests with the limit raised; no overflow at the extremes.
        assert!(check_mapping_limit(100_000, Some(700_000)).is_ok());
        assert!(check_mapping_limit(u32::MAX, Some(u64::MAX)).is_ok());
        assert!(check_mapping_limit(u32::MAX, Some(0)).is_err());
        assert!(check_mapping_limit(u32::MAX, None).is_ok());
    }

    #[test]
    fn a_host_beyond_the_mapping_limit_is_refused() {
        let Some(limit) = mapping_limit() else {
            panic!("/proc/sys/vm/max_map_count is unreadable");
        };
        let too_many =
            u32::try_from((limit / MAPPINGS_PER_CELL).saturating_add(1)).unwrap_or(u32::MAX);
        let Err(e) = Runtime::new(1 << 20, too_many, CacheConfig::default()) else {
            panic!("{too_many} cells fit in a limit of {limit} mappings");
        };
        assert!(e.to_string().contains("vm.max_map_count"), "{e}");
        // The system's limit, not the engine's failure.
        assert!(matches!(e, RuntimeError::Mappings(_)), "{e}");
        assert!(!e.to_string().contains("WebAssembly engine"), "{e}");
    }

    #[test]
    fn wide_reservations_while_the_pool_fits_its_address_space() {
        assert!(wide_reservations(512 << 20, 1024));
        assert!(wide_reservations(4 << 30, 5461));
        assert!(!wide_reservations(512 << 20, 5462));
        assert!(!wide_reservations(512 << 20, 100_000));
        assert!(!wide_reservations(8 << 30, 1));
        // Both kinds make an engine.
        Engine::new(&engine_config(512 << 20, 64)).unwrap();
        Engine::new(&engine_config(512 << 20, 6000)).unwrap();
    }

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
