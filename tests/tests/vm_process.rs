//! The host's ELF path (boot, agent connection, process semantics,
//! teardown) with the agent running as an ordinary host process on a Unix
//! socket: the same Cap'n Proto path a microVM's vsock carries, on machines
//! whose KVM cannot run Linux user space.

use std::path::PathBuf;
use std::time::Duration;

use capsa::{ExitStatus, HostConfig, VmBackend, VmSettings};
use capsa_tests::*;

/// The tests of this file take turns: one of them looks for agent
/// processes left behind, which another's live agent would look like.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn agent() -> PathBuf {
    match std::env::var_os("CAPSA_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("capsa-agent")
        }
    }
}

fn config_with(agent: PathBuf, ready: Duration) -> HostConfig {
    HostConfig {
        vm: Some(VmSettings {
            backend: VmBackend::AgentProcess { agent },
            ready_timeout: ready,
            vcpus: 1,
            memory_mib: 128,
            total_memory_mib: None,
        }),
        ..HostConfig::default()
    }
}

fn config() -> HostConfig {
    let a = agent();
    assert!(
        a.exists(),
        "{}: build the agent (`cargo xtask test` does)",
        a.display()
    );
    config_with(a, Duration::from_secs(10))
}

fn elf(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn an_elf_runs_with_its_output_and_status() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let p = run(
            &root,
            &elf("/bin/echo"),
            Run {
                args: &["hello", "from", "an", "ELF"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&p).await, b"hello from an ELF\n");
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));

        let p = run(
            &root,
            &elf("/bin/sh"),
            Run {
                args: &["-c", "exit 9"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Exited(9));
    });
}

#[test]
fn stdin_streams_into_the_elf() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let p = run(&root, &elf("/bin/cat"), Run::default()).await.unwrap();
        let sink = capsa_client::stdin(&p).await.unwrap();
        let input: Vec<u8> = (0..2u32 << 20).map(|i| (i % 253) as u8).collect();
        let writer = {
            let input = input.clone();
            tokio::task::spawn_local(async move {
                for chunk in input.chunks(64 << 10) {
                    let mut req = sink.write_request();
                    req.get().set_data(chunk);
                    req.send().await.unwrap();
                }
                sink.close_request().send().promise.await.unwrap();
            })
        };
        let out = stdout_of(&p).await;
        writer.await.unwrap();
        assert!(out == input, "{} bytes back of {}", out.len(), input.len());
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
    });
}

/// An ELF's output is pushed into the caller's sinks as a WASM child's
/// is: the host pulls the agent's streams and pushes them on, the caller
/// waits first and finds everything there.
#[test]
fn an_elfs_output_is_pushed_into_the_callers_sinks() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let (out_sink, out) = Collector::open();
        let (err_sink, err) = Collector::open();
        let p = run(
            &root,
            &elf("/bin/sh"),
            Run {
                args: &["-c", "cat; echo done >&2"],
                stdout_to: Some(&out_sink),
                stderr_to: Some(&err_sink),
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let input: Vec<u8> = (0..2u32 << 20).map(|i| (i % 253) as u8).collect();
        let sink = capsa_client::stdin(&p).await.unwrap();
        let waited = wait_in_background(&p);
        capsa_client::write_all(&sink, &input).await.unwrap();
        assert_eq!(waited.await.unwrap(), ExitStatus::Exited(0));
        {
            let out = out.collected.borrow();
            let got = out.bytes.len();
            assert!(
                out.closed && out.bytes == input,
                "{got} of {} bytes",
                input.len()
            );
        }
        assert_eq!(err.collected.borrow().bytes, b"done\n");
        assert_stdout_is_pushed(&p).await;
    });
}

#[test]
fn bootstrap_is_the_agents_executor_and_can_be_passed_to_a_wasm_child() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let p = run(&root, &elf("/bin/true"), Run::default()).await.unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
        // The ELF is done; the machine stays while its Process is held.
        let agent = exported_executor(&p);
        assert_eq!(
            echo(&agent, "in the machine").await.unwrap(),
            "in the machine"
        );
        let second = run(
            &agent,
            &elf("/bin/echo"),
            Run {
                args: &["again"],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&second).await, b"again\n");

        // A WASM child whose only capability is the machine's Executor.
        let child = run(
            &root,
            &guest("child-echo"),
            Run {
                args: &["vm-user"],
                bootstrap: Some(&agent.client),
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let reply = echo(&exported_executor(&child), "via the agent")
            .await
            .unwrap();
        assert_eq!(
            reply,
            "child-echo[vm-user]: 8 concurrent echoes ok: via the agent"
        );
    });
}

