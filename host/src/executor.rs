//! The host's Executor: what `runBytes` and `Program.run` do here (format
//! routing, grants, quotas, limits narrowing, bootstrap choice), `load`
//! and `program` over the host's program table, and the directories its
//! holder was granted. The `Executor` and `Program` capabilities are the
//! schema crate's (`capsa_schema::serve`), served the same way by a
//! machine's agent; a Program runs through the Executor that loaded or
//! found it, so its processes have that Executor's limits, quotas and
//! scope, whoever calls `run`.
//!
//! Every Executor carries the nesting depth of the children it starts and the
//! limits they inherit. The default bootstrap of a child is a new Executor one
//! level deeper with the child's own limits, so quotas compose down the tree.

use std::cell::Cell as Counter;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capsa_schema::capsa_capnp::{directory, executor, network, process};
use capsa_schema::error::error;
use capsa_schema::program::Hash;
use capsa_schema::request::{Bootstrap, Pushed, Request, Stdio};
use capsa_schema::serve::executor::{Executes, Payload};
use capsa_schema::serve::program::Info;
use capsa_schema::ErrorKind;

use crate::cell::{CellSpec, StdioMode};
use crate::directory::{Grants, Preopen};
use crate::engine::EPOCH_TICK;
use crate::error::SpawnError;
use crate::format::{self, Format};
use crate::network::NetworkImpl;
use crate::process::Target;
use crate::program::{self, Loaded};
use crate::quota::Slot;
use crate::scope::Scope;
use crate::spawner::Spawner;
use crate::status::Limits;
use crate::vm::VmRequest;
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
    /// The network granted to whoever holds this Executor.
    network: Option<network::Client>,
}

impl ExecutorImpl {
    /// An Executor whose processes (and their descendants) join `scope`,
    /// held by a grantee of `grants` and `network`.
    pub(crate) fn scoped(
        host: Spawner,
        depth: u32,
        limits: Limits,
        scope: Scope,
        grants: Grants,
        network: Option<network::Client>,
    ) -> Self {
        ExecutorImpl {
            host,
            depth,
            limits,
            live: Rc::new(Counter::new(0)),
            scope,
            grants,
            network,
        }
    }

