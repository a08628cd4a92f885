//! The agent's `Executor`: runs x86-64 ELF executables as child processes.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::time::Duration;

use capsa_directory::Directories;
use capsa_schema::argv;
use capsa_schema::capsa_capnp::{directory, env_var, executor, options, process, program};
use capsa_schema::error::error;
use capsa_schema::ErrorKind;

use capsa_schema::program::Hash;
use sha2::{Digest, Sha256};

use crate::format::check_elf;
use crate::grants::{self, InUse};
use crate::process::{spawn, ProcessImpl, Spec};
use crate::reaper::Reaper;
use capsa_client::Pushed;

/// What every connection's Executor shares.
pub struct Runner {
    pub reaper: Rc<Reaper>,
    /// Private folder (mode 0700) the executables are written to.
    pub dir: PathBuf,
    /// The machine's filesystem as its clients see it: `/` in a VM; a
    /// folder of the agent's own when it runs as a host process. The
    /// programs' working directory, where grants land (see [`grants`]).
    pub root: PathBuf,
    /// `root` as a Directory, for `Executor.directories`.
    root_dir: directory::Client,
    in_use: InUse,
    serial: Cell<u64>,
    programs: Programs,
}

impl Runner {
    pub fn new(reaper: Rc<Reaper>, dir: PathBuf, root: PathBuf) -> std::io::Result<Self> {
        let (root_dir, _) = Directories::default().open(&root, false)?;
        Ok(Runner {
            reaper,
            dir,
            root,
            root_dir,
            in_use: InUse::default(),
            serial: Cell::new(0),
            programs: Programs::default(),
        })
    }
}

pub struct ExecutorImpl {
    runner: Rc<Runner>,
}

impl ExecutorImpl {
    pub fn new(runner: Rc<Runner>) -> Self {
        ExecutorImpl { runner }
    }
}

fn invalid(what: String) -> capnp::Error {
    error(ErrorKind::BadRequest, what)
}

fn text(reader: capnp::text::Reader<'_>, what: &str) -> Result<String, capnp::Error> {
    let s = reader
        .to_str()
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))?;
    if s.contains('\0') {
        return Err(invalid(format!("{what} contains a NUL byte")));
    }
    Ok(s.to_string())
}

/// The arguments of `runBytes` and `Program.run`.
struct RunParams<'a> {
    args: capnp::text_list::Reader<'a>,
    env: capnp::struct_list::Reader<'a, env_var::Owned>,
    options: Option<options::Reader<'a>>,
}

impl ExecutorImpl {
    async fn run(
        self: &Rc<Self>,
        bytes: &[u8],
        params: RunParams<'_>,
    ) -> Result<process::Client, capnp::Error> {
        check_elf(bytes).map_err(|e| error(ErrorKind::BadPayload, e.to_string()))?;

        let args = capsa_schema::request::args(params.args)?;
        let env = capsa_schema::request::env(params.env)?;

        let serial = self.runner.serial.get() + 1;
        self.runner.serial.set(serial);
        // Stdio is always plain data: an ELF executable has no Cap'n Proto
        // connection of its own, so `options.stdio` and `options.bootstrap`
        // do not apply.
        let mut pushed = Pushed::default();
        let (name, deadline, cpu_budget, memory_limit, granted) =
            if let Some(options) = params.options {
                pushed = Pushed::from_options(options)?;
                let name = if options.has_name() {
                    text(options.get_name()?, "options.name")?
                } else {
                    String::new()
                };
                let deadline = match options.get_deadline_millis() {
                    0 => None,
                    ms => Some(Duration::from_millis(ms)),
                };
                let cpu_budget = match options.get_cpu_budget_millis() {
                    0 => None,
                    ms => Some(Duration::from_millis(ms)),
                };
                let memory = match options.get_memory_limit_bytes() {
                    0 => None,
                    b => Some(b),
                };
                let granted = grants::copy_in(
                    &self.runner.root,
                    options.get_directories()?,
                    &self.runner.in_use,
                )
                .await?;
                (name, deadline, cpu_budget, memory, granted)
            } else {
                (String::new(), None, None, None, Vec::new())
            };
        // The caller's name is argv[0] as well; without one, argv[0] is the
        // default every backend shares and the log label is generated.
        let argv0 = argv::argv0(&name).to_string();
        let name = if name.is_empty() {
            format!("elf-{serial}")
        } else {
            name
        };

        let child = spawn(
            &self.runner.reaper,
            &self.runner.dir,
            serial,
            Spec {
                bytes,
                name: name.clone(),
                argv0,
                args,
                env,
                deadline,
                cpu_budget,
                memory_limit,
                cwd: &self.runner.root,
                granted,
            },
        )
        .map_err(|e| {
            // The kernel refusing the bytes is the caller's to know.
            let kind = if e.raw_os_error() == Some(nix::errno::Errno::ENOEXEC as i32) {
                ErrorKind::BadPayload
            } else {
                ErrorKind::Failed
            };
            error(kind, format!("could not start {name}: {e}"))
        })?;
        eprintln!("capsa-agent: started {name}");
        Ok(capnp_rpc::new_client(ProcessImpl::new(
            child,
            capnp_rpc::new_client::<executor::Client, _>(ExecutorImpl::new(self.runner.clone()))
                .client,
            pushed,
        )))
    }
}

