//! The agent as an ordinary process (`--listen unix:PATH`), driven over the
//! same Cap'n Proto path a host uses to reach it inside a VM. The programs it
//! runs are the host's own `/bin` executables, sent as bytes.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa_schema::argv::DEFAULT_ARGV0;
use capsa_schema::capsa_capnp::{byte_source, directory, executor, process, WriteMode};
use capsa_schema::status::ExitStatus as Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// A running `capsa-agent --listen unix:...` with its own temporary folder.
struct Agent {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Agent {
    fn start(extra: &[&str]) -> Agent {
        Agent::launch(extra, |_| {})
    }

    /// As `start`, with the agent's command adjusted by `adjust` first.
    fn launch(extra: &[&str], adjust: impl FnOnce(&mut Command)) -> Agent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "capsa-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        // CAPSA_AGENT_BIN runs the same tests against another build of the
        // agent, such as the static musl binary that goes into the initramfs.
        let program = std::env::var_os("CAPSA_AGENT_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_capsa-agent").into());
        let mut command = Command::new(program);
        command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(extra)
            .arg("--work-dir")
            .arg(dir.join("work"))
            .env("TMPDIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().unwrap();
        // The agent's log: wait for its "listening" line, then keep draining.
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = ready_tx.send(());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent did not start listening");
        Agent { child, dir, socket }
    }

    /// The agent's private folder for the executables it writes.
    fn exec_dir(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Agent {
    /// Sends SIGTERM and waits up to ten seconds for the agent to exit; an
    /// agent that is still there is killed, and the test fails.
    fn terminate(&mut self) -> Result<(), String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err("the agent did not stop within 10 s of SIGTERM".into())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let stopped = self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Err(e) = stopped {
            if !std::thread::panicking() {
                panic!("{e}");
            }
        }
    }
}

/// Runs `f` on a single-threaded runtime inside a `LocalSet`, as capnp-rpc needs.
fn local<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("test timed out")
    })
}

async fn connect(socket: &Path) -> executor::Client {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, w) = stream.into_split();
    let network = twoparty::VatNetwork::new(
        r.compat(),
        w.compat_write(),
        Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let executor: executor::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    executor
}

/// What a run gets: the client layer's `Spawn`, shared with the host's
/// tests, PID0 and `capsa exec`.
use capsa_client::Spawn as Run;

fn bin(name: &str) -> Vec<u8> {
    std::fs::read(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

async fn run(
    executor: &executor::Client,
    bytes: &[u8],
    run: Run<'_>,
) -> Result<process::Client, capnp::Error> {
    run.start(executor, bytes).await
}

async fn wait(p: &process::Client) -> Status {
    capsa_client::wait(p).await.unwrap()
}

async fn read_all(source: &byte_source::Client) -> Vec<u8> {
    capsa_client::read_to_end(source).await.unwrap()
}

async fn stdout_of(p: &process::Client) -> Vec<u8> {
    read_all(&p.stdout_request().send().pipeline.get_source()).await
}

/// Runs `bytes` to its end: its stdout, its stderr and how it ended.
async fn outcome(ex: &executor::Client, bytes: &[u8], opts: Run<'_>) -> (String, String, Status) {
    let p = run(ex, bytes, opts).await.unwrap();
    let out = capsa_client::output(&p).await.unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (text(out.stdout), text(out.stderr), out.status)
}

fn error_of<T>(result: Result<T, capnp::Error>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

async fn echo(ex: &executor::Client, message: &str) -> String {
    capsa_client::echo(ex, message).await.unwrap()
}

#[test]
fn echo_returns_the_message() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        assert_eq!(echo(&ex, "hello agent").await, "hello agent");
    });
}

