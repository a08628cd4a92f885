//! The `Executor` capability, served the same way by the host and by a
//! machine's agent: one `runBytes` path for both.
//!
//! A side says how it runs programs ([`Executes`]); every [`Executes`] is
//! an Executor capability (`capnp_rpc::new_client(it)`), whose calls are
//! read and checked here in one order: the payload's format first, then
//! the whole request ([`Request`]), then the side's own work.

use std::future::Future;
use std::rc::Rc;

use crate::capsa_capnp::{directory, executor, network, process};
use crate::error::error;
use crate::format::Format;
use crate::program::Hash;
use crate::request::Request;
use crate::serve::program::{Info, ProgramServer};
use crate::ErrorKind;

/// What runs programs: the host (WebAssembly here, ELF through machines)
/// or a machine's agent (ELF).
pub trait Executes: Sized + 'static {
    /// A program loaded here.
    type Loaded: Info + 'static;

    /// Who holds the loaded programs, in messages: "this host".
    const HOLDER: &'static str;

    /// What `bytes` are, if this side runs them; why not otherwise
    /// (`badPayload`).
    fn format(&self, bytes: &[u8]) -> capnp::Result<Format>;

    /// Starts `payload` as `request` asks: `runBytes` and `Program.run`.
    fn start(
        self: &Rc<Self>,
        payload: Payload<'_, Self::Loaded>,
        request: Request,
    ) -> impl Future<Output = capnp::Result<process::Client>>;

    /// `load`: checks (and compiles) `bytes` once, as `runBytes` would.
    fn prepare(&self, bytes: &[u8]) -> impl Future<Output = capnp::Result<Rc<Self::Loaded>>>;

    /// The program loaded here whose bytes hash to `hash`, if it is held.
    fn find(&self, hash: &Hash) -> Option<Rc<Self::Loaded>>;

    /// The directories granted to whoever holds this Executor, each at its
    /// path.
    fn grants(&self) -> &[(String, directory::Client)];

    /// The Network granted to whoever holds this Executor, if any. None by
    /// default: a side that grants no network says so (`denied`).
    fn network(&self) -> Option<network::Client> {
        None
    }
}

/// What a run starts from.
pub enum Payload<'a, L> {
    /// The bytes `runBytes` was sent.
    Bytes(&'a [u8]),
    /// A program loaded here (`Program.run`).
    Loaded(&'a Rc<L>),
}

impl<E: Executes> executor::Server for E {
    async fn run_bytes(
        self: Rc<Self>,
        params: executor::RunBytesParams,
        mut results: executor::RunBytesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let bytes = p.get_bytes()?;
        let format = self.format(bytes)?;
        let request = Request::run_bytes(p, format)?;
        let process = self.start(Payload::Bytes(bytes), request).await?;
        results.get().set_process(process);
        Ok(())
    }

    async fn load(
        self: Rc<Self>,
        params: executor::LoadParams,
        mut results: executor::LoadResults,
    ) -> Result<(), capnp::Error> {
        let loaded = self.prepare(params.get()?.get_bytes()?).await?;
        results
            .get()
            .set_program(ProgramServer::client(self, loaded));
        Ok(())
    }

    async fn program(
        self: Rc<Self>,
        params: executor::ProgramParams,
        mut results: executor::ProgramResults,
    ) -> Result<(), capnp::Error> {
        let hash = params.get()?.get_hash()?;
        let hash: Hash = hash.try_into().map_err(|_| {
            error(
                ErrorKind::BadRequest,
                format_args!("a program hash is 32 bytes (SHA-256), not {}", hash.len()),
            )
        })?;
        let loaded = self.find(&hash).ok_or_else(|| {
            error(
                ErrorKind::NotFound,
                format_args!(
                    "{} holds no program with that hash: load its bytes",
                    E::HOLDER
                ),
            )
        })?;
        results
            .get()
            .set_program(ProgramServer::client(self, loaded));
        Ok(())
    }

    async fn directories(
        self: Rc<Self>,
        _: executor::DirectoriesParams,
        mut results: executor::DirectoriesResults,
    ) -> Result<(), capnp::Error> {
        let grants = self.grants();
        let mut list = results.get().init_grants(grants.len() as u32);
        for (i, (path, directory)) in grants.iter().enumerate() {
            let mut grant = list.reborrow().get(i as u32);
            grant.set_path(path);
            grant.set_directory(directory.clone());
        }
        Ok(())
    }

    async fn network(
        self: Rc<Self>,
        _: executor::NetworkParams,
        mut results: executor::NetworkResults,
    ) -> Result<(), capnp::Error> {
        let network = Executes::network(&*self).ok_or_else(|| {
            error(
                ErrorKind::Denied,
                "no network was granted to whoever holds this Executor",
            )
        })?;
        results.get().set_network(network);
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
