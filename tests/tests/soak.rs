//! Tests that measure the whole process (soak, bounded memory under a
//! flood): in a test binary of their own, run one at a time, so no other
//! test's threads, fds or memory are counted.

use std::time::Duration;

use capsa::{ExitStatus, HostConfig};
use capsa_tests::*;
use futures::FutureExt;

/// One measuring test at a time.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Soak: spawn, call and kill cycles of WASM children leave the host's
/// threads, fds and memory where they were. `CAPSA_SOAK_CYCLES` sets the
/// count (PLAN.md's figures come from 10,000).
#[test]
fn soak_spawn_call_kill_cycles_leave_nothing_behind() {
    let _alone = alone();
    let cycles = soak_cycles("CAPSA_SOAK_CYCLES", 1000);
    with_host(HostConfig::default(), |host| async move {
        let root = host.root_executor();
        let echo_guest = guest("child-echo");
        let cycle = || async {
            let p = run(&root, &echo_guest, Run::default()).await.unwrap();
            let reply = echo(&exported_executor(&p), "soak").await.unwrap();
            assert!(reply.ends_with("soak"), "{reply}");
            p.kill_request().send().promise.await.unwrap();
            assert_eq!(wait(&p).await, ExitStatus::Killed);
        };
        // What the process keeps for good (cache, pools) comes first.
        for _ in 0..20 {
            cycle().await;
        }
        until_nothing_runs(&host, "warm-up children").await;
        let (threads, fds, rss) = (settled_thread_count(), open_fds(), rss_kib());
        let start = std::time::Instant::now();
        for _ in 0..cycles {
            cycle().await;
        }
        until_nothing_runs(&host, "soaked children").await;
        let took = start.elapsed();
        let (threads_after, fds_after, rss_after) = (settled_thread_count(), open_fds(), rss_kib());
        eprintln!(
            "soak: {cycles} spawn/echo/kill cycles in {:.1} s ({:.0} µs each); \
             RSS {rss} -> {rss_after} KiB; threads {threads} -> {threads_after}; \
             fds {} -> {}",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / cycles.max(1) as f64,
            fds.len(),
            fds_after.len()
        );
        assert_eq!(threads_after, threads, "threads left behind");
        assert_eq!(fds_after, fds, "fds left behind");
        assert!(
            rss_after < rss + 16 * 1024,
            "RSS grew from {rss} KiB to {rss_after} KiB"
        );
    });
}

/// Starts `faulty flood ARGS`, watches the host's RSS for a while and
/// returns the flood process and the largest growth seen, in MiB.
async fn flood(
    root: &capsa::schema::executor::Client,
    args: &[&str],
) -> (capsa::schema::process::Client, u64) {
    let before = rss_kib();
    let mut args_with_mode = vec!["flood"];
    args_with_mode.extend_from_slice(args);
    let p = run(
        root,
        &guest("faulty"),
        Run {
            args: &args_with_mode,
            ..Run::default()
        },
    )
    .await
    .unwrap();
    let mut grown = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        grown = grown.max(rss_kib().saturating_sub(before) / 1024);
    }
    (p, grown)
}

/// A guest that pipelines calls and never reads the replies is held back
/// (the host stops reading it once 4 MiB of replies wait) instead of the
/// host queueing every reply: 20,000 calls of 64 KiB would otherwise grow
/// the host by more than a GiB.
#[test]
fn a_guest_that_never_reads_its_replies_is_held_back() {
    let _alone = alone();
    with_host(HostConfig::default(), |host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let (p, grown) = flood(&root, &["20000", "65536", "finish"]).await;
        assert!(grown < 128, "the host grew by {grown} MiB");
        still_healthy(&witness).await;
        assert!(
            p.wait_request().send().promise.now_or_never().is_none(),
            "held back, not ended"
        );
        p.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Killed);
        still_healthy(&witness).await;
    });
}

/// A million questions whose answers hold a capability (`Bootstrap`), each
/// left open (no `Finish`) or followed by a `Finish` for a question never
/// asked (which must not wind the count down): every one keeps an answer in
/// the host, so past the limit the connection ends with a reason that says
/// so. (Small `echo` calls left open are not this case: their `Return` says
/// no `Finish` is needed, so they only meet the back-pressure above.)
#[test]
fn a_guest_that_leaves_a_million_calls_open_is_cut_off() {
    let _alone = alone();
    for how in ["open", "bogus"] {
        a_guest_leaves_calls_open(how);
    }
}

fn a_guest_leaves_calls_open(how: &'static str) {
    with_host(HostConfig::default(), |host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let (p, grown) = flood(&root, &["1000000", "0", how]).await;
        assert!(grown < 128, "the host grew by {grown} MiB");
        match wait(&p).await {
            ExitStatus::Failed(m) => assert!(m.contains("calls open at once"), "{m}"),
            s => panic!("flood: {s}"),
        }
        still_healthy(&witness).await;
    });
}
