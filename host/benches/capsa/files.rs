//! `files`: a WASM child's file work in a granted directory beside
//! `wasmtime run --dir`, a directory from another host, and reads
//! through the Directory capability itself.

use std::path::Path;
use std::time::Instant;

use capsa::schema::StdioMode;
use capsa::{Host, HostConfig};

use crate::clients::drain;
use crate::report::{gbps, median, Report};
use crate::{guest, local, peers};

pub fn rows(r: &mut Report) {
    let dir = std::env::temp_dir().join(format!("capsa-bench-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    files_row(
        r,
        "WASM child writes 64 MiB to a granted directory",
        &dir,
        &["fill", "/data/big", "64"],
        &["fill", "/data/empty", "0"],
    );
    files_row(
        r,
        "WASM child reads 64 MiB from a granted directory",
        &dir,
        &["sum", "/data/big"],
        &["sum", "/data/empty"],
    );
    std::fs::create_dir_all(dir.join("many")).unwrap();
    files_in_capsa(&dir, &["touch-many", "/data/many", "10000"], 0, false);
    files_row(
        r,
        "WASM child stats 10,000 small files in a granted directory",
        &dir,
        &["stat-many", "/data/many", "10000"],
        &["stat-many", "/data/many", "0"],
    );
    // The same child with the directory from another host: copied in
    // (the 64 MiB file alone) and checked for changes at its end.
    let alone = dir.join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::rename(dir.join("big"), alone.join("big")).unwrap();
    let foreign = median(files_in_capsa(&alone, &["sum", "/data/big"], 3, true));
    let local_run = median(files_in_capsa(&alone, &["sum", "/data/big"], 3, false));
    r.row(
        "WASM child reads 64 MiB, directory from another host",
        format!("{:.1} ms", foreign / 1e6),
        format!(
            "same run with a local grant: {:.1} ms (copy in and back: {:.1}x)",
            local_run / 1e6,
            foreign / local_run
        ),
    );
    let rate = median(
        (0..3)
            .map(|_| read_through_capability(&alone, "big"))
            .collect(),
    );
    r.row(
        "client reads 64 MiB through Directory.read (1 MiB reads)",
        gbps(rate),
        String::new(),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file workload through a local grant against the same program under
/// `wasmtime run --dir`. Each side's time for `idle` (the same program
/// doing next to nothing) is taken off its time for `work`, so that the
/// row compares the file work, not process start and compilation.
fn files_row(r: &mut Report, what: &str, dir: &Path, work: &[&str], idle: &[&str]) {
    const RUNS: usize = 7;
    let ours = median(files_in_capsa(dir, work, RUNS, false))
        - median(files_in_capsa(dir, idle, RUNS, false));
    let peer = peers::files_in_wasmtime_cli(dir, work, RUNS)
        .zip(peers::files_in_wasmtime_cli(dir, idle, RUNS))
        .map(|(w, i)| median(w) - median(i));
    let peer = match peer {
        Some(p) => format!(
            "`wasmtime run --dir`: {:.2} ms (capsa/peer {:.2})",
            p / 1e6,
            ours / p
        ),
        None => "`wasmtime run`: not installed (CAPSA_PEER_WASMTIME unset)".into(),
    };
    r.row(what, format!("{:.2} ms", ours / 1e6), peer);
}

/// A host that grants `dir` at "/data" to its root Executor.
fn granting(dir: &Path) -> HostConfig {
    HostConfig {
        directories: vec![capsa::DirGrant {
            path: "/data".into(),
            host_path: dir.to_path_buf(),
            read_only: false,
        }],
        ..HostConfig::default()
    }
}

/// The first directory `host`'s root Executor lists.
async fn first_grant(host: &Host) -> capsa::schema::directory::Client {
    let grants = host
        .root_executor()
        .directories_request()
        .send()
        .promise
        .await
        .unwrap();
    let grants = grants.get().unwrap().get_grants().unwrap();
    grants.get(0).get_directory().unwrap()
}

/// Runs `files ARGS` `runs` times (after one warm-up) with `dir` granted
/// at "/data": a Directory of the same host (`foreign` false: a preopen of
/// the same descriptor) or of a second host in this thread (copied in and
/// written back). The wall time of each run, from `runBytes` to the exit
/// status.
fn files_in_capsa(dir: &Path, args: &[&str], runs: usize, foreign: bool) -> Vec<f64> {
    let bytes = guest("files");
    local(async {
        let host = Host::new(granting(dir)).unwrap();
        let root = host.root_executor();
        let other = Host::new(granting(dir)).unwrap();
        let data = first_grant(if foreign { &other } else { &host }).await;
        let mut v = Vec::new();
        for i in 0..=runs {
            let t = Instant::now();
            let mut req = root.run_bytes_request();
            {
                let mut p = req.get();
                p.set_bytes(&bytes);
                let mut list = p.reborrow().init_args(args.len() as u32);
                for (i, a) in args.iter().enumerate() {
                    list.set(i as u32, *a);
                }
                let mut options = p.init_options();
                options.set_stdio(StdioMode::Data);
                let mut grant = options.init_directories(1).get(0);
                grant.set_path("/data");
                grant.set_directory(data.clone());
            }
            let p = req.send().pipeline.get_process();
            drain(&p.stdout_request().send().pipeline.get_source()).await;
            let status = p.wait_request().send().promise.await.unwrap();
            let status = capsa::ExitStatus::read_from(status.get().unwrap().get_status().unwrap());
            assert_eq!(
                status.unwrap(),
                capsa::ExitStatus::Exited(0),
                "files {args:?}"
            );
            if i > 0 {
                v.push(t.elapsed().as_nanos() as f64);
            }
        }
        host.shutdown().await;
        other.shutdown().await;
        v
    })
}

/// Reads a 64 MiB file through the Directory capability itself, in 1 MiB
/// reads; bytes per second.
fn read_through_capability(dir: &Path, file: &str) -> f64 {
    local(async {
        let host = Host::new(granting(dir)).unwrap();
        let data = first_grant(&host).await;
        let t = Instant::now();
        let mut req = data.read_request();
        req.get().set_path(file);
        let source = req.send().pipeline.get_source();
        let mut total = 0usize;
        loop {
            let mut read = source.read_request();
            read.get().set_max_bytes(1 << 20);
            let resp = read.send().promise.await.unwrap();
            let chunk = resp.get().unwrap();
            total += chunk.get_data().unwrap().len();
            if chunk.get_eof() {
                break;
            }
        }
        let rate = total as f64 / t.elapsed().as_secs_f64();
        host.shutdown().await;
        rate
    })
}
