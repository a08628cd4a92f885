//! The WASM capability host end to end: real guests on a real host, driven
//! through the same Cap'n Proto interfaces PID0 uses.

use std::time::Duration;

use capsa::{ExitStatus, HostConfig};
use capsa_tests::*;

fn host<F, Fut, T>(f: F) -> T
where
    F: FnOnce(capsa::Host) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    with_host(HostConfig::default(), f)
}

#[test]
fn child_makes_concurrent_calls_and_spawns_a_grandchild() {
    host(|host| async move {
        let root = host.root_executor();
        let child = run(
            &root,
            &guest("child-echo"),
            Run {
                args: &["child"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let child_exec = exported_executor(&child);
        let reply = echo(&child_exec, "ping").await.unwrap();
        assert_eq!(reply, "child-echo[child]: 8 concurrent echoes ok: ping");

        // Through the child's own Executor: three levels.
        let grandchild = run(
            &child_exec,
            &guest("child-echo"),
            Run {
                args: &["grandchild"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let reply = echo(&exported_executor(&grandchild), "deep").await.unwrap();
        assert_eq!(
            reply,
            "child-echo[grandchild]: 8 concurrent echoes ok: deep"
        );
        assert_eq!(host.live_guests(), 2);
    });
}

/// Arguments and environment become the program's C strings: a NUL byte
/// would cut one short, so it is refused, as the microVM agent refuses it
/// (one parser, `capsa_schema::request`, serves both).
#[test]
fn nul_bytes_in_arguments_or_environment_are_refused() {
    host(|host| async move {
        let root = host.root_executor();
        let with = |args, env| Run {
            args,
            env,
            stdio: StdioMode::Data,
            ..Run::default()
        };
        let err = run(&root, &guest("hello"), with(&["cut\0short"], &[]))
            .await
            .err()
            .expect("an argument with a NUL");
        assert_kind(&err, ErrorKind::BadRequest, "argument 0 contains a NUL");
        let err = run(&root, &guest("hello"), with(&[], &[("A", "b\0c")]))
            .await
            .err()
            .expect("a value with a NUL");
        assert_kind(&err, ErrorKind::BadRequest, "variable A contains a NUL");
        // The host goes on serving.
        let p = run(&root, &guest("hello"), with(&["fine"], &[]))
            .await
            .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
        drop(p);
        until_nothing_runs(&host, "a child survived").await;
    });
}

#[test]
fn data_mode_runs_plain_wasi_programs_p2_and_p1() {
    host(|host| async move {
        let root = host.root_executor();
        for name in ["hello", "hello-p1"] {
            let p = run(
                &root,
                &guest(name),
                Run {
                    args: &["a", "b"],
                    stdio: StdioMode::Data,
                    ..Run::default()
                },
            )
            .await
            .unwrap();
            let out = String::from_utf8(stdout_of(&p).await).unwrap();
            assert_eq!(
                out.trim_end(),
                "hello from a plain WASI program: a b",
                "{name}"
            );
            assert_eq!(wait(&p).await, ExitStatus::Exited(0), "{name}");

            let p = run(
                &root,
                &guest(name),
                Run {
                    args: &["exit", "3"],
                    stdio: StdioMode::Data,
                    ..Run::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(wait(&p).await, ExitStatus::Exited(3), "{name}");
        }
    });
}

/// A client that reads a finished program's output learns of the end
/// with the last bytes, in one call: p2 and p1 alike.
#[test]
fn output_read_after_wait_ends_with_its_last_bytes() {
    host(|host| async move {
        let root = host.root_executor();
        for name in ["hello", "hello-p1"] {
            let p = run(
                &root,
                &guest(name),
                Run {
                    args: &["last"],
                    stdio: StdioMode::Data,
                    ..Run::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(wait(&p).await, ExitStatus::Exited(0), "{name}");
            let stdout = p.stdout_request().send().pipeline.get_source();
            let (data, eof) = read_once(&stdout, 1 << 16).await;
            assert_eq!(
                (String::from_utf8_lossy(&data).as_ref(), eof),
                ("hello from a plain WASI program: last\n", true),
                "{name}"
            );
            assert_eq!(read_once(&stdout, 1 << 16).await, (Vec::new(), true));
            let stderr = p.stderr_request().send().pipeline.get_source();
            assert_eq!(read_once(&stderr, 1 << 16).await, (Vec::new(), true));
        }
        // Asked for less than is left: not the end yet.
        let p = run(
            &root,
            &guest("hello"),
            Run {
                args: &["last"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        wait(&p).await;
        let stdout = p.stdout_request().send().pipeline.get_source();
        assert_eq!(read_once(&stdout, 5).await, (b"hello".to_vec(), false));
    });
}

#[test]
fn data_mode_streams_stdin_to_stdout() {
    host(|host| async move {
        let root = host.root_executor();
        let p = run(
            &root,
            &guest("hello"),
            Run {
                args: &["cat"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let sink = capsa_client::stdin(&p).await.unwrap();
        let input: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let writer = {
            let input = input.clone();
            let sink = sink.clone();
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
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
    });
}

#[test]
fn a_writer_nobody_reads_is_held_back() {
    host(|host| async move {
        let root = host.root_executor();
        let total = 64 << 20;
        let p = emitting(&root, total, None).await;
        // Nobody reads: the guest must be parked on a full pipe, not done.
        assert!(held_back(&p).await, "the guest finished without a reader");
        assert_eq!(stdout_of(&p).await.len(), total);
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
    });
}

/// Output pushed into the caller's sinks needs no reader: the caller waits
/// first (with pulled streams, output past the pipe's 256 KiB would hold the
/// child for ever), and every byte, stdout and stderr apart, is in the
/// sinks, closed, when `wait` answers.
#[test]
fn pushed_output_needs_no_reader_and_is_all_there_when_wait_answers() {
    host(|host| async move {
        let root = host.root_executor();
        let (out_sink, out) = Collector::open();
        let (err_sink, err) = Collector::open();
        let p = run(
            &root,
            &guest("hello"),
            Run {
                args: &["cat"],
                stdio: StdioMode::Data,
                stdout_to: Some(&out_sink),
                stderr_to: Some(&err_sink),
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let input: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let sink = capsa_client::stdin(&p).await.unwrap();
        let waited = wait_in_background(&p);
        capsa_client::write_all(&sink, &input).await.unwrap();
        assert_eq!(waited.await.unwrap(), ExitStatus::Exited(0));
        {
            let out = out.collected.borrow();
            assert!(out.closed, "stdout's sink was not closed");
            assert_eq!(out.bytes.len(), input.len());
            assert!(out.bytes == input, "stdout came out different");
        }
        assert!(err.collected.borrow().closed);

        let p = run(
            &root,
            &guest("hello"),
            Run {
                args: &["stderr"],
                stdio: StdioMode::Data,
                stderr_to: Some(&err_sink),
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
        assert_eq!(err.collected.borrow().bytes, b"hello on stderr\n");
        // stdout was not asked for: it is still pulled.
        assert_eq!(stdout_of(&p).await, b"hello on stdout\n");
    });
}

/// A sink that does not take its writes holds the child back through the
/// bounded pipe: the host buffers a bounded amount, then everything flows
/// once the sink takes writes again.
#[test]
fn a_slow_sink_holds_the_child_back() {
    host(|host| async move {
        let root = host.root_executor();
        let (sink, held) = Collector::held();
        let total = 64 << 20;
        let p = emitting(&root, total, Some(&sink)).await;
        assert!(
            held_back(&p).await,
            "the child finished into a sink that took nothing"
        );
        assert_eq!(held.collected.borrow().writes, 0);
        held.release();
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
        let c = held.collected.borrow();
        assert_eq!(c.bytes.len(), total);
        assert!(c.closed);
    });
}

/// A sink that fails does not leave the child stuck on a full pipe: the
/// rest of its output is dropped and it ends.
#[test]
fn a_failing_sink_does_not_hold_the_child() {
    host(|host| async move {
        let root = host.root_executor();
        let (sink, failing) = Collector::failing();
        let p = emitting(&root, 8 << 20, Some(&sink)).await;
        let ended = tokio::time::timeout(Duration::from_secs(60), wait(&p)).await;
        assert_eq!(
            ended.expect("stuck on a failed sink"),
            ExitStatus::Exited(0)
        );
        assert!(failing.collected.borrow().bytes.is_empty());
    });
}

/// Pushing needs data mode, and a pushed stream cannot also be pulled.
#[test]
fn pushed_streams_are_refused_in_rpc_mode_and_cannot_be_pulled() {
    host(|host| async move {
        let root = host.root_executor();
        let (sink, _) = Collector::open();
        let refused = run(
            &root,
            &guest("child-echo"),
            Run {
                stdout_to: Some(&sink),
                ..Run::default()
            },
        )
        .await
        .map(drop)
        .unwrap_err();
        assert_kind(&refused, ErrorKind::WrongMode, "need data mode");
        assert_eq!(host.live_guests(), 0, "a refused child was started");

        let p = run(
            &root,
            &guest("hello"),
            Run {
                stdio: StdioMode::Data,
                stdout_to: Some(&sink),
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_stdout_is_pushed(&p).await;
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
    });
}

#[test]
fn promise_pipelining_costs_one_round_trip() {
    host(|host| async move {
        let (root, wire) = connect(host.root_executor().client);
        echo(&root, "warm up").await.unwrap();
        let before = wire.borrow().events.len();

        // runBytes(...).process.bootstrap().echo(...) without waiting.
        let spawn = run_request(
            &root,
            &guest("child-echo"),
            Run {
                args: &["p"],
                ..Run::default()
            },
        );
        let child = spawn.pipeline.get_process();
        let exec = exported_executor(&child);
        let mut req = exec.echo_request();
        req.get().set_message("pipelined");
        let reply = req.send().promise.await.unwrap();
        assert_eq!(
            reply
                .get()
                .unwrap()
                .get_response()
                .unwrap()
                .to_str()
                .unwrap(),
            "child-echo[p]: 8 concurrent echoes ok: pipelined"
        );

        let messages: Vec<(Dir, String)> = {
            let w = wire.borrow();
            let tail = Wire {
                events: w.events[before..].to_vec(),
            };
            tail.messages()
        };
        // All three calls leave before anything comes back.
        let first_in = messages.iter().position(|(d, _)| *d == Dir::In).unwrap();
        let calls_out: Vec<_> = messages[..first_in]
            .iter()
            .filter(|(d, k)| *d == Dir::Out && k.starts_with("call"))
            .collect();
        assert_eq!(calls_out.len(), 3, "{messages:?}");
        let later_calls = messages[first_in..]
            .iter()
            .filter(|(d, k)| *d == Dir::Out && k.starts_with("call"))
            .count();
        assert_eq!(later_calls, 0, "a call waited for a reply: {messages:?}");
    });
}

#[test]
fn any_number_of_waiters_get_the_same_status() {
    host(|host| async move {
        let root = host.root_executor();
        let p = run(
            &root,
            &guest("hello"),
            Run {
                args: &["exit", "5"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let waits: Vec<_> = (0..10).map(|_| wait(&p)).collect();
        for status in futures::future::join_all(waits).await {
            assert_eq!(status, ExitStatus::Exited(5));
        }
        // And after the fact.
        assert_eq!(wait(&p).await, ExitStatus::Exited(5));
    });
}

#[test]
fn kill_interrupts_an_infinite_loop() {
    host(|host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["loop"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The loop yields at epoch ticks, so the host still serves others.
        still_healthy(&witness).await;
        p.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Killed);
        still_healthy(&witness).await;
    });
}

#[test]
fn deadline_and_cpu_budget_end_an_infinite_loop() {
    host(|host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["loop"],
                stdio: StdioMode::Data,
                deadline_ms: 200,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::DeadlineExceeded);
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["loop"],
                stdio: StdioMode::Data,
                cpu_ms: 50,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::CpuBudgetExceeded);
        // A deadline also ends a guest blocked in host I/O.
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["block-stdin"],
                stdio: StdioMode::Data,
                deadline_ms: 100,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::DeadlineExceeded);
        still_healthy(&witness).await;
    });
}

#[test]
fn dropping_the_last_process_reference_kills_the_child() {
    host(|host| async move {
        let root = host.root_executor();
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["block-stdin"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let p2 = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["loop"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(host.live_guests(), 2);
        drop((p, p2));
        until_nothing_runs(&host, "children survived their Process").await;
    });
}

#[test]
fn the_demo_pid0_runs_to_a_clean_exit() {
    host(|host| async move {
        let status = host.run_pid0(&guest("pid0"), vec![]).await.unwrap();
        assert_eq!(status, ExitStatus::Exited(0));
        assert_eq!(host.live_guests(), 0);
    });
}

#[test]
fn nesting_depth_is_bounded() {
    let config = HostConfig {
        max_depth: 2,
        ..HostConfig::default()
    };
    with_host(config, |host| async move {
        let root = host.root_executor();
        let child = run(&root, &guest("child-echo"), Run::default())
            .await
            .unwrap();
        let level2 = run(
            &exported_executor(&child),
            &guest("child-echo"),
            Run::default(),
        )
        .await
        .unwrap();
        let err = run(
            &exported_executor(&level2),
            &guest("child-echo"),
            Run::default(),
        )
        .await
        .err()
        .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::Quota, "nesting depth limit of 2 reached");
    });
}

#[test]
fn live_children_are_bounded_per_executor() {
    let config = HostConfig {
        max_children: 2,
        ..HostConfig::default()
    };
    with_host(config, |host| async move {
        let root = host.root_executor();
        let block = || Run {
            args: &["block-stdin"],
            stdio: StdioMode::Data,
            ..Run::default()
        };
        let a = run(&root, &guest("faulty"), block()).await.unwrap();
        let _b = run(&root, &guest("faulty"), block()).await.unwrap();
        let err = run(&root, &guest("faulty"), block())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::Quota, "live children limit of 2");
        a.kill_request().send().promise.await.unwrap();
        wait(&a).await;
        run(&root, &guest("faulty"), block())
            .await
            .expect("a slot was freed");
    });
}

#[test]
fn same_bytes_compile_once() {
    host(|host| async move {
        let root = host.root_executor();
        for _ in 0..3 {
            let p = run(
                &root,
                &guest("hello"),
                Run {
                    stdio: StdioMode::Data,
                    ..Run::default()
                },
            )
            .await
            .unwrap();
            wait(&p).await;
        }
        assert_eq!(host.compiled_guests(), 1);
    });
}

#[test]
fn bad_bytes_get_clear_errors() {
    host(|host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;

        let err = run(&root, b"GET / HTTP/1.1\r\n", Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert!(
            err.contains(
                "not a WASM component, WASM module or ELF executable: first bytes 47 45 54"
            ),
            "{err}"
        );
        let hello = guest("hello");
        let err = run(&root, &hello[..hello.len() / 2], Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::BadPayload, "invalid WebAssembly");
        let err = run(&root, b"\0as", Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::BadPayload, "truncated");

        let elf = capsa_schema::format::elf_header(2, 2, 0x3e);
        let err = run(&root, &elf, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::VmDisabled, "microVMs are not enabled");

        let missing = wat::parse_str(
            r#"(component
                (import "capsa:missing/thing" (instance (export "f" (func))))
                (instance $run)
                (export "wasi:cli/run@0.2.0" (instance $run)))"#,
        )
        .unwrap();
        let err = run(&root, &missing, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::Link, "capsa:missing/thing");

        // Outside the world in wit/world.wit: named, with what the host gives.
        let http = wat::parse_str(
            r#"(component
                (import "wasi:cli/stdout@0.2.0" (instance))
                (import "wasi:http/outgoing-handler@0.2.0" (instance))
                (instance $run)
                (export "wasi:cli/run@0.2.0" (instance $run)))"#,
        )
        .unwrap();
        let err = run(&root, &http, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(
            &err,
            ErrorKind::Link,
            r#"the component imports "wasi:http/outgoing-handler@0.2.0", which capsa does not provide"#,
        );
        assert_kind(
            &err,
            ErrorKind::Link,
            "wasi:filesystem/{preopens, types}@0.2.12",
        );
        let p1 = wat::parse_str(r#"(module (import "env" "now" (func)) (func (export "_start")))"#)
            .unwrap();
        let err = run(&root, &p1, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(
            &err,
            ErrorKind::Link,
            r#"the module imports "env" "now", which capsa does not provide"#,
        );

        let no_start = wat::parse_str("(module)").unwrap();
        let err = run(&root, &no_start, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::BadPayload, "_start");

        // Refused for what they are, before any compiling.
        let reactor = wat::parse_str(r#"(module (func (export "_initialize")))"#).unwrap();
        let err = run(&root, &reactor, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(
            &err,
            ErrorKind::BadPayload,
            "a WASI reactor: exports `_initialize` but no `_start`",
        );
        let library = wat::parse_str("(component)").unwrap();
        let err = run(&root, &library, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::BadPayload, "no `wasi:cli/run`");

        still_healthy(&witness).await;
    });
}

#[test]
fn traps_panics_and_exhaustion_are_exit_statuses() {
    host(|host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let faulty = guest("faulty");

        let p = run(
            &root,
            &faulty,
            Run {
                args: &["trap"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        match wait(&p).await {
            ExitStatus::Trapped(m) => assert!(m.contains("unreachable"), "{m}"),
            s => panic!("trap: {s}"),
        }

        let p = run(
            &root,
            &faulty,
            Run {
                args: &["panic"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        match wait(&p).await {
            ExitStatus::Trapped(m) => assert!(m.contains("panicked on purpose"), "{m}"),
            s => panic!("panic: {s}"),
        }

        let p = run(
            &root,
            &faulty,
            Run {
                args: &["alloc"],
                memory_limit: 32 << 20,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::OutOfMemory(32 << 20));

        still_healthy(&witness).await;
    });
}

#[test]
fn a_guest_exiting_mid_call_fails_the_call() {
    host(|host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["exit-mid-call"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let err = echo(&exported_executor(&p), "bye")
            .await
            .expect_err("runBytes should fail");
        assert!(
            err.to_lowercase().contains("disconnected") || err.contains("closed"),
            "{err}"
        );
        assert_eq!(wait(&p).await, ExitStatus::Exited(7));
        still_healthy(&witness).await;
    });
}

#[test]
fn garbage_on_the_rpc_channel_ends_that_guest_only() {
    host(|host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let p = run(
            &root,
            &guest("faulty"),
            Run {
                args: &["garbage"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        match wait(&p).await {
            ExitStatus::Failed(m) => assert!(m.contains("broken RPC connection"), "{m}"),
            s => panic!("garbage: {s}"),
        }
        assert!(echo(&exported_executor(&p), "hello?").await.is_err());
        still_healthy(&witness).await;
    });
}

/// `capsa run` keeps what it compiles in its cache folder: a second run
/// of the same PID0 compiles nothing, and a damaged entry is compiled
/// again, never loaded.
#[test]
fn capsa_run_compiles_once_and_recompiles_damaged_entries() {
    let capsa = capsa_tests::capsa_bin();
    let scratch = capsa_tests::TempDir::new("compile-cache");
    // A folder capsa makes itself (an existing one must be private already).
    let cache = scratch.path().join("cache");
    let run = || {
        let out = std::process::Command::new(&capsa)
            .arg("run")
            .arg("--cache-dir")
            .arg(&cache)
            .arg(guests_dir().join("pid0.wasm"))
            .env("CAPSA_LOG", "warn,capsa::engine=debug")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", capsa.display()));
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        let compiled = log.matches("compiled in").count();
        let loaded = log.matches("loaded from the compile cache").count();
        (compiled, loaded, log)
    };
    let (compiled, loaded, log) = run();
    assert!(compiled >= 2 && loaded == 0, "first run: {log}");
    let (again, loaded, log) = run();
    assert_eq!((again, loaded), (0, compiled), "second run: {log}");

    // Every entry damaged (cut short): all compiled again, and said so.
    let mut entries = 0;
    for folder in std::fs::read_dir(&cache).unwrap() {
        for entry in std::fs::read_dir(folder.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            entries += 1;
        }
    }
    assert_eq!(entries, compiled);
    let (recompiled, loaded, log) = run();
    assert_eq!((recompiled, loaded), (compiled, 0), "damaged: {log}");
    assert!(log.contains("damaged compile cache entry"), "{log}");
    // The folder is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn the_capsa_binary_runs_the_demo() {
    let capsa = capsa_tests::capsa_bin();
    let out = std::process::Command::new(&capsa)
        .arg("run")
        .arg(guests_dir().join("pid0.wasm"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", capsa.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("three levels"), "{stderr}");
    assert!(
        stderr.contains("hello from a plain WASI program"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "PID0's stdout is its RPC channel, not the terminal's"
    );
}

/// `capsa run --dir`: PID0 gets the directory as its preopen and in its
/// Executor's `directories`, and hands it through a child to a grandchild.
#[test]
fn capsa_run_dir_reaches_pid0_and_a_grandchild() {
    let capsa = capsa_tests::capsa_bin();
    let dir = capsa_tests::TempDir::new("run-dir");
    let out = std::process::Command::new(&capsa)
        .arg("run")
        .arg("--dir")
        .arg(format!("{}::/shared", dir.path().display()))
        .arg(guests_dir().join("pid0.wasm"))
        .args(["--", "files"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", capsa.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the first at /shared"), "{stderr}");
    assert!(
        stderr.contains("read back through its own preopen"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("from-grandchild.txt")).unwrap(),
        "written by a grandchild of pid0\n"
    );
    // Without the grant, PID0 has none to give.
    let out = std::process::Command::new(&capsa)
        .arg("run")
        .arg(guests_dir().join("pid0.wasm"))
        .args(["--", "files"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no directory granted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every numeric option at its extremes: 0 (inherit), 1 and u64::MAX start
/// a child that works, or fail cleanly; none wraps into a tiny limit or
/// panics the host.
#[test]
fn numeric_options_at_their_extremes_neither_wrap_nor_panic() {
    host(|host| async move {
        let root = host.root_executor();
        for value in [0, 1, u64::MAX, u64::MAX / 1000 + 1] {
            let p = run(
                &root,
                &guest("hello"),
                Run {
                    args: &["extreme"],
                    stdio: StdioMode::Data,
                    cpu_ms: value.max(1_000),
                    deadline_ms: value.max(60_000),
                    memory_limit: value.max(64 << 20),
                    ..Run::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(
                String::from_utf8_lossy(&stdout_of(&p).await),
                "hello from a plain WASI program: extreme\n",
                "{value}"
            );
            assert_eq!(wait(&p).await, ExitStatus::Exited(0), "{value}");
        }
        // A budget of 1 ms, a deadline of 1 ms, 1 byte of memory: the
        // child ends with the matching status, the host serves on.
        for tiny in [
            Run {
                cpu_ms: 1,
                ..Run::default()
            },
            Run {
                deadline_ms: 1,
                ..Run::default()
            },
            Run {
                memory_limit: 1,
                ..Run::default()
            },
        ] {
            let outcome = match run(
                &root,
                &guest("faulty"),
                Run {
                    args: &["loop"],
                    stdio: StdioMode::Data,
                    ..tiny
                },
            )
            .await
            {
                Ok(p) => wait(&p).await.to_string(),
                Err(e) => e,
            };
            assert!(!outcome.is_empty());
        }
        let witness = run(&root, &guest("child-echo"), Run::default())
            .await
            .unwrap();
        still_healthy(&witness).await;
    });
}

/// Two readers of one stdout and two writers of one stdin at once: each
/// `stdout()`/`stdin()` call returns the same stream, so they take turns
/// and none waits for ever on a waker another one replaced.
#[test]
fn concurrent_readers_and_writers_of_one_stream_all_finish() {
    host(|host| async move {
        let root = host.root_executor();
        let p = run(
            &root,
            &guest("hello"),
            Run {
                args: &["cat"],
                stdio: StdioMode::Data,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let chunk = vec![7u8; 48 << 10];
        let writer = |n: usize| {
            let p = p.clone();
            let chunk = chunk.clone();
            async move {
                let sink = capsa_client::stdin(&p).await.unwrap();
                for _ in 0..n {
                    let mut req = sink.write_request();
                    req.get().set_data(&chunk);
                    req.send().await.unwrap();
                }
            }
        };
        let reader = || {
            let source = p.stdout_request().send().pipeline.get_source();
            async move { read_all(source).await.len() }
        };
        let writers = async {
            // Both readers are waiting on the empty pipe before a byte
            // arrives: the case where one waker replaced the other.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            futures::join!(writer(40), writer(40));
            let sink = capsa_client::stdin(&p).await.unwrap();
            sink.close_request().send().promise.await.unwrap();
        };
        // Each reader is a task of its own, woken only by its own waker,
        // as calls arriving over a connection are.
        let (a, b) = (
            tokio::task::spawn_local(reader()),
            tokio::task::spawn_local(reader()),
        );
        let all = async { futures::join!(writers, a, b) };
        let ((), a, b) = tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .expect("a reader or writer of a shared stream never finished");
        assert_eq!(a.unwrap() + b.unwrap(), 80 * (48 << 10));
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
    });
}