/// Whoever starts the agent may stop it the moment it says it is
/// listening, even when it inherited SIGTERM ignored (as children of some
/// supervisors and shells do): it must already be watching for the signal.
#[test]
#[expect(unsafe_code, reason = "pre_exec runs code between fork and exec")]
fn sigterm_right_after_listening_stops_the_agent() {
    use std::os::unix::process::CommandExt;
    for _ in 0..20 {
        let mut agent = Agent::launch(&[], |command| {
            // SAFETY: between fork and exec only `sigaction` runs, which is
            // async-signal-safe, and nothing is allocated.
            unsafe {
                command.pre_exec(|| {
                    nix::sys::signal::signal(
                        nix::sys::signal::Signal::SIGTERM,
                        nix::sys::signal::SigHandler::SigIgn,
                    )
                    .map(drop)
                    .map_err(std::io::Error::from)
                });
            }
        });
        agent.terminate().unwrap();
    }
}

#[test]
fn the_socket_is_private() {
    let agent = Agent::start(&[]);
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn runs_an_elf_with_its_arguments() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/echo"),
            Run {
                args: &["hello", "world"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&p).await, b"hello world\n");
        assert_eq!(wait(&p).await, Status::Exited(0));
    });
    // The executable is removed once the process has ended (the machine's
    // root folder stays).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(agent.exec_dir())
        .unwrap()
        .any(|e| e.unwrap().file_name() != "root")
    {
        assert!(Instant::now() < deadline, "the executable was left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A finished program's output ends with its last bytes: one read after
/// `wait` gets them and `eof` together.
#[test]
fn output_read_after_wait_ends_with_its_last_bytes() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/echo"),
            Run {
                args: &["last"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, Status::Exited(0));
        let stdout = p.stdout_request().send().pipeline.get_source();
        let read = |max: u32| {
            let mut request = stdout.read_request();
            request.get().set_max_bytes(max);
            async move {
                let response = request.send().promise.await.unwrap();
                let chunk = response.get().unwrap();
                (chunk.get_data().unwrap().to_vec(), chunk.get_eof())
            }
        };
        assert_eq!(read(1 << 16).await, (b"last\n".to_vec(), true));
        assert_eq!(read(1 << 16).await, (Vec::new(), true));
    });
}

/// A program loaded once runs many times without its bytes, is found by
/// its hash while someone holds it, and says what it is.
#[test]
fn a_loaded_program_runs_again_without_its_bytes() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let bytes = bin("/bin/echo");
        let mut req = ex.load_request();
        req.get().set_bytes(&bytes);
        let program = req.send().pipeline.get_program();
        for word in ["one", "two"] {
            let mut req = program.run_request();
            req.get().init_args(1).set(0, word);
            let p = req.send().pipeline.get_process();
            assert_eq!(stdout_of(&p).await, format!("{word}\n").as_bytes());
            assert_eq!(wait(&p).await, Status::Exited(0));
        }
        let info = program.info_request().send().promise.await.unwrap();
        let info = info.get().unwrap();
        let hash = info.get_hash().unwrap().to_vec();
        assert_eq!(hash.len(), 32);
        assert_eq!(info.get_size(), bytes.len() as u64);
        assert_eq!(info.get_format().unwrap().to_str().unwrap(), "elf");

        let find = |hash: Vec<u8>| {
            let mut req = ex.program_request();
            req.get().set_hash(&hash);
            req.send().promise
        };
        {
            let response = find(hash.clone()).await.unwrap();
            let found = response.get().unwrap().get_program().unwrap();
            let mut req = found.run_request();
            req.get().init_args(1).set(0, "found");
            let p = req.send().pipeline.get_process();
            assert_eq!(stdout_of(&p).await, b"found\n");
            assert_eq!(wait(&p).await, Status::Exited(0));
        }

        // Nobody holds it any more (releases cross the connection after
        // the drops): the machine keeps no bytes.
        drop(program);
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match find(hash.clone()).await {
                Err(e) => break e.to_string(),
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(_) => panic!("the program outlived every holder"),
            }
        };
        assert!(err.contains("notFound"), "{err}");
        let err = error_of(find(vec![1; 31]).await);
        assert!(err.contains("badRequest"), "{err}");

        let mut req = ex.load_request();
        req.get().set_bytes(b"#!/bin/sh\n");
        let err = error_of(req.send().promise.await);
        assert!(err.contains("badPayload"), "{err}");
    });
}

