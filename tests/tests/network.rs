//! The network as a capability: a granted view reaches exactly what its
//! rules allow, narrowed views never widen, dropping a view ends its
//! connections, limits hold, and bad rules are refused. Every server is one
//! the test starts on 127.0.0.1.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use capsa::netpolicy::Rules;
use capsa::schema::{connection, executor, network};
use capsa::HostConfig;
use capsa_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the test's server saw of each connection: the bytes, and whether
/// the peer closed its side.
#[derive(Default, Debug)]
struct Seen {
    accepted: usize,
    closed: usize,
}

/// A server on 127.0.0.1 that echoes what it reads and, at the end of its
/// input, writes "bye" and closes.
async fn echo_server() -> (u16, Rc<RefCell<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Rc::new(RefCell::new(Seen::default()));
    let s = seen.clone();
    tokio::task::spawn_local(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            s.borrow_mut().accepted += 1;
            let s = s.clone();
            tokio::task::spawn_local(async move {
                let mut buf = vec![0; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.write_all(b"bye").await;
                s.borrow_mut().closed += 1;
            });
        }
    });
    (port, seen)
}

/// The error of a call expected to fail.
fn refused<T>(result: Result<T, String>) -> String {
    match result {
        Ok(_) => panic!("the call succeeded"),
        Err(e) => e,
    }
}

fn config(rules: &str) -> HostConfig {
    HostConfig {
        network: Some(Rules::parse_cli(rules).unwrap()),
        ..HostConfig::default()
    }
}

async fn network_of(exec: &executor::Client) -> Result<network::Client, String> {
    let response = exec
        .network_request()
        .send()
        .promise
        .await
        .map_err(|e| e.to_string())?;
    response
        .get()
        .and_then(|r| r.get_network())
        .map_err(|e| e.to_string())
}

async fn connect(
    net: &network::Client,
    host: &str,
    port: u16,
) -> Result<connection::Client, String> {
    let mut request = net.connect_request();
    request.get().set_host(host);
    request.get().set_port(port);
    let response = request.send().promise.await.map_err(|e| e.to_string())?;
    response
        .get()
        .and_then(|r| r.get_connection())
        .map_err(|e| e.to_string())
}

async fn restrict(
    net: &network::Client,
    rules: &[&str],
    f: impl FnOnce(capsa::schema::net_rules::Builder<'_>),
) -> Result<network::Client, String> {
    let mut request = net.restrict_request();
    let mut r = request.get().init_rules();
    let mut hosts = r.reborrow().init_hosts(rules.len() as u32);
    for (i, h) in rules.iter().enumerate() {
        hosts.set(i as u32, *h);
    }
    f(r);
    let response = request.send().promise.await.map_err(|e| e.to_string())?;
    response
        .get()
        .and_then(|r| r.get_network())
        .map_err(|e| e.to_string())
}

async fn halves(
    c: &connection::Client,
) -> (
    capsa::schema::byte_source::Client,
    capsa::schema::byte_sink::Client,
) {
    let input = c.input_request().send().promise.await.unwrap();
    let output = c.output_request().send().promise.await.unwrap();
    (
        input.get().unwrap().get_source().unwrap(),
        output.get().unwrap().get_sink().unwrap(),
    )
}

async fn write(sink: &capsa::schema::byte_sink::Client, data: &[u8]) -> Result<(), String> {
    let mut w = sink.write_request();
    w.get().set_data(data);
    w.send().await.map_err(|e| e.to_string())
}

async fn close(sink: &capsa::schema::byte_sink::Client) {
    sink.close_request().send().promise.await.unwrap();
}

/// Reads until `want` bytes have come or the stream ends.
async fn read_n(source: &capsa::schema::byte_source::Client, want: usize) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    loop {
        let (data, eof) = read_once(source, 4096).await;
        got.extend_from_slice(&data);
        if eof || got.len() >= want {
            return (got, eof);
        }
    }
}

