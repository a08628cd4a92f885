//! `serve` and `tls`: capsa's remote clients (Rust and the Python
//! example) through `capsa serve`'s socket, and what TLS adds on loopback.

use std::path::PathBuf;

use capsa::serve::{Address, ServeConfig};

use crate::clients::{echo_round_trips, pushed_through, start_cat, stream_through};
use crate::report::{gbps, median, us, Report};
use crate::servers::{serve_config_in_thread, serve_in_thread};
use crate::{guests, local};

/// The rows of `serve`; `pid0_echo` is the in-process echo round trip
/// they are set beside, where the `echo` rows ran.
pub fn rows(r: &mut Report, pid0_echo: Option<f64>) {
    let dir = std::env::temp_dir().join(format!("capsa-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (address, stop, thread) = serve_in_thread(&dir);
    let beside = |ns: f64| match pid0_echo {
        Some(p) => format!("in-process PID0 <-> host: {} (ratio {:.2})", us(p), ns / p),
        None => String::new(),
    };
    let rust = median(echo_through_serve_rust(&address, None));
    r.row(
        "echo round trip Rust client <-> capsa serve (Unix)",
        us(rust),
        beside(rust),
    );
    match echo_through_serve_python(&address) {
        Ok(py) => r.row(
            "echo round trip Python client <-> capsa serve (Unix)",
            us(py),
            beside(py),
        ),
        Err(e) => r.row(
            "echo round trip Python client <-> capsa serve (Unix)",
            "skipped".into(),
            e.lines().last().unwrap_or_default().to_string(),
        ),
    }
    let runs: Vec<(f64, f64)> = (0..3)
        .map(|_| stream_through_serve_rust(&address, None, 1 << 20, 256 << 20))
        .collect();
    let pushed = median(runs.iter().map(|r| r.0).collect());
    let pulled = median(runs.iter().map(|r| r.1).collect());
    r.row(
        "byte stream Rust client -> capsa serve -> guest cat -> back",
        format!("{} pushed", gbps(pushed)),
        format!(
            "the same pulled: {} (ratio {:.2})",
            gbps(pulled),
            pushed / pulled
        ),
    );
    match stream_through_serve_python(&address) {
        Ok((pushed, pulled)) => r.row(
            "byte stream Python client -> capsa serve -> guest cat -> back",
            format!("{pushed:.0} MB/s pushed"),
            format!(
                "the same pulled: {pulled:.0} MB/s (ratio {:.2})",
                pushed / pulled
            ),
        ),
        Err(e) => r.row(
            "byte stream Python client -> capsa serve -> guest cat -> back",
            "skipped".into(),
            e.lines().last().unwrap_or_default().to_string(),
        ),
    }
    drop(stop);
    thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The rows of `tls`: what TLS costs a remote client, echo and the stream
/// through a `tls:` listener against a plain `tcp:` one, both on loopback
/// in this process, alternating.
pub fn tls_rows(r: &mut Report) {
    let dir = std::env::temp_dir().join(format!("capsa-bench-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tls = capsa::tls::ServerTls::load_or_generate(&dir, "127.0.0.1").unwrap();
    let trust = capsa::tls::Trust::Fingerprint(tls.fingerprint());
    let (tcp, stop_tcp, tcp_thread) =
        serve_config_in_thread(ServeConfig::new(Address::Tcp("127.0.0.1:0".into())));
    let (tls_address, stop_tls, tls_thread) = serve_config_in_thread(ServeConfig {
        tls: Some(tls),
        ..ServeConfig::new(Address::Tls("127.0.0.1:0".into()))
    });
    let (mut echo_tls, mut echo_tcp) = (Vec::new(), Vec::new());
    let (mut stream_tls, mut stream_tcp) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        echo_tcp.extend(echo_through_serve_rust(&tcp, None));
        echo_tls.extend(echo_through_serve_rust(&tls_address, Some(&trust)));
        stream_tcp.push(stream_through_serve_rust(&tcp, None, 1 << 20, 256 << 20));
        stream_tls.push(stream_through_serve_rust(
            &tls_address,
            Some(&trust),
            1 << 20,
            256 << 20,
        ));
    }
    let (echo_tls, echo_tcp) = (median(echo_tls), median(echo_tcp));
    r.row(
        "echo round trip Rust client <-> capsa serve over TLS (loopback)",
        us(echo_tls),
        format!(
            "plain TCP in the same run: {} (TLS/TCP {:.2})",
            us(echo_tcp),
            echo_tls / echo_tcp
        ),
    );
    for (which, pick) in [("pushed", 0), ("pulled", 1)] {
        let get = |runs: &[(f64, f64)]| {
            median(
                runs.iter()
                    .map(|r| if pick == 0 { r.0 } else { r.1 })
                    .collect(),
            )
        };
        let (tls_rate, tcp_rate) = (get(&stream_tls), get(&stream_tcp));
        r.row(
            &format!(
                "byte stream Rust client -> capsa serve over TLS -> guest cat -> back, {which}"
            ),
            gbps(tls_rate),
            format!(
                "plain TCP in the same run: {} (TCP/TLS time {:.2})",
                gbps(tcp_rate),
                tcp_rate / tls_rate
            ),
        );
    }
    drop((stop_tcp, stop_tls));
    tcp_thread.join().unwrap();
    tls_thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Echo round trips from a Rust client through `capsa serve`'s socket.
fn echo_through_serve_rust(address: &Address, trust: Option<&capsa::tls::Trust>) -> Vec<f64> {
    local(async move {
        let connection = capsa::serve::connect(address, None, trust).await.unwrap();
        let exec = connection.executor.clone();
        let v = echo_round_trips(&exec).await;
        drop(exec);
        connection.close().await;
        v
    })
}

/// A byte stream through `hello cat` from the Rust client of `capsa
/// serve`, pushed and pulled in the same connection: bytes per second of
/// each.
fn stream_through_serve_rust(
    address: &Address,
    trust: Option<&capsa::tls::Trust>,
    chunk: usize,
    total: usize,
) -> (f64, f64) {
    local(async move {
        let connection = capsa::serve::connect(address, None, trust).await.unwrap();
        let exec = connection.executor.clone();
        let pushed = pushed_through(&exec, chunk, total).await;
        let p = start_cat(&exec).await;
        let pulled = stream_through(&p, chunk, total).await;
        drop((p, exec));
        connection.close().await;
        (pushed, pulled)
    })
}

/// Runs the Python example (pycapnp) against `address` with `args`, when
/// `CAPSA_PYTHON` names a Python that has it, and returns the numbers it
/// reports after each of `prefixes` (the first word after it).
fn python_example(address: &Address, args: &[&str], prefixes: &[&str]) -> Result<Vec<f64>, String> {
    let python = std::env::var_os("CAPSA_PYTHON")
        .ok_or("CAPSA_PYTHON unset (`cargo xtask bench` sets it)")?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/capsa_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--connect")
        .arg(address.to_string())
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    prefixes
        .iter()
        .map(|prefix| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
                .ok_or_else(|| format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        })
        .collect()
}

/// The echo round trip from the Python example: the median it reports, in
/// nanoseconds.
fn echo_through_serve_python(address: &Address) -> Result<f64, String> {
    let found = python_example(
        address,
        &["--bench-echo", "5000"],
        &["python echo round trip: median "],
    )?;
    Ok(found[0] * 1000.0)
}

/// 256 MiB through `hello cat` from the Python example, its output pushed
/// and pulled: the medians it reports, in MB/s.
fn stream_through_serve_python(address: &Address) -> Result<(f64, f64), String> {
    let hello = guests().join("hello.wasm");
    let found = python_example(
        address,
        &[
            "--wasm",
            &hello.display().to_string(),
            "--bench-stream",
            "256",
        ],
        &[
            "python stream pushed: median ",
            "python stream pulled: median ",
        ],
    )?;
    Ok((found[0], found[1]))
}
