//! `cargo xtask bench`: capsa's performance figures, each beside a peer
//! measured in the same run where one exists. Medians throughout.
//!
//! Needs the guests built by the xtask (`CAPSA_GUESTS`).
//!
//! Each group of rows is a module named as the word that selects it
//! (`cargo xtask bench spawn`): `echo`, `serve` (with `tls`), `compile`,
//! `program`, `spawn`, `throughput`, `files`, `startup`, `idle`, `memory`.
//! What the groups share: `report` (printing rows, medians, units),
//! `servers` (capabilities the rows serve and `capsa serve` in a thread),
//! `clients` (echo round trips, a byte stream through `hello cat`),
//! `peers` (the same work without capsa) and `procfs` (what `/proc` says
//! of this process).

use std::path::PathBuf;

use report::Report;

mod clients;
mod compile;
mod echo;
mod files;
mod idle;
mod memory;
mod peers;
mod procfs;
mod program;
mod report;
mod serve;
mod servers;
mod spawn;
mod startup;
mod throughput;

fn guests() -> PathBuf {
    std::env::var_os("CAPSA_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guests/out"))
}

fn guest(name: &str) -> Vec<u8> {
    let p = guests().join(format!("{name}.wasm"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask bench`", p.display()))
}

/// Runs `f` on a current-thread runtime in a LocalSet, as capnp-rpc wants.
fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// A group of rows: the word that selects it, and what measures and
/// prints them.
type Group = (&'static str, fn(&mut Report));

fn main() {
    if let Ok(filter) = std::env::var("CAPSA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    if let Ok(variant) = std::env::var("CAPSA_BENCH_MEMORY_ONE") {
        memory::one_measurement(&variant);
        return;
    }
    // `cargo bench` passes `--bench`; anything else narrows the run.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let mut r = Report::start();
    let pid0_echo = want("echo").then(|| echo::rows(&mut r));
    if want("serve") {
        serve::rows(&mut r, pid0_echo);
    }
    let groups: [Group; 9] = [
        ("tls", serve::tls_rows),
        ("compile", compile::rows),
        ("program", program::rows),
        ("spawn", spawn::rows),
        ("throughput", throughput::rows),
        ("files", files::rows),
        ("startup", startup::rows),
        ("idle", idle::rows),
        ("memory", memory::rows),
    ];
    for (name, rows) in groups {
        if want(name) {
            rows(&mut r);
        }
    }
}
