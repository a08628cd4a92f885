//! `startup`: `capsa run` of the demo with an empty compile cache and
//! with the cache the first run filled.

use std::time::Instant;

use crate::guests;
use crate::report::{median, Report};

pub fn rows(r: &mut Report) {
    let (first, second) = demo_cold_and_warm(3);
    r.row(
        "second `capsa run` of the demo PID0 (disk compile cache)",
        format!("{:.0} ms", second / 1e6),
        format!(
            "first run, empty cache: {:.0} ms ({:.1}x faster; target >= 20x)",
            first / 1e6,
            first / second
        ),
    );
}

/// `capsa run pid0.wasm` (the demo) twice with a fresh compile cache
/// folder, `rounds` times: the medians of the first and second runs.
fn demo_cold_and_warm(rounds: usize) -> (f64, f64) {
    let capsa = env!("CARGO_BIN_EXE_capsa");
    let pid0 = guests().join("pid0.wasm");
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let cache =
            std::env::temp_dir().join(format!("capsa-bench-cache-{}-{round}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        for times in [&mut first, &mut second] {
            let t = Instant::now();
            let out = std::process::Command::new(capsa)
                .arg("run")
                .arg("--cache-dir")
                .arg(&cache)
                .arg(&pid0)
                .output()
                .expect("capsa run");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            times.push(t.elapsed().as_nanos() as f64);
        }
        let _ = std::fs::remove_dir_all(&cache);
    }
    (median(first), median(second))
}
