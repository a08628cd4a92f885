//! Misbehaving guests, one per first argument, for the host's fault tests:
//!
//! - `trap`: executes `unreachable`;
//! - `panic`: panics;
//! - `loop`: spins forever;
//! - `alloc`: allocates and keeps 1 MiB blocks until memory runs out;
//! - `garbage`: writes 4 KiB of 0xFF to stdout, which in RPC mode is the
//!   connection, then reads stdin until EOF;
//! - `exit-mid-call`: serves an `Executor` whose `echo` exits with code 7
//!   while the call is in flight;
//! - `block-stdin`: reads stdin until EOF, then exits 0;
//! - `flood COUNT BYTES finish|open|bogus`: writes a `Bootstrap` and then
//!   COUNT pipelined `echo` calls of BYTES bytes each (or, with BYTES 0,
//!   COUNT `Bootstrap` messages) straight onto its stdout,
//!   each followed by its `Finish`, left open, or followed by a `Finish`
//!   for a question never asked, and never reads a reply.

use std::hint::black_box;
use std::io::{self, Write};

use capsa_schema::executor;
use capsa_schema::hostile::Finish;
use guest_runtime::{log, Connection};

const BLOCK_BYTES: usize = 1024 * 1024;
const PAGE_BYTES: usize = 4096;

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

fn spin() -> ! {
    let mut turns: u64 = 0;
    loop {
        turns = black_box(turns).wrapping_add(1);
    }
}

fn allocate_forever() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; BLOCK_BYTES];
        // Touch every page so the memory is really used.
        for byte in block.iter_mut().step_by(PAGE_BYTES) {
            *byte = 1;
        }
        kept.push(block);
        black_box(&mut kept);
    }
}

fn drain_stdin() -> io::Result<()> {
    io::copy(&mut io::stdin().lock(), &mut io::sink()).map(drop)
}

fn garbage() -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(&[0xFF; 4096])?;
    stdout.flush()?;
    drain_stdin()
}

/// Exits in the middle of the first `echo` it handles.
struct ExitMidCall;

impl executor::Server for ExitMidCall {
    async fn echo(
        self: capnp::capability::Rc<Self>,
        _: executor::EchoParams,
        _: executor::EchoResults,
    ) -> Result<(), capnp::Error> {
        log!("faulty: exiting with code 7 in the middle of echo");
        wasip2::cli::exit::exit_with_code(7);
        unreachable!("exit-with-code returned")
    }
}

fn exit_mid_call() -> Result<(), guest_runtime::Error> {
    Connection::open(|_| {
        let export: executor::Client = capnp_rpc::new_client(ExitMidCall);
        Some(export.client)
    })
    .serve()
}

/// `bytes` 0 floods with `Bootstrap` messages instead of `echo` calls.
fn flood(count: u32, bytes: usize, finish: Finish) -> io::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    if bytes == 0 {
        capsa_schema::hostile::bootstrap_flood(&mut out, count, finish)?;
    } else {
        capsa_schema::hostile::echo_flood(&mut out, count, bytes, finish)?;
    }
    log!("faulty flood: {count} calls sent; never reading a reply");
    loop {
        wasip2::clocks::monotonic_clock::subscribe_duration(3_600_000_000_000).block();
    }
}

fn flood_args() -> Result<(u32, usize, Finish), String> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let usage = || "usage: flood COUNT BYTES finish|open|bogus".to_string();
    let [count, bytes, finish] = args.as_slice() else {
        return Err(usage());
    };
    let finish = match finish.as_str() {
        "finish" => Finish::Each,
        "open" => Finish::Never,
        "bogus" => Finish::Bogus,
        _ => return Err(usage()),
    };
    Ok((
        count.parse().map_err(|_| usage())?,
        bytes.parse().map_err(|_| usage())?,
        finish,
    ))
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let result = match mode.as_str() {
        "trap" => trap(),
        "panic" => panic!("faulty guest panicked on purpose"),
        "loop" => spin(),
        "alloc" => allocate_forever(),
        "garbage" => garbage().map_err(|e| e.to_string()),
        "exit-mid-call" => exit_mid_call().map_err(|e| e.to_string()),
        "block-stdin" => drain_stdin().map_err(|e| e.to_string()),
        "flood" => flood_args().and_then(|(count, bytes, finish)| {
            flood(count, bytes, finish).map_err(|e| e.to_string())
        }),
        _ => Err(format!(
            "unknown mode {mode:?}; expected trap, panic, loop, alloc, garbage, \
             exit-mid-call, block-stdin or flood"
        )),
    };
    if let Err(e) = result {
        log!("faulty {mode}: {e}");
        std::process::exit(1);
    }
}
