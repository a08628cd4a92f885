//! `capsa exec FILE` with a host of its own: one command for one program,
//! as `wasmtime run prog.wasm` is, with the host's options (`--dir`, limits,
//! `--allow-vm`), an environment given exactly with `--env`, and every log
//! line a guest causes labelled with it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use capsa_tests::*;

/// `capsa exec` run from `dir` (where no socket is), with a compile cache
/// of the test's own and no log filter from outside.
fn exec(dir: &Path) -> Command {
    let mut command = Command::new(capsa_bin());
    command
        .current_dir(dir)
        .env_remove("CAPSA_LOG")
        .arg("exec")
        .arg("--cache-dir")
        .arg(dir.join("cache"));
    command
}

fn guest_path(name: &str) -> PathBuf {
    guests_dir().join(format!("{name}.wasm"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
}

#[test]
fn exec_runs_a_program_in_a_host_of_its_own() {
    let tmp = TempDir::new("exec-own");
    for name in ["hello", "hello-p1"] {
        let out = exec(tmp.path())
            .arg(guest_path(name))
            .args(["--", "no", "socket"])
            .output()
            .unwrap();
        assert_exit(&out, 0);
        assert_eq!(
            text(&out.stdout),
            "hello from a plain WASI program: no socket\n",
            "{name}"
        );
        assert_eq!(text(&out.stderr), "", "{name}");
    }

    // stdin → program → stdout.
    let mut child = exec(tmp.path())
        .arg(guest_path("hello"))
        .args(["--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let sent = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&sent).unwrap());
    let mut output = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut output)
        .unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        output == input,
        "{} bytes back of {}",
        output.len(),
        input.len()
    );

    // Exit codes like a shell; anything else said.
    let out = exec(tmp.path())
        .arg(guest_path("hello"))
        .args(["--", "exit", "3"])
        .output()
        .unwrap();
    assert_exit(&out, 3);
    assert!(!text(&out.stderr).contains("capsa:"), "{out:?}");
    let out = exec(tmp.path())
        .arg(guest_path("faulty"))
        .args(["--", "trap"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("capsa: process trapped"),
        "{out:?}"
    );
}

#[test]
fn exec_applies_its_limits_to_the_program() {
    let tmp = TempDir::new("exec-limits");
    let out = exec(tmp.path())
        .args(["--deadline", "0.3"])
        .arg(guest_path("faulty"))
        .args(["--", "loop"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("capsa: process killed: deadline exceeded"),
        "{out:?}"
    );
    let out = exec(tmp.path())
        .args(["--cpu-ms", "100"])
        .arg(guest_path("faulty"))
        .args(["--", "loop"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("capsa: process killed: CPU budget exceeded"),
        "{out:?}"
    );
    let out = exec(tmp.path())
        .args(["--memory-mib", "16"])
        .arg(guest_path("faulty"))
        .args(["--", "alloc"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains(&format!(
            "capsa: process out of memory: limit of {} bytes reached",
            16 << 20
        )),
        "{out:?}"
    );
    // An ELF needs --allow-vm.
    let out = exec(tmp.path()).arg("/bin/true").output().unwrap();
    assert_exit(&out, 125);
    assert!(text(&out.stderr).contains("vmDisabled"), "{out:?}");
}

#[test]
fn exec_grants_directories_of_its_own_host() {
    let tmp = TempDir::new("exec-dir");
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("in.txt"), "from this machine").unwrap();
    let files = |grant: &str, args: &[&str]| {
        exec(tmp.path())
            .arg("--dir")
            .arg(format!("{}::/shared{grant}", mine.display()))
            .arg(guest_path("files"))
            .arg("--")
            .args(args)
            .output()
            .unwrap()
    };
    let out = files("", &["cat", "/shared/in.txt"]);
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), "from this machine");
    let out = files("", &["append", "/shared/log", "written in place"]);
    assert_exit(&out, 0);
    assert_eq!(
        std::fs::read_to_string(mine.join("log")).unwrap(),
        "written in place\n"
    );
    let out = files(":ro", &["append", "/shared/log", "refused"]);
    assert_exit(&out, 1);
    assert_eq!(
        std::fs::read_to_string(mine.join("log")).unwrap(),
        "written in place\n"
    );
    // A directory that is not there: said as such.
    let out = exec(tmp.path())
        .arg("--dir")
        .arg(tmp.path().join("missing"))
        .arg(guest_path("files"))
        .output()
        .unwrap();
    assert_exit(&out, 125);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot grant") && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(!stderr.contains("WebAssembly engine"), "{stderr}");
    // Without a grant, nothing.
    let out = exec(tmp.path())
        .arg(guest_path("files"))
        .args(["--", "cat", "/shared/in.txt"])
        .output()
        .unwrap();
    assert_exit(&out, 1);
}

#[test]
fn exec_gives_the_program_exactly_the_environment_asked_for() {
    let tmp = TempDir::new("exec-env");
    let out = exec(tmp.path())
        .env("CAPSA_TEST_PASSED", "from the shell")
        .env("CAPSA_TEST_NOT_ASKED", "stays here")
        .args(["--env", "A=1", "--env", "EMPTY=", "--env", "EQ=x=y"])
        .args(["--env", "CAPSA_TEST_PASSED"])
        .arg(guest_path("hello"))
        .args(["--", "env"])
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert_eq!(
        text(&out.stdout),
        "A=1\nCAPSA_TEST_PASSED=from the shell\nEMPTY=\nEQ=x=y\n"
    );
    // Nothing inherited unless asked.
    let out = exec(tmp.path())
        .env("CAPSA_TEST_NOT_ASKED", "stays here")
        .arg(guest_path("hello"))
        .args(["--", "env"])
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), "");
    // A name to pass that is not set here, or no name at all.
    let out = exec(tmp.path())
        .env_remove("CAPSA_TEST_UNSET")
        .args(["--env", "CAPSA_TEST_UNSET"])
        .arg(guest_path("hello"))
        .output()
        .unwrap();
    assert_exit(&out, 125);
    assert!(
        text(&out.stderr).contains("--env CAPSA_TEST_UNSET: environment variable not found"),
        "{out:?}"
    );
    let out = exec(tmp.path())
        .args(["--env", "=x"])
        .arg(guest_path("hello"))
        .output()
        .unwrap();
    assert_exit(&out, 2);
    assert!(text(&out.stderr).contains("expected NAME=VALUE"), "{out:?}");
}

/// With --connect the serving host decides how guests run: options that
/// would set up a host are refused rather than silently ignored (those
/// from the environment, like CAPSA_KERNEL, are no request).
#[test]
fn exec_connect_refuses_options_for_a_host_of_its_own() {
    let tmp = TempDir::new("exec-connect");
    let nowhere = format!("unix:{}", tmp.path().join("none.sock").display());
    for option in [
        &["--allow-vm"][..],
        &["--max-children", "3"],
        &["--no-cache"],
    ] {
        let out = Command::new(capsa_bin())
            .args(["exec", "--connect", &nowhere])
            .args(option)
            .arg(guest_path("hello"))
            .output()
            .unwrap();
        assert_exit(&out, 2);
        assert!(
            text(&out.stderr).contains(&format!(
                "{} sets up a host of this command's own; with --connect the serving host's \
                 settings apply",
                option[0]
            )),
            "{out:?}"
        );
    }
    // From the environment: not refused; the connection is what fails.
    let out = Command::new(capsa_bin())
        .env("CAPSA_KERNEL", "/nonexistent")
        .args(["exec", "--connect", &nowhere])
        .args(["--memory-mib", "64", "--deadline", "5"])
        .arg(guest_path("hello"))
        .output()
        .unwrap();
    assert_exit(&out, 125);
    assert!(!text(&out.stderr).contains("sets up a host"), "{out:?}");
    assert!(text(&out.stderr).contains("none.sock"), "{out:?}");
    // A token is for a serving host only.
    let out = Command::new(capsa_bin())
        .args(["exec", "--token-file", "/nonexistent"])
        .arg(guest_path("hello"))
        .output()
        .unwrap();
    assert_exit(&out, 2);
    assert!(text(&out.stderr).contains("--connect"), "{out:?}");
}

/// wasmtime-wasi logs a warning when a preview 1 program calls a socket
/// function it does not implement; the line says which guest caused it.
#[test]
fn log_lines_a_guest_causes_carry_its_label() {
    let tmp = TempDir::new("exec-label");
    let module = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "sock_shutdown"
              (func $sock_shutdown (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
              (drop (call $sock_shutdown (i32.const 0) (i32.const 2)))))"#,
    )
    .unwrap();
    let program = tmp.path().join("shutter.wasm");
    std::fs::write(&program, module).unwrap();
    let out = exec(tmp.path()).arg(&program).output().unwrap();
    assert_exit(&out, 0);
    let stderr = text(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("p1 sock_shutdown is not implemented"))
        .unwrap_or_else(|| panic!("no warning logged: {stderr}"));
    assert!(line.contains("process=shutter#"), "{line}");
}
