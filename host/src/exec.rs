//! `capsa exec`: run one program on a serving host in data mode, with this
//! process's stdio streamed to and from it. A thin client over the schema,
//! like any other: everything it does, a client in another language can do.

use capsa_schema::capsa_capnp::{byte_source, directory, executor, StdioMode};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::status::ExitStatus;

/// Bytes moved per call in each direction.
const CHUNK: u32 = 64 * 1024;

/// Runs `bytes` on `executor` in data mode, copying this process's stdin to
/// the program's and the program's stdout and stderr to this process's, and
/// returns how it ended once both output streams are drained. `dirs` are
/// granted to the program at their paths (directories of this process's
/// machine are served from here: the host copies them in and writes them
/// back). Must be called inside a `LocalSet`.
pub async fn run(
    executor: &executor::Client,
    bytes: &[u8],
    name: &str,
    args: &[String],
    deadline_ms: u64,
    dirs: &[(String, directory::Client)],
) -> anyhow::Result<ExitStatus> {
    let mut request = executor.run_bytes_request();
    {
        let mut params = request.get();
        params.set_bytes(bytes);
        let mut list = params.reborrow().init_args(args.len() as u32);
        for (i, a) in args.iter().enumerate() {
            list.set(i as u32, a.as_str());
        }
        let mut options = params.init_options();
        options.set_stdio(StdioMode::Data);
        options.set_name(name);
        options.set_deadline_millis(deadline_ms);
        let mut grants = options.init_directories(dirs.len() as u32);
        for (i, (path, dir)) in dirs.iter().enumerate() {
            let mut grant = grants.reborrow().get(i as u32);
            grant.set_path(path);
            grant.set_directory(dir.clone());
        }
    }
    let process = request.send().promise.await?.get()?.get_process()?;
    let sink = process.stdin_request().send().pipeline.get_sink();
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
    let done = process.wait_request().send().promise.await?;
    Ok(ExitStatus::read_from(done.get()?.get_status()?)?)
}

/// Copies a program's output stream to `to` until its end.
async fn copy_out(
    from: byte_source::Client,
    mut to: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
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
