//! The `files` mode: PID0's directories (from `capsa run --dir`) reach a
//! grandchild. PID0 lists the grants of its root Executor, starts
//! child-echo, and through the child's Executor starts the `files` program
//! with the first grant at the same path; the grandchild writes a file
//! there, and PID0 reads it back through its own WASI preopen.

use capsa_schema::capsa_capnp::{executor, StdioMode};
use guest_runtime::log;

use crate::guests::{CHILD_ECHO, FILES};
use capsa_client::{exported_executor, wait, ExitStatus, Spawn};

const WRITTEN: &str = "written by a grandchild of pid0\n";

pub async fn run(root: executor::Client) -> capnp::Result<()> {
    let grants = root.directories_request().send().promise.await?;
    let grants = grants.get()?.get_grants()?;
    let Some(grant) = grants.iter().next() else {
        return Err(capnp::Error::failed(
            "no directory granted: run with capsa run --dir HOST::GUEST".into(),
        ));
    };
    let path = grant.get_path()?.to_str()?.to_owned();
    let directory = grant.get_directory()?;
    log!(
        "pid0: granted {} director(ies), the first at {path}",
        grants.len()
    );

    let child = Spawn {
        args: &["child"],
        name: "child",
        ..Spawn::default()
    }
    .start(&root, CHILD_ECHO)
    .await?;
    let child_executor = exported_executor(&child);

    let file = format!("{path}/from-grandchild.txt");
    let args = ["put", file.as_str()];
    let grandchild = Spawn {
        args: &args,
        stdio: StdioMode::Data,
        name: "files",
        dirs: &[(path.as_str(), &directory)],
        ..Spawn::default()
    }
    .start(&child_executor, FILES)
    .await?;
    let stdin = capsa_client::stdin(&grandchild).await?;
    capsa_client::write_all(&stdin, WRITTEN.as_bytes()).await?;
    let ended = wait(&grandchild).await?;
    log!("pid0: the grandchild wrote {file} and {ended}");
    if ended != ExitStatus::Exited(0) {
        return Err(capnp::Error::failed(format!("files put {file}: {ended}")));
    }

    // PID0's own preopen of the same directory.
    let read = std::fs::read_to_string(&file)
        .map_err(|e| capnp::Error::failed(format!("pid0 reading {file}: {e}")))?;
    log!("pid0: read back through its own preopen: {read:?}");
    if read != WRITTEN {
        return Err(capnp::Error::failed(format!("{file} holds {read:?}")));
    }
    child.kill_request().send().promise.await?;
    Ok(())
}
