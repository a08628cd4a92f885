//! `capsa serve`, `capsa exec`, the embedding API and the Python client:
//! capsa reached from outside any guest.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsa::schema::StdioMode;
use capsa::scope::Share;
use capsa::serve::{self, Address, Token};
use capsa::{ExitStatus, HostConfig};
use capsa_schema::hostile::Finish;
use capsa_tests::served::{local, scratch, Served};
use capsa_tests::*;

fn agent_bin() -> PathBuf {
    match std::env::var_os("CAPSA_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => capsa_bin().with_file_name("capsa-agent"),
    }
}

fn unix_path(a: &Address) -> &Path {
    match a {
        Address::Unix(p) => p,
        other => panic!("{other} is not a Unix address"),
    }
}

fn sock_arg(dir: &Path) -> String {
    format!("unix:{}", dir.join("capsa.sock").display())
}

#[test]
fn serve_makes_a_private_socket_and_exec_streams_stdio() {
    let dir = scratch("exec");
    let listen = sock_arg(&dir);
    let served = Served::start(&["--listen", &listen]);
    let path = unix_path(&served.address);
    let meta = std::fs::symlink_metadata(path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let hello = guests_dir().join("hello.wasm");
    // stdin → process → stdout, through `hello cat`.
    let mut exec = Command::new(capsa_bin())
        .args(["exec", "--connect", &listen])
        .arg(&hello)
        .args(["--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut stdin = exec.stdin.take().unwrap();
    let sent = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&sent).unwrap());
    let mut output = Vec::new();
    exec.stdout
        .take()
        .unwrap()
        .read_to_end(&mut output)
        .unwrap();
    writer.join().unwrap();
    assert!(exec.wait().unwrap().success());
    assert_eq!(output, input);

    // Arguments, and the exit code of a failing program.
    let out = Command::new(capsa_bin())
        .args(["exec", "--connect", &listen])
        .arg(&hello)
        .args(["--", "over", "a", "socket"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a plain WASI program: over a socket\n"
    );
    // The environment, exactly as given, through the serving host too.
    let out = Command::new(capsa_bin())
        .env("CAPSA_TEST_PASSED", "passed")
        .args(["exec", "--connect", &listen])
        .args(["--env", "A=over a socket", "--env", "CAPSA_TEST_PASSED"])
        .arg(&hello)
        .args(["--", "env"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "A=over a socket\nCAPSA_TEST_PASSED=passed\n"
    );
    let out = Command::new(capsa_bin())
        .args(["exec", "--connect", &listen])
        .arg(guests_dir().join("faulty.wasm"))
        .args(["--", "trap"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("capsa: process trapped"),
        "{out:?}"
    );
}

/// `capsa exec --dir` grants a directory of the client's machine: the
/// serving host copies it in and writes the program's changes back; and
/// an ordinary non-zero exit is the program's own business, said by it
/// alone.
#[test]
fn exec_grants_a_local_directory_and_exits_like_a_shell() {
    let dir = scratch("exec-dir");
    let listen = sock_arg(&dir);
    let _served = Served::start(&["--listen", &listen]);
    let mine = dir.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("in.txt"), "from the client").unwrap();
    let exec = |args: &[&str]| {
        Command::new(capsa_bin())
            .args(["exec", "--connect", &listen])
            .arg("--dir")
            .arg(format!("{}::/shared", mine.display()))
            .arg(guests_dir().join("files.wasm"))
            .arg("--")
            .args(args)
            .output()
            .unwrap()
    };
    let out = exec(&["cat", "/shared/in.txt"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the client");
    let out = exec(&["append", "/shared/log", "written by the program"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(mine.join("log")).unwrap(),
        "written by the program\n"
    );
    // A failure of the program: its exit code, its words, nothing else.
    let out = exec(&["cat", "/shared/missing"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: NotFound"), "{stderr}");
    assert!(!stderr.contains("capsa:"), "{stderr}");
}

#[test]
fn the_socket_path_is_refused_unless_absent_or_stale() {
    let dir = scratch("paths");
    let path = dir.join("capsa.sock");
    let listen = format!("unix:{}", path.display());

    std::fs::write(&path, b"precious").unwrap();
    let log = Served::try_start(&["--listen", &listen])
        .err()
        .expect("a regular file must not be replaced");
    assert!(log.contains("not a socket"), "{log}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // A live socket: another server.
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let log = Served::try_start(&["--listen", &listen])
        .err()
        .expect("a live socket must not be replaced");
    assert!(log.contains("another server"), "{log}");
    drop(live);

    // The file of a listener that is gone: stale, replaced.
    assert!(path.exists());
    let served = Served::start(&["--listen", &listen]);
    local(async {
        let exec = serve::connect(&served.address, None, None)
            .await
            .unwrap()
            .executor;
        assert_eq!(echo(&exec, "fresh").await.unwrap(), "fresh");
    });
}

#[test]
fn sigterm_kills_every_process_removes_the_socket_and_exits_0() {
    let dir = scratch("sigterm");
    let mut served = Served::start(&["--listen", &sock_arg(&dir), "-v"]);
    let address = served.address.clone();
    let status = local(async {
        let exec = serve::connect(&address, None, None).await.unwrap().executor;
        // `hello cat` waits for stdin forever.
        let p = run(
            &exec,
            &guest("hello"),
            Run {
                args: &["cat"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        served.wait_log("connection 1");
        served.signal("-TERM");
        tokio::time::timeout(Duration::from_secs(20), p.wait_request().send().promise).await
    });
    // The client hears "killed", unless the server was gone first.
    match status.expect("the process outlived the server") {
        Ok(r) => assert_eq!(
            ExitStatus::read_from(r.get().unwrap().get_status().unwrap()).unwrap(),
            ExitStatus::Killed
        ),
        Err(e) => assert!(e.to_string().contains("isconnect"), "{e}"),
    }
    assert!(served.exit_status().success(), "{}", served.log());
    assert!(!unix_path(&served.address).exists());

    // SIGINT too.
    let mut served = Served::start(&["--listen", &sock_arg(&dir)]);
    served.signal("-INT");
    assert!(served.exit_status().success());
    assert!(!unix_path(&served.address).exists());
}

/// Serves `host` over one end of a socket pair in this thread and returns a
/// client on the other end, plus the task serving it.
type ServerTask = tokio::task::JoinHandle<Result<usize, serve::ConnectionError>>;

fn in_process(host: &capsa::Host) -> (serve::Connection, ServerTask) {
    in_process_with(host, None)
}

/// A connection served by `host` with `share`, over a socket pair.
fn in_process_with(host: &capsa::Host, share: Option<Share>) -> (serve::Connection, ServerTask) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let host = host.clone();
    let server =
        tokio::task::spawn_local(
            async move { serve::serve_connection(&host, a, None, share).await },
        );
    (serve::client_over(b), server)
}

/// A client that makes more calls, one after another, than the open-call
/// limit is not cut off: a `Return` without capabilities needs no `Finish`
/// (capnp-rpc says so in the `Return`), and its call is no longer open.
#[test]
fn many_sequential_calls_are_not_open_calls() {
    with_host(HostConfig::default(), |host| async move {
        let (conn, _served) = in_process(&host);
        let limit = host.config().flow.open_calls;
        for i in 0..limit + 1_000 {
            if let Err(e) = echo(&conn.executor, "again").await {
                panic!("call {i}: {e}");
            }
        }
    });
}

/// Seeded stand-in for the `executor_messages` fuzz target: RPC streams of
/// pipelined calls, mutated as a fuzzer would, sent to a connection never
/// panic the host, and it keeps serving everyone else.
#[test]
fn mutated_rpc_streams_never_break_the_host() {
    with_host(HostConfig::default(), |host| async move {
        let (witness_conn, _witness_served) = in_process(&host);
        let witness = witness_conn.executor.clone();
        let mut base = Vec::new();
        capsa_schema::hostile::echo_flood(&mut base, 4, 24, Finish::Each).unwrap();
        let mut rng = XorShift::new(0x5eed_cafe);
        for round in 0..3000 {
            let mut bytes = base.clone();
            rng.mutate(&mut bytes);
            if let Err(e) = feed_connection(&host, &bytes).await {
                panic!("round {round}: {e}");
            }
        }
        assert_eq!(echo(&witness, "after").await.unwrap(), "after");
        assert_eq!(host.live_guests(), 0);
    });
}

/// Each connection holds at most its share
/// of guests (at every nesting level together) and of guest memory, so one
/// client cannot lock the others out; what a guest held goes back to the
/// share when it ends.
#[test]
fn a_connection_holds_only_its_share_of_guests_and_memory() {
    with_host(HostConfig::default(), |host| async move {
        let share = Share {
            cells: 2,
            memory_bytes: 64 << 20,
        };
        let cat = Run {
            args: &["cat"],
            stdio: StdioMode::Data,
            ..Run::default()
        };
        let (conn_one, _served_one) = in_process_with(&host, Some(share));
        let (conn_two, _served_two) = in_process_with(&host, Some(share));
        let (one, two) = (conn_one.executor.clone(), conn_two.executor.clone());

        // A child and its grandchild fill one's share of guests.
        let child = run(&one, &guest("child-echo"), Run::default())
            .await
            .unwrap();
        let child_exec = exported_executor(&child);
        let grandchild = run(&child_exec, &guest("hello"), Run { ..cat })
            .await
            .unwrap();
        for exec in [&one, &child_exec] {
            let refused = run(exec, &guest("hello"), Run { ..cat })
                .await
                .err()
                .unwrap();
            assert_kind(&refused, ErrorKind::Quota, "share of 2 guests");
        }
        // Two's share is its own.
        let b = run(&two, &guest("hello"), Run { ..cat }).await.unwrap();
        drop(b);

        // Memory: a guest that allocates without end is stopped at two's
        // 64 MiB, far below its own 512 MiB limit.
        let hog = run(
            &two,
            &guest("faulty"),
            Run {
                args: &["alloc"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&hog).await, ExitStatus::OutOfMemory(64 << 20));
        drop(hog);
        let reply = echo(&child_exec, "one still served").await.unwrap();
        assert!(reply.ends_with("one still served"), "{reply}");

        // What the hog held went back: a guest with 48 MiB of its own runs.
        let again = run(
            &two,
            &guest("faulty"),
            Run {
                args: &["alloc"],
                memory_limit: 48 << 20,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&again).await, ExitStatus::OutOfMemory(48 << 20));

        // A grandchild that ends gives its seat back.
        grandchild.kill_request().send().promise.await.unwrap();
        wait(&grandchild).await;
        drop(grandchild);
        let start = Instant::now();
        loop {
            match run(&one, &guest("hello"), Run { ..cat }).await {
                Ok(_) => break,
                Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop((conn_one, conn_two));
    });
}

#[test]
fn a_connection_gets_its_own_quotas_and_its_processes_die_with_it() {
    let config = HostConfig {
        max_children: 2,
        ..HostConfig::default()
    };
    with_host(config, |host| async move {
        let cat = Run {
            args: &["cat"],
            stdio: StdioMode::Data,
            ..Run::default()
        };
        let (conn_one, served_one) = in_process(&host);
        let (conn_two, _served_two) = in_process(&host);
        let (one, two) = (conn_one.executor.clone(), conn_two.executor.clone());
        let _a = run(&one, &guest("hello"), Run { ..cat }).await.unwrap();
        // A child in RPC mode, and a grandchild through it.
        let child = run(&one, &guest("child-echo"), Run::default())
            .await
            .unwrap();
        let child_exec = exported_executor(&child);
        let _grandchild = run(&child_exec, &guest("hello"), Run { ..cat })
            .await
            .unwrap();
        let refused = run(&one, &guest("hello"), Run { ..cat })
            .await
            .err()
            .unwrap();
        assert_kind(&refused, ErrorKind::Quota, "live children limit of 2");
        // The other connection's quota is its own.
        let _b = run(&two, &guest("hello"), Run { ..cat }).await.unwrap();
        assert_eq!(host.live_guests(), 4);

        // Connection one goes, its capabilities still held here: its three
        // processes end, two's stays.
        conn_one.close().await;
        tokio::time::timeout(Duration::from_secs(10), served_one)
            .await
            .expect("the connection ended")
            .unwrap()
            .unwrap();
        let start = Instant::now();
        while host.live_guests() != 1 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{}",
                host.live_guests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(echo(&two, "still here").await.unwrap(), "still here");
        drop((one, child, child_exec, _a, _grandchild));
    });
}

#[test]
fn bad_clients_are_dropped_and_the_server_keeps_serving() {
    let dir = scratch("bad");
    let served = Served::start(&["--listen", &sock_arg(&dir), "--max-connections", "16", "-v"]);
    let path = unix_path(&served.address).to_path_buf();
    let address = served.address.clone();
    local(async {
        // A well-behaved client, connected before the others.
        let witness = serve::connect(&address, None, None).await.unwrap().executor;
        assert_eq!(echo(&witness, "before").await.unwrap(), "before");

        // Garbage: a segment table announcing far more than it sends, then
        // noise. The server drops the connection.
        let mut garbage = std::os::unix::net::UnixStream::connect(&path).unwrap();
        garbage
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        garbage
            .write_all(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
            .unwrap();
        // The server may have dropped it already after the table.
        if let Err(e) = garbage.write_all(&[0xa5; 4096]) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            );
        }
        let mut rest = Vec::new();
        // Closed (or reset, as the server left bytes unread).
        match garbage.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert_eq!(
            echo(&witness, "after garbage").await.unwrap(),
            "after garbage"
        );

        // A client that starts a process and dies mid-call (its read and
        // wait in flight): the process is killed.
        let mut quitter = Command::new(capsa_bin())
            .args(["exec", "--connect", &address.to_string()])
            .arg(guests_dir().join("hello.wasm"))
            .args(["--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Its process runs once an echo of our bytes comes back.
        quitter.stdin.as_mut().unwrap().write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        quitter
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut pong)
            .unwrap();
        assert_eq!(&pong, b"ping");
        quitter.kill().unwrap();
        quitter.wait().unwrap();
        served.wait_log("killed cell=hello#");
        assert_eq!(
            echo(&witness, "after quitter").await.unwrap(),
            "after quitter"
        );

        // Half a message, then gone.
        let mut half = std::os::unix::net::UnixStream::connect(&path).unwrap();
        half.write_all(&[0, 0, 0, 0, 8, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(half);

        // 1,000 connections at once: those past the limit are closed at
        // once; the witness does not notice.
        let start = Instant::now();
        let mut flood = Vec::new();
        for _ in 0..1000 {
            flood.push(std::os::unix::net::UnixStream::connect(&path).unwrap());
        }
        let mut closed = 0;
        for s in &mut flood[100..] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            if matches!(s.read(&mut b), Ok(0)) {
                closed += 1;
            }
        }
        // At most the limit's worth of them can have found a free slot.
        assert!(closed >= 900 - 16, "only {closed} of 900 closed");
        assert_eq!(
            echo(&witness, "during flood").await.unwrap(),
            "during flood"
        );
        drop(flood);
        assert!(start.elapsed() < Duration::from_secs(30));

        // A new client once the flood has gone.
        let start = Instant::now();
        loop {
            let late = serve::connect(&address, None, None).await.unwrap().executor;
            match tokio::time::timeout(Duration::from_secs(2), echo(&late, "late")).await {
                Ok(Ok(s)) => {
                    assert_eq!(s, "late");
                    break;
                }
                _ => assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "never served again"
                ),
            }
        }
    });
}

/// A process's resident memory in MiB.
fn rss_mib(pid: u32) -> u64 {
    rss_kib_of(&pid.to_string()) / 1024
}

/// Over a socket: a client that pipelines 20,000 `echo` calls of 64 KiB and
/// never reads a reply would grow the server by more than a GiB; the server
/// stops reading that client once 4 MiB of replies wait, and keeps serving
/// the others.
#[test]
fn a_client_that_never_reads_its_replies_is_held_back() {
    let dir = scratch("flood");
    let served = Served::start(&["--listen", &sock_arg(&dir), "-v"]);
    let path = unix_path(&served.address).to_path_buf();
    let address = served.address.clone();
    local(async {
        let witness = serve::connect(&address, None, None).await.unwrap().executor;
        assert_eq!(echo(&witness, "before").await.unwrap(), "before");
        let before = rss_mib(served.child.id());
        let flood = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut writer = flood.try_clone().unwrap();
        let writing = std::thread::spawn(move || {
            let mut out = std::io::BufWriter::new(&mut writer);
            capsa_schema::hostile::echo_flood(&mut out, 20_000, 65_536, Finish::Each)
        });
        let mut grown = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            grown = grown.max(rss_mib(served.child.id()).saturating_sub(before));
        }
        assert!(grown < 128, "the server grew by {grown} MiB");
        assert!(!writing.is_finished(), "the server read all 1.25 GiB");
        assert_eq!(echo(&witness, "during").await.unwrap(), "during");
        // Closing the socket ends the writer, and the server forgets the
        // connection.
        flood.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(writing.join().unwrap().is_err());
        drop(flood);
        assert_eq!(echo(&witness, "after").await.unwrap(), "after");
    });
}

/// Soak: clients that connect, run a program and disconnect, one after
/// another, leave the server's threads, fds and memory where they were.
/// `CAPSA_SOAK_CONNECTIONS` sets the count (PLAN.md's figures come from
/// 1,000).
#[test]
fn soak_connect_run_disconnect_cycles_leave_the_server_as_it_was() {
    let cycles = soak_cycles("CAPSA_SOAK_CONNECTIONS", 200);
    let dir = scratch("soak");
    let served = Served::start(&["--listen", &sock_arg(&dir)]);
    let address = served.address.clone();
    let pid = served.child.id().to_string();
    let hello = guest("hello");
    local(async {
        let cycle = || async {
            let conn = serve::connect(&address, None, None).await.unwrap();
            let p = run(
                &conn.executor,
                &hello,
                Run {
                    args: &["soak"],
                    stdio: StdioMode::Data,
                    ..Run::default()
                },
            )
            .await
            .unwrap();
            let out = stdout_of(&p).await;
            assert!(String::from_utf8_lossy(&out).contains("soak"));
            assert_eq!(wait(&p).await, ExitStatus::Exited(0));
            drop(p);
            conn.close().await;
        };
        for _ in 0..5 {
            cycle().await;
        }
        let settled = || {
            let start = Instant::now();
            let mut last = (thread_count_of(&pid), open_fds_of(&pid));
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let now = (thread_count_of(&pid), open_fds_of(&pid));
                if now == last || start.elapsed() > Duration::from_secs(15) {
                    return now;
                }
                last = now;
            }
        };
        let (before, rss) = (settled(), rss_mib(served.child.id()));
        let start = Instant::now();
        for _ in 0..cycles {
            cycle().await;
        }
        let took = start.elapsed();
        let (after, rss_after) = (settled(), rss_mib(served.child.id()));
        eprintln!(
            "soak: {cycles} connect/run/disconnect cycles in {:.1} s ({:.1} ms each); \
             server RSS {rss} -> {rss_after} MiB; threads {} -> {}; fds {} -> {}",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e3 / cycles.max(1) as f64,
            before.0,
            after.0,
            before.1.len(),
            after.1.len()
        );
        assert_eq!(after, before, "threads or fds left behind in the server");
        assert!(
            rss_after < rss + 16,
            "server RSS grew from {rss} to {rss_after} MiB"
        );
    });
}

#[test]
fn tcp_is_loopback_only_and_a_token_is_checked_before_any_capability() {
    let state = scratch("tcp-state");
    let log = Served::try_start_with(
        &["--listen", "tls:0.0.0.0:0", "--allow-remote"],
        &[("XDG_STATE_HOME", state.to_str().unwrap())],
    )
    .err()
    .unwrap();
    assert!(log.contains("needs --token-file"), "{log}");
    let log = Served::try_start(&["--listen", "tcp:0.0.0.0:0"])
        .err()
        .unwrap();
    assert!(log.contains("not a loopback address"), "{log}");
    // Plain TCP is never remote: the token would cross the network in
    // clear text. The refusal names the fix.
    let log = Served::try_start(&["--listen", "tcp:0.0.0.0:0", "--allow-remote"])
        .err()
        .unwrap();
    assert!(
        log.contains("--allow-remote needs a TLS listener (--listen tls:0.0.0.0:0)"),
        "{log}"
    );

    let dir = scratch("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tf = token_file.to_str().unwrap();
    let log = Served::try_start(&["--listen", "tcp:127.0.0.1:0", "--token-file", tf])
        .err()
        .unwrap();
    assert!(log.contains("readable by others"), "{log}");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A token on loopback TCP (other users of this machine).
    let served = Served::start(&["--listen", "tcp:127.0.0.1:0", "--token-file", tf]);
    let address = served.address.clone();
    local(async {
        let wrong = Token::new("not-the-right-token-at-all").unwrap();
        let exec = serve::connect(&address, Some(&wrong), None)
            .await
            .unwrap()
            .executor;
        let refused = tokio::time::timeout(Duration::from_secs(10), echo(&exec, "x"))
            .await
            .expect("a wrong token closes the connection");
        assert!(refused.is_err(), "{refused:?}");

        let right = Token::from_file(&token_file).unwrap();
        let exec = serve::connect(&address, Some(&right), None)
            .await
            .unwrap()
            .executor;
        assert_eq!(echo(&exec, "authorized").await.unwrap(), "authorized");
    });
    // `capsa exec` sends it too.
    let out = Command::new(capsa_bin())
        .args([
            "exec",
            "--connect",
            &address.to_string(),
            "--token-file",
            tf,
        ])
        .arg(guests_dir().join("hello.wasm"))
        .args(["--", "with", "token"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a plain WASI program: with token\n"
    );
}

#[test]
fn pid0_on_one_host_runs_children_on_another() {
    // Two hosts on loopback. This test holds a connection to each and
    // hands host B's Executor to PID0 on host A as its bootstrap: PID0's
    // calls go PID0 -> A -> this process -> B (level-one RPC: each middle
    // party proxies).
    let a = Served::start(&["--listen", "tcp:127.0.0.1:0", "-v"]);
    let b = Served::start(&["--listen", "tcp:127.0.0.1:0", "-v"]);
    let status = local(async {
        let exec_a = serve::connect(&a.address, None, None)
            .await
            .unwrap()
            .executor;
        let exec_b = serve::connect(&b.address, None, None)
            .await
            .unwrap()
            .executor;
        let mut req = exec_a.run_bytes_request();
        req.get().set_bytes(&guest("pid0"));
        let mut o = req.get().init_options();
        o.set_stdio(StdioMode::Rpc);
        o.set_name("pid0");
        o.init_bootstrap()
            .init_capability()
            .set_as_capability(exec_b.client.hook.clone());
        let p = req
            .send()
            .promise
            .await
            .unwrap()
            .get()
            .unwrap()
            .get_process()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), wait(&p)).await
    });
    let (log_a, log_b) = (a.log(), b.log());
    assert_eq!(
        status.ok(),
        Some(ExitStatus::Exited(0)),
        "A:\n{log_a}\nB:\n{log_b}"
    );
    // PID0 ran on A; its children ran on B, as B's own log says.
    a.wait_log("[pid0#0] pid0: demo complete");
    for name in [
        "cell=child#",
        "cell=grandchild#",
        "cell=hello#",
        "cell=hello-p1#",
    ] {
        b.wait_log(name);
    }
    a.wait_log("cell=pid0#0");
    let (log_a, log_b) = (a.log(), b.log());
    for name in ["child#", "hello#", "hello-p1#"] {
        assert!(!log_a.contains(name), "{name} ran on A:\n{log_a}");
    }
    assert!(!log_b.contains("pid0#"), "{log_b}");
}

#[test]
fn the_embedding_api_serves_each_caller_its_own_executor() {
    let host = capsa::embed::start(HostConfig {
        max_children: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let hello = guest("hello");
    local(async {
        let one = host.executor();
        let two = host.executor();
        let p = run(
            &one,
            &hello,
            Run {
                args: &["embedded"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&stdout_of(&p).await),
            "hello from a plain WASI program: embedded\n"
        );
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
        // One live child each: `one`'s quota is used, `two`'s is not.
        let cat = Run {
            args: &["cat"],
            stdio: StdioMode::Data,
            ..Run::default()
        };
        let _held = run(&one, &hello, Run { ..cat }).await.unwrap();
        assert!(run(&one, &hello, Run { ..cat }).await.is_err());
        let other = run(&two, &hello, Run { ..cat }).await.unwrap();
        // Shutting the host down kills what runs: the waiter hears
        // "killed", or that the host is gone.
        let waiting = other.wait_request().send().promise;
        std::thread::spawn(move || host.shutdown());
        match tokio::time::timeout(Duration::from_secs(10), waiting).await {
            Ok(Ok(r)) => assert_eq!(
                ExitStatus::read_from(r.get().unwrap().get_status().unwrap()).unwrap(),
                ExitStatus::Killed
            ),
            Ok(Err(e)) => assert!(e.to_string().contains("isconnect"), "{e}"),
            Err(_) => panic!("the process outlived its host"),
        }
    });
}

/// Runs `cmd` to its end with its output captured, killing it (and saying
/// what it printed) if it takes longer than `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {limit:?}; it printed:\n{}\n{}",
                String::from_utf8_lossy(&out.join().unwrap()),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The Python example against `capsa serve`: echo, a WASM program and an
/// ELF, the last through `vm_args` (a microVM or the agent as a process).
fn python_example_against_capsa_serve(name: &str, vm_args: &[String]) {
    let python = std::env::var_os("CAPSA_PYTHON").unwrap_or_else(|| {
        panic!(
            "CAPSA_PYTHON is not set: it names a Python with pycapnp installed; \
             `cargo xtask test` creates one and sets it"
        )
    });
    let busybox = std::env::var_os("CAPSA_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "CAPSA_BUSYBOX is not set: `cargo xtask test` installs busybox-static and sets it"
            )
        });
    let dir = scratch(name);
    let listen = sock_arg(&dir);
    let granted = dir.join("out");
    std::fs::create_dir(&granted).unwrap();
    let mut args = vec![
        "--listen".to_string(),
        listen.clone(),
        "--dir".to_string(),
        format!("out={}", granted.display()),
    ];
    args.extend(vm_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _served = Served::start(&args);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/capsa_client.py");
    let out = output_within(
        Command::new(&python)
            .arg(&example)
            .args(["--connect", &listen, "--wasm"])
            .arg(guests_dir().join("hello.wasm"))
            .arg("--elf")
            .arg(&busybox)
            .arg("--files")
            .arg(guests_dir().join("files.wasm")),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("echo: hello from python"), "{stderr}");
    assert!(
        stdout.contains("hello from a plain WASI program: from python\n"),
        "{stdout}"
    );
    assert!(stderr.contains("wasm: exited 0"), "{stderr}");
    assert!(stdout.contains("hello from an ELF, via python"), "{stdout}");
    assert!(stderr.contains("elf: exited 0"), "{stderr}");
    // A WASM child wrote into the directory the server offers, and the
    // client read it back through the same capability.
    assert!(
        stderr.contains(r"files: exited 0, read back b'written by a WASM child\n'"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(granted.join("from-wasm.txt")).unwrap(),
        "written by a WASM child\n"
    );
}

/// ELF executables through the agent as a host process, so the same client
/// path runs on machines without usable KVM.
#[test]
fn the_python_example_runs_against_capsa_serve() {
    let agent = agent_bin();
    assert!(
        agent.exists(),
        "{}: `cargo xtask test` builds the agent",
        agent.display()
    );
    python_example_against_capsa_serve(
        "python",
        &["--vm-as-process".into(), agent.display().to_string()],
    );
}

mod native_kvm {
    use super::*;

    /// The Python example's ELF in a real microVM.
    #[test]
    fn the_python_example_runs_an_elf_in_a_microvm() {
        let var = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("{name} is not set: run `cargo xtask test`"))
        };
        python_example_against_capsa_serve(
            "python-vm",
            &[
                "--allow-vm".into(),
                "--kernel".into(),
                var("CAPSA_KERNEL"),
                "--initramfs".into(),
                var("CAPSA_INITRAMFS"),
                "--vm-ready-timeout".into(),
                "120".into(),
            ],
        );
    }
}
