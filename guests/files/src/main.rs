//! A plain WASI command-line program that works on files, nothing
//! capsa-specific: the same bytes run under `wasmtime run --dir` and in a
//! capsa child with a granted directory. Built as a component (WASI
//! preview 2) and as a core module (WASI preview 1).
//!
//! Commands (paths as the program sees them, through its preopens):
//! - `ls DIR`: one line per entry, sorted: `NAME KIND SIZE`;
//! - `cat FILE`: the file to stdout;
//! - `put FILE`: stdin into the file (created or truncated);
//! - `append FILE TEXT`: TEXT and a newline at the file's end;
//! - `mkdir DIR`, `rm PATH` (a file or an empty directory), `mv FROM TO`;
//! - `stat PATH`: `KIND SIZE`;
//! - `hold DIR N`: opens N files in DIR (creating them) and keeps them all
//!   open, then prints how many it got and the error that stopped it;
//! - `fill FILE MIB`: writes MIB MiB of zeros, 1 MiB at a time;
//! - `sum FILE`: reads the file in 1 MiB pieces, prints its length;
//! - `touch-many DIR N`: creates N empty files `f0`..;
//! - `stat-many DIR N`: stats `f0`.. `f{N-1}`, prints how many are files.
//!
//! A failure prints `error: KIND: MESSAGE` (KIND as Rust's
//! `io::ErrorKind` names it) on stderr and exits 1.

use std::fs;
use std::io::{self, Read, Write};
use std::process::ExitCode;

fn kind(meta: &fs::Metadata) -> &'static str {
    if meta.is_dir() {
        "dir"
    } else if meta.is_file() {
        "file"
    } else {
        "other"
    }
}

fn arg(args: &[String], i: usize, what: &str) -> io::Result<String> {
    args.get(i)
        .cloned()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("missing {what}")))
}

fn number(args: &[String], i: usize, what: &str) -> io::Result<u64> {
    arg(args, i, what)?
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad {what}")))
}

fn run(args: &[String]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match args.first().map(String::as_str) {
        Some("ls") => {
            let mut lines = Vec::new();
            for entry in fs::read_dir(arg(args, 1, "directory")?)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                lines.push(format!(
                    "{} {} {}",
                    entry.file_name().to_string_lossy(),
                    kind(&meta),
                    if meta.is_file() { meta.len() } else { 0 }
                ));
            }
            lines.sort();
            for line in lines {
                writeln!(out, "{line}")?;
            }
        }
        Some("cat") => {
            let mut file = fs::File::open(arg(args, 1, "file")?)?;
            io::copy(&mut file, &mut out)?;
        }
        Some("put") => {
            let mut file = fs::File::create(arg(args, 1, "file")?)?;
            io::copy(&mut io::stdin().lock(), &mut file)?;
            file.sync_all()?;
        }
        Some("append") => {
            let mut file = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(arg(args, 1, "file")?)?;
            writeln!(file, "{}", arg(args, 2, "text")?)?;
        }
        Some("mkdir") => fs::create_dir(arg(args, 1, "directory")?)?,
        Some("rm") => {
            let path = arg(args, 1, "path")?;
            if fs::symlink_metadata(&path)?.is_dir() {
                fs::remove_dir(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        Some("mv") => fs::rename(arg(args, 1, "source")?, arg(args, 2, "target")?)?,
        Some("stat") => {
            let meta = fs::metadata(arg(args, 1, "path")?)?;
            writeln!(out, "{} {}", kind(&meta), meta.len())?;
        }
        Some("hold") => {
            let dir = arg(args, 1, "directory")?;
            let n = number(args, 2, "count")?;
            let mut held = Vec::new();
            let mut stopped = String::from("none");
            for i in 0..n {
                match fs::File::create(format!("{dir}/h{i}")) {
                    Ok(f) => held.push(f),
                    Err(e) => {
                        stopped = format!("{:?}", e.kind());
                        break;
                    }
                }
            }
            writeln!(out, "held {} stopped {stopped}", held.len())?;
        }
        Some("fill") => {
            let mut file = fs::File::create(arg(args, 1, "file")?)?;
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..number(args, 2, "MiB")? {
                file.write_all(&chunk)?;
            }
            file.sync_all()?;
        }
        Some("sum") => {
            let mut file = fs::File::open(arg(args, 1, "file")?)?;
            let mut chunk = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = file.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            writeln!(out, "{total}")?;
        }
        Some("touch-many") => {
            let dir = arg(args, 1, "directory")?;
            for i in 0..number(args, 2, "count")? {
                fs::File::create(format!("{dir}/f{i}"))?;
            }
        }
        Some("stat-many") => {
            let dir = arg(args, 1, "directory")?;
            let mut files = 0;
            for i in 0..number(args, 2, "count")? {
                if fs::metadata(format!("{dir}/f{i}"))?.is_file() {
                    files += 1;
                }
            }
            writeln!(out, "{files}")?;
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown command {other:?}"),
            ))
        }
    }
    out.flush()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {:?}: {e}", e.kind());
            ExitCode::FAILURE
        }
    }
}
