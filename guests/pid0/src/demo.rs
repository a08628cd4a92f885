//! The demo: one echo per level of nesting, then unmodified WASI programs in
//! data mode, each step logged.

use capsa_schema::capsa_capnp::{executor, process, StdioMode};
use guest_runtime::log;

use crate::guests::{CHILD_ECHO, HELLO, HELLO_P1};
use capsa_client::{echo, exported_executor, read_to_end, wait, ExitStatus, Spawn};

const HELLO_ARGS: [&str; 4] = ["hello", "from", "data", "mode"];
const HELLO_OUTPUT: &str = "hello from a plain WASI program: hello from data mode\n";

/// child-echo in RPC mode, to start with [`CHILD_ECHO`].
fn rpc_child<'a>(args: &'a [&'a str], name: &'a str) -> Spawn<'a> {
    Spawn {
        args,
        name,
        ..Spawn::default()
    }
}

pub async fn run(root: executor::Client) -> capnp::Result<()> {
    log!("pid0: [1/5] echo through the root executor");
    let answer = echo(&root, "hello from pid0").await?;
    log!("pid0: root executor answered: {answer}");

    log!("pid0: [2/5] starting child-echo as \"child\" (rpc mode)");
    let child = rpc_child(&["child"], "child")
        .start(&root, CHILD_ECHO)
        .await?;
    let child_executor = exported_executor(&child);
    let answer = echo(&child_executor, "hello from pid0 to child").await?;
    log!("pid0: child answered: {answer}");

    log!("pid0: [3/5] starting a grandchild through the child's executor");
    let grandchild = rpc_child(&["grandchild"], "grandchild")
        .start(&child_executor, CHILD_ECHO)
        .await?;
    let grandchild_executor = exported_executor(&grandchild);
    let answer = echo(&grandchild_executor, "hello from pid0 to grandchild").await?;
    log!("pid0: three levels: pid0 -> child -> grandchild: {answer}");

    log!("pid0: [4/5] plain WASI programs in data mode");
    for (kind, bytes, name) in [
        ("component", HELLO, "hello"),
        ("core module", HELLO_P1, "hello-p1"),
    ] {
        let program = Spawn {
            args: &HELLO_ARGS,
            stdio: StdioMode::Data,
            name,
            ..Spawn::default()
        }
        .start(&root, bytes)
        .await?;
        let output = read_to_end(&program.stdout_request().send().pipeline.get_source()).await?;
        let ended = wait(&program).await?;
        let output = String::from_utf8_lossy(&output);
        log!("pid0: hello ({kind}) wrote {output:?} and {ended}");
        if output != HELLO_OUTPUT || ended != ExitStatus::Exited(0) {
            return Err(capnp::Error::failed(format!(
                "hello ({kind}) should write {HELLO_OUTPUT:?} and exit with code 0"
            )));
        }
    }

    log!("pid0: [5/5] stopping the children");
    for (name, process) in [("grandchild", &grandchild), ("child", &child)] {
        log!("pid0: {name} {}", stop(process).await?);
    }

    log!(
        "pid0: demo complete: echo at three levels of nesting, \
         a component and a core module in data mode"
    );
    Ok(())
}

async fn stop(process: &process::Client) -> capnp::Result<ExitStatus> {
    process.kill_request().send().promise.await?;
    wait(process).await
}

/// Starts child-echo, takes its executor and calls it, all in one round of
/// promise pipelining: nothing is awaited but the final answer.
pub async fn pipeline(root: executor::Client) -> capnp::Result<()> {
    let spawned = rpc_child(&["pipelined"], "pipelined")
        .run_bytes(&root, CHILD_ECHO)
        .send();
    let bootstrapped = spawned.pipeline.get_process().bootstrap_request().send();
    let child_executor: executor::Client =
        capnp::capability::FromClientHook::new(bootstrapped.pipeline.get_cap().as_cap());
    let answer = echo(&child_executor, "pipelined").await?;
    log!("pid0: pipelined: {answer}");
    drop((bootstrapped, spawned));
    Ok(())
}
