//! capsa's typed client layer: the calls every client of the schema makes,
//! written once.
//!
//! A [`Spawn`] says what a run gets (arguments, environment, options) and
//! builds the `runBytes` or `Program.run` request from it, to send or to
//! pipeline on; the free functions load programs, wait for a Process,
//! read a stream to its end and echo. Everything returns `capnp::Result`,
//! whose exceptions carry the schema's error kinds
//! (`capsa_schema::error::kind_of`).
//!
//! It depends on the schema and `capnp` only, so WASM guests (PID0),
//! `capsa exec`, embedders (`capsa::client`), the microVM agent's tests
//! and the workspace's tests all use the same code. Nothing here needs an
//! async runtime: the futures run on whatever drives the RPC system.

use capnp::capability::{FromClientHook, RemotePromise, Request};
use capsa_schema::capsa_capnp::{
    byte_sink, byte_source, directory, env_var, executor, network, options, process, program,
    StdioMode, WriteMode,
};

pub use capsa_schema::status::ExitStatus;

/// How many bytes one `ByteSource.read` asks for.
pub const READ_BYTES: u32 = 1 << 20;

/// A `runBytes` request, built and not sent.
pub type RunBytesRequest =
    Request<executor::run_bytes_params::Owned, executor::run_bytes_results::Owned>;

/// A `Program.run` request, built and not sent.
pub type ProgramRunRequest = Request<program::run_params::Owned, program::run_results::Owned>;

/// What a run gets: its arguments, environment and options. Zero, empty
/// and `None` leave an option to the host (no limit, the Executor's
/// bootstrap, the host's machine size).
#[derive(Clone, Copy)]
pub struct Spawn<'a> {
    pub args: &'a [&'a str],
    /// The whole environment of the child.
    pub env: &'a [(&'a str, &'a str)],
    /// RPC (the child's stdio carries its Cap'n Proto connection) or data.
    pub stdio: StdioMode,
    /// Shown in the host's log and as `argv[0]`.
    pub name: &'a str,
    pub memory_limit: u64,
    pub deadline_ms: u64,
    pub cpu_ms: u64,
    /// The capability the child bootstraps; `None` inherits the Executor.
    pub bootstrap: Option<&'a capnp::capability::Client>,
    /// microVM options (ELF payloads); zero or `None` takes the host's.
    pub vm_vcpus: u32,
    pub vm_memory_mib: u32,
    pub vm_initramfs: Option<&'a [u8]>,
    /// Directories granted to the child, at their paths.
    pub dirs: &'a [(&'a str, &'a directory::Client)],
    /// Data mode: sinks the child's stdout and stderr are pushed into
    /// (`Options.stdoutTo`, `stderrTo`) instead of being pulled.
    pub stdout_to: Option<&'a byte_sink::Client>,
    pub stderr_to: Option<&'a byte_sink::Client>,
    /// The network granted to the child (`Options.network`); `None`: none.
    pub network: Option<&'a network::Client>,
}

impl Default for Spawn<'_> {
    fn default() -> Self {
        Spawn {
            args: &[],
            env: &[],
            stdio: StdioMode::Rpc,
            name: "",
            memory_limit: 0,
            deadline_ms: 0,
            cpu_ms: 0,
            bootstrap: None,
            vm_vcpus: 0,
            vm_memory_mib: 0,
            vm_initramfs: None,
            dirs: &[],
            stdout_to: None,
            stderr_to: None,
            network: None,
        }
    }
}

