//! A plain WASI command-line program: no Cap'n Proto, nothing capsa-specific.
//! It is built both as a component (WASI preview 2) and as a core module
//! (WASI preview 1) to show that unmodified programs run in data mode.
//!
//! Arguments:
//! - `cat`: copies stdin to stdout until EOF;
//! - `emit BYTES CHUNK`: writes BYTES zero bytes to stdout, CHUNK at a time;
//! - `exit CODE`: exits with CODE;
//! - `stderr`: writes one line to stderr and one to stdout;
//! - `env`: prints its environment, a `NAME=VALUE` line each, sorted;
//! - anything else, or nothing: greets with its arguments.

use std::io::{self, Read, Write};
use std::process::ExitCode;

const CAT_BUFFER_BYTES: usize = 64 * 1024;

fn cat() -> io::Result<()> {
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    let mut buffer = vec![0; CAT_BUFFER_BYTES];
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            return output.flush();
        }
        output.write_all(&buffer[..n])?;
        output.flush()?;
    }
}

fn emit(bytes: u64, chunk: usize) -> io::Result<()> {
    let buffer = vec![0; chunk];
    let mut output = io::stdout().lock();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk, |left| left.min(chunk));
        output.write_all(&buffer[..n])?;
        // One write per chunk, whatever stdout buffers.
        output.flush()?;
        left -= n as u64;
    }
    Ok(())
}

fn number<T: std::str::FromStr>(what: &str, text: Option<&String>) -> Result<T, String> {
    let text = text.ok_or_else(|| format!("missing {what}"))?;
    text.parse().map_err(|_| format!("bad {what}: {text:?}"))
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("cat") => cat().map_err(|e| format!("cat: {e}")),
        Some("emit") => {
            let bytes: u64 = number("BYTES", args.get(1))?;
            let chunk: usize = number("CHUNK", args.get(2))?;
            if chunk == 0 {
                return Err("CHUNK must be at least 1".into());
            }
            emit(bytes, chunk).map_err(|e| format!("emit: {e}"))
        }
        Some("exit") => exit(number("CODE", args.get(1))?),
        Some("env") => {
            let mut vars: Vec<String> = std::env::vars()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            vars.sort();
            for var in vars {
                println!("{var}");
            }
            Ok(())
        }
        Some("stderr") => {
            eprintln!("hello on stderr");
            println!("hello on stdout");
            Ok(())
        }
        _ => {
            println!("hello from a plain WASI program: {}", args.join(" "));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `std::process::exit` can only report success or failure from a WASI
/// preview 2 component; `exit-with-code` carries the exact status.
#[cfg(all(target_os = "wasi", target_env = "p2"))]
fn exit(code: i32) -> ! {
    wasip2::cli::exit::exit_with_code(code as u8);
    unreachable!("exit-with-code returned")
}

#[cfg(not(all(target_os = "wasi", target_env = "p2")))]
fn exit(code: i32) -> ! {
    std::process::exit(code)
}
