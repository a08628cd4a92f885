//! The remote path of `capsa serve`: TLS (a pinned certificate or a CA),
//! admission before authentication, and failed tokens slowing their
//! address. Every peer is on loopback; attackers and clients are told
//! apart by their source addresses (all of 127.0.0.0/8 is this machine's).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsa::serve::{self, Address, Token};
use capsa::tls::{Fingerprint, Trust};
use capsa_tests::served::{local, scratch, Served};
use capsa_tests::*;
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "remote-test-token-0123456789abcdef";

fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, TOKEN).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `capsa serve` on a TLS loopback port with a token and a self-signed
/// certificate made in `dir`; and the fingerprint it printed.
fn serve_tls(dir: &Path, extra: &[&str]) -> (Served, Fingerprint) {
    let tf = token_file(dir);
    let state = dir.join("state");
    let mut args = vec![
        "--listen",
        "tls:127.0.0.1:0",
        "--token-file",
        tf.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    // Connections opened and closed are logged: what a failed client's
    // report quotes.
    let env = [
        ("XDG_STATE_HOME", state.to_str().unwrap()),
        ("CAPSA_LOG", "warn,capsa::serve=info"),
    ];
    let served = Served::try_start_with(&args, &env)
        .unwrap_or_else(|log| panic!("capsa serve did not start: {log}"));
    let log = served.log();
    let printed = log
        .lines()
        .find_map(|l| l.strip_prefix("capsa: TLS certificate SHA-256 fingerprint "))
        .unwrap_or_else(|| panic!("no fingerprint printed: {log}"));
    (served, printed.parse().unwrap())
}

fn socket_addr(address: &Address) -> SocketAddr {
    match address {
        Address::Tcp(a) | Address::Tls(a) => a.parse().unwrap(),
        other => panic!("{other} is not TCP"),
    }
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    socket.connect(to).await
}

/// Connects from `from` with `token` and `trust`, and makes one echo call.
async fn echo_from(
    from: Ipv4Addr,
    address: &Address,
    token: &str,
    trust: Option<&Trust>,
) -> Result<String, String> {
    let stream = tcp_from(from, socket_addr(address))
        .await
        .map_err(|e| e.to_string())?;
    let token = Token::new(token).unwrap();
    let connection = serve::connect_over(Box::new(stream), address, Some(&token), trust)
        .await
        .map_err(|e| chain(&e))?;
    let reply = tokio::time::timeout(Duration::from_secs(10), echo(&connection.executor, "hi"))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?;
    connection.close().await;
    reply
}

/// An error and its sources, as `capsa` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A CA, and a server certificate and key it signed for 127.0.0.1, in
/// `dir`: (ca.pem, cert.pem, key.pem).
fn ca_signed(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "capsa test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&paths.2, std::fs::Permissions::from_mode(0o600)).unwrap();
    paths
}

/// `capsa serve` on a TLS loopback port with a token and a certificate
/// signed by a CA of the test's own; and that CA's file.
fn serve_with_ca(dir: &Path) -> (Served, PathBuf) {
    let ca_dir = dir.join("ca");
    std::fs::create_dir(&ca_dir).unwrap();
    let (ca, cert, key) = ca_signed(&ca_dir);
    let tf = token_file(dir);
    let served = Served::start(&[
        "--listen",
        "tls:127.0.0.1:0",
        "--token-file",
        tf.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    (served, ca)
}

const CLIENT: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The tests of this file one at a time: the flood measures a client's
/// wait, and other servers starting beside it are load it did not ask
/// for (with them, two runs in about ten saw one client's handshake
/// closed by the server; PLAN.md, Known broken).
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn tls_clients_are_served_only_when_they_trust_the_server() {
    let _alone = alone();
    let dir = scratch("tls-trust");
    let (pinned_server, fingerprint) = serve_tls(&dir, &[]);
    let pinned = pinned_server.address.clone();
    // The generated certificate is kept private, and the same one is used
    // at the next start.
    let key = dir.join("state/capsa/tls/key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (ca_server, ca) = serve_with_ca(&dir);
    let tf = token_file(&dir);
    let with_ca = ca_server.address.clone();
    let plain = Served::start(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "--token-file",
        tf.to_str().unwrap(),
    ]);

    local(async {
        let pin = Trust::Fingerprint(fingerprint);
        let by_ca = Trust::Ca(ca.clone());
        let both_serve = || async {
            let pinned_reply = echo_from(CLIENT, &pinned, TOKEN, Some(&pin)).await;
            let ca_reply = echo_from(CLIENT, &with_ca, TOKEN, Some(&by_ca)).await;
            assert_eq!(
                (pinned_reply.as_deref(), ca_reply.as_deref()),
                (Ok("hi"), Ok("hi"))
            );
        };
        both_serve().await;

        // The wrong fingerprint, or a CA that did not sign the server's
        // certificate: the client refuses before it sends the token.
        let wrong = Trust::Fingerprint(Fingerprint([7; 32]));
        let err = echo_from(CLIENT, &pinned, TOKEN, Some(&wrong))
            .await
            .unwrap_err();
        assert!(err.contains("not the pinned"), "{err}");
        let err = echo_from(CLIENT, &pinned, TOKEN, Some(&by_ca))
            .await
            .unwrap_err();
        assert!(err.contains("TLS handshake"), "{err}");
        // No trust at all is no option.
        let err = echo_from(CLIENT, &pinned, TOKEN, None).await.unwrap_err();
        assert!(err.contains("--tls-fingerprint"), "{err}");

        // TLS to a plain port, and plain TCP to a TLS port.
        let err = echo_from(CLIENT, &tls_at(&plain.address), TOKEN, Some(&pin))
            .await
            .unwrap_err();
        assert!(err.contains("TLS handshake"), "{err}");
        let err = echo_from(CLIENT, &tcp_at(&pinned), TOKEN, None)
            .await
            .unwrap_err();
        assert!(err.contains("speaks TLS"), "{err}");

        // The servers went on serving through all of it.
        both_serve().await;
    });

    // `capsa exec` over TLS, both ways of trusting.
    let hello = guests_dir().join("hello.wasm");
    for trust in [
        vec![
            "--tls-fingerprint".to_string(),
            fingerprint.to_string(),
            pinned.to_string(),
        ],
        vec![
            "--tls-ca".to_string(),
            ca.display().to_string(),
            with_ca.to_string(),
        ],
    ] {
        let out = Command::new(capsa_bin())
            .args(["exec", "--token-file", tf.to_str().unwrap()])
            .args([&trust[0], &trust[1], "--connect", &trust[2]])
            .arg(&hello)
            .args(["--", "over", "TLS"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from a plain WASI program: over TLS\n"
        );
    }
    // The same certificate at the next start.
    drop(pinned_server);
    let (_again, again) = serve_tls(&dir, &[]);
    assert_eq!(again, fingerprint);
}

fn tls_at(address: &Address) -> Address {
    Address::Tls(socket_addr(address).to_string())
}

fn tcp_at(address: &Address) -> Address {
    Address::Tcp(socket_addr(address).to_string())
}

/// `--allow-remote` takes only a TLS listener, and names the fix.
#[test]
fn allow_remote_needs_tls() {
    let _alone = alone();
    let dir = scratch("allow-remote");
    let tf = token_file(&dir);
    let log = Served::try_start(&[
        "--listen",
        "tcp:0.0.0.0:0",
        "--allow-remote",
        "--token-file",
        tf.to_str().unwrap(),
    ])
    .err()
    .unwrap();
    assert!(log.contains("--listen tls:0.0.0.0:0"), "{log}");
    // With TLS it starts (reached here on loopback).
    let (served, fingerprint) = serve_tls(&dir, &[]);
    drop(served);
    let state = dir.join("state");
    let served = Served::try_start_with(
        &[
            "--listen",
            "tls:0.0.0.0:0",
            "--allow-remote",
            "--token-file",
            tf.to_str().unwrap(),
        ],
        &[("XDG_STATE_HOME", state.to_str().unwrap())],
    )
    .unwrap();
    let address = Address::Tls(format!("127.0.0.1:{}", socket_addr(&served.address).port()));
    local(async {
        let pin = Trust::Fingerprint(fingerprint);
        assert_eq!(
            echo_from(CLIENT, &address, TOKEN, Some(&pin))
                .await
                .unwrap(),
            "hi"
        );
    });
}

/// Hundreds of peers that never authenticate, from hundreds of addresses,
/// reconnecting as soon as they are dropped, and hundreds sending garbage:
/// a client with the token is served within a second every time.
#[test]
fn unauthenticated_peers_cannot_lock_a_client_out() {
    let dir = scratch("lockout");
    let _alone = alone();
    let (served, fingerprint) = serve_tls(&dir, &["--max-connections", "4"]);
    let address = served.address.clone();
    let to = socket_addr(&address);
    let seconds = soak_cycles("CAPSA_LOCKOUT_SECS", 60) as u64;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers = {
        let stop = stop.clone();
        std::thread::spawn(move || local(attack(to, stop)))
    };
    let worst = local(async {
        let pin = Trust::Fingerprint(fingerprint);
        // Let the flood build up first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let start = Instant::now();
        let mut times = Vec::new();
        while start.elapsed() < Duration::from_secs(seconds) {
            let t = Instant::now();
            let reply = echo_from(CLIENT, &address, TOKEN, Some(&pin)).await;
            times.push(t.elapsed());
            if reply.as_deref() != Ok("hi") {
                // What the server said of this client's connections.
                let log = served.log();
                let ours: Vec<&str> = log.lines().filter(|l| l.contains("127.0.0.1:")).collect();
                panic!(
                    "after {:?}: {reply:?}; the server on 127.0.0.1's connections:\n{}",
                    start.elapsed(),
                    ours[ours.len().saturating_sub(6)..].join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        times.sort();
        eprintln!(
            "{} clients served under the flood: median {:?}, worst {:?}",
            times.len(),
            times[times.len() / 2],
            times[times.len() - 1]
        );
        times[times.len() - 1]
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (idle, garbage) = attackers.join().unwrap();
    eprintln!("{idle} idle and {garbage} garbage connections were made");
    assert!(
        idle > 400 && garbage > 400,
        "the flood was too thin: {idle} idle, {garbage} garbage"
    );
    assert!(worst < Duration::from_secs(1), "a client waited {worst:?}");
}

/// 200 idle peers, one per address of 127.0.1.0/24, and 200 garbage
/// senders on 127.0.2.0/24, each reconnecting at once when dropped; how
/// many connections of each were made.
async fn attack(
    to: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (usize, usize) {
    let counts = Rc::new((std::cell::Cell::new(0usize), std::cell::Cell::new(0usize)));
    let mut tasks = Vec::new();
    for i in 0..200u8 {
        for garbage in [false, true] {
            let stop = stop.clone();
            let counts = counts.clone();
            let from = Ipv4Addr::new(127, 0, 1 + u8::from(garbage), i + 1);
            tasks.push(tokio::task::spawn_local(async move {
                let mut rng = XorShift::new(u64::from(i) + 1);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut stream) = tcp_from(from, to).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    if garbage {
                        counts.1.set(counts.1.get() + 1);
                        let junk: Vec<u8> = (0..64).map(|_| rng.next_u64() as u8).collect();
                        let _ = stream.write_all(&junk).await;
                    } else {
                        counts.0.set(counts.0.get() + 1);
                    }
                    // Hold it until the server drops it.
                    let mut buf = [0u8; 256];
                    loop {
                        match tokio::time::timeout(Duration::from_millis(200), stream.readable())
                            .await
                        {
                            Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                            Err(_) => continue,
                            Ok(_) => match stream.try_read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(_) => continue,
                            },
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    (counts.0.get(), counts.1.get())
}

/// Wrong tokens from one address slow that address (its next tokens wait
/// longer and longer), and no other.
#[test]
fn wrong_tokens_slow_their_address_and_no_other() {
    let _alone = alone();
    let dir = scratch("slowed");
    let tf = token_file(&dir);
    let served = Served::start(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    let address = served.address.clone();
    let guesser = Ipv4Addr::new(127, 0, 3, 1);
    let other = Ipv4Addr::new(127, 0, 3, 2);
    local(async {
        let mut took = Vec::new();
        for _ in 0..4 {
            let t = Instant::now();
            let refused = echo_from(guesser, &address, "not-the-token-0123456789", None).await;
            assert!(refused.is_err(), "{refused:?}");
            took.push(t.elapsed());
        }
        // The 3rd guess waited for the 2nd failure's 500 ms, the 4th for
        // the 3rd's second.
        assert!(took[2] >= Duration::from_millis(400), "{took:?}");
        assert!(took[3] >= Duration::from_millis(900), "{took:?}");
        // Another address is not slowed.
        let t = Instant::now();
        assert_eq!(echo_from(other, &address, TOKEN, None).await.unwrap(), "hi");
        let quick = t.elapsed();
        // The guesser's right token still waits its turn (two seconds
        // after four failures) and is then served.
        let t = Instant::now();
        assert_eq!(
            echo_from(guesser, &address, TOKEN, None).await.unwrap(),
            "hi"
        );
        let slowed = t.elapsed();
        assert!(slowed >= Duration::from_millis(1500), "{slowed:?}");
        assert!(quick < slowed, "{quick:?} vs {slowed:?}");
    });
}

/// The Python example over Python's `ssl`, trusting the server both ways,
/// and refusing a wrong fingerprint before it sends the token.
#[test]
fn the_python_example_connects_over_tls() {
    let _alone = alone();
    let python = std::env::var_os("CAPSA_PYTHON").unwrap_or_else(|| {
        panic!(
            "CAPSA_PYTHON is not set: it names a Python with pycapnp installed; \
             `cargo xtask test` creates one and sets it"
        )
    });
    let dir = scratch("python-tls");
    let (pinned, fingerprint) = serve_tls(&dir, &[]);
    let (with_ca, ca) = serve_with_ca(&dir);
    let tf = token_file(&dir);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/capsa_client.py");
    let run = |address: &Address, trust: [&str; 2]| {
        Command::new(&python)
            .arg(&example)
            .args(["--connect", &address.to_string(), "--token-file"])
            .arg(&tf)
            .args(trust)
            .arg("--wasm")
            .arg(guests_dir().join("hello.wasm"))
            .output()
            .unwrap()
    };
    let printed = fingerprint.to_string();
    for out in [
        run(&pinned.address, ["--tls-fingerprint", &printed]),
        run(&with_ca.address, ["--tls-ca", ca.to_str().unwrap()]),
    ] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stderr.contains("echo: hello from python"), "{stderr}");
        assert!(
            stdout.contains("hello from a plain WASI program: from python\n"),
            "{stdout}"
        );
    }
    let wrong = Fingerprint([9; 32]).to_string();
    let out = run(&pinned.address, ["--tls-fingerprint", &wrong]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not 0909"), "{stderr}");
}