impl executor::Server for ExecutorImpl {
    async fn run_bytes(
        self: Rc<Self>,
        params: executor::RunBytesParams,
        mut results: executor::RunBytesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let run = RunParams {
            args: p.get_args()?,
            env: p.get_env()?,
            options: p.has_options().then(|| p.get_options()).transpose()?,
        };
        let process = self.run(p.get_bytes()?, run).await?;
        results.get().set_process(process);
        Ok(())
    }

    /// Checks the bytes once; the Program runs them here as `runBytes`.
    async fn load(
        self: Rc<Self>,
        params: executor::LoadParams,
        mut results: executor::LoadResults,
    ) -> Result<(), capnp::Error> {
        let bytes = params.get()?.get_bytes()?;
        check_elf(bytes).map_err(|e| error(ErrorKind::BadPayload, e.to_string()))?;
        let loaded = self.runner.programs.load(bytes);
        results
            .get()
            .set_program(capnp_rpc::new_client(ProgramImpl {
                executor: self,
                loaded,
            }));
        Ok(())
    }

    /// A program loaded in this machine whose Program someone still holds.
    async fn program(
        self: Rc<Self>,
        params: executor::ProgramParams,
        mut results: executor::ProgramResults,
    ) -> Result<(), capnp::Error> {
        let hash = capsa_schema::program::hash_arg(params.get()?.get_hash()?)?;
        let loaded = self
            .runner
            .programs
            .find(&hash)
            .ok_or_else(|| capsa_schema::program::not_held("this machine"))?;
        results
            .get()
            .set_program(capnp_rpc::new_client(ProgramImpl {
                executor: self,
                loaded,
            }));
        Ok(())
    }

    /// The machine's whole filesystem, at "/": how a caller puts files in
    /// and takes results out.
    async fn directories(
        self: Rc<Self>,
        _: executor::DirectoriesParams,
        mut results: executor::DirectoriesResults,
    ) -> Result<(), capnp::Error> {
        let mut grant = results.get().init_grants(1).get(0);
        grant.set_path("/");
        grant.set_directory(self.runner.root_dir.clone());
        Ok(())
    }

    async fn echo(
        self: Rc<Self>,
        params: executor::EchoParams,
        mut results: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        let message = params.get()?.get_message()?;
        results.get().set_response(message);
        Ok(())
    }
}

/// Bytes loaded in this machine.
struct Loaded {
    bytes: Vec<u8>,
    hash: Hash,
}

/// The programs of this machine that someone still holds, by hash: a
/// machine keeps no bytes nobody can run.
#[derive(Default)]
struct Programs(std::cell::RefCell<HashMap<Hash, Weak<Loaded>>>);

impl Programs {
    fn load(&self, bytes: &[u8]) -> Rc<Loaded> {
        let hash: Hash = Sha256::digest(bytes).into();
        if let Some(known) = self.find(&hash) {
            return known;
        }
        let loaded = Rc::new(Loaded {
            bytes: bytes.to_vec(),
            hash,
        });
        let mut map = self.0.borrow_mut();
        map.retain(|_, weak| weak.strong_count() > 0);
        map.insert(hash, Rc::downgrade(&loaded));
        loaded
    }

    fn find(&self, hash: &Hash) -> Option<Rc<Loaded>> {
        self.0.borrow().get(hash)?.upgrade()
    }
}

struct ProgramImpl {
    executor: Rc<ExecutorImpl>,
    loaded: Rc<Loaded>,
}

impl program::Server for ProgramImpl {
    async fn run(
        self: Rc<Self>,
        params: program::RunParams,
        mut results: program::RunResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let run = RunParams {
            args: p.get_args()?,
            env: p.get_env()?,
            options: p.has_options().then(|| p.get_options()).transpose()?,
        };
        let process = self.executor.run(&self.loaded.bytes, run).await?;
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
            capsa_schema::format::Format::Elf.name(),
        );
        Ok(())
    }
}
