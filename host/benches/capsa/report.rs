//! The report: one printed row per figure, capsa's beside its peer's, and
//! the statistics and units the rows share.

use crate::procfs;

/// Where the rows go: each is printed as soon as it is measured.
pub struct Report;

impl Report {
    /// Prints the machine the figures come from and the column heads.
    pub fn start() -> Report {
        println!(
            "capsa bench: {} cores, {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            procfs::cpu_model()
        );
        println!("{:<58} {:>18}   peer (same run)", "what (median)", "capsa");
        Report
    }

    pub fn row(&mut self, what: &str, capsa: String, peer: String) {
        println!("{what:<58} {capsa:>18}   {peer}");
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Nanoseconds as microseconds.
pub fn us(ns: f64) -> String {
    format!("{:.1} µs", ns / 1000.0)
}

/// Bytes per second as gigabytes per second.
pub fn gbps(rate: f64) -> String {
    format!("{:.2} GB/s", rate / 1e9)
}
