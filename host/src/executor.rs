//! The `Executor` capability (`runBytes`, `load`, `program`, `directories`
//! and `echo`) and the `Program` capability, which runs a loaded program
//! through the Executor that loaded or found it: its processes have that
//! Executor's limits, quotas and scope, whoever calls `run`.
//!
//! Every Executor carries the nesting depth of the children it starts and the
//! limits they inherit. The default bootstrap of a child is a new Executor one
//! level deeper with the child's own limits, so quotas compose down the tree.

use std::cell::Cell as Counter;
use std::rc::Rc;
use std::sync::Arc;

use capsa_schema::argv;
use capsa_schema::capsa_capnp::{
    env_var, executor, options, process, program, StdioMode as WireStdio,
};
use capsa_schema::error::error;
use capsa_schema::ErrorKind;

use crate::cell::{CellSpec, StdioMode};
use crate::directory::{Grants, Preopen};
use crate::engine::EPOCH_TICK;
use crate::error::SpawnError;
use crate::format::{self, Format};
use crate::process::ProcessImpl;
use crate::program::{Loaded, Payload};
use crate::quota::Slot;
use crate::scope::Scope;
use crate::spawner::Spawner;
use crate::status::Limits;
use crate::vm::VmRequest;
use capsa_client::Pushed;
use capsa_directory::mirror::{Folder, Mirror};
use futures::future::LocalBoxFuture;

pub struct ExecutorImpl {
    host: Spawner,
    /// Nesting level of the children this Executor starts (PID0's are 1).
    depth: u32,
    limits: Limits,
    /// Children of this Executor that are still running.
    live: Rc<Counter<u32>>,
    /// The client every process started here belongs to (for PID0 and an
    /// embedder's root Executors, a scope of their own); the Executors
    /// handed to children carry it on.
    scope: Scope,
    /// The directories granted to whoever holds this Executor.
    grants: Grants,
}

impl ExecutorImpl {
    /// An Executor whose processes (and their descendants) join `scope`,
    /// held by a grantee of `grants`.
    pub(crate) fn scoped(
        host: Spawner,
        depth: u32,
        limits: Limits,
        scope: Scope,
        grants: Grants,
    ) -> Self {
        ExecutorImpl {
            host,
            depth,
            limits,
            live: Rc::new(Counter::new(0)),
            scope,
            grants,
        }
    }

    /// `Options.directories`, each as a preopen at its path: this host's
    /// own Directories as they are, others copied in (and written back by
    /// the returned work once the child has ended; see [`crate::mirror`]).
    async fn granted(
        &self,
        list: capnp::struct_list::Reader<'_, capsa_schema::capsa_capnp::grant::Owned>,
    ) -> capnp::Result<(Grants, Vec<Preopen>, Vec<LocalBoxFuture<'static, ()>>)> {
        let grants = forwarded(list)?;
        let mut preopens = Vec::with_capacity(grants.len());
        let mut after_exit = Vec::new();
        for (path, client) in grants.iter() {
            let path = path.as_str();
            match self.host.directories().local(client).await? {
                Some(local) => preopens.push(Preopen::of(&local, path)?),
                None => {
                    let config = self.host.config();
                    let scratch = config
                        .scratch_dir
                        .clone()
                        .unwrap_or_else(std::env::temp_dir);
                    let (preopen, write_back) =
                        copied(path, client.clone(), &scratch, config.directory_timeout).await?;
                    preopens.push(preopen);
                    after_exit.push(write_back);
                }
            }
        }
        Ok((grants, preopens, after_exit))
    }

    /// Reserves a live-child slot, or refuses when the quotas are used up.
    fn reserve(&self) -> Result<Slot, SpawnError> {
        let config = self.host.config();
        if self.scope.is_closed() {
            return Err(SpawnError::ShuttingDown);
        }
        if self.depth > config.max_depth {
            return Err(SpawnError::Depth(config.max_depth));
        }
        if self.live.get() >= config.max_children {
            return Err(SpawnError::Children(config.max_children));
        }
        Ok(Slot::new(self.live.clone(), self.scope.seat()?))
    }
}