#[test]
fn a_granted_network_reaches_an_allowed_local_server_both_ways() {
    with_host(config("127.0.0.1,loopback"), |host| async move {
        let (port, seen) = echo_server().await;
        let net = network_of(&host.root_executor()).await.unwrap();
        let c = connect(&net, "127.0.0.1", port).await.unwrap();
        let (input, output) = halves(&c).await;
        write(&output, b"hello").await.unwrap();
        assert_eq!(read_n(&input, 5).await, (b"hello".to_vec(), false));
        // Closing our side only: the server reads the end and answers.
        close(&output).await;
        assert_eq!(read_all(input).await, b"bye");
        let addresses = c.addresses_request().send().promise.await.unwrap();
        let peer = addresses
            .get()
            .unwrap()
            .get_peer()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(peer, format!("127.0.0.1:{port}"));
        assert_eq!(seen.borrow().accepted, 1);
    });
}

#[test]
fn without_a_grant_there_is_no_network() {
    with_host(HostConfig::default(), |host| async move {
        let err = refused(network_of(&host.root_executor()).await);
        assert_kind(&err, ErrorKind::Denied, "no network");
    });
}

#[test]
fn destinations_outside_the_view_are_denied_with_the_rule_that_refused() {
    let rules = "127.0.0.1,*.test,loopback,pin:ok.test=127.0.0.1";
    with_host(config(rules), |host| async move {
        let (port, _) = echo_server().await;
        let (other, _) = echo_server().await;
        let root = host.root_executor();
        let net = network_of(&root).await.unwrap();
        // A pinned name inside the view reaches its address.
        connect(&net, "ok.test", port).await.unwrap();
        // A name outside the hosts.
        let err = refused(connect(&net, "example.com", port).await);
        assert_kind(&err, ErrorKind::Denied, "\"example.com\" matches none");
        // An address outside the ranges.
        let err = refused(connect(&net, "127.0.0.2", port).await);
        assert_kind(
            &err,
            ErrorKind::Denied,
            "127.0.0.2 is in none of the allowed ranges",
        );
        // A port outside a narrowed view's ports.
        let narrow = restrict(&net, &["*.test"], |mut r| {
            r.set_allow_loopback(true);
            let mut ports = r.init_ports(1);
            ports.reborrow().get(0).set_first(port);
            ports.get(0).set_last(port);
        })
        .await
        .unwrap();
        connect(&narrow, "ok.test", port).await.unwrap();
        let err = refused(connect(&narrow, "ok.test", other).await);
        assert_kind(&err, ErrorKind::Denied, &format!("port {other} is outside"));
        // Not a host at all, and port 0.
        let err = refused(connect(&net, "not a host", port).await);
        assert_kind(&err, ErrorKind::BadRequest, "neither");
        let err = refused(connect(&net, "127.0.0.1", 0).await);
        assert_kind(&err, ErrorKind::BadRequest, "port 0");
    });
}

#[test]
fn loopback_is_refused_unless_allowed_even_through_a_name() {
    // Every name and address, but no address class beyond public ones.
    let rules = "any,pin:local.test=127.0.0.1";
    with_host(config(rules), |host| async move {
        let (port, seen) = echo_server().await;
        let net = network_of(&host.root_executor()).await.unwrap();
        for host in [
            "127.0.0.1",
            "local.test",
            "localhost",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            let err = refused(connect(&net, host, port).await);
            assert_kind(&err, ErrorKind::Denied, "loopback");
        }
        assert_eq!(
            seen.borrow().accepted,
            0,
            "a refused connection reached the server"
        );
        // The view cannot grant itself loopback either.
        let wider = restrict(&net, &["*"], |mut r| {
            r.set_allow_loopback(true);
            r.init_ranges(1).set(0, "127.0.0.0/8");
        })
        .await
        .unwrap();
        let err = refused(connect(&wider, "127.0.0.1", port).await);
        assert_kind(&err, ErrorKind::Denied, "granted view");
    });
}

