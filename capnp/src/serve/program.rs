//! The `Program` capability, served the same way by the host and the
//! agent: a loaded program bound to the Executor that loaded or found it,
//! which runs it with its own limits and quotas whoever calls `run`.

use std::rc::Rc;

use crate::capsa_capnp::program;
use crate::format::Format;
use crate::program::Hash;
use crate::request::Request;
use crate::serve::executor::{Executes, Payload};

/// A loaded program, as `Program.info` describes it.
pub trait Info {
    /// Its SHA-256, the length of its bytes, and what they are.
    fn info(&self) -> (&Hash, usize, Format);
}

/// The `Program` capability: `loaded`, run through `executor`.
pub struct ProgramServer<E: Executes> {
    executor: Rc<E>,
    loaded: Rc<E::Loaded>,
}

impl<E: Executes> ProgramServer<E> {
    pub fn client(executor: Rc<E>, loaded: Rc<E::Loaded>) -> program::Client {
        capnp_rpc::new_client(ProgramServer { executor, loaded })
    }
}

impl<E: Executes> program::Server for ProgramServer<E> {
    async fn run(
        self: Rc<Self>,
        params: program::RunParams,
        mut results: program::RunResults,
    ) -> Result<(), capnp::Error> {
        let (_, _, format) = self.loaded.info();
        let request = Request::program_run(params.get()?, format)?;
        let process = self
            .executor
            .start(Payload::Loaded(&self.loaded), request)
            .await?;
        results.get().set_process(process);
        Ok(())
    }

    async fn info(
        self: Rc<Self>,
        _: program::InfoParams,
        mut results: program::InfoResults,
    ) -> Result<(), capnp::Error> {
        let (hash, size, format) = self.loaded.info();
        let mut r = results.get();
        r.set_hash(hash);
        r.set_size(size as u64);
        r.set_format(format.name());
        Ok(())
    }
}