#[test]
fn exit_codes_and_signals_are_reported() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let sh = bin("/bin/sh");
        let p = run(
            &ex,
            &sh,
            Run {
                args: &["-c", "exit 7"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, Status::Exited(7));
        let p = run(
            &ex,
            &sh,
            Run {
                args: &["-c", "echo oops >&2; exit 0"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let stderr = read_all(&p.stderr_request().send().pipeline.get_source()).await;
        assert_eq!(stderr, b"oops\n");
        assert_eq!(wait(&p).await, Status::Exited(0));
        let p = run(
            &ex,
            &sh,
            Run {
                args: &["-c", "kill -SEGV $$"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        match wait(&p).await {
            Status::Failed(m) => assert!(m.starts_with("killed by signal 11"), "{m}"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn the_environment_and_name_are_exactly_those_given() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/usr/bin/env"),
            Run {
                env: &[("A", "1"), ("B", "two words")],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&p).await, b"A=1\nB=two words\n");
        assert_eq!(wait(&p).await, Status::Exited(0));

        let p = run(
            &ex,
            &bin("/bin/sh"),
            Run {
                args: &["-c", "cat /proc/$$/cmdline"],
                name: "my-tool",
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let cmdline = stdout_of(&p).await;
        assert!(
            cmdline.starts_with(b"my-tool\0-c\0"),
            "{:?}",
            String::from_utf8_lossy(&cmdline)
        );

        let err = error_of(
            run(
                &ex,
                &bin("/bin/true"),
                Run {
                    env: &[("A=B", "1")],
                    ..Run::default()
                },
            )
            .await,
        );
        assert!(err.contains("contains '='"), "{err}");
    });
}

/// Every option is read and checked, also those an ELF has no use for,
/// as the host reads them: a request one side refuses, the other refuses
/// too.
#[test]
fn options_an_elf_ignores_are_checked_all_the_same() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let mut request = Run::default().run_bytes(&ex, &bin("/bin/true"));
        request
            .get()
            .get_options()
            .unwrap()
            .init_bootstrap()
            .init_capability()
            .set_as::<capnp::text::Owned>("not a capability")
            .unwrap();
        let err = error_of(request.send().promise.await);
        assert!(err.contains("capability"), "{err}");
        // The connection still serves.
        let p = run(&ex, &bin("/bin/true"), Run::default()).await.unwrap();
        assert_eq!(wait(&p).await, Status::Exited(0));
    });
}

#[test]
fn argv0_is_the_name_or_the_shared_default() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let sh = bin("/bin/sh");
        let default = format!("{DEFAULT_ARGV0}\n");
        // An empty name reads as an unset one.
        for (name, expected) in [("myname", "myname\n"), ("", default.as_str())] {
            let opts = Run {
                args: &["-c", "echo $0"],
                name,
                ..Run::default()
            };
            assert_eq!(
                outcome(&ex, &sh, opts).await,
                (expected.into(), "".into(), Status::Exited(0)),
                "name {name:?}"
            );
        }
    });
}

/// Every thread of the agent runs under its seccomp filter but the one
/// that starts programs, and the programs it runs are not filtered (they
/// can run others in turn).
#[test]
fn the_agent_is_confined_and_its_programs_are_not() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let script = "for t in /proc/$PPID/task/*; do \
                echo \"$(cat $t/comm) $(grep Seccomp: $t/status | cut -f2)\"; \
            done; \
            echo \"program $(grep Seccomp: /proc/self/status | cut -f2)\"";
        let opts = Run {
            args: &["-c", script],
            env: &[("PATH", "/usr/bin:/bin")],
            ..Run::default()
        };
        let (out, err, status) = outcome(&ex, &bin("/bin/sh"), opts).await;
        assert_eq!(status, Status::Exited(0), "{err}");
        let modes: Vec<(&str, &str)> = out
            .lines()
            .map(|l| l.rsplit_once(' ').unwrap_or((l, "")))
            .collect();
        assert!(modes.contains(&("program", "0")), "{out}");
        assert!(modes.contains(&("spawner", "0")), "{out}");
        let confined = modes
            .iter()
            .filter(|(name, _)| !["program", "spawner"].contains(name));
        let mut threads = 0;
        for (name, mode) in confined {
            assert_eq!(*mode, "2", "thread {name} is not filtered: {out}");
            threads += 1;
        }
        assert!(threads >= 1, "{out}");
    });
}