/// A host directory granted on to an ELF: the agent copies it into the
/// machine (beneath its root: the agent runs as a process here) and back
/// before `wait` answers; the machine's own filesystem is its Executor's
/// Directory.
#[test]
fn a_granted_directory_reaches_the_elf_and_its_changes_come_back() {
    let _serial = serial();
    let tmp = TempDir::new("vm-dir");
    std::fs::write(tmp.path().join("in.txt"), "host data\n").unwrap();
    let config = HostConfig {
        directories: vec![capsa::DirGrant {
            path: "/shared".into(),
            host_path: tmp.path().to_path_buf(),
            read_only: false,
        }],
        ..config()
    };
    with_host(config, |host| async move {
        let root = host.root_executor();
        let (_, dir) = granted(&root).await.pop().unwrap();
        let p = run(
            &root,
            &elf("/bin/sh"),
            Run {
                name: "sh",
                args: &[
                    "-c",
                    "cat data/in.txt; echo from the machine > data/out.txt; echo kept > local.txt",
                ],
                dirs: &[("/data", &dir)],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stdout_of(&p).await, b"host data\n");
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
        let machine = granted(&exported_executor(&p)).await;
        assert_eq!(machine.len(), 1);
        assert_eq!(machine[0].0, "/");
        let mut req = machine[0].1.read_request();
        req.get().set_path("local.txt");
        let source = req.send().pipeline.get_source();
        assert_eq!(read_all(source).await, b"kept\n");
    });
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("out.txt")).unwrap(),
        "from the machine\n"
    );
}

#[test]
fn kill_drop_and_deadline_tear_the_machine_down() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let sleeper = || Run {
            args: &["1000"],
            ..Run::default()
        };
        let p = run(&root, &elf("/bin/sleep"), sleeper()).await.unwrap();
        assert_eq!(host.live_guests(), 1);
        p.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Killed);

        let p = run(
            &root,
            &elf("/bin/sleep"),
            Run {
                deadline_ms: 200,
                ..sleeper()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&p).await, ExitStatus::DeadlineExceeded);

        let p = run(&root, &elf("/bin/sleep"), sleeper()).await.unwrap();
        drop(p);
        until_nothing_runs(&host, "machines survived their Process").await;
    });
}

/// `cpuBudgetMillis` holds for an ELF as for a WASM guest: a loop that
/// burns its budget ends with `cpuBudgetExceeded`; a program that waits
/// longer than its budget without using the CPU is not touched.
#[test]
fn an_elf_that_spends_its_cpu_budget_ends_with_that_status() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let spinner = run(
            &root,
            &elf("/bin/sh"),
            Run {
                args: &["-c", "while :; do :; done"],
                cpu_ms: 300,
                deadline_ms: 60_000,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&spinner).await, ExitStatus::CpuBudgetExceeded);
        // The same budget, spent by a child of the shell: the budget is
        // the process group's.
        let forked = run(
            &root,
            &elf("/bin/sh"),
            Run {
                args: &["-c", "sh -c 'while :; do :; done' & wait"],
                cpu_ms: 300,
                deadline_ms: 60_000,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&forked).await, ExitStatus::CpuBudgetExceeded);
        let sleeper = run(
            &root,
            &elf("/bin/sleep"),
            Run {
                args: &["1"],
                cpu_ms: 300,
                ..Run::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(wait(&sleeper).await, ExitStatus::Exited(0));
        drop((spinner, forked, sleeper));
        until_nothing_runs(&host, "machines survived their Process").await;
    });
}

/// A process an ELF leaves running in the background (`sleep &` in a shell) ends with its machine, whether the
/// Process is killed or dropped, although the agent is killed before it
/// can end anything itself.
#[test]
fn background_processes_of_an_elf_end_with_its_machine() {
    let _serial = serial();
    for ending in ["kill", "drop"] {
        // A sleep length no other process on this machine uses.
        let secs = format!("{}", 600_000 + std::process::id());
        let needle = format!("sleep {secs}");
        let script = format!("sleep {secs} & echo started; wait");
        let inside = needle.clone();
        with_host(config(), |host| async move {
            let needle = inside;
            let root = host.root_executor();
            let p = run(
                &root,
                &elf("/bin/sh"),
                Run {
                    args: &["-c", &script],
                    ..Run::default()
                },
            )
            .await
            .unwrap();
            // Once the shell said so, the sleep is running.
            let out = p.stdout_request().send().pipeline.get_source();
            let mut req = out.read_request();
            req.get().set_max_bytes(64);
            let said = req.send().promise.await.unwrap();
            assert_eq!(said.get().unwrap().get_data().unwrap(), b"started\n");
            assert!(!processes_with(&needle).is_empty(), "{ending}: no sleep");
            match ending {
                "kill" => {
                    p.kill_request().send().promise.await.unwrap();
                    assert_eq!(wait(&p).await, ExitStatus::Killed);
                }
                _ => drop(p),
            }
            until_nothing_runs(&host, "the machine survived its Process").await;
        });
        assert_none_left(
            &needle,
            &format!("{ending}: the background sleep outlived its machine"),
        );
    }
}

