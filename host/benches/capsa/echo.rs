//! `echo`: Cap'n Proto round trips between a guest and the host, one hop
//! and two, and the stdio round trip beneath them.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use capsa::schema::executor;
use capsa::{Host, HostConfig};

use crate::clients::{start_cat, ECHOES};
use crate::report::{median, us, Report};
use crate::servers::Recorder;
use crate::{guest, local, peers};

/// The rows; returns PID0's echo round trip in nanoseconds, which the
/// `serve` rows compare with.
pub fn rows(r: &mut Report) -> f64 {
    let pid0 = median(guest_samples(
        &["bench-echo", &ECHOES.to_string()],
        "pid0-echo",
    ));
    let peer = median(peers::echo_peer());
    r.row(
        "echo round trip PID0 <-> host",
        us(pid0),
        format!(
            "capnp-rpc over a Unix socket, two threads: {} (capsa/peer {:.2})",
            us(peer),
            pid0 / peer
        ),
    );
    let nested = median(guest_samples(
        &["bench-nested", &ECHOES.to_string()],
        "nested-echo",
    ));
    r.row(
        "echo round trip grandchild <-> child <-> host (two hops)",
        us(nested),
        format!("(vs PID0: {:.2})", nested / pid0),
    );
    let floor = median(stdio_ping_pong(ECHOES));
    r.row(
        "stdio round trip host <-> guest cat, 1 byte, no RPC in the guest",
        us(floor),
        format!(
            "the part of PID0's echo that is not Cap'n Proto: {:.0}%",
            100.0 * floor / pid0
        ),
    );
    pid0
}

/// Runs PID0 with `args` and returns the samples it reported as `want`.
fn guest_samples(args: &[&str], want: &str) -> Vec<f64> {
    local(async {
        let host = Host::new(HostConfig::default()).unwrap();
        let samples = Rc::new(RefCell::new(Vec::new()));
        let recorder: executor::Client = capnp_rpc::new_client(Recorder {
            root: host.root_executor(),
            samples: samples.clone(),
        });
        let status = host
            .run_pid0_with(
                &guest("pid0"),
                args.iter().map(|s| s.to_string()).collect(),
                recorder.client,
            )
            .await
            .unwrap();
        assert!(status.success(), "bench pid0: {status}");
        let found = samples
            .borrow()
            .iter()
            .find(|(n, _)| n == want)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the guest reported no {want} samples"));
        found
    })
}

/// One byte to `hello cat` (data mode) and back, `rounds` times: what a
/// host ⇄ guest round trip costs without Cap'n Proto in the guest (the
/// bench's own calls to the stdio capabilities are local, not serialized).
fn stdio_ping_pong(rounds: usize) -> Vec<f64> {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let p = start_cat(&root).await;
        let sink = capsa_client::stdin(&p).await.unwrap();
        let source = p.stdout_request().send().pipeline.get_source();
        let mut v = Vec::with_capacity(rounds);
        for i in 0..=rounds {
            let t = Instant::now();
            let mut req = sink.write_request();
            req.get().set_data(b"x");
            req.send().await.unwrap();
            let mut req = source.read_request();
            req.get().set_max_bytes(1);
            let resp = req.send().promise.await.unwrap();
            assert_eq!(resp.get().unwrap().get_data().unwrap(), b"x");
            if i > 0 {
                v.push(t.elapsed().as_nanos() as f64);
            }
        }
        sink.close_request().send().promise.await.unwrap();
        host.shutdown().await;
        v
    })
}
