//! Benchmarks. Samples are reported to the host through
//! `echo("bench:<name>:<ns>,<ns>,...")`, where the benchmark harness reads
//! them.

use capsa_schema::capsa_capnp::executor;
use guest_runtime::log;
use wasip2::clocks::monotonic_clock;

use crate::guests::CHILD_ECHO;
use capsa_client::{echo, exported_executor, Spawn};

/// Times `rounds` sequential echo round trips to the root executor.
pub async fn echo_rounds(root: executor::Client, rounds: usize) -> capnp::Result<()> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = monotonic_clock::now();
        echo(&root, "x").await?;
        samples.push(monotonic_clock::now() - start);
    }
    report(&root, "pid0-echo", &samples).await
}

/// Starts a relaying child (its `echo` is one call to the root executor)
/// and, through it, a grandchild in `bench-echo` mode that bootstraps the
/// child's Executor: each of the grandchild's echoes goes through the
/// child to the host and back, two hops. (Bootstrapping the root executor
/// instead would be one hop: capnp-rpc resolves a capability passed back to
/// its host to the host's own object.) The grandchild times its echoes
/// and reports them through the same path; its `echo` answers only once
/// it has.
pub async fn nested(root: executor::Client, rounds: usize) -> capnp::Result<()> {
    let child = Spawn {
        args: &["relay"],
        name: "bench-child",
        bootstrap: Some(&root.client),
        ..Spawn::default()
    }
    .start(&root, CHILD_ECHO)
    .await?;
    let child_executor = exported_executor(&child);
    let rounds = rounds.to_string();
    let grandchild = Spawn {
        args: &["bench-echo", &rounds],
        name: "bench-grandchild",
        bootstrap: Some(&child_executor.client),
        ..Spawn::default()
    }
    .start(&child_executor, CHILD_ECHO)
    .await?;
    let grandchild_executor = exported_executor(&grandchild);
    let answer = echo(&grandchild_executor, "done?").await?;
    log!("pid0: nested bench reported: {answer}");
    Ok(())
}

async fn report(root: &executor::Client, name: &str, samples: &[u64]) -> capnp::Result<()> {
    let samples: Vec<String> = samples.iter().map(u64::to_string).collect();
    echo(root, &format!("bench:{name}:{}", samples.join(","))).await?;
    Ok(())
}
