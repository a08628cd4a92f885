//! `cargo xtask`: the one entry point for preparing a machine and building,
//! testing, benchmarking and demonstrating capsa.
//!
//! Every task starts the same way: install what is missing ([`tools`]), then
//! build the guests into a stable folder ([`guests`]). Cargo commands that run
//! after that see the folder in `CAPSA_GUESTS`.

mod cmd;
mod guests;
mod initramfs;
mod kernel;
mod python;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cmd::{cargo, exit_code, run, stdout_of, step};

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  demo            install missing tools, build the guests and capsa, run the demo
  test [args]     check formatting, then build everything and run every test
                  (args go to the test binaries, e.g. a name filter)
  bench [args]    build the guests and run the benchmarks (args go to the bench),
                  then the microVM boot (with QEMU as reference) and vsock benchmarks
  guests          install missing tools and build the guests
  kernel          build the microVM guest kernel (cached by config and patches)
  initramfs       build the microVM agent and the initramfs around it";

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
        ("initramfs", []) => initramfs::ensure_initramfs(&root).map(|_| ExitCode::SUCCESS),
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
    let microvm = demo_microvm(root)?;

    let capsa = native_target_dir(root).join("release/capsa");
    let pid0 = guests::out_dir(root).join("pid0.wasm");
    eprintln!("==> running the demo: capsa run {}", pid0.display());
    let mut demo = Command::new(&capsa);
    demo.arg("run")
        .arg(&pid0)
        .current_dir(root)
        .env(guests::ENV_VAR, guests::out_dir(root));
    if let Some(assets) = &microvm {
        assets.export(&mut demo);
    }
    let status = demo
        .status()
        .with_context(|| format!("could not start {}", capsa.display()))?;
    if !status.success() {
        return Ok(exit_code(status));
    }
    let Some(assets) = &microvm else {
        return Ok(exit_code(status));
    };
    // KVM runs guests natively: PID0 runs busybox in a real microVM.
    eprintln!(
        "==> running the microVM demo: capsa run --allow-vm {} -- microvm",
        pid0.display()
    );
    let mut vm_demo = Command::new(&capsa);
    vm_demo
        .arg("run")
        .arg("--allow-vm")
        .arg(&pid0)
        .args(["--", "microvm"])
        .current_dir(root);
    assets.export(&mut vm_demo);
    let status = vm_demo
        .status()
        .with_context(|| format!("could not start {}", capsa.display()))?;
    Ok(exit_code(status))
}

/// What the microVM tests, demo and benchmark boot, built and located once.
struct MicrovmAssets {
    kernel: PathBuf,
    initramfs: PathBuf,
    agent: PathBuf,
    busybox: PathBuf,
}

impl MicrovmAssets {
    /// Builds the kernel (cached), the agent and initramfs, and installs
    /// Debian's static busybox if it is missing.
    fn prepare(root: &Path) -> Result<MicrovmAssets> {
        let kernel = kernel::ensure_kernel(root)?;
        let initramfs = initramfs::ensure_initramfs(root)?;
        let busybox = tools::ensure_busybox()?;
        Ok(MicrovmAssets {
            kernel,
            initramfs,
            agent: initramfs::agent_binary(root),
            busybox,
        })
    }

    /// Passes the paths to `cmd` in the environment the tests read.
    fn export(&self, cmd: &mut Command) {
        cmd.env("CAPSA_KERNEL", &self.kernel)
            .env("CAPSA_INITRAMFS", &self.initramfs)
            .env("CAPSA_AGENT_BIN", &self.agent)
            .env("CAPSA_BUSYBOX", &self.busybox);
    }
}

/// Builds and runs the microVM probe example; returns whether KVM emulates
/// guest instructions and the probe's nanoseconds per loop iteration.
fn run_probe(root: &Path) -> Result<(bool, f64)> {
    run(cargo(root).args([
        "build",
        "--release",
        "-p",
        "capsa-microvm",
        "--example",
        "probe",
    ]))?;
    let probe = native_target_dir(root).join("release/examples/probe");
    let out = stdout_of(&mut Command::new(&probe))
        .context("the KVM probe failed; is /dev/kvm there and can this user open it?")?;
    let mut words = out.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let ns = words.next().and_then(|n| n.parse::<f64>().ok());
    match (kind, ns) {
        ("emulated", Some(ns)) => Ok((true, ns)),
        ("native", Some(ns)) => Ok((false, ns)),
        _ => bail!("unexpected output from the KVM probe: {out:?}"),
    }
}

