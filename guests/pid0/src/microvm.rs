//! The `microvm` mode: an ELF executable run through the root Executor,
//! which boots a microVM for it (or, on a host started with
//! `--vm-as-process`, runs it through the agent as a host process).

use capsa_schema::capsa_capnp::{executor, process, StdioMode};
use guest_runtime::log;

use crate::guests::DEMO_ELF;
use capsa_client::{echo, exported_executor, read_to_end, wait, ExitStatus, Spawn};

const GREETING: &str = "hello from a microVM";

pub async fn run(root: executor::Client) -> capnp::Result<()> {
    if DEMO_ELF.is_empty() {
        return Err(capnp::Error::failed(
            "this pid0 was built without an ELF to run (set CAPSA_DEMO_ELF when building it)"
                .into(),
        ));
    }
    log!(
        "pid0: running busybox ({} bytes) through runBytes",
        DEMO_ELF.len()
    );
    let busybox = start_busybox(&root, &["echo", GREETING]).await?;
    let output = read_to_end(&busybox.stdout_request().send().pipeline.get_source()).await?;
    let ended = wait(&busybox).await?;
    let output = String::from_utf8_lossy(&output);
    log!("pid0: busybox wrote {output:?} and {ended}");
    if output.trim_end() != GREETING || ended != ExitStatus::Exited(0) {
        return Err(capnp::Error::failed(format!(
            "busybox should write {GREETING:?} and exit with code 0"
        )));
    }
    // The machine's own Executor (the ELF's bootstrap, pipelined): more
    // work in the same VM.
    let agent = exported_executor(&busybox);
    log!(
        "pid0: the VM's agent answered: {}",
        echo(&agent, "are you there?").await?
    );
    busybox.kill_request().send().promise.await?;
    log!("pid0: microVM demo complete");
    Ok(())
}

/// The `abandon SECS` mode: starts a WASM child that blocks reading its
/// stdin and `busybox sleep SECS` in a machine, checks both run, and exits
/// without killing or waiting for either: the host must leave nothing.
pub async fn abandon(root: executor::Client, secs: &str) -> capnp::Result<()> {
    let blocked = Spawn {
        args: &["cat"],
        stdio: StdioMode::Data,
        name: "blocked-cat",
        ..Spawn::default()
    }
    .start(&root, crate::guests::HELLO)
    .await?;
    let sleeper = Spawn {
        args: &["sleep", secs],
        stdio: StdioMode::Data,
        ..Spawn::default()
    }
    .start(&root, DEMO_ELF)
    .await?;
    let agent = exported_executor(&sleeper);
    log!(
        "pid0: the sleeper's machine answered: {}",
        echo(&agent, "up").await?
    );
    // Leak both handles: PID0's exit, not a kill or a dropped reference
    // while it runs, is what must end them.
    std::mem::forget((blocked, sleeper, agent));
    log!("pid0: exiting with a blocked child and a sleeping machine");
    Ok(())
}

/// Starts the embedded busybox with `args` (the applet first) in data mode.
async fn start_busybox(root: &executor::Client, args: &[&str]) -> capnp::Result<process::Client> {
    Spawn {
        args,
        stdio: StdioMode::Data,
        name: "busybox",
        ..Spawn::default()
    }
    .start(root, DEMO_ELF)
    .await
}
