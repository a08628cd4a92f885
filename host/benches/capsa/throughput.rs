//! `throughput`: a byte stream from the host through a guest and back,
//! pulled and pushed, beside a guestless loopback and `wasmtime run`.

use capsa::{Host, HostConfig};

use crate::clients::{pushed_through, start_cat, stream_through};
use crate::report::{gbps, median, Report};
use crate::{local, peers};

pub fn rows(r: &mut Report) {
    let total = 512 << 20;
    for chunk in [64 << 10, 1 << 20] {
        let ours = median((0..3).map(|_| throughput_capsa(chunk, total)).collect());
        let peer = median(
            (0..3)
                .map(|_| peers::throughput_peer(chunk, total))
                .collect(),
        );
        r.row(
            &format!(
                "byte stream host -> guest -> host, {} KiB writes",
                chunk >> 10
            ),
            gbps(ours),
            format!(
                "loopback Process over a Unix socket, no guest: {} (ratio {:.2})",
                gbps(peer),
                ours / peer
            ),
        );
        let pushed = median(
            (0..3)
                .map(|_| throughput_capsa_pushed(chunk, total))
                .collect(),
        );
        r.row(
            &format!(
                "byte stream, guest stdout pushed, {} KiB writes",
                chunk >> 10
            ),
            gbps(pushed),
            format!(
                "the same pulled: {} (ratio {:.2})",
                gbps(ours),
                pushed / ours
            ),
        );
        let cli: Vec<f64> = (0..3)
            .filter_map(|_| peers::throughput_wasmtime_cli(chunk, total))
            .collect();
        let (capsa, peer) = if cli.is_empty() {
            (
                "skipped".to_string(),
                "CAPSA_PEER_WASMTIME is not set".to_string(),
            )
        } else {
            let cli = median(cli);
            (
                gbps(cli),
                format!(
                    "capsa pulled / wasmtime {:.2}, pushed / wasmtime {:.2}",
                    ours / cli,
                    pushed / cli
                ),
            )
        };
        r.row(
            &format!(
                "byte stream, `wasmtime run hello cat` over pipes, {} KiB writes",
                chunk >> 10
            ),
            capsa,
            peer,
        );
    }
}

/// Host → guest → host through `hello cat` in data mode, `chunk` bytes a write.
fn throughput_capsa(chunk: usize, total: usize) -> f64 {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let root = host.root_executor();
        let p = start_cat(&root).await;
        let rate = stream_through(&p, chunk, total).await;
        host.shutdown().await;
        rate
    })
}

/// As `throughput_capsa`, with the guest's stdout pushed into a sink of
/// the caller's (`Options.stdoutTo`) instead of pulled.
fn throughput_capsa_pushed(chunk: usize, total: usize) -> f64 {
    local(async move {
        let host = Host::new(HostConfig::default()).unwrap();
        let rate = pushed_through(&host.root_executor(), chunk, total).await;
        host.shutdown().await;
        rate
    })
}
