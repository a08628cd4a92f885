//! The vsock device's benchmark, run by `cargo xtask bench` (feature
//! `device-bench`) as a unit test, since it drives the device through the
//! test [`Driver`].
#![cfg(all(test, feature = "device-bench"))]

use std::io::{Read, Write};
use std::sync::Arc;

use super::packet::*;
use super::test_utils::Driver;
use crate::event_loop::poll;

/// One turn of a device thread that does not linger: process the
/// queues, poll the host sockets for at most `timeout_ms`, handle them.
fn pump(d: &mut Driver, timeout_ms: i32) {
    let _ = d.wake.read();
    let dev = d.t.device_mut();
    dev.process();
    let mut fds = Vec::new();
    dev.fill_pollfds(&mut fds);
    if !fds.is_empty() {
        poll(&mut fds, timeout_ms).unwrap();
        dev.on_ready(&fds);
    }
}

/// Benchmark, run by `cargo xtask bench` (feature `device-bench`): the vsock device
/// driven from the host side, with this test playing the guest driver
/// (no vCPU, no guest kernel). A host thread owns the host end of a
/// guest-initiated connection; this thread runs the device and the
/// driver.
/// - echo round trip: the host writes 64 bytes and waits until the
///   driver has echoed them back through RX and TX; mean wall time over
///   the round trips;
/// - host -> guest throughput: the host writes 256 MiB in 64 KiB writes;
///   the driver takes every RX packet and returns credit; bytes over the
///   wall time from the first write to the last byte received.
#[test]
fn bench_vsock_device_from_host() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    const ROUND_TRIPS: u32 = 5000;
    const MSG: usize = 64;
    const BULK: usize = 256 << 20;

    let mut d = Driver::new();
    let mut host = d.guest_connect(1000, 52);
    host.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let host_done = done.clone();
    let host_thread = std::thread::spawn(move || {
        let msg = [0x5au8; MSG];
        let mut back = [0u8; MSG];
        let t = Instant::now();
        for _ in 0..ROUND_TRIPS {
            host.write_all(&msg).unwrap();
            host.read_exact(&mut back).unwrap();
        }
        let rtt = t.elapsed() / ROUND_TRIPS;
        let chunk = vec![0xa5u8; 64 << 10];
        let t = Instant::now();
        for _ in 0..BULK / chunk.len() {
            host.write_all(&chunk).unwrap();
        }
        host_done.store(true, Ordering::Release);
        (rtt, t, host)
    });

    // Guest driver: echo the first ROUND_TRIPS * MSG bytes, count the rest.
    let echo_total = ROUND_TRIPS as usize * MSG;
    let mut received = 0usize;
    let mut credited = 0usize;
    let mut bulk_end = None;
    while received < echo_total + BULK {
        pump(&mut d, 5);
        let pkts = d.recv();
        let mut echo = Vec::new();
        for (h, data) in pkts {
            if h.op != OP_RW {
                continue;
            }
            let in_echo = echo_total.saturating_sub(received).min(data.len());
            echo.extend_from_slice(&data[..in_echo]);
            received += data.len();
        }
        if !echo.is_empty() {
            let mut h = d.hdr(1000, 52, OP_RW);
            h.fwd_cnt = received as u32;
            h.len = echo.len() as u32;
            d.send_raw(&h, &echo);
            credited = received;
        } else if received - credited >= 32 << 10 {
            let mut h = d.hdr(1000, 52, OP_CREDIT_UPDATE);
            h.fwd_cnt = received as u32;
            d.send_raw(&h, &[]);
            credited = received;
        }
        if received >= echo_total + BULK {
            bulk_end = Some(Instant::now());
        }
        assert!(!d.t.device().state().needs_reset);
    }
    let (rtt, bulk_start, _host) = host_thread.join().unwrap();
    assert!(done.load(Ordering::Acquire));
    let secs = (bulk_end.unwrap() - bulk_start).as_secs_f64();
    eprintln!(
        "vsock device, host side: echo round trip ({MSG} B) {:.1} us; \
         host -> guest throughput {:.0} MiB/s ({} MiB in {:.2} s)",
        rtt.as_secs_f64() * 1e6,
        (BULK >> 20) as f64 / secs,
        BULK >> 20,
        secs
    );
}