/// `Options.directories` as read: bounded in number, paths UTF-8. A
/// machine's are passed on to its agent as they are (the agent checks the
/// paths against its own filesystem); a WASM child's become preopens.
fn forwarded(
    list: capnp::struct_list::Reader<'_, capsa_schema::capsa_capnp::grant::Owned>,
) -> capnp::Result<Grants> {
    if list.len() > MAX_GRANTS {
        return Err(error(
            ErrorKind::BadRequest,
            format_args!("at most {MAX_GRANTS} directories may be granted to one child"),
        ));
    }
    list.iter()
        .map(|grant| {
            let path = grant.get_path()?.to_str().map_err(|_| {
                error(
                    ErrorKind::BadRequest,
                    "a granted directory's path must be UTF-8",
                )
            })?;
            Ok((path.to_string(), grant.get_directory()?))
        })
        .collect()
}

/// A Directory from elsewhere copied into a private folder: its preopen,
/// and the work that writes it back and removes the folder.
async fn copied(
    path: &str,
    remote: capsa_schema::capsa_capnp::directory::Client,
    scratch: &std::path::Path,
    timeout: std::time::Duration,
) -> capnp::Result<(Preopen, LocalBoxFuture<'static, ()>)> {
    let folder = Folder::new(scratch).map_err(|e| {
        error(
            ErrorKind::Failed,
            format_args!("a folder for {path:?}: {e}"),
        )
    })?;
    let mirror = Mirror::copy_in(remote, folder.path().to_path_buf(), timeout).await?;
    let preopen = Preopen::folder(path, mirror.local(), false)
        .map_err(|e| error(ErrorKind::Failed, format_args!("{path:?}: {e}")))?;
    let path = path.to_string();
    let write_back = async move {
        if let Err(e) = mirror.write_back().await {
            tracing::warn!("writing back the directory granted at {path:?}: {e}");
        }
        // Removing a large tree is blocking work.
        let _ = tokio::task::spawn_blocking(move || drop(folder)).await;
    };
    Ok((preopen, Box::pin(write_back)))
}

pub use capsa_directory::MAX_GRANTS;

/// A CPU budget in milliseconds as epoch ticks, saturating: a budget too
/// large to count is as good as none, never a small wrapped one.
pub fn cpu_ticks(millis: u64) -> u64 {
    let tick_micros = u64::try_from(EPOCH_TICK.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    millis.saturating_mul(1000) / tick_micros
}

/// A machine's memory counts against its caller's memory limit: unset, it
/// is the host's default narrowed to that limit; asked for, it must fit.
fn vm_memory_mib(asked: u32, default: u32, limit_bytes: u64) -> Result<u32, SpawnError> {
    let limit_mib = u32::try_from(limit_bytes >> 20).unwrap_or(u32::MAX);
    match asked {
        0 => Ok(default.min(limit_mib)),
        n if n > limit_mib => Err(SpawnError::VmTooLarge(format!(
            "{n} MiB of memory asked for, and this caller's memory limit is {limit_mib} MiB"
        ))),
        n => Ok(n),
    }
}

/// vCPUs: unset is the host's default; at most as many as the host has
/// CPUs, and at most 255 (the VMM's bound).
fn vm_vcpus(asked: u32, default: u8) -> Result<u32, SpawnError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .min(u32::from(u8::MAX));
    match asked {
        0 => Ok(u32::from(default).min(max)),
        n if n > max => Err(SpawnError::VmTooLarge(format!(
            "{n} vCPUs asked for, and this host gives a machine at most {max}"
        ))),
        n => Ok(n),
    }
}