impl Spawn<'_> {
    /// `runBytes` of `bytes` on `executor`, ready to send or pipeline on.
    pub fn run_bytes(&self, executor: &executor::Client, bytes: &[u8]) -> RunBytesRequest {
        let mut request = executor.run_bytes_request();
        let mut params = request.get();
        params.set_bytes(bytes);
        self.fill_args(params.reborrow().init_args(self.args.len() as u32));
        self.fill_env(params.reborrow().init_env(self.env.len() as u32));
        self.fill_options(params.init_options());
        request
    }

    /// `Program.run` on `program`, as [`Spawn::run_bytes`].
    pub fn program_run(&self, program: &program::Client) -> ProgramRunRequest {
        let mut request = program.run_request();
        let mut params = request.get();
        self.fill_args(params.reborrow().init_args(self.args.len() as u32));
        self.fill_env(params.reborrow().init_env(self.env.len() as u32));
        self.fill_options(params.init_options());
        request
    }

    /// Starts `bytes` on `executor`: its Process.
    pub async fn start(
        &self,
        executor: &executor::Client,
        bytes: &[u8],
    ) -> capnp::Result<process::Client> {
        let response = self.run_bytes(executor, bytes).send().promise.await?;
        response.get()?.get_process()
    }

    /// Starts `program`: its Process.
    pub async fn start_program(&self, program: &program::Client) -> capnp::Result<process::Client> {
        let response = self.program_run(program).send().promise.await?;
        response.get()?.get_process()
    }

    fn fill_args(&self, mut list: capnp::text_list::Builder<'_>) {
        for (i, arg) in self.args.iter().enumerate() {
            list.set(i as u32, *arg);
        }
    }

    fn fill_env(&self, mut list: capnp::struct_list::Builder<'_, env_var::Owned>) {
        for (i, (name, value)) in self.env.iter().enumerate() {
            let mut var = list.reborrow().get(i as u32);
            var.set_name(*name);
            var.set_value(*value);
        }
    }

    fn fill_options(&self, mut o: options::Builder<'_>) {
        o.set_stdio(self.stdio);
        o.set_memory_limit_bytes(self.memory_limit);
        o.set_deadline_millis(self.deadline_ms);
        o.set_cpu_budget_millis(self.cpu_ms);
        o.set_name(self.name);
        let mut vm = o.reborrow().init_vm();
        vm.set_vcpus(self.vm_vcpus);
        vm.set_memory_mib(self.vm_memory_mib);
        if let Some(initramfs) = self.vm_initramfs {
            vm.set_initramfs(initramfs);
        }
        let mut grants = o.reborrow().init_directories(self.dirs.len() as u32);
        for (i, (path, dir)) in self.dirs.iter().enumerate() {
            let mut grant = grants.reborrow().get(i as u32);
            grant.set_path(*path);
            grant.set_directory((*dir).clone());
        }
        if let Some(sink) = self.stdout_to {
            o.set_stdout_to(sink.clone());
        }
        if let Some(sink) = self.stderr_to {
            o.set_stderr_to(sink.clone());
        }
        if let Some(network) = self.network {
            o.set_network(network.clone());
        }
        if let Some(cap) = self.bootstrap {
            o.init_bootstrap()
                .init_capability()
                .set_as_capability(cap.hook.add_ref());
        }
    }
}

/// The Network granted to whoever holds `executor` (`denied` if none).
pub async fn network(executor: &executor::Client) -> capnp::Result<network::Client> {
    let response = executor.network_request().send().promise.await?;
    response.get()?.get_network()
}

/// `Executor.load` of `bytes`, sent: pipeline on its `program`.
pub fn load_request(
    executor: &executor::Client,
    bytes: &[u8],
) -> RemotePromise<executor::load_results::Owned> {
    let mut request = executor.load_request();
    request.get().set_bytes(bytes);
    request.send()
}

/// Loads `bytes` as a Program.
pub async fn load(executor: &executor::Client, bytes: &[u8]) -> capnp::Result<program::Client> {
    load_request(executor, bytes)
        .promise
        .await?
        .get()?
        .get_program()
}

/// The Program whose bytes hash to `hash` (`Executor.program`), if the
/// host holds it.
pub async fn program_by_hash(
    executor: &executor::Client,
    hash: &[u8],
) -> capnp::Result<program::Client> {
    let mut request = executor.program_request();
    request.get().set_hash(hash);
    request.send().promise.await?.get()?.get_program()
}