#[test]
fn busybox_without_a_name_runs_the_applet_its_arguments_name() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let busybox =
            bin(&std::env::var("CAPSA_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into()));
        let opts = Run {
            args: &["echo", "hi"],
            ..Run::default()
        };
        assert_eq!(
            outcome(&ex, &busybox, opts).await,
            ("hi\n".into(), "".into(), Status::Exited(0))
        );
    });
}

#[test]
fn stdin_and_stdout_round_trip_through_cat() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(&ex, &bin("/bin/cat"), Run::default()).await.unwrap();
        let sink = capsa_client::stdin(&p).await.unwrap();
        let input: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let input = input.clone();
            tokio::task::spawn_local(async move {
                for chunk in input.chunks(100_000) {
                    let mut req = sink.write_request();
                    req.get().set_data(chunk);
                    req.send().await.unwrap();
                }
                sink.close_request().send().promise.await.unwrap();
            })
        };
        let out = stdout_of(&p).await;
        writer.await.unwrap();
        assert_eq!(out.len(), input.len());
        assert!(out == input);
        assert_eq!(wait(&p).await, Status::Exited(0));
    });
}

/// Keeps what is pushed into it and notes the close.
#[derive(Default)]
struct Kept {
    bytes: std::cell::RefCell<Vec<u8>>,
    closed: std::cell::Cell<bool>,
}

struct KeptSink(std::rc::Rc<Kept>);

impl capsa_schema::capsa_capnp::byte_sink::Server for KeptSink {
    async fn write(
        self: std::rc::Rc<Self>,
        params: capsa_schema::capsa_capnp::byte_sink::WriteParams,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        self.0.bytes.borrow_mut().extend_from_slice(data);
        Ok(())
    }

    async fn close(
        self: std::rc::Rc<Self>,
        _: capsa_schema::capsa_capnp::byte_sink::CloseParams,
        _: capsa_schema::capsa_capnp::byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        self.0.closed.set(true);
        Ok(())
    }
}

/// `stdoutTo`/`stderrTo` on the agent's own Executor: the output is pushed
/// into the caller's sinks, all of it there when `wait` answers (asked
/// before anything was written), and the pushed stream cannot be pulled.
#[test]
fn output_is_pushed_into_the_callers_sinks() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let (out, err) = (
            std::rc::Rc::new(Kept::default()),
            std::rc::Rc::new(Kept::default()),
        );
        let out_sink: capsa_schema::capsa_capnp::byte_sink::Client =
            capnp_rpc::new_client(KeptSink(out.clone()));
        let err_sink: capsa_schema::capsa_capnp::byte_sink::Client =
            capnp_rpc::new_client(KeptSink(err.clone()));
        let p = run(
            &ex,
            &bin("/bin/sh"),
            Run {
                // 1.3 MB, far past the pipe, with nobody reading.
                args: &["-c", "seq 1 200000; echo done >&2"],
                stdout_to: Some(&out_sink),
                stderr_to: Some(&err_sink),
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, Status::Exited(0));
        let expected: Vec<u8> = (1..=200_000)
            .map(|n| format!("{n}\n"))
            .collect::<String>()
            .into();
        assert!(out.closed.get() && err.closed.get());
        assert!(
            *out.bytes.borrow() == expected,
            "{} bytes of {}",
            out.bytes.borrow().len(),
            expected.len()
        );
        assert_eq!(*err.bytes.borrow(), b"done\n");
        let pulled = p.stdout_request().send().promise.await.map(drop);
        assert_eq!(kind_of(pulled), capsa_schema::ErrorKind::WrongMode);
    });
}

