//! `compile`: the compile-time cost of each setting capsa's engine differs
//! in from wasmtime's defaults.

use std::time::Instant;

use crate::guest;
use crate::report::{median, Report};

/// The rows, on the largest guest and on a large real-world program.
pub fn rows(r: &mut Report) {
    let limits = capsa::Limits::default();
    let capsa_config = capsa::engine::engine_config(limits.memory_bytes, 1024);
    let mut defaults = wasmtime::Config::new();
    defaults.wasm_component_model(true);
    let mut no_epoch = capsa_config.clone();
    no_epoch.epoch_interruption(false);
    // What a host of more than 5,461 cells gets (see `wide_reservations`).
    let mut narrow = capsa_config.clone();
    narrow
        .memory_reservation(limits.memory_bytes)
        .memory_guard_size(64 << 10);
    let mut with_epoch = defaults.clone();
    with_epoch.epoch_interruption(true);
    let compare = Compare {
        defaults: &defaults,
        capsa: &capsa_config,
    };
    // A large real-world program (`cargo xtask bench` fetches
    // StarlingMonkey, the SpiderMonkey-based JS engine of
    // componentize-js, 10 MiB): where the difference is, the epoch checks
    // kill, deadlines and CPU budgets need or not.
    match std::env::var_os("CAPSA_BENCH_LARGE_WASM") {
        Some(path) => {
            let large = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let name = std::path::Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            compare.rows(
                r,
                &name,
                &large,
                3,
                &[("capsa's engine without epoch checks", &no_epoch)],
            );
        }
        None => r.row(
            "compile a large real-world program",
            "not run".to_string(),
            "CAPSA_BENCH_LARGE_WASM unset (`cargo xtask bench` sets it)".to_string(),
        ),
    }
    compare.rows(
        r,
        "pid0.wasm",
        &guest("pid0"),
        5,
        &[
            ("capsa's engine without epoch checks", &no_epoch),
            (
                "capsa's engine, 512 MiB reservation + 64 KiB guard",
                &narrow,
            ),
            ("wasmtime defaults + epoch checks", &with_epoch),
        ],
    );
}

/// Seconds to compile `bytes` (a component) with `config`, median of `runs`.
fn compile_seconds(config: &wasmtime::Config, bytes: &[u8], runs: usize) -> f64 {
    let engine = wasmtime::Engine::new(config).unwrap();
    let samples = (0..runs)
        .map(|_| {
            let t = Instant::now();
            // A core module (version 1) or a component.
            if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
                wasmtime::Module::new(&engine, bytes).unwrap();
            } else {
                wasmtime::component::Component::new(&engine, bytes).unwrap();
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(samples)
}

/// Compile times of capsa's engine against wasmtime's defaults (as
/// `wasmtime compile`) on the same bytes.
struct Compare<'a> {
    defaults: &'a wasmtime::Config,
    capsa: &'a wasmtime::Config,
}

impl Compare<'_> {
    /// The headline row for `bytes`, then one row per variant, each
    /// against the defaults.
    fn rows(
        &self,
        r: &mut Report,
        name: &str,
        bytes: &[u8],
        runs: usize,
        variants: &[(&str, &wasmtime::Config)],
    ) {
        let peer = compile_seconds(self.defaults, bytes, runs);
        let ours = compile_seconds(self.capsa, bytes, runs);
        r.row(
            &format!("compile {name} ({} KiB), capsa's engine", bytes.len() >> 10),
            format!("{:.0} ms", ours * 1e3),
            format!(
                "wasmtime defaults (as `wasmtime compile`): {:.0} ms (ratio {:.2}; target <= 1.2)",
                peer * 1e3,
                ours / peer
            ),
        );
        for (what, config) in variants {
            let t = compile_seconds(config, bytes, runs);
            r.row(
                &format!("compile {name}, {what}"),
                format!("{:.0} ms", t * 1e3),
                format!("(vs wasmtime defaults: {:.2})", t / peer),
            );
        }
    }
}
