//! Programs sent once: `Executor.load`, `Program.run`, `Program.info` and
//! `Executor.program` by content hash.

use capsa::{ExitStatus, HostConfig};
use capsa_tests::*;
use sha2::Digest;

fn data<'a>(args: &'a [&'a str]) -> Run<'a> {
    Run {
        args,
        stdio: StdioMode::Data,
        ..Run::default()
    }
}

#[test]
fn a_program_loaded_once_runs_many_times_and_says_what_it_is() {
    with_host(HostConfig::default(), |host| async move {
        let root = host.root_executor();
        for (name, format) in [("hello", "component"), ("hello-p1", "module")] {
            let bytes = guest(name);
            let program = load(&root, &bytes).await.unwrap();
            for word in ["one", "two", "three"] {
                let p = run_program(&program, data(&[word])).await.unwrap();
                let out = String::from_utf8(stdout_of(&p).await).unwrap();
                assert_eq!(out, format!("hello from a plain WASI program: {word}\n"));
                assert_eq!(wait(&p).await, ExitStatus::Exited(0));
            }
            let p = run_program(&program, data(&["exit", "7"])).await.unwrap();
            assert_eq!(wait(&p).await, ExitStatus::Exited(7));

            let info = program.info_request().send().promise.await.unwrap();
            let info = info.get().unwrap();
            assert_eq!(
                info.get_hash().unwrap(),
                sha2::Sha256::digest(&bytes).as_slice()
            );
            assert_eq!(info.get_size(), bytes.len() as u64);
            assert_eq!(info.get_format().unwrap().to_str().unwrap(), format);
        }
    });
}

/// `load(...).program.run(...).process.wait()` sent without waiting: all
/// three calls leave before any answer comes back.
#[test]
fn load_run_and_wait_pipelined_cost_one_round_trip() {
    with_host(HostConfig::default(), |host| async move {
        let (root, wire) = connect(host.root_executor().client);
        echo(&root, "warm up").await.unwrap();
        let before = wire.borrow().events.len();

        let bytes = guest("hello");
        let program = load_request(&root, &bytes).pipeline.get_program();
        let process = program_run_request(&program, data(&["exit", "3"]))
            .pipeline
            .get_process();
        let waited = process.wait_request().send().promise.await.unwrap();
        let status = ExitStatus::read_from(waited.get().unwrap().get_status().unwrap()).unwrap();
        assert_eq!(status, ExitStatus::Exited(3));

        let messages = Wire {
            events: wire.borrow().events[before..].to_vec(),
        }
        .messages();
        let first_in = messages.iter().position(|(d, _)| *d == Dir::In).unwrap();
        let calls_out = messages[..first_in]
            .iter()
            .filter(|(d, k)| *d == Dir::Out && k.starts_with("call"))
            .count();
        assert_eq!(calls_out, 3, "{messages:?}");
        let later_calls = messages[first_in..]
            .iter()
            .filter(|(d, k)| *d == Dir::Out && k.starts_with("call"))
            .count();
        assert_eq!(later_calls, 0, "a call waited for an answer: {messages:?}");
    });
}

/// Another client (another root Executor, as a new `capsa serve`
/// connection gets) finds the program by its hash without sending it.
#[test]
fn a_program_is_found_by_its_hash_from_another_executor() {
    with_host(HostConfig::default(), |host| async move {
        let bytes = guest("hello");
        let hash = sha2::Sha256::digest(&bytes);

        let other = host.root_executor();
        let err = by_hash(&other, &hash).await.err().expect("not loaded yet");
        assert_kind(&err, ErrorKind::NotFound, "load its bytes");

        let first = host.root_executor();
        let program = load(&first, &bytes).await.unwrap();
        drop(program);
        drop(first);

        let found = by_hash(&other, &hash).await.unwrap();
        let p = run_program(&found, data(&["again"])).await.unwrap();
        assert_eq!(
            stdout_of(&p).await,
            b"hello from a plain WASI program: again\n"
        );
        assert_eq!(wait(&p).await, ExitStatus::Exited(0));

        for bad in [&hash[..31], &[][..], &[0u8; 33][..]] {
            let err = by_hash(&other, bad).await.err().expect("a bad hash");
            assert_kind(&err, ErrorKind::BadRequest, "32 bytes");
        }
        let err = by_hash(&other, &[0u8; 32]).await.err().expect("unknown");
        assert_kind(&err, ErrorKind::NotFound, "no program");
    });
}

/// Bytes that cannot run fail at `load`, as `runBytes` would fail.
#[test]
fn bytes_that_cannot_run_fail_at_load() {
    with_host(HostConfig::default(), |host| async move {
        let root = host.root_executor();
        let witness = healthy(&root).await;
        let cases: [(&[u8], ErrorKind, &str); 4] = [
            (
                b"not a program at all",
                ErrorKind::BadPayload,
                "not a WASM component",
            ),
            (
                b"\0asm\x01\0\0\0\x01",
                ErrorKind::BadPayload,
                "invalid WebAssembly",
            ),
            (b"\x7fELF\x02\x01\x01", ErrorKind::BadPayload, ""),
            (&[], ErrorKind::BadPayload, "empty"),
        ];
        for (bytes, kind, says) in cases {
            let err = load(&root, bytes).await.err().expect("refused");
            assert_kind(&err, kind, says);
        }
        let elf = std::fs::read("/bin/true").unwrap();
        let err = load(&root, &elf).await.err().expect("no microVMs here");
        assert_kind(&err, ErrorKind::VmDisabled, "--allow-vm");
        still_healthy(&witness).await;
    });
}

/// A Program runs through the Executor that loaded it: its quotas hold
/// whoever calls `run`.
#[test]
fn a_program_runs_under_its_executors_quotas() {
    let config = HostConfig {
        max_children: 2,
        ..HostConfig::default()
    };
    with_host(config, |host| async move {
        let root = host.root_executor();
        let program = load(&root, &guest("child-echo")).await.unwrap();
        let rpc = || Run {
            args: &["p"],
            ..Run::default()
        };
        let a = run_program(&program, rpc()).await.unwrap();
        let b = run(&root, &guest("child-echo"), rpc()).await.unwrap();
        let err = run_program(&program, rpc()).await.err().expect("quota");
        assert_kind(&err, ErrorKind::Quota, "live children limit of 2");
        drop(b);
        until_live(&host, 1).await;
        let c = run_program(&program, rpc()).await.unwrap();
        let reply = echo(&exported_executor(&c), "x").await.unwrap();
        assert_eq!(reply, "child-echo[p]: 8 concurrent echoes ok: x");
        drop((a, c));
    });
}

async fn until_live(host: &capsa::Host, n: usize) {
    let start = std::time::Instant::now();
    while host.live_guests() != n {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{} live",
            host.live_guests()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