#[test]
fn a_writer_nobody_reads_is_held_back() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let before = agent.rss_kib();
        let p = run(
            &ex,
            &bin("/bin/sh"),
            Run {
                args: &["-c", "exec head -c 500000000 /dev/zero"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let waited = tokio::time::timeout(Duration::from_millis(10), wait(&p)).await;
        assert!(waited.is_err(), "the writer finished without a reader");
        let grown = agent.rss_kib().saturating_sub(before);
        assert!(grown < 16 << 10, "the agent grew by {grown} KiB");
        // A reader gets the bytes in bounded chunks.
        let source = p.stdout_request().send().pipeline.get_source();
        let mut req = source.read_request();
        req.get().set_max_bytes(4096);
        let resp = req.send().promise.await.unwrap();
        assert_eq!(resp.get().unwrap().get_data().unwrap().len(), 4096);
        p.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&p).await, Status::Killed);
    });
}

#[test]
fn any_number_of_waiters_get_the_same_status() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/sh"),
            Run {
                args: &["-c", "sleep 0.3; exit 3"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let p = p.clone();
                tokio::task::spawn_local(async move { wait(&p).await })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Status::Exited(3));
        }
        assert_eq!(wait(&p).await, Status::Exited(3));
    });
}

#[test]
fn kill_ends_a_sleeping_process_at_once() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/sleep"),
            Run {
                args: &["1000"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let start = Instant::now();
        p.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&p).await, Status::Killed);
        assert!(start.elapsed() < Duration::from_secs(5));
        // Killing again after the end changes nothing.
        p.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&p).await, Status::Killed);
    });
}

#[test]
fn the_deadline_is_enforced() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let start = Instant::now();
        let p = run(
            &ex,
            &bin("/bin/sleep"),
            Run {
                args: &["1000"],
                deadline_ms: 300,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, Status::DeadlineExceeded);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(10),
            "{took:?}"
        );
    });
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; the agent reaps its children, so an
    // ended child's entry goes away.
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn dropping_the_process_kills_it_and_its_group() {
    let agent = Agent::start(&[]);
    let pids: Vec<i32> = local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/sh"),
            Run {
                args: &["-c", "/bin/sleep 1000 & echo $$ $!; wait"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let source = p.stdout_request().send().pipeline.get_source();
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            let resp = source.read_request().send().promise.await.unwrap();
            line.extend_from_slice(resp.get().unwrap().get_data().unwrap());
        }
        drop(source);
        drop(p);
        // Let the release reach the agent.
        ex.echo_request().send().promise.await.unwrap();
        String::from_utf8(line)
            .unwrap()
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect()
    });
    assert_eq!(pids.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&pid| alive(pid)) {
        assert!(
            Instant::now() < deadline,
            "{pids:?} still alive after the Process was dropped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_payloads_are_refused_with_a_clear_error() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let err = error_of(run(&ex, b"GET / HTTP/1.1\r\n", Run::default()).await);
        assert!(
            err.contains(
                "not a WASM component, WASM module or ELF executable: first bytes 47 45 54 20"
            ),
            "{err}"
        );
        let err = error_of(run(&ex, b"\0asm\x0d\0\x01\0", Run::default()).await);
        assert!(err.contains("runs ELF executables only"), "{err}");
        let err = error_of(run(&ex, b"\x7fELF", Run::default()).await);
        assert!(err.contains("truncated"), "{err}");
        let err = error_of(run(&ex, b"", Run::default()).await);
        assert!(err.contains("empty"), "{err}");
        let echo = bin("/bin/echo");
        let mut arm = echo.clone();
        arm[18..20].copy_from_slice(&0xb7u16.to_le_bytes());
        let err = error_of(run(&ex, &arm, Run::default()).await);
        assert!(err.contains("another machine"), "{err}");
        // The connection still serves.
        let p = run(
            &ex,
            &echo,
            Run {
                args: &["ok"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&p).await, b"ok\n");
    });
}

/// An ELF process's `bootstrap()` is the Executor of the machine it runs
/// in, as on the host: more processes start through it, beside the first.
#[test]
fn an_elf_process_bootstrap_is_its_machines_executor() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/sleep"),
            Run {
                args: &["1000"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let machine: executor::Client = capnp::capability::FromClientHook::new(
            p.bootstrap_request().send().pipeline.get_cap().as_cap(),
        );
        assert_eq!(echo(&machine, "same machine").await, "same machine");
        let second = run(
            &machine,
            &bin("/bin/echo"),
            Run {
                args: &["second"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&second).await, b"second\n");
    });
}

