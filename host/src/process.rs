//! The `Process` capability: a handle on one running cell.
//!
//! Dropping the last reference to a Process kills its cell (`Drop` below),
//! which is how "no orphans" holds for processes nobody can reach any more.

use std::rc::Rc;

use capsa_schema::capsa_capnp::process;

use crate::cell::{wait_status, Cell};
use crate::status::ExitStatus;
use crate::stream::{ByteSinkImpl, ByteSourceImpl};

pub struct ProcessImpl {
    cell: Rc<Cell>,
}

impl ProcessImpl {
    pub fn new(cell: Rc<Cell>) -> Self {
        ProcessImpl { cell }
    }

    fn data_only(&self, what: &str) -> capnp::Error {
        capnp::Error::failed(format!(
            "{} runs in RPC mode: its stdin/stdout carry its Cap'n Proto connection and its \
             stderr goes to the host log, so there is no {what} stream; start it in data mode",
            self.cell.name
        ))
    }
}

impl Drop for ProcessImpl {
    fn drop(&mut self) {
        self.cell.kill(ExitStatus::Killed);
    }
}

impl process::Server for ProcessImpl {
    async fn wait(
        self: Rc<Self>,
        _: process::WaitParams,
        mut results: process::WaitResults,
    ) -> Result<(), capnp::Error> {
        let status = wait_status(self.cell.status_receiver()).await;
        status.write_to(results.get().init_status());
        Ok(())
    }

    async fn kill(
        self: Rc<Self>,
        _: process::KillParams,
        _: process::KillResults,
    ) -> Result<(), capnp::Error> {
        self.cell.kill(ExitStatus::Killed);
        Ok(())
    }

    async fn stdin(
        self: Rc<Self>,
        _: process::StdinParams,
        mut results: process::StdinResults,
    ) -> Result<(), capnp::Error> {
        let data = self
            .cell
            .data
            .as_ref()
            .ok_or_else(|| self.data_only("stdin"))?;
        results
            .get()
            .set_sink(capnp_rpc::new_client(ByteSinkImpl::new(data.stdin.clone())));
        Ok(())
    }

    async fn stdout(
        self: Rc<Self>,
        _: process::StdoutParams,
        mut results: process::StdoutResults,
    ) -> Result<(), capnp::Error> {
        let data = self
            .cell
            .data
            .as_ref()
            .ok_or_else(|| self.data_only("stdout"))?;
        results
            .get()
            .set_source(capnp_rpc::new_client(ByteSourceImpl::new(
                data.stdout.clone(),
            )));
        Ok(())
    }

    async fn stderr(
        self: Rc<Self>,
        _: process::StderrParams,
        mut results: process::StderrResults,
    ) -> Result<(), capnp::Error> {
        let data = self
            .cell
            .data
            .as_ref()
            .ok_or_else(|| self.data_only("stderr"))?;
        results
            .get()
            .set_source(capnp_rpc::new_client(ByteSourceImpl::new(
                data.stderr.clone(),
            )));
        Ok(())
    }

    async fn bootstrap(
        self: Rc<Self>,
        _: process::BootstrapParams,
        mut results: process::BootstrapResults,
    ) -> Result<(), capnp::Error> {
        let export = self.cell.export.as_ref().ok_or_else(|| {
            capnp::Error::failed(format!(
                "{} runs in data mode: it has no Cap'n Proto connection and exports nothing",
                self.cell.name
            ))
        })?;
        results
            .get()
            .init_cap()
            .set_as_capability(export.hook.clone());
        Ok(())
    }
}
