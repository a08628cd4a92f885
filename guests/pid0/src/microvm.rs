//! The `microvm` mode: an ELF executable run through the root Executor,
//! which boots a microVM for it (or, on a host started with
//! `--vm-as-process`, runs it through the agent as a host process).

use capsa_schema::capsa_capnp::{executor, process, StdioMode};
use guest_runtime::log;

use crate::calls::{echo, read_to_end, wait, Ended, Spawn};
use crate::guests::DEMO_ELF;

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
    let output = read_to_end(busybox.stdout_request().send().pipeline.get_source()).await?;
    let ended = wait(&busybox).await?;
    let output = String::from_utf8_lossy(&output);
    log!("pid0: busybox wrote {output:?} and {ended}");
    if output.trim_end() != GREETING || ended != Ended::Exited(0) {
        return Err(capnp::Error::failed(format!(
            "busybox should write {GREETING:?} and exit with code 0"
        )));
    }
    // The machine's own Executor: more work in the same VM.
    let agent = machine_of(&busybox);
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
        bytes: crate::guests::HELLO,
        args: &["cat"],
        stdio: StdioMode::Data,
        name: "blocked-cat",
        bootstrap: None,
    }
    .start(&root)
    .await?;
    let sleeper = Spawn {
        bytes: DEMO_ELF,
        args: &["sleep", secs],
        stdio: StdioMode::Data,
        name: "",
        bootstrap: None,
    }
    .start(&root)
    .await?;
    let agent: executor::Client = capnp::capability::FromClientHook::new(
        sleeper
            .bootstrap_request()
            .send()
            .pipeline
            .get_cap()
            .as_cap(),
    );
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
        bytes: DEMO_ELF,
        args,
        stdio: StdioMode::Data,
        name: "busybox",
        bootstrap: None,
    }
    .start(root)
    .await
}

/// The Executor of the machine an ELF process runs in (its bootstrap),
/// pipelined: usable before the answer is back.
fn machine_of(elf: &process::Client) -> executor::Client {
    capnp::capability::FromClientHook::new(
        elf.bootstrap_request().send().pipeline.get_cap().as_cap(),
    )
}
