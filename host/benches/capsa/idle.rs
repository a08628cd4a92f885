//! `idle`: how often an idle host wakes, beside a thread that ticks an
//! epoch every millisecond.

use std::time::Duration;

use capsa::schema::executor;
use capsa::{Host, HostConfig};

use crate::report::Report;
use crate::{guest, local, peers, procfs};

pub fn rows(r: &mut Report) {
    r.row(
        "idle host wake-ups (one live child waiting for calls)",
        format!("{:.1} /s", idle_wakeups()),
        format!(
            "a thread ticking every 1 ms, as before: {:.0} /s; target: none while no guest runs",
            peers::always_ticking_wakeups()
        ),
    );
}

/// Wake-ups per second of a host with one live child that waits for calls.
fn idle_wakeups() -> f64 {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let child = capsa_client::Spawn::default()
            .start(&root, &guest("child-echo"))
            .await
            .unwrap();
        let exec: executor::Client = capnp::capability::FromClientHook::new(
            child.bootstrap_request().send().pipeline.get_cap().as_cap(),
        );
        let mut e = exec.echo_request();
        e.get().set_message("alive");
        e.send().promise.await.unwrap();
        // Past the ticker's idle stretch.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let window = Duration::from_secs(2);
        let before = procfs::context_switches();
        // The measuring thread sleeps in one go: its own switch is one.
        std::thread::sleep(window);
        let per_second = (procfs::context_switches() - before) as f64 / window.as_secs_f64();
        drop(child);
        host.shutdown().await;
        per_second
    })
}