#[test]
fn a_view_narrowed_twice_holds_in_every_view_and_pins_cannot_widen() {
    let rules = "*.test,127.0.0.1,loopback,pin:a.test=127.0.0.1,pin:b.test=127.0.0.1";
    with_host(config(rules), |host| async move {
        let (port, _) = echo_server().await;
        let net = network_of(&host.root_executor()).await.unwrap();
        let child = restrict(&net, &["*.test"], |mut r| r.set_allow_loopback(true))
            .await
            .unwrap();
        let grandchild = restrict(&child, &["a.test"], |mut r| r.set_allow_loopback(true))
            .await
            .unwrap();
        connect(&grandchild, "a.test", port).await.unwrap();
        let err = refused(connect(&grandchild, "b.test", port).await);
        assert_kind(&err, ErrorKind::Denied, "narrowed 2 times");
        // A pin to an address the views above do not allow is refused.
        let err = refused(
            restrict(&child, &["a.test"], |r| {
                let mut pin = r.init_pins(1).get(0);
                pin.set_host("a.test");
                pin.init_addresses(1).set(0, "10.0.0.1");
            })
            .await,
        );
        assert_kind(&err, ErrorKind::Denied, "10.0.0.1");
    });
}

#[test]
fn dropping_a_view_ends_its_connections_and_no_other() {
    with_host(config("127.0.0.1,loopback"), |host| async move {
        let (port, seen) = echo_server().await;
        let net = network_of(&host.root_executor()).await.unwrap();
        let kept = connect(&net, "127.0.0.1", port).await.unwrap();
        let child = restrict(&net, &[], |mut r| {
            r.set_allow_loopback(true);
            r.init_ranges(1).set(0, "127.0.0.1");
        })
        .await
        .unwrap();
        let grandchild = restrict(&child, &[], |mut r| {
            r.set_allow_loopback(true);
            r.init_ranges(1).set(0, "127.0.0.1");
        })
        .await
        .unwrap();
        let c = connect(&grandchild, "127.0.0.1", port).await.unwrap();
        let (input, output) = halves(&c).await;
        write(&output, b"x").await.unwrap();
        assert_eq!(read_n(&input, 1).await.0, b"x");
        drop(child);
        // Revoking the child revokes the grandchild made from it: the
        // connection through it ends, for its holder and for the server.
        let (rest, eof) = tokio::time::timeout(Duration::from_secs(10), read_n(&input, 1 << 20))
            .await
            .expect("the connection outlived its view");
        assert!(eof, "{rest:?}");
        let err = refused(connect(&grandchild, "127.0.0.1", port).await);
        assert_kind(&err, ErrorKind::Denied, "revoked");
        for _ in 0..500 {
            if seen.borrow().closed >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            seen.borrow().closed,
            1,
            "the server still holds the connection"
        );
        // The root's own connection goes on.
        let (input, output) = halves(&kept).await;
        write(&output, b"still").await.unwrap();
        assert_eq!(read_n(&input, 5).await.0, b"still");
    });
}

#[test]
fn a_loop_of_connections_meets_the_views_limit_and_a_sibling_is_served() {
    with_host(config("127.0.0.1,loopback"), |host| async move {
        let (port, _) = echo_server().await;
        let net = network_of(&host.root_executor()).await.unwrap();
        let limited = |max| {
            let net = net.clone();
            async move {
                restrict(&net, &[], |mut r| {
                    r.set_allow_loopback(true);
                    r.set_max_connections(max);
                    r.init_ranges(1).set(0, "127.0.0.1");
                })
                .await
                .unwrap()
            }
        };
        let greedy = limited(16).await;
        let sibling = limited(4).await;
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..200 {
            match connect(&greedy, "127.0.0.1", port).await {
                Ok(c) => open.push(c),
                Err(e) => {
                    assert_kind(&e, ErrorKind::Quota, "limit of 16");
                    refused += 1;
                }
            }
        }
        assert_eq!((open.len(), refused), (16, 184));
        connect(&sibling, "127.0.0.1", port).await.unwrap();
        // A closed connection gives its seat back.
        open.pop();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        connect(&greedy, "127.0.0.1", port).await.unwrap();
    });
}

