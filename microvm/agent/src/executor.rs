//! The agent's `Executor`: runs x86-64 ELF executables as child processes.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::{Rc, Weak};

use capsa_directory::Directories;
use capsa_schema::capsa_capnp::{directory, executor, process};
use capsa_schema::error::error;
use capsa_schema::format::Format;
use capsa_schema::program::Hash;
use capsa_schema::request::Request;
use capsa_schema::serve::executor::{Executes, Payload};
use capsa_schema::serve::program::Info;
use capsa_schema::ErrorKind;
use sha2::{Digest, Sha256};

use crate::format::check_elf;
use crate::grants::{self, InUse};
use crate::process::{spawn, Elf, Spec};
use crate::reaper::Reaper;

/// What every connection's Executor shares.
pub struct Runner {
    pub reaper: Rc<Reaper>,
    /// Private folder (mode 0700) the executables are written to.
    pub dir: PathBuf,
    /// The machine's filesystem as its clients see it: `/` in a VM; a
    /// folder of the agent's own when it runs as a host process. The
    /// programs' working directory, where grants land (see [`grants`]).
    pub root: PathBuf,
    /// `root` as a Directory, at "/", for `Executor.directories`: the
    /// machine's whole filesystem, how a caller puts files in and takes
    /// results out.
    grants: [(String, directory::Client); 1],
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
            grants: [("/".to_string(), root_dir)],
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

    /// Runs `bytes`, an ELF executable, as `request` asks.
    async fn run(
        self: &Rc<Self>,
        bytes: &[u8],
        request: Request,
    ) -> Result<process::Client, capnp::Error> {
        let serial = self.runner.serial.get() + 1;
        self.runner.serial.set(serial);
        // The caller's name is argv[0] as well; without one, argv[0] is the
        // default every backend shares and the log label is generated.
        let argv0 = request.argv0().to_string();
        let name = match request.name.as_str() {
            "" => format!("elf-{serial}"),
            _ => request.name,
        };
        // An ELF's stdio is always data: it has no Cap'n Proto connection
        // of its own.
        let pushed = request.stdio.into_pushed();
        let granted =
            grants::copy_in(&self.runner.root, request.grants, &self.runner.in_use).await?;

        let child = spawn(
            &self.runner.reaper,
            &self.runner.dir,
            serial,
            Spec {
                bytes,
                name: name.clone(),
                argv0,
                args: request.args,
                env: request.env,
                limits: request.limits,
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
        let machine: executor::Client =
            capnp_rpc::new_client(ExecutorImpl::new(self.runner.clone()));
        Ok(Elf::client(child, machine.client, pushed))
    }
}

/// The agent's side of the Executor capability (the schema crate's
/// [`Executes`]): ELF executables, run as processes of this machine.
impl Executes for ExecutorImpl {
    type Loaded = Loaded;

    const HOLDER: &'static str = "this machine";

    fn format(&self, bytes: &[u8]) -> capnp::Result<Format> {
        check_elf(bytes).map_err(|e| error(ErrorKind::BadPayload, e.to_string()))?;
        Ok(Format::Elf)
    }

    async fn start(
        self: &Rc<Self>,
        payload: Payload<'_, Loaded>,
        request: Request,
    ) -> capnp::Result<process::Client> {
        match payload {
            Payload::Bytes(bytes) => self.run(bytes, request).await,
            Payload::Loaded(loaded) => self.run(&loaded.bytes, request).await,
        }
    }

    async fn prepare(&self, bytes: &[u8]) -> capnp::Result<Rc<Loaded>> {
        self.format(bytes)?;
        Ok(self.runner.programs.load(bytes))
    }

    /// A program loaded in this machine whose Program someone still holds.
    fn find(&self, hash: &Hash) -> Option<Rc<Loaded>> {
        self.runner.programs.find(hash)
    }

    fn grants(&self) -> &[(String, directory::Client)] {
        &self.runner.grants
    }
}

/// Bytes loaded in this machine.
pub struct Loaded {
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

impl Info for Loaded {
    fn info(&self) -> (&Hash, usize, Format) {
        (&self.hash, self.bytes.len(), Format::Elf)
    }
}