    /// Each grant as a preopen at its path: this host's own Directories as
    /// they are, others copied in (and written back by the returned work
    /// once the child has ended; see [`crate::mirror`]).
    async fn granted(
        &self,
        grants: &Grants,
    ) -> capnp::Result<(Vec<Preopen>, Vec<LocalBoxFuture<'static, ()>>)> {
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
        Ok((preopens, after_exit))
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

/// A Directory from elsewhere copied into a private folder: its preopen,
/// and the work that writes it back and removes the folder.
async fn copied(
    path: &str,
    remote: directory::Client,
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

/// A CPU budget in milliseconds as epoch ticks, saturating: a budget too
/// large to count is as good as none, never a small wrapped one.
pub fn cpu_ticks(millis: u64) -> u64 {
    let tick_micros = u64::try_from(EPOCH_TICK.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    millis.saturating_mul(1000) / tick_micros
}

/// A CPU budget asked for as epoch ticks: at least one, since a budget
/// asked for is never none.
fn budget_ticks(budget: Duration) -> u64 {
    cpu_ticks(u64::try_from(budget.as_millis()).unwrap_or(u64::MAX)).max(1)
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
    async fn run(
        self: &Rc<Self>,
        payload: program::Payload,
        request: Request,
    ) -> Result<process::Client, capnp::Error> {
        let elf = request.format == Format::Elf;
        // The caller's name is argv[0] as well; without one, argv[0] is the
        // default every backend shares and the log label is generated.
        let argv0 = request.argv0().to_string();
        let name = match request.name.as_str() {
            "" => format!("child{}", self.depth),
            _ => request.name,
        };
        let grants: Grants = request.grants.into();
        // A machine's agent copies its grants in itself; a WASM child's are
        // preopened here.
        let (preopens, mut after_exit) = match elf {
            true => (Vec::new(), Vec::new()),
            false => self.granted(&grants).await?,
        };
        // The child's network: a view of its own, so its exit revokes what
        // it made, whoever else holds the parent's.
        let (network, view) = match request.network {
            Some(_) if elf => {
                return Err(error(
                    ErrorKind::BadRequest,
                    "a microVM cannot be granted a network: it has no network device yet",
                ))
            }
            Some(given) => NetworkImpl::for_child(self.host.networks(), given).await,
            None => (None, None),
        };
        if let Some(held) = network.clone() {
            // Held until the child has ended.
            after_exit.push(Box::pin(async move { drop(held) }));
        }
        let mut slot = self.reserve()?;
        let asked = request.limits;
        let limits = self.limits.narrowed(
            asked.memory_bytes,
            asked.deadline,
            asked.cpu_budget.map(budget_ticks),
        );
        let (stdio, bootstrap, pushed) = match request.stdio {
            Stdio::Rpc(bootstrap) => (StdioMode::Rpc, Some(bootstrap), Pushed::default()),
            Stdio::Data(pushed) => (StdioMode::Data, None, pushed),
        };
        let bootstrap = match bootstrap {
            Some(Bootstrap::Inherit) => Some(
                capnp_rpc::new_client::<executor::Client, _>(ExecutorImpl::scoped(
                    self.host.clone(),
                    self.depth + 1,
                    limits.clone(),
                    self.scope.clone(),
                    grants.clone(),
                    network.clone(),
                ))
                .client,
            ),
            Some(Bootstrap::Capability(cap)) => Some(cap),
            Some(Bootstrap::None) | None => None,
        };
        let spec = CellSpec {
            name,
            argv0,
            args: request.args,
            env: request.env,
            limits,
            stdio,
            bootstrap,
            want_export: stdio == StdioMode::Rpc,
            memory_share: slot.memory_share(),
            preopens,
            network: view,
            after_exit,
        };
        if elf {
            let machine = request.vm;
            let settings = self
                .host
                .config()
                .vm
                .as_ref()
                .ok_or(SpawnError::VmDisabled)?;
            let vcpus = vm_vcpus(machine.vcpus, settings.vcpus)?;
            let memory_mib = vm_memory_mib(
                machine.memory_mib,
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
                kernel: machine.kernel,
                initramfs: machine.initramfs,
                directories: grants.to_vec(),
            };
            slot.take_memory(u64::from(memory_mib) << 20)?;
            let vm = self.host.spawn_vm(req, Some(slot)).await?;
            self.scope.track(vm.kill_switch(), vm.torn_down());
            return Ok(Target::Vm(vm).client(pushed));
        }
        let cell = self.host.spawn(payload, spec, Some(slot)).await?;
        self.scope.track(cell.kill_switch(), cell.status_receiver());
        Ok(Target::Cell(cell).client(pushed))
    }
}

/// The host's side of the Executor capability (the schema crate's
/// [`Executes`]): WebAssembly runs here, an ELF in a machine.
impl Executes for ExecutorImpl {
    type Loaded = Loaded;

    const HOLDER: &'static str = "this host";

    fn format(&self, bytes: &[u8]) -> capnp::Result<Format> {
        Ok(format::detect(bytes).map_err(SpawnError::from)?)
    }

    async fn start(
        self: &Rc<Self>,
        payload: Payload<'_, Loaded>,
        request: Request,
    ) -> capnp::Result<process::Client> {
        let payload = match payload {
            Payload::Bytes(bytes) => program::Payload::Bytes(Arc::from(bytes)),
            Payload::Loaded(loaded) => program::Payload::Loaded(loaded.clone()),
        };
        self.run(payload, request).await
    }

    async fn prepare(&self, bytes: &[u8]) -> capnp::Result<Rc<Loaded>> {
        Ok(self.host.load(Arc::from(bytes)).await?)
    }

    /// Bytes any client loaded, from the host's program table.
    fn find(&self, hash: &Hash) -> Option<Rc<Loaded>> {
        self.host.program(hash)
    }

    fn network(&self) -> Option<network::Client> {
        self.network.clone()
    }

    fn grants(&self) -> &[(String, directory::Client)] {
        &self.grants
    }
}

impl Info for Loaded {
    fn info(&self) -> (&Hash, usize, Format) {
        (&self.hash, self.bytes.len(), self.format)
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

    /// Runs `test` with the root Executor of a host of its own, then shuts
    /// the host down.
    fn on_a_host<F: std::future::Future<Output = ()>>(test: impl FnOnce(executor::Client) -> F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let host = Host::new(HostConfig::default()).unwrap();
            test(host.root_executor()).await;
            host.shutdown().await;
        });
    }

    /// `runBytes` of `PRINT_ARGV` with the argument "x", in data mode, with
    /// the options `set` makes.
    fn print_argv(
        exec: &executor::Client,
        set: impl FnOnce(capsa_schema::capsa_capnp::options::Builder<'_>),
    ) -> capsa_client::RunBytesRequest {
        let mut req = exec.run_bytes_request();
        let mut p = req.get();
        p.set_bytes(&wat::parse_str(PRINT_ARGV).unwrap());
        p.reborrow().init_args(1).set(0, "x");
        let mut options = p.init_options();
        options.set_stdio(capsa_schema::capsa_capnp::StdioMode::Data);
        set(options);
        req
    }

    /// What `PRINT_ARGV` writes when run with `name`.
    async fn argv_of(exec: &executor::Client, name: Option<&str>) -> String {
        let req = print_argv(exec, |mut options| {
            if let Some(name) = name {
                options.set_name(name);
            }
        });
        let response = req.send().promise.await.unwrap();
        let process = response.get().unwrap().get_process().unwrap();
        let stdout = process.stdout_request().send().pipeline.get_source();
        String::from_utf8(capsa_client::read_to_end(&stdout).await.unwrap()).unwrap()
    }

    /// Why `print_argv` with the options `set` makes is refused.
    async fn refused(
        exec: &executor::Client,
        set: impl FnOnce(capsa_schema::capsa_capnp::options::Builder<'_>),
    ) -> capnp::Error {
        match print_argv(exec, set).send().promise.await {
            Ok(_) => panic!("the request was taken"),
            Err(e) => e,
        }
    }

    /// A request is read as the agent reads it: a name is text like any
    /// other, and a grant's path, from whichever Directory, is not empty.
    #[test]
    fn names_and_grant_paths_are_checked_as_the_agent_checks_them() {
        use capsa_schema::error::kind;
        on_a_host(|root| async move {
            for name in [&b"cut\0short"[..], b"\xff"] {
                let e = refused(&root, |mut o| o.set_name(capnp::text::Reader::from(name))).await;
                assert_eq!(kind(&e), ErrorKind::BadRequest, "{e}");
                assert!(e.to_string().contains("options.name"), "{e}");
            }
            // A Directory from elsewhere, which would be copied in.
            let folder = std::env::temp_dir().join(format!("capsa-grant-{}", std::process::id()));
            std::fs::create_dir_all(&folder).unwrap();
            let (elsewhere, _) = capsa_directory::Directories::default()
                .open(&folder, false)
                .unwrap();
            for path in [&b""[..], b"a\0b"] {
                let e = refused(&root, |o| {
                    let mut grant = o.init_directories(1).get(0);
                    grant.set_path(capnp::text::Reader::from(path));
                    grant.set_directory(elsewhere.clone());
                })
                .await;
                assert_eq!(kind(&e), ErrorKind::BadRequest, "{e}");
                assert!(e.to_string().contains("path"), "{e}");
            }
            let _ = std::fs::remove_dir_all(&folder);
        });
    }

    #[test]
    fn a_wasm_child_gets_its_name_or_the_shared_default_as_argv0() {
        on_a_host(|root| async move {
            let default = format!("{DEFAULT_ARGV0}\0x\0");
            assert_eq!(argv_of(&root, Some("myname")).await, "myname\0x\0");
            assert_eq!(argv_of(&root, None).await, default);
            assert_eq!(argv_of(&root, Some("")).await, default);
        });
    }
}
