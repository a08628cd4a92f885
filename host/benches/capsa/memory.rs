//! `memory`: host memory per idle live child, each measurement in a
//! process of its own (this benchmark run again with
//! `CAPSA_BENCH_MEMORY_ONE`).

use std::time::{Duration, Instant};

use capsa::schema::executor;
use capsa::{Host, HostConfig};

use crate::procfs::{self, Mapping};
use crate::report::Report;
use crate::spawn::{spawn_to_first_call, Start};
use crate::{guest, local};

pub fn rows(r: &mut Report) {
    // `relay`: the child's echo is one call to the host; by default
    // it makes eight at once, and the guest keeps the heap that took
    // (linear memory never shrinks).
    // Each in a fresh process: memory a first run freed stays in
    // `malloc`'s heap and would hide the second run's.
    let (per, live) = memory_in_own_process("relay");
    let (fanned, _) = memory_in_own_process("fan-out");
    r.row(
        &format!(
            "host memory per idle live child, RSS + page tables ({live} live, one echo relayed)"
        ),
        format!("{:.0} KiB", per / 1024.0),
        format!(
            "after an echo of eight concurrent host calls: {:.0} KiB; target <= 200 KiB at 100,000",
            fanned / 1024.0
        ),
    );
}

/// The measurement [`memory_in_own_process`] asks of this process, printed
/// for it to read.
pub fn one_measurement(variant: &str) {
    let n: usize = std::env::var("CAPSA_BENCH_CHILDREN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9_000);
    let args: &'static [&'static str] = if variant == "relay" { &["relay"] } else { &[] };
    let (per, live) = memory_per_child(n, args);
    println!("memory-one {per} {live}");
}

/// [`memory_per_child`] run by this benchmark in a new process: child-echo
/// as `relay` (its echo one call to the host) or as it is (eight at once).
/// `CAPSA_BENCH_CHILDREN` children; 9,000 by default, which fit the
/// kernel's default limit on memory mappings (`vm.max_map_count` 65,530,
/// six per guest slot); 100,000 need it raised first (`sysctl -w
/// vm.max_map_count=700000`).
fn memory_in_own_process(variant: &str) -> (f64, usize) {
    let out = std::process::Command::new(std::env::current_exe().expect("this benchmark"))
        .env("CAPSA_BENCH_MEMORY_ONE", variant)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the benchmark runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("memory-one "))
        .unwrap_or_else(|| panic!("no measurement from {variant}: {text}"));
    let mut words = line.split_whitespace();
    let per = words.next().and_then(|w| w.parse().ok()).expect("bytes");
    let live = words.next().and_then(|w| w.parse().ok()).expect("count");
    (per, live)
}

/// Host memory per idle live child (resident pages and page tables), with
/// `n` children of child-echo started with `args`, each having answered
/// one echo.
fn memory_per_child(n: usize, args: &'static [&'static str]) -> (f64, usize) {
    let config = HostConfig {
        max_children: n as u32 + 1,
        max_cells: n as u32 + 16,
        ..HostConfig::default()
    };
    local(async move {
        let host = Host::new(config).unwrap();
        let root = host.root_executor();
        let bytes = guest("child-echo");
        // Warm the compile cache and the allocator before the baseline.
        let warm = spawn_to_first_call(&root, Start::Bytes(&bytes)).await;
        std::hint::black_box(warm);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = procfs::rss_bytes() + procfs::page_table_bytes();
        let mappings_before = procfs::mappings();
        let mut procs = Vec::with_capacity(n);
        let t = Instant::now();
        for i in 0..n {
            if i % 1000 == 0 && i > 0 {
                eprintln!(
                    "  {i} children alive after {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
            let mut req = root.run_bytes_request();
            req.get().set_bytes(&bytes);
            let mut list = req.get().init_args(args.len() as u32);
            for (i, arg) in args.iter().enumerate() {
                list.set(i as u32, *arg);
            }
            let spawn = req.send();
            let p = spawn.pipeline.get_process();
            let _spawn = tokio::task::spawn_local(spawn.promise);
            let exec: executor::Client = capnp::capability::FromClientHook::new(
                p.bootstrap_request().send().pipeline.get_cap().as_cap(),
            );
            let mut e = exec.echo_request();
            e.get().set_message("alive");
            e.send().promise.await.unwrap();
            procs.push(p);
        }
        let live = host.live_guests();
        let after = procfs::rss_bytes() + procfs::page_table_bytes();
        if let Some(path) = std::env::var_os("CAPSA_BENCH_SMAPS_DUMP") {
            std::fs::copy("/proc/self/smaps", path).unwrap();
        }
        if std::env::var_os("CAPSA_BENCH_SMAPS").is_some() {
            print_mappings_grown(&mappings_before, &procfs::mappings(), n);
        }
        drop(procs);
        host.shutdown().await;
        ((after.saturating_sub(before)) as f64 / n as f64, live)
    })
}

/// Where the memory of `n` new children went: resident bytes per child by
/// size of the mapping holding them (a pool's slots live in one mapping,
/// `malloc`'s arenas in others), and how many mappings were added.
fn print_mappings_grown(before: &[Mapping], after: &[Mapping], n: usize) {
    let mut by_kind: std::collections::BTreeMap<String, (u64, i64)> = Default::default();
    let old: std::collections::HashMap<u64, u64> = before.iter().map(|m| (m.0, m.2)).collect();
    for (start, size, rss, name) in after {
        let grown = *rss as i64 - *old.get(start).unwrap_or(&0) as i64;
        let kind = if name == "[anon]" && *size >= 1 << 30 {
            format!("anonymous, {} GiB", size >> 30)
        } else if name == "[anon]" {
            format!("anonymous, {} KiB", size >> 10)
        } else {
            name.clone()
        };
        let entry = by_kind.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += grown;
    }
    eprintln!(
        "  mappings: {} before, {} after ({:+})",
        before.len(),
        after.len(),
        after.len() as i64 - before.len() as i64
    );
    let mut rows: Vec<_> = by_kind.into_iter().filter(|(_, (_, g))| *g != 0).collect();
    rows.sort_by_key(|(_, (_, g))| -g);
    for (kind, (count, grown)) in rows.iter().take(12) {
        eprintln!(
            "  {:>8.1} KiB per child in {count} mapping(s): {kind}",
            *grown as f64 / 1024.0 / n as f64
        );
    }
}