impl ExecutorImpl {
    /// `runBytes` with the bytes sent, and `Program.run` with a loaded
    /// program.
    pub(crate) async fn run(
        self: &Rc<Self>,
        payload: Payload,
        args: capnp::text_list::Reader<'_>,
        env_list: capnp::struct_list::Reader<'_, env_var::Owned>,
        opts: options::Reader<'_>,
    ) -> Result<process::Client, capnp::Error> {
        let args = capsa_schema::request::args(args)?;
        let env = capsa_schema::request::env(env_list)?;
        let format = match &payload {
            Payload::Loaded(loaded) => loaded.format,
            Payload::Bytes(bytes) => format::detect(bytes).map_err(SpawnError::from)?,
        };
        let elf = format == Format::Elf;
        // A machine's agent copies its grants in itself; a WASM child's are
        // preopened here.
        let (grants, preopens, after_exit) = match elf {
            true => (forwarded(opts.get_directories()?)?, Vec::new(), Vec::new()),
            false => self.granted(opts.get_directories()?).await?,
        };
        let mut slot = self.reserve()?;
        let cpu_ticks = cpu_ticks(opts.get_cpu_budget_millis());
        let limits = self.limits.narrowed(
            opts.get_memory_limit_bytes(),
            opts.get_deadline_millis(),
            cpu_ticks,
        );
        let stdio = match opts.get_stdio()? {
            WireStdio::Rpc => StdioMode::Rpc,
            WireStdio::Data => StdioMode::Data,
        };
        let pushed = Pushed::from_options(opts)?;
        // An ELF's stdio is always data; a WASM child in RPC mode has no
        // streams to push.
        if stdio == StdioMode::Rpc && !elf && pushed.any() {
            return Err(error(
                ErrorKind::WrongMode,
                "stdoutTo and stderrTo need data mode: in RPC mode stdout carries the child's \
                 connection and stderr goes to the host log",
            ));
        }
        let bootstrap = match opts.get_bootstrap().which()? {
            options::bootstrap::Inherit(()) => Some(
                capnp_rpc::new_client::<executor::Client, _>(ExecutorImpl::scoped(
                    self.host.clone(),
                    self.depth + 1,
                    limits.clone(),
                    self.scope.clone(),
                    grants.clone(),
                ))
                .client,
            ),
            options::bootstrap::None(()) => None,
            options::bootstrap::Capability(cap) => {
                Some(cap.get_as_capability::<capnp::capability::Client>()?)
            }
        };
        // The caller's name is argv[0] as well; without one, argv[0] is the
        // default every backend shares and the log label is generated.
        let given = opts.get_name()?.to_str().unwrap_or("");
        let argv0 = argv::argv0(given).to_string();
        let name = match given {
            "" => format!("child{}", self.depth),
            n => n.to_string(),
        };
        let spec = CellSpec {
            name,
            argv0,
            args,
            env,
            limits,
            stdio,
            bootstrap,
            want_export: stdio == StdioMode::Rpc,
            memory_share: slot.memory_share(),
            preopens,
            network: None,
            after_exit,
        };
        if elf {
            let vm = opts.get_vm();
            let settings = self
                .host
                .config()
                .vm
                .as_ref()
                .ok_or(SpawnError::VmDisabled)?;
            let non_empty = |d: &[u8]| (!d.is_empty()).then(|| d.to_vec());
            let vcpus = vm_vcpus(vm.get_vcpus(), settings.vcpus)?;
            let memory_mib = vm_memory_mib(
                vm.get_memory_mib(),
                settings.memory_mib,
                spec.limits.memory_bytes,
            )?;
            let req = VmRequest {
                name: spec.name,
                argv0: spec.argv0,
                bytes: payload.bytes().to_vec(),
                args: spec.args,
                env: spec.env,
                limits: spec.limits,
                vcpus,
                memory_mib,
                kernel: non_empty(vm.get_kernel()?),
                initramfs: non_empty(vm.get_initramfs()?),
                directories: grants.to_vec(),
            };
            slot.take_memory(u64::from(memory_mib) << 20)?;
            let process = self.host.spawn_vm(req, Some(slot)).await?;
            self.scope.track(process.kill_switch(), process.torn_down());
            return Ok(capnp_rpc::new_client(ProcessImpl::vm(process, pushed)));
        }
        let cell = self.host.spawn(payload, spec, Some(slot)).await?;
        self.scope.track(cell.kill_switch(), cell.status_receiver());
        Ok(capnp_rpc::new_client(ProcessImpl::new(cell, pushed)))
    }