#[test]
fn bad_rules_are_refused_and_the_view_goes_on() {
    with_host(config("127.0.0.1,loopback"), |host| async move {
        let (port, _) = echo_server().await;
        let net = network_of(&host.root_executor()).await.unwrap();
        for bad in ["a b", "*.", "127.0.0.1", "x".repeat(300).as_str()] {
            let err = refused(restrict(&net, &[bad], |_| {}).await);
            assert_kind(&err, ErrorKind::BadRequest, "");
        }
        let err = refused(
            restrict(&net, &[], |r| {
                r.init_ranges(1).set(0, "10.0.0.0/99");
            })
            .await,
        );
        assert_kind(&err, ErrorKind::BadRequest, "10.0.0.0/99");
        let many: Vec<&str> = vec!["a.test"; 300];
        let err = refused(restrict(&net, &many, |_| {}).await);
        assert_kind(&err, ErrorKind::BadRequest, "too many hosts");
        let err = refused(
            restrict(&net, &[], |r| {
                let mut pin = r.init_pins(1).get(0);
                pin.set_host("a.test");
                pin.init_addresses(1).set(0, "not an address");
            })
            .await,
        );
        assert_kind(&err, ErrorKind::BadRequest, "not an address");
        connect(&net, "127.0.0.1", port).await.unwrap();
    });
}

/// A plain WASI program (std's `TcpStream`) fetches from a server the test
/// runs, through a Network its parent granted; without one, or outside it,
/// its connection is refused; and it cannot listen.
#[test]
fn a_wasi_program_fetches_through_its_granted_network_and_nowhere_else() {
    with_host(config("127.0.0.1,loopback"), |host| async move {
        let (port, seen) = http_server().await;
        let root = host.root_executor();
        let net = network_of(&root).await.unwrap();
        let hello = guest("hello");
        let address = format!("127.0.0.1:{port}");
        let fetch = |network: Option<network::Client>| {
            let root = root.clone();
            let hello = hello.clone();
            let address = address.clone();
            async move {
                let p = run(
                    &root,
                    &hello,
                    Run {
                        args: &["fetch", &address, "/index"],
                        network: network.as_ref(),
                        stdio: StdioMode::Data,
                        ..Run::default()
                    },
                )
                .await
                .unwrap();
                let out = String::from_utf8_lossy(&stdout_of(&p).await).into_owned();
                (wait(&p).await, out)
            }
        };
        let (status, out) = fetch(Some(net.clone())).await;
        assert_eq!(status, capsa::ExitStatus::Exited(0), "{out}");
        assert!(
            out.starts_with("HTTP/1.0 200 OK") && out.ends_with("GET /index"),
            "{out}"
        );
        assert_eq!(*seen.borrow(), 1);
        // No network given: nothing reaches the server.
        let (status, _) = fetch(None).await;
        assert_eq!(status, capsa::ExitStatus::Exited(1));
        // A view without this port.
        let narrow = restrict(&net, &[], |mut r| {
            r.set_allow_loopback(true);
            r.reborrow().init_ranges(1).set(0, "127.0.0.1");
            let mut ports = r.init_ports(1);
            ports.reborrow().get(0).set_first(1);
            ports.get(0).set_last(1);
        })
        .await
        .unwrap();
        let (status, _) = fetch(Some(narrow)).await;
        assert_eq!(status, capsa::ExitStatus::Exited(1));
        assert_eq!(*seen.borrow(), 1, "a refused program reached the server");
        // A network to reach out is no port to listen on: nothing listens
        // on the host's interfaces.
        let p = run(
            &root,
            &hello,
            Run {
                args: &["listen"],
                network: Some(&net),
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&stdout_of(&p).await).into_owned();
        assert_eq!(wait(&p).await, capsa::ExitStatus::Exited(1), "{out}");
    });
}

/// A server that answers each connection's first request line with an
/// HTTP/1.0 response whose body is that line, and counts requests.
async fn http_server() -> (u16, Rc<RefCell<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Rc::new(RefCell::new(0));
    let c = count.clone();
    tokio::task::spawn_local(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            *c.borrow_mut() += 1;
            tokio::task::spawn_local(async move {
                let mut request = Vec::new();
                let mut buf = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let line = line.lines().next().unwrap_or("");
                let body = line.trim_end_matches(" HTTP/1.0");
                let _ = stream
                    .write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes())
                    .await;
            });
        }
    });
    (port, count)
}

