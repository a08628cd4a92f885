//! The calls PID0 makes, each one small `async fn` over the schema.

use capnp::capability::Request;
use capsa_schema::capsa_capnp::{byte_source, executor, process, StdioMode};

/// How many bytes one `ByteSource.read` asks for.
const READ_BYTES: u32 = 64 * 1024;

type RunBytesRequest =
    Request<executor::run_bytes_params::Owned, executor::run_bytes_results::Owned>;

/// What to run and how: the parameters of one `Executor.runBytes`.
pub struct Spawn<'a> {
    pub bytes: &'a [u8],
    pub args: &'a [&'a str],
    pub stdio: StdioMode,
    pub name: &'a str,
    /// The capability the child bootstraps; `None` inherits the executor's.
    pub bootstrap: Option<&'a executor::Client>,
}

impl Spawn<'_> {
    /// The `runBytes` request on `executor`, ready to send or to pipeline on.
    pub fn request(&self, executor: &executor::Client) -> capnp::Result<RunBytesRequest> {
        let mut request = executor.run_bytes_request();
        let mut params = request.get();
        params.set_bytes(self.bytes);
        params.set_args(self.args)?;
        let mut options = params.init_options();
        options.set_stdio(self.stdio);
        options.set_name(self.name);
        if let Some(cap) = self.bootstrap {
            options
                .init_bootstrap()
                .init_capability()
                .set_as_capability(cap.client.hook.add_ref());
        }
        Ok(request)
    }

    /// Starts the child on `executor`.
    pub async fn start(&self, executor: &executor::Client) -> capnp::Result<process::Client> {
        let response = self.request(executor)?.send().promise.await?;
        response.get()?.get_process()
    }
}

pub async fn echo(executor: &executor::Client, message: &str) -> capnp::Result<String> {
    let mut request = executor.echo_request();
    request.get().set_message(message);
    let response = request.send().promise.await?;
    Ok(response.get()?.get_response()?.to_str()?.to_owned())
}

/// The `Executor` a child in RPC mode exports.
pub async fn exported_executor(process: &process::Client) -> capnp::Result<executor::Client> {
    let response = process.bootstrap_request().send().promise.await?;
    response.get()?.get_cap().get_as_capability()
}

/// Everything a child writes to `source`, until EOF.
pub async fn read_to_end(source: byte_source::Client) -> capnp::Result<Vec<u8>> {
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

/// How a child ended, once it has.
pub async fn wait(process: &process::Client) -> capnp::Result<Ended> {
    let response = process.wait_request().send().promise.await?;
    Ended::read_from(response.get()?.get_status()?)
}

/// How a child ended: the schema crate's owned `ExitStatus`.
pub use capsa_schema::status::ExitStatus as Ended;