    /// `loaded` as a Program that runs through this Executor.
    fn bound(self: &Rc<Self>, loaded: Rc<Loaded>) -> program::Client {
        capnp_rpc::new_client(ProgramImpl {
            executor: self.clone(),
            loaded,
        })
    }
}

impl executor::Server for ExecutorImpl {
    async fn run_bytes(
        self: Rc<Self>,
        params: executor::RunBytesParams,
        mut results: executor::RunBytesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let bytes: Arc<[u8]> = Arc::from(p.get_bytes()?);
        // An unset struct reads as its defaults: every limit inherited.
        let process = self
            .run(
                Payload::Bytes(bytes),
                p.get_args()?,
                p.get_env()?,
                p.get_options()?,
            )
            .await?;
        results.get().set_process(process);
        Ok(())
    }

    async fn load(
        self: Rc<Self>,
        params: executor::LoadParams,
        mut results: executor::LoadResults,
    ) -> Result<(), capnp::Error> {
        let bytes: Arc<[u8]> = Arc::from(params.get()?.get_bytes()?);
        let loaded = self.host.load(bytes).await?;
        results.get().set_program(self.bound(loaded));
        Ok(())
    }

    async fn program(
        self: Rc<Self>,
        params: executor::ProgramParams,
        mut results: executor::ProgramResults,
    ) -> Result<(), capnp::Error> {
        let hash = capsa_schema::program::hash_arg(params.get()?.get_hash()?)?;
        let loaded = self
            .host
            .program(&hash)
            .ok_or_else(|| capsa_schema::program::not_held("this host"))?;
        results.get().set_program(self.bound(loaded));
        Ok(())
    }

    async fn directories(
        self: Rc<Self>,
        _: executor::DirectoriesParams,
        mut results: executor::DirectoriesResults,
    ) -> Result<(), capnp::Error> {
        let mut list = results.get().init_grants(self.grants.len() as u32);
        for (i, (path, directory)) in self.grants.iter().enumerate() {
            let mut grant = list.reborrow().get(i as u32);
            grant.set_path(path);
            grant.set_directory(directory.clone());
        }
        Ok(())
    }

    async fn echo(
        self: Rc<Self>,
        params: executor::EchoParams,
        mut results: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_response(params.get()?.get_message()?);
        Ok(())
    }
}

/// A loaded program, bound to the Executor that runs it.
pub(crate) struct ProgramImpl {
    pub(crate) executor: Rc<ExecutorImpl>,
    pub(crate) loaded: Rc<Loaded>,
}

impl program::Server for ProgramImpl {
    async fn run(
        self: Rc<Self>,
        params: program::RunParams,
        mut results: program::RunResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let process = self
            .executor
            .run(
                Payload::Loaded(self.loaded.clone()),
                p.get_args()?,
                p.get_env()?,
                p.get_options()?,
            )
            .await?;
        results.get().set_process(process);
        Ok(())
    }