#[test]
fn an_agent_that_never_answers_is_bounded_by_the_ready_timeout() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("capsa-mute-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mute = dir.join("mute-agent");
    std::fs::write(&mute, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&mute, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    with_host(
        config_with(mute, Duration::from_millis(300)),
        |host| async move {
            let root = host.root_executor();
            let witness = run(&root, &guest("child-echo"), Run::default())
                .await
                .unwrap();
            let err = run(&root, &elf("/bin/true"), Run::default())
                .await
                .err()
                .expect("runBytes should fail");
            assert_kind(&err, ErrorKind::Vm, "the agent did not answer within");
            assert_eq!(host.live_guests(), 1);
            assert!(echo(&exported_executor(&witness), "ok?")
                .await
                .unwrap()
                .contains("ok?"));
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_elf_is_refused_and_the_machine_goes() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        // Refused by the format check, before any machine boots.
        let elf32 = capsa_schema::format::elf_header(1, 2, 0x3e);
        let err = run(&root, &elf32, Run::default())
            .await
            .err()
            .expect("runBytes should fail");
        assert_kind(&err, ErrorKind::BadPayload, "ELF executable of class 1");
        assert_eq!(host.live_guests(), 0);

        // A header that passes the check with nothing behind it: the agent
        // cannot execute it, and the process says so.
        let hollow = capsa_schema::format::elf_header(2, 2, 0x3e);
        match run(&root, &hollow, Run::default()).await {
            Err(e) => assert_kind(&e, ErrorKind::BadPayload, "the agent refused the ELF"),
            Ok(p) => {
                let status = wait(&p).await;
                assert!(!status.success(), "a hollow ELF ran: {status}");
                drop(p);
            }
        }
        until_nothing_runs(&host, "machines of a failed ELF survived").await;
    });
}

/// PID0 runs Debian's static busybox through its root Executor, reads its
/// output, and talks to the machine's agent: the demo's microVM step, here
/// with the agent as a host process.
#[test]
fn pid0_runs_busybox_through_the_capsa_binary() {
    let _serial = serial();
    let capsa = capsa_tests::capsa_bin();
    let out = std::process::Command::new(&capsa)
        .arg("run")
        .arg("--vm-as-process")
        .arg(agent())
        .arg(guests_dir().join("pid0.wasm"))
        .arg("--")
        .arg("microvm")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", capsa.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(r#"busybox wrote "hello from a microVM\n" and exited with code 0"#),
        "{stderr}"
    );
    assert!(
        stderr.contains("the VM's agent answered: are you there?"),
        "{stderr}"
    );
}

/// A machine counts against its caller's memory limit: a child limited to
/// 64 MiB cannot get a 100 GiB machine, nor more vCPUs than the host has.
/// Refused before anything boots; the host goes on serving.
#[test]
fn a_machine_larger_than_the_callers_limits_is_refused() {
    let _serial = serial();
    with_host(config(), |host| async move {
        let root = host.root_executor();
        let err = run(
            &root,
            &elf("/bin/true"),
            Run {
                memory_limit: 64 << 20,
                vm_memory_mib: 100 << 10,
                ..Run::default()
            },
        )
        .await
        .err()
        .expect("a 100 GiB machine for a 64 MiB caller");
        assert_kind(&err, ErrorKind::TooLarge, "microVM too large");
        assert!(err.contains("memory limit is 64 MiB"), "{err}");
        let err = run(
            &root,
            &elf("/bin/true"),
            Run {
                vm_vcpus: u32::MAX,
                ..Run::default()
            },
        )
        .await
        .err()
        .expect("4 billion vCPUs");
        assert_kind(&err, ErrorKind::TooLarge, "vCPUs");
        assert_eq!(host.live_guests(), 0);
        let p = run(&root, &elf("/bin/true"), Run::default()).await.unwrap();
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));
    });
}

