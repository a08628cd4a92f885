//! A child guest in RPC mode. It exports its own `Executor`, built on the one
//! it bootstraps from its host:
//!
//! - `echo` makes eight concurrent echo calls to the host executor, checks
//!   every answer and reports success;
//! - `runBytes` forwards the call unchanged, so a parent can start a
//!   grandchild through this child;
//! - `directories` lists the directories this child was granted (its
//!   host Executor's).
//!
//! Arguments: `[NAME]` names the child in its answers (default
//! `child-echo`). `relay` makes its `echo` one call to the host executor
//! whose answer it returns, so that a grandchild bootstrapping this
//! child's Executor measures two hops (the nested echo benchmark). `bench-echo N` first times N sequential echo round trips to
//! the host executor and reports them as
//! `echo("bench:nested-echo:<ns>,<ns>,...")`; its own `echo` answers only
//! after that report.
//!
//! It serves until its connection closes.

use capnp::capability::Rc as ServerRc;
use capsa_schema::executor;
use futures::future::{self, FutureExt, LocalBoxFuture, Shared};
use guest_runtime::{log, Connection, HostExecutor};
use wasip2::clocks::monotonic_clock;

/// How many echo calls one `echo` makes at once.
const CONCURRENT_ECHOES: usize = 8;

type Bench = Shared<LocalBoxFuture<'static, Result<(), capnp::Error>>>;

struct ChildExecutor {
    name: String,
    host: HostExecutor,
    /// In bench mode, `echo` waits for the benchmark to be reported.
    bench: Option<Bench>,
    /// `echo` is passed on to the host as it is.
    relay: bool,
}

impl executor::Server for ChildExecutor {
    async fn echo(
        self: ServerRc<Self>,
        params: executor::EchoParams,
        mut results: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        if let Some(bench) = &self.bench {
            bench.clone().await?;
        }
        if self.relay {
            let mut request = self.host.client()?.echo_request();
            request.get().set_message(params.get()?.get_message()?);
            let response = request.send().promise.await?;
            results.get().set_response(response.get()?.get_response()?);
            return Ok(());
        }
        let message = params.get()?.get_message()?.to_str()?.to_owned();
        let host = self.host.client()?;
        let sent: Vec<String> = (0..CONCURRENT_ECHOES)
            .map(|i| format!("{message} [{i}]"))
            .collect();
        // Every call leaves before any answer is awaited.
        let calls = sent.iter().map(|text| {
            let mut request = host.echo_request();
            request.get().set_message(text.as_str());
            request.send().promise
        });
        let answers = future::try_join_all(calls).await?;
        for (text, answer) in sent.iter().zip(&answers) {
            let got = answer.get()?.get_response()?.to_str()?;
            if got != text {
                return Err(capnp::Error::failed(format!(
                    "echo of {text:?} came back as {got:?}"
                )));
            }
        }
        results.get().set_response(format!(
            "child-echo[{}]: {CONCURRENT_ECHOES} concurrent echoes ok: {message}",
            self.name
        ));
        Ok(())
    }

    async fn run_bytes(
        self: ServerRc<Self>,
        params: executor::RunBytesParams,
        mut results: executor::RunBytesResults,
    ) -> Result<(), capnp::Error> {
        let mut request = self.host.client()?.run_bytes_request();
        request.set(params.get()?)?;
        let response = request.send().promise.await?;
        results.get().set_process(response.get()?.get_process()?);
        Ok(())
    }

    async fn directories(
        self: ServerRc<Self>,
        _: executor::DirectoriesParams,
        mut results: executor::DirectoriesResults,
    ) -> Result<(), capnp::Error> {
        let request = self.host.client()?.directories_request();
        let response = request.send().promise.await?;
        results.set(response.get()?)
    }
}

/// Times `rounds` sequential echo round trips to the host and reports the
/// samples, in nanoseconds, through one more echo.
async fn bench_echo(host: HostExecutor, rounds: usize) -> Result<(), capnp::Error> {
    let host = host.client()?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = monotonic_clock::now();
        let mut request = host.echo_request();
        request.get().set_message("x");
        request.send().promise.await?;
        samples.push(monotonic_clock::now() - start);
    }
    let samples: Vec<String> = samples.iter().map(u64::to_string).collect();
    let mut report = host.echo_request();
    report
        .get()
        .set_message(format!("bench:nested-echo:{}", samples.join(",")));
    report.send().promise.await?;
    Ok(())
}

/// The benchmark rounds when the arguments are `bench-echo N`.
fn bench_rounds(args: &[String]) -> Result<Option<usize>, String> {
    match args {
        [mode, rounds] if mode == "bench-echo" => rounds
            .parse()
            .map(Some)
            .map_err(|e| format!("bench-echo N: bad N {rounds:?}: {e}")),
        [mode, ..] if mode == "bench-echo" => Err("usage: bench-echo N".into()),
        _ => Ok(None),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().cloned().unwrap_or_else(|| "child-echo".into());
    let rounds = match bench_rounds(&args) {
        Ok(rounds) => rounds,
        Err(e) => {
            log!("child-echo[{name}]: {e}");
            std::process::exit(2);
        }
    };

    let mut bench_task = None;
    let connection = Connection::open(|host| {
        let bench = rounds.map(|rounds| bench_echo(host.clone(), rounds).boxed_local().shared());
        bench_task.clone_from(&bench);
        let export: executor::Client = capnp_rpc::new_client(ChildExecutor {
            name: name.clone(),
            host,
            bench,
            relay: name == "relay",
        });
        Some(export.client)
    });
    let served = match bench_task {
        Some(bench) => connection.serve_with(bench),
        None => connection.serve(),
    };
    if let Err(e) = served {
        log!("child-echo[{name}]: {e}");
        std::process::exit(1);
    }
}