/// The microVM half of the demo. Where KVM executes guests natively, PID0
/// runs busybox in a microVM (the kernel and initramfs are built for it and
/// passed in the environment); where KVM is emulated, one line says so.
fn demo_microvm(root: &Path) -> Result<Option<MicrovmAssets>> {
    let (emulated, ns) = step("probing KVM", || run_probe(root))?;
    if emulated {
        eprintln!(
            "microVM: skipped, KVM is emulated here (probe: {ns:.0} ns per loop iteration; \
             native runs ~1 ns)"
        );
        return Ok(None);
    }
    eprintln!(
        "microVM: KVM runs guests natively (probe: {ns:.1} ns per loop iteration); \
         PID0 runs busybox in a microVM"
    );
    MicrovmAssets::prepare(root).map(Some)
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
    let microvm = MicrovmAssets::prepare(root)?;
    let python = step(
        "preparing the Python client (virtualenv with pycapnp)",
        || python::ensure_venv(&native_target_dir(root)),
    )?;
    step("running tests", || {
        let mut test = cargo(root);
        // The Python example's test runs this interpreter.
        test.env("CAPSA_PYTHON", &python);
        // The microVM crate's tests include a real Linux boot of the
        // project's kernel; they read its paths from the environment.
        microvm.export(&mut test);
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

/// The wasmtime CLI, the peer for the spawn figures: built once into
/// `target/peers` (a long build, done only for benchmarks).
fn ensure_wasmtime_cli(root: &Path) -> Result<PathBuf> {
    let peers = native_target_dir(root).join("peers");
    let exe = peers.join("bin/wasmtime");
    if exe.exists() {
        return Ok(exe);
    }
    step(
        "building the wasmtime CLI 48 as the benchmark peer (once; several minutes)",
        || {
            run(cargo(root)
                .args([
                    "install",
                    "wasmtime-cli",
                    "--version",
                    "48.0.8",
                    "--locked",
                    "--root",
                ])
                .arg(&peers)
                .arg("--target-dir")
                .arg(peers.join("build")))
        },
    )?;
    Ok(exe)
}

fn bench(root: &Path, bench_args: &[String]) -> Result<()> {
    prepare(root)?;
    let wasmtime = ensure_wasmtime_cli(root)?;
    let python = step(
        "preparing the Python client (virtualenv with pycapnp)",
        || python::ensure_venv(&native_target_dir(root)),
    )?;
    step("running benchmarks", || {
        let mut bench = cargo(root);
        bench.env("CAPSA_PEER_WASMTIME", &wasmtime);
        // For the echo through `capsa serve` from Python.
        bench.env("CAPSA_PYTHON", &python);
        bench.args(["bench", "-p", "capsa-host", "--bench", "capsa"]);
        if !bench_args.is_empty() {
            bench.arg("--").args(bench_args);
        }
        run(&mut bench)
    })?;
    // The microVM section: capsa's VMM booting the project's kernel, with
    // QEMU booting the same kernel and initramfs as the reference.
    let microvm = MicrovmAssets::prepare(root)?;
    let qemu = tools::ensure_qemu()?;
    step(
        "running the microVM boot benchmark (capsa's VMM, then QEMU)",
        || {
            let mut bench = cargo(root);
            microvm.export(&mut bench);
            bench.env("CAPSA_QEMU", &qemu).args([
                "run",
                "--release",
                "-p",
                "capsa-microvm",
                "--example",
                "boot_bench",
            ]);
            run(&mut bench)
        },
    )?;
    // The vsock device driven from the host side against a guest driver
    // played by the test (no guest kernel needed); see the test's comment.
    step("running the vsock device benchmark", || {
        run(cargo(root).args([
            "test",
            "--release",
            "-p",
            "capsa-microvm",
            "--features",
            "device-bench",
            "--lib",
            "bench_vsock_device_from_host",
            "--",
            "--nocapture",
        ]))
    })
}