    async fn info(
        self: Rc<Self>,
        _: program::InfoParams,
        mut results: program::InfoResults,
    ) -> Result<(), capnp::Error> {
        capsa_schema::program::set_info(
            results.get(),
            &self.loaded.hash,
            self.loaded.bytes.len(),
            self.loaded.format.name(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use capsa_schema::argv::DEFAULT_ARGV0;

    use super::*;
    use crate::host::{Host, HostConfig};

    #[test]
    fn cpu_budgets_never_wrap() {
        assert_eq!(cpu_ticks(0), 0);
        assert_eq!(cpu_ticks(1), 1);
        assert_eq!(cpu_ticks(50), 50);
        // u64::MAX / 1000 + 1 ms wraps to 1384 µs when multiplied naively.
        assert_eq!(cpu_ticks(18_446_744_073_709_553), u64::MAX / 1000);
        assert_eq!(cpu_ticks(u64::MAX), u64::MAX / 1000);
    }

    #[test]
    fn vm_memory_counts_against_the_callers_limit() {
        // Unset: the host's default, narrowed to the limit.
        assert_eq!(vm_memory_mib(0, 128, 512 << 20).unwrap(), 128);
        assert_eq!(vm_memory_mib(0, 128, 64 << 20).unwrap(), 64);
        assert_eq!(vm_memory_mib(0, 128, u64::MAX).unwrap(), 128);
        assert_eq!(vm_memory_mib(0, 128, 1).unwrap(), 0);
        // Asked for: within the limit, or refused.
        assert_eq!(vm_memory_mib(1, 128, 64 << 20).unwrap(), 1);
        assert_eq!(vm_memory_mib(64, 128, 64 << 20).unwrap(), 64);
        let err = vm_memory_mib(100 << 10, 128, 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("102400 MiB") && err.contains("64 MiB"),
            "{err}"
        );
        assert!(vm_memory_mib(u32::MAX, 128, 64 << 20).is_err());
        assert_eq!(vm_memory_mib(u32::MAX, 128, u64::MAX).unwrap(), u32::MAX);
    }

    #[test]
    fn vm_vcpus_are_bounded_by_the_hosts_cpus() {
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(vm_vcpus(0, 1).unwrap(), 1);
        assert_eq!(vm_vcpus(0, u8::MAX).unwrap(), cpus.min(255));
        assert_eq!(vm_vcpus(1, 1).unwrap(), 1);
        assert!(vm_vcpus(cpus + 1, 1).is_err());
        assert!(vm_vcpus(u32::MAX, 1)
            .unwrap_err()
            .to_string()
            .contains("vCPUs"));
    }

    /// A WASI preview 1 program that writes its argument strings, each
    /// ending in NUL as `args_get` leaves them, to stdout.
    const PRINT_ARGV: &str = r#"
        (module
          (import "wasi_snapshot_preview1" "args_sizes_get"
            (func $sizes (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "args_get"
            (func $get (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write"
            (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            ;; argc at 0, string bytes at 4, pointers at 256, strings at 1024.
            (drop (call $sizes (i32.const 0) (i32.const 4)))
            (drop (call $get (i32.const 256) (i32.const 1024)))
            ;; One iovec at 8 over the strings; bytes written go to 16.
            (i32.store (i32.const 8) (i32.const 1024))
            (i32.store (i32.const 12) (i32.load (i32.const 4)))
            (drop (call $write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))))
    "#;

    /// What `PRINT_ARGV` writes when run with `name` and the argument "x".
    async fn argv_of(exec: &executor::Client, name: Option<&str>) -> String {
        let mut req = exec.run_bytes_request();
        {
            let mut p = req.get();
            p.set_bytes(&wat::parse_str(PRINT_ARGV).unwrap());
            p.reborrow().init_args(1).set(0, "x");
            let mut options = p.init_options();
            options.set_stdio(WireStdio::Data);
            if let Some(name) = name {
                options.set_name(name);
            }
        }
        let response = req.send().promise.await.unwrap();
        let process = response.get().unwrap().get_process().unwrap();
        let stdout = process.stdout_request().send().pipeline.get_source();
        let mut out = Vec::new();
        loop {
            let mut read = stdout.read_request();
            read.get().set_max_bytes(4096);
            let chunk = read.send().promise.await.unwrap();
            let chunk = chunk.get().unwrap();
            out.extend_from_slice(chunk.get_data().unwrap());
            if chunk.get_eof() {
                return String::from_utf8(out).unwrap();
            }
        }
    }

    #[test]
    fn a_wasm_child_gets_its_name_or_the_shared_default_as_argv0() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let host = Host::new(HostConfig::default()).unwrap();
            let root = host.root_executor();
            let default = format!("{DEFAULT_ARGV0}\0x\0");
            assert_eq!(argv_of(&root, Some("myname")).await, "myname\0x\0");
            assert_eq!(argv_of(&root, None).await, default);
            assert_eq!(argv_of(&root, Some("")).await, default);
            host.shutdown().await;
        });
    }
}