#[test]
fn garbage_on_a_connection_drops_only_that_connection() {
    let agent = Agent::start(&[]);
    local(async {
        let mut raw = tokio::net::UnixStream::connect(&agent.socket)
            .await
            .unwrap();
        // A segment table claiming 2^32 segments, then noise.
        raw.write_all(&[0xff; 64]).await.unwrap();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the agent kept a connection that sent garbage"
        );

        let ex = connect(&agent.socket).await;
        let mut req = ex.echo_request();
        req.get().set_message("still here");
        let resp = req.send().promise.await.unwrap();
        assert_eq!(
            resp.get()
                .unwrap()
                .get_response()
                .unwrap()
                .to_str()
                .unwrap(),
            "still here"
        );
    });
}

#[test]
fn once_exits_after_the_first_connection() {
    let mut agent = Agent::start(&["--once"]);
    local(async {
        let ex = connect(&agent.socket).await;
        let p = run(
            &ex,
            &bin("/bin/sleep"),
            Run {
                args: &["1000"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        ex.echo_request().send().promise.await.unwrap();
        drop(p);
    });
    // The runtime (and with it the connection) is gone: the agent exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after its only connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!agent.socket.exists(), "the socket file was left behind");
    assert!(
        !agent.exec_dir().exists(),
        "the private folder was left behind"
    );
}

/// A folder of the test's, served as a Directory from the test's side of
/// the connection, as a host serves its grants.
fn served(path: &Path) -> directory::Client {
    capsa_directory::Directories::default()
        .open(path, false)
        .unwrap()
        .0
}

fn kind_of<T>(result: Result<T, capnp::Error>) -> capsa_schema::ErrorKind {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => capsa_schema::error::kind(&e),
    }
}

/// A program granted a directory finds it at its guest path; what it
/// creates, changes and removes there is back in the granting folder by the
/// time `wait` answers, and the copy is gone from the machine.
#[test]
fn a_granted_directory_is_copied_in_and_written_back() {
    let agent = Agent::start(&[]);
    let shared = agent.dir.join("shared");
    std::fs::create_dir_all(shared.join("old")).unwrap();
    std::fs::write(shared.join("in.txt"), "from the host\n").unwrap();
    std::fs::write(shared.join("old/gone.txt"), "x").unwrap();
    local(async {
        let ex = connect(&agent.socket).await;
        let dir = served(&shared);
        let script = "cat /data/in.txt data/in.txt; echo made > data/out.txt \
             && rm -r data/old && mkdir data/sub && echo deep > data/sub/f \
             && echo more >> data/in.txt";
        let (out, err, status) = outcome(
            &ex,
            &bin("/bin/sh"),
            Run {
                name: "sh",
                args: &["-c", script],
                dirs: &[("/data", &dir)],
                ..Run::default()
            },
        )
        .await;
        // The agent as a process: "/data" lands beneath the machine's root,
        // the program's working directory; "/data" itself is not there.
        assert!(out.contains("from the host\n"), "{out:?} {err:?}");
        assert!(err.contains("/data/in.txt"), "{err:?}");
        assert_eq!(status, Status::Exited(0), "{err}");
    });
    let read = |p: &str| std::fs::read_to_string(shared.join(p)).unwrap();
    assert_eq!(read("out.txt"), "made\n");
    assert_eq!(read("in.txt"), "from the host\nmore\n");
    assert_eq!(read("sub/f"), "deep\n");
    assert!(!shared.join("old").exists(), "a removed folder came back");
    assert!(
        !agent.exec_dir().join("root/data").exists(),
        "the copy was left in the machine"
    );
}

/// `Executor.directories` is the machine's filesystem: files put there are
/// what its programs see, and what they write can be read back.
#[test]
fn the_machines_filesystem_is_its_executors_directory() {
    let agent = Agent::start(&[]);
    local(async {
        let ex = connect(&agent.socket).await;
        let resp = ex.directories_request().send().promise.await.unwrap();
        let grants = resp.get().unwrap().get_grants().unwrap();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants.get(0).get_path().unwrap().to_str().unwrap(), "/");
        let root = grants.get(0).get_directory().unwrap();

        let sink = capsa_client::create(&root, "given.txt", WriteMode::Truncate)
            .await
            .unwrap();
        capsa_client::write_all(&sink, b"put by the caller")
            .await
            .unwrap();

        let (out, _, status) = outcome(
            &ex,
            &bin("/bin/sh"),
            Run {
                name: "sh",
                args: &["-c", "cat given.txt; echo result > made.txt"],
                ..Run::default()
            },
        )
        .await;
        assert_eq!(
            (out.as_str(), status),
            ("put by the caller", Status::Exited(0))
        );

        let mut get = root.read_request();
        get.get().set_path("made.txt");
        let source = get.send().pipeline.get_source();
        assert_eq!(read_all(&source).await, b"result\n");
        // It cannot be left by its own `..`.
        let mut up = root.list_request();
        up.get().set_path("..");
        assert_eq!(
            kind_of(up.send().promise.await),
            capsa_schema::ErrorKind::BadPath
        );
    });
}

/// Grants at paths that cannot take them are refused with their kind, and
/// nothing is left behind in the machine.
#[test]
fn grants_at_bad_or_busy_paths_are_refused() {
    use capsa_schema::ErrorKind;
    let agent = Agent::start(&[]);
    let shared = agent.dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let root = agent.exec_dir().join("root");
    std::fs::create_dir_all(root.join("busy")).unwrap();
    std::fs::write(root.join("busy/x"), "taken").unwrap();
    local(async {
        let ex = connect(&agent.socket).await;
        let dir = served(&shared);
        let echo = bin("/bin/echo");
        assert_eq!(
            kind_of(run_granted(&ex, &echo, "a/../b", &dir).await),
            ErrorKind::BadPath
        );
        // Text of the request: refused as the host refuses it.
        assert_eq!(
            kind_of(run_granted(&ex, &echo, "a\0b", &dir).await),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(run_granted(&ex, &echo, "/", &dir).await),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(run_granted(&ex, &echo, "busy", &dir).await),
            ErrorKind::Exists
        );

        // Two programs may not hold overlapping grants at once.
        let sleeper = run(
            &ex,
            &bin("/bin/sleep"),
            Run {
                args: &["1000"],
                dirs: &[("outer", &dir)],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            kind_of(run_granted(&ex, &echo, "outer/inner", &dir).await),
            ErrorKind::Exists
        );
        sleeper.kill_request().send().promise.await.unwrap();
        wait(&sleeper).await;
        // Free again once the first has ended.
        let p = run_granted(&ex, &echo, "outer/inner", &dir).await.unwrap();
        assert_eq!(wait(&p).await, Status::Exited(0));

        // A Directory that fails while being copied fails the run, and its
        // folder goes.
        let broken: directory::Client = capnp_rpc::new_client(Unanswering);
        let broken_run = Run {
            dirs: &[("broken", &broken)],
            ..Run::default()
        };
        assert_eq!(
            kind_of(run(&ex, &echo, broken_run).await),
            ErrorKind::Failed
        );
        assert!(
            !root.join("broken").exists(),
            "a failed copy was left behind"
        );
    });
    assert_eq!(
        std::fs::read_to_string(root.join("busy/x")).unwrap(),
        "taken"
    );
    assert!(!root.join("outer").exists());
}

/// Runs `bytes` with `dir` granted at `path`.
async fn run_granted(
    ex: &executor::Client,
    bytes: &[u8],
    path: &str,
    dir: &directory::Client,
) -> Result<process::Client, capnp::Error> {
    let run_opts = Run {
        dirs: &[(path, dir)],
        ..Run::default()
    };
    run(ex, bytes, run_opts).await
}

/// A Directory that implements nothing.
struct Unanswering;

impl directory::Server for Unanswering {}