/// `capsa exec --net` grants the host's network to the program, and an
/// unreadable `--net` is refused before anything runs, naming the flag.
#[test]
fn capsa_exec_grants_its_net_to_the_program() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.0 200 OK\r\n\r\nfrom the test")
            .unwrap();
    });
    let hello = guests_dir().join("hello.wasm");
    let address = format!("127.0.0.1:{port}");
    let out = std::process::Command::new(capsa_bin())
        .args(["exec", "--no-cache", "--net", "127.0.0.1,loopback"])
        .arg(&hello)
        .args(["--", "fetch", &address, "/"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.ends_with("from the test"), "{stdout}");
    server.join().unwrap();

    let out = std::process::Command::new(capsa_bin())
        .args(["exec", "--no-cache", "--net", "port=99999"])
        .arg(&hello)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("--net") && stderr.contains("99999"),
        "{stderr}"
    );
}

#[test]
fn resolve_gives_what_connect_would_try_and_refuses_the_rest() {
    let rules = "*.test,any,pin:ok.test=127.0.0.1+192.0.2.1,pin:local.test=127.0.0.1";
    with_host(config(rules), |host| async move {
        let net = network_of(&host.root_executor()).await.unwrap();
        let resolve = |name: &str| {
            let mut request = net.resolve_request();
            request.get().set_host(name);
            async move {
                let response = request.send().promise.await.map_err(|e| e.to_string())?;
                let list = response.get().unwrap().get_addresses().unwrap();
                Ok::<Vec<String>, String>(
                    list.iter()
                        .map(|a| a.unwrap().to_str().unwrap().to_string())
                        .collect(),
                )
            }
        };
        // A pin, without the loopback address the view does not allow.
        assert_eq!(resolve("ok.test").await.unwrap(), ["192.0.2.1"]);
        // Nothing left of a name: denied, naming the class.
        assert_kind(
            &refused(resolve("local.test").await),
            ErrorKind::Denied,
            "loopback",
        );
        assert_kind(
            &refused(resolve("localhost").await),
            ErrorKind::Denied,
            "loopback",
        );
        // An address is itself, if the view allows it as one.
        assert_eq!(resolve("192.0.2.7").await.unwrap(), ["192.0.2.7"]);
        assert_kind(
            &refused(resolve("10.0.0.1").await),
            ErrorKind::Denied,
            "private",
        );
        assert_kind(&refused(resolve("a b").await), ErrorKind::BadRequest, "");
    });
}

/// A peer that never reads holds the writer back: writes stop completing
/// once the kernel's buffers are full, and nothing piles up in the host.
#[test]
fn a_peer_that_never_reads_holds_the_writer_back() {
    with_host(config("127.0.0.1,loopback"), |host| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and keeps the connection, never reading.
        let held = tokio::task::spawn_local(async move { listener.accept().await.unwrap() });
        let net = network_of(&host.root_executor()).await.unwrap();
        let c = connect(&net, "127.0.0.1", port).await.unwrap();
        let _peer = held.await.unwrap();
        let (_input, output) = halves(&c).await;
        let chunk = vec![7u8; 64 << 10];
        let rss = rss_kib();
        let mut written = 0usize;
        loop {
            let write = write(&output, &chunk);
            match tokio::time::timeout(Duration::from_secs(2), write).await {
                Ok(result) => {
                    result.unwrap();
                    written += chunk.len();
                }
                Err(_) => break,
            }
            assert!(
                written < 256 << 20,
                "256 MiB written to a peer that reads nothing"
            );
        }
        eprintln!(
            "{} KiB taken before the writer was held back",
            written >> 10
        );
        assert!(
            rss_kib() < rss + 64 * 1024,
            "the host grew by {} KiB",
            rss_kib() - rss
        );
    });
}
