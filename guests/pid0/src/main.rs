//! PID0 of the capsa demo: the first guest, holding the root `Executor`.
//!
//! Arguments:
//! - none: the demo ([`demo::run`]);
//! - `pipeline`: spawn, bootstrap and echo in one pipelined round;
//! - `bench-echo N`: time N echo round trips to the root executor;
//! - `bench-nested N`: time N echoes from a grandchild;
//! - `microvm`: run the embedded ELF (busybox) through `runBytes`;
//! - `abandon SECS`: start a blocked child and `busybox sleep SECS` in a
//!   machine, then exit without ending either;
//! - `files`: a grandchild writes into PID0's first granted directory,
//!   and PID0 reads it back through its preopen ([`files::run`]).
//!
//! Progress goes to stderr; stdout is the connection to the host. Any failure
//! is logged and ends PID0 with exit code 1.

mod bench;
mod demo;
mod files;
mod guests;
mod microvm;

use guest_runtime::{log, Connection};

enum Mode {
    Demo,
    Pipeline,
    BenchEcho(usize),
    BenchNested(usize),
    Microvm,
    Abandon(String),
    Files,
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let rounds = |n: &str| n.parse().map_err(|e| format!("bad round count {n:?}: {e}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] => Ok(Mode::Demo),
        ["pipeline"] => Ok(Mode::Pipeline),
        ["microvm"] => Ok(Mode::Microvm),
        ["files"] => Ok(Mode::Files),
        ["abandon", secs] => Ok(Mode::Abandon(secs.to_string())),
        ["bench-echo", n] => rounds(n).map(Mode::BenchEcho),
        ["bench-nested", n] => rounds(n).map(Mode::BenchNested),
        _ => Err(format!(
            "unknown arguments {args:?}; expected none, `pipeline`, \
             `bench-echo N`, `bench-nested N`, `microvm` or `abandon SECS`"
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse(&args) {
        Ok(mode) => mode,
        Err(e) => {
            log!("pid0: {e}");
            std::process::exit(2);
        }
    };
    let connection = Connection::open(|_| None);
    let root = connection.host();
    let result = match mode {
        Mode::Demo => connection.run_until(demo::run(root)),
        Mode::Pipeline => connection.run_until(demo::pipeline(root)),
        Mode::BenchEcho(rounds) => connection.run_until(bench::echo_rounds(root, rounds)),
        Mode::BenchNested(rounds) => connection.run_until(bench::nested(root, rounds)),
        Mode::Microvm => connection.run_until(microvm::run(root)),
        Mode::Abandon(secs) => connection.run_until(microvm::abandon(root, &secs)),
        Mode::Files => connection.run_until(files::run(root)),
    };
    if let Err(e) = result {
        log!("pid0: failed: {e}");
        std::process::exit(1);
    }
}