/// `Executor.echo`.
pub async fn echo(executor: &executor::Client, message: &str) -> capnp::Result<String> {
    let mut request = executor.echo_request();
    request.get().set_message(message);
    let response = request.send().promise.await?;
    Ok(response.get()?.get_response()?.to_str()?.to_owned())
}

/// The capability an RPC-mode child exports, as an Executor, pipelined:
/// calls on it go out before the child has answered.
pub fn exported_executor(process: &process::Client) -> executor::Client {
    let pipeline = process.bootstrap_request().send().pipeline;
    FromClientHook::new(pipeline.get_cap().as_cap())
}

/// How a Process ended, once it has.
pub async fn wait(process: &process::Client) -> capnp::Result<ExitStatus> {
    let response = process.wait_request().send().promise.await?;
    ExitStatus::read_from(response.get()?.get_status()?)
}

/// The sink of `process`'s stdin, once the Process has handed it over.
///
/// Sinks are awaited, never pipelined on, before writing into them: with
/// capnp-rpc 0.27, calls queued on a capability that has not resolved yet
/// are dispatched in the order their tasks happen to run when it resolves,
/// so a `close` pipelined behind a `write` can reach the server first and
/// the write is lost. Waiting for the sink costs one round trip per stream
/// and makes every later call go straight to it, in order.
pub async fn stdin(process: &process::Client) -> capnp::Result<byte_sink::Client> {
    let response = process.stdin_request().send().promise.await?;
    response.get()?.get_sink()
}

/// A sink writing the file at `path` of `directory` (`Directory.write`),
/// once the Directory has opened it: see [`stdin`] for why it is awaited.
pub async fn create(
    directory: &directory::Client,
    path: &str,
    mode: WriteMode,
) -> capnp::Result<byte_sink::Client> {
    let mut request = directory.write_request();
    request.get().set_path(path);
    request.get().set_mode(mode);
    let response = request.send().promise.await?;
    response.get()?.get_sink()
}

/// Writes `data` into `sink` in chunks of at most [`READ_BYTES`], then
/// closes it; the close returns once the server holds every byte.
pub async fn write_all(sink: &byte_sink::Client, data: &[u8]) -> capnp::Result<()> {
    for chunk in data.chunks(READ_BYTES as usize) {
        let mut request = sink.write_request();
        request.get().set_data(chunk);
        request.send().await?;
    }
    sink.close_request().send().promise.await?;
    Ok(())
}

/// The directories granted to whoever holds `executor`
/// (`Executor.directories`), each at its path.
pub async fn directories(
    executor: &executor::Client,
) -> capnp::Result<Vec<(String, directory::Client)>> {
    let response = executor.directories_request().send().promise.await?;
    let grants = response.get()?.get_grants()?;
    let mut out = Vec::with_capacity(grants.len() as usize);
    for grant in grants.iter() {
        let path = grant.get_path()?.to_string().map_err(|e| {
            capnp::Error::failed(format!("a granted directory's path is not UTF-8: {e}"))
        })?;
        out.push((path, grant.get_directory()?));
    }
    Ok(out)
}

/// Everything read from `source` until its end.
pub async fn read_to_end(source: &byte_source::Client) -> capnp::Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let mut request = source.read_request();
        request.get().set_max_bytes(READ_BYTES);
        let response = request.send().promise.await?;
        let chunk = response.get()?;
        data.extend_from_slice(chunk.get_data()?);
        if chunk.get_eof() {
            return Ok(data);
        }
    }
}

/// What a data-mode Process wrote and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Reads a data-mode Process's stdout and stderr to their ends, at once
/// (a child blocked on a full stderr would never finish its stdout), then
/// waits for it.
pub async fn output(process: &process::Client) -> capnp::Result<Output> {
    let stdout = process.stdout_request().send().pipeline.get_source();
    let stderr = process.stderr_request().send().pipeline.get_source();
    let (out, err) = futures::future::join(read_to_end(&stdout), read_to_end(&stderr)).await;
    Ok(Output {
        stdout: out?,
        stderr: err?,
        status: wait(process).await?,
    })
}