/// The host's machines together hold at most `total_memory_mib`, whoever
/// asks: a machine that does not fit is refused (`hostFull`) while the
/// others run, and fits again once one has gone.
#[test]
fn machines_together_hold_at_most_the_hosts_total() {
    let _serial = serial();
    let mut config = config();
    if let Some(vm) = config.vm.as_mut() {
        vm.memory_mib = 64;
        vm.total_memory_mib = Some(100);
    }
    with_host(config, |host| async move {
        let root = host.root_executor();
        let sleeper = |secs: &'static str| {
            let root = root.clone();
            async move {
                run(
                    &root,
                    &elf("/bin/sleep"),
                    Run {
                        args: &[secs],
                        ..Run::default()
                    },
                )
                .await
            }
        };
        let first = sleeper("30").await.unwrap();
        let err = sleeper("30").await.err().expect("a second 64 MiB machine");
        assert_kind(&err, ErrorKind::HostFull, "hold 64 of 100 MiB");
        first.kill_request().send().promise.await.unwrap();
        assert_eq!(wait(&first).await, ExitStatus::Killed);
        drop(first);
        until_nothing_runs(&host, "the first machine").await;
        let again = sleeper("0").await.unwrap();
        assert_eq!(wait(&again).await, ExitStatus::Exited(0));
    });
}

/// Processes whose `PID: ARGS...` line (arguments joined by spaces)
/// contains `needle`.
/// Waits up to ten seconds for every process whose command line holds
/// `needle` to be gone; fails with `what` and those left if some stay.
#[track_caller]
fn assert_none_left(needle: &str, what: &str) {
    let start = std::time::Instant::now();
    while !processes_with(needle).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_with(needle), Vec::<String>::new(), "{what}");
}

fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = format!(
            "{pid}: {}",
            String::from_utf8_lossy(&raw).replace('\0', " ")
        );
        if line.contains(needle) {
            found.push(line);
        }
    }
    found
}

/// PID0 exits while a WASM child blocks on its stdin and a machine runs
/// `busybox sleep`, without killing either: the host ends both, the agent
/// and the ELF it started are gone, and threads and fds are back where
/// they were.
#[test]
fn pid0_exit_leaves_nothing_running() {
    let _serial = serial();
    // A sleep length no other process on this machine uses.
    let secs = format!("{}", 500_000 + std::process::id());
    let needle = format!("sleep {secs}");
    let round = || {
        with_host(config(), |host| {
            let secs = secs.clone();
            async move {
                let status = host
                    .run_pid0(&guest("pid0"), vec!["abandon".into(), secs])
                    .await
                    .unwrap();
                assert_eq!(status, ExitStatus::Exited(0));
                assert_eq!(host.live_guests(), 0);
            }
        });
        assert_none_left(&needle, "the ELF survived PID0");
        assert_eq!(
            processes_with(&format!("capsa-vm-{}-", std::process::id())),
            Vec::<String>::new(),
            "the agent survived PID0"
        );
        (
            settled_thread_count(),
            std::fs::read_dir("/proc/self/fd").unwrap().count(),
        )
    };
    // The first round also starts what a process keeps for good
    // (wasmtime-wasi's own runtime); the second must add nothing.
    let before = round();
    assert_eq!(round(), before, "threads or fds left behind");
}

/// A host that begins shutting down while a machine boots does not keep
/// that machine: `runBytes` fails with "shutting down" once the boot ends,
/// and the agent is gone.
#[test]
fn a_machine_booting_while_the_host_shuts_down_is_not_kept() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("capsa-slow-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let slow = dir.join("slow-agent");
    std::fs::write(
        &slow,
        format!("#!/bin/sh\nsleep 1\nexec {} \"$@\"\n", agent().display()),
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    with_host(
        config_with(slow, Duration::from_secs(10)),
        |host| async move {
            let root = host.root_executor();
            let booting = tokio::task::spawn_local({
                let root = root.clone();
                async move {
                    run(
                        &root,
                        &elf("/bin/sleep"),
                        Run {
                            args: &["1000"],
                            ..Run::default()
                        },
                    )
                    .await
                    .map(drop)
                }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            host.shutdown().await;
            let err = booting.await.unwrap().expect_err("the machine was kept");
            assert_kind(&err, ErrorKind::ShuttingDown, "shutting down");
            assert_eq!(host.live_guests(), 0);
        },
    );
    let agents = processes_with(&format!("capsa-vm-{}-", std::process::id()));
    assert_eq!(
        agents,
        Vec::<String>::new(),
        "the agent outlived the shutdown"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
