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
//! - `fetch HOST:PORT PATH`: an HTTP/1.0 `GET PATH` over std's
//!   `TcpStream` (wasi:sockets in a component), the whole response to
//!   stdout; a connection refused by the host's network says so on stderr;
//! - `listen`: tries to listen on a TCP port of every interface and says
//!   on which, or fails;
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

fn fetch(address: &str, path: &str) -> io::Result<()> {
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    io::stdout().write_all(&response)
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
        Some("listen") => {
            let listener =
                std::net::TcpListener::bind("0.0.0.0:0").map_err(|e| format!("listen: {e}"))?;
            println!("listening on {:?}", listener.local_addr());
            Ok(())
        }
        Some("fetch") => {
            let address = args.get(1).ok_or("missing HOST:PORT")?;
            let path = args.get(2).map_or("/", String::as_str);
            fetch(address, path).map_err(|e| format!("fetch {address}: {e}"))
        }
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
