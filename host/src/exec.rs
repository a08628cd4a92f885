//! `capsa exec`: run one program in data mode, on a serving host or on a
//! host of the command's own, with this process's stdio streamed to and
//! from it. A thin client over the schema, like any other: everything it
//! does, a client in another language can do.

use capsa_client::Spawn;
use capsa_schema::capsa_capnp::{byte_source, executor, StdioMode};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::status::ExitStatus;

/// Bytes moved per call in each direction.
const CHUNK: u32 = 64 * 1024;

/// Why `capsa exec` could not run its program to the end.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The host refused or failed a call (its error kind is in the text:
    /// `capsa_schema::error::kind_of`).
    #[error(transparent)]
    Rpc(#[from] capnp::Error),
    /// Writing the program's output to this process's stdout or stderr.
    #[error("cannot write the program's output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `bytes` on `executor` as `spawn` says, in data mode, copying this
/// process's stdin to the program's and the program's stdout and stderr to
/// this process's, and returns how it ended once both output streams are
/// drained. Directories in `spawn.dirs` that this process serves (a
/// client's own, for a host elsewhere) are copied in by that host and
/// written back. Must be called inside a `LocalSet`.
pub async fn run(
    executor: &executor::Client,
    bytes: &[u8],
    spawn: Spawn<'_>,
) -> Result<ExitStatus, ExecError> {
    let process = Spawn {
        stdio: StdioMode::Data,
        stdout_to: None,
        stderr_to: None,
        ..spawn
    }
    .start(executor, bytes)
    .await?;
    let sink = capsa_client::stdin(&process).await?;
    let stdout = process.stdout_request().send().pipeline.get_source();
    let stderr = process.stderr_request().send().pipeline.get_source();

    // stdin is copied in the background: the program may end without
    // reading it, and this process's stdin may never end.
    tokio::task::spawn_local(async move {
        let mut input = tokio::io::stdin();
        let mut buf = vec![0u8; CHUNK as usize];
        loop {
            let n = match input.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut write = sink.write_request();
            write.get().set_data(&buf[..n]);
            if write.send().await.is_err() {
                return;
            }
        }
        let _ = sink.close_request().send().promise.await;
    });
    let (out, err) = futures::future::join(
        copy_out(stdout, tokio::io::stdout()),
        copy_out(stderr, tokio::io::stderr()),
    )
    .await;
    out?;
    err?;
    Ok(capsa_client::wait(&process).await?)
}

/// Copies a program's output stream to `to` until its end.
async fn copy_out(
    from: byte_source::Client,
    mut to: impl AsyncWrite + Unpin,
) -> Result<(), ExecError> {
    loop {
        let mut read = from.read_request();
        read.get().set_max_bytes(CHUNK);
        let response = read.send().promise.await?;
        let chunk = response.get()?;
        to.write_all(chunk.get_data()?).await?;
        to.flush().await?;
        if chunk.get_eof() {
            return Ok(());
        }
    }
}
