//! `cargo xtask`: the one entry point for preparing a machine and building,
//! testing, benchmarking and demonstrating capsa.
//!
//! Every task starts the same way: install what is missing ([`tools`]), then
//! build the guests into a stable folder ([`guests`]). Cargo commands that run
//! after that see the folder in `CAPSA_GUESTS`.

mod cmd;
mod guests;
mod kernel;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cmd::{cargo, exit_code, run, step};

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  demo            install missing tools, build the guests and capsa, run the demo
  test [args]     check formatting, then build everything and run every test
                  (args go to the test binaries, e.g. a name filter)
  bench [args]    build the guests and run the benchmarks (args go to the bench)
  guests          install missing tools and build the guests
  kernel          build the microVM guest kernel (cached by config and patches)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => return usage_error(),
    };
    let root = workspace_root();
    let result = match (task, rest) {
        ("demo", []) => demo(&root),
        ("test", rest) => test(&root, passthrough(rest)).map(|()| ExitCode::SUCCESS),
        ("bench", rest) => bench(&root, passthrough(rest)).map(|()| ExitCode::SUCCESS),
        ("guests", []) => prepare(&root).map(|()| ExitCode::SUCCESS),
        ("kernel", []) => kernel::ensure_kernel(&root).map(|_| ExitCode::SUCCESS),
        ("help" | "-h" | "--help", _) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => return usage_error(),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn usage_error() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

/// Arguments meant for the program cargo runs; a leading `--` is accepted and dropped.
fn passthrough(args: &[String]) -> &[String] {
    match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    }
}

/// The workspace root: the folder above this crate.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask crate lives inside the workspace")
        .to_path_buf()
}

/// Where cargo puts native build output: `CARGO_TARGET_DIR` if set, else `target/`.
fn native_target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// The preparation every task shares: missing tools, then the guests.
fn prepare(root: &Path) -> Result<()> {
    tools::ensure_tools()?;
    step("building guests", || guests::build_guests(root))
}

fn build_host(root: &Path) -> Result<()> {
    step("building capsa (release)", || {
        run(cargo(root).args(["build", "--release", "-p", "capsa-host"]))
    })
}

fn demo(root: &Path) -> Result<ExitCode> {
    prepare(root)?;
    build_host(root)?;
    demo_microvm(root)?;

    let capsa = native_target_dir(root).join("release/capsa");
    let pid0 = guests::out_dir(root).join("pid0.wasm");
    eprintln!("==> running the demo: capsa run {}", pid0.display());
    let status = Command::new(&capsa)
        .arg("run")
        .arg(&pid0)
        .current_dir(root)
        .env(guests::ENV_VAR, guests::out_dir(root))
        .status()
        .with_context(|| format!("could not start {}", capsa.display()))?;
    Ok(exit_code(status))
}

/// The microVM half of the demo: building the agent, kernel and initramfs it
/// boots. The demo does not start a microVM yet, so there is nothing to prepare.
fn demo_microvm(_root: &Path) -> Result<()> {
    Ok(())
}

/// Guest crates only build for wasm; `cargo test --workspace` must skip them.
const WASM_ONLY: [&str; 5] = ["pid0", "child-echo", "hello", "faulty", "guest-runtime"];

fn test(root: &Path, test_args: &[String]) -> Result<()> {
    let start = Instant::now();
    step("checking formatting", || {
        tools::ensure_rustfmt()?;
        run(cargo(root).args(["fmt", "--all", "--", "--check"])).context(
            "some files are not formatted as rustfmt wants; \
             run `cargo fmt --all` and commit the result",
        )
    })?;
    prepare(root)?;
    build_host(root)?;
    step("running tests", || {
        let mut test = cargo(root);
        test.args(["test", "--release", "--workspace"]);
        for crate_name in WASM_ONLY {
            test.args(["--exclude", crate_name]);
        }
        if !test_args.is_empty() {
            test.arg("--").args(test_args);
        }
        run(&mut test)
    })?;
    eprintln!("==> all tests passed ({})", cmd::human(start.elapsed()));
    Ok(())
}

fn bench(root: &Path, bench_args: &[String]) -> Result<()> {
    prepare(root)?;
    step("running benchmarks", || {
        let mut bench = cargo(root);
        bench.args(["bench", "-p", "capsa-host", "--bench", "capsa"]);
        if !bench_args.is_empty() {
            bench.arg("--").args(bench_args);
        }
        run(&mut bench)
    })
}
