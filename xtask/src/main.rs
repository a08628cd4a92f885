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
mod nested;
mod python;
mod tools;
mod triage;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cmd::{cargo, exit_code, run, stdout_of, step};

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  demo            install missing tools, build the guests and capsa, run the demo
  test [--skip-native-kvm] [args]
                  check formatting, then build everything and run every test
                  (args go to the test binaries, e.g. a name filter). Tests
                  that need KVM running guests natively (named `native_kvm::*`)
                  run here if KVM is native, else in the nested test machine;
                  --skip-native-kvm leaves them out (said in the summary)
  bench [args]    build the guests and run the benchmarks (args go to the bench),
                  then the microVM boot benchmark (capsa's VMM and QEMU, where KVM
                  is native: here or in the nested test machine) and the vsock one
  nested CMD...   run a command in the nested test machine (its KVM runs
                  microVMs natively) with the microVM tests' environment
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
        ("test", rest) => {
            let (skip_native_kvm, rest) = match rest.split_first() {
                Some((flag, rest)) if flag == "--skip-native-kvm" => (true, rest),
                _ => (false, rest),
            };
            test(&root, skip_native_kvm, passthrough(rest)).map(|()| ExitCode::SUCCESS)
        }
        ("bench", rest) => bench(&root, passthrough(rest)).map(|()| ExitCode::SUCCESS),
        ("nested", rest) if !rest.is_empty() => nested_command(&root, passthrough(rest)),
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
    if !status.success() {
        return Ok(exit_code(status));
    }
    demo_microvm(root, &capsa, &pid0)
}

/// What the microVM tests, demo and benchmark boot, built and located once.
struct MicrovmAssets {
    kernel: PathBuf,
    initramfs: PathBuf,
    agent: PathBuf,
    busybox: PathBuf,
    /// Broken initramfs archives for the failure tests.
    no_agent: PathBuf,
    no_init: PathBuf,
}

impl MicrovmAssets {
    /// Builds the kernel (cached), the agent and initramfs, and installs
    /// Debian's static busybox if it is missing.
    fn prepare(root: &Path) -> Result<MicrovmAssets> {
        let kernel = kernel::ensure_kernel(root)?;
        let initramfs = initramfs::ensure_initramfs(root)?;
        let busybox = tools::ensure_busybox()?;
        let (no_agent, no_init) = initramfs::ensure_test_initramfs(root, &busybox)?;
        Ok(MicrovmAssets {
            kernel,
            initramfs,
            agent: initramfs::agent_binary(root),
            busybox,
            no_agent,
            no_init,
        })
    }

    /// The paths, under the names the tests read them from.
    fn vars(&self) -> [(&'static str, &Path); 6] {
        [
            ("CAPSA_KERNEL", &self.kernel),
            ("CAPSA_INITRAMFS", &self.initramfs),
            ("CAPSA_AGENT_BIN", &self.agent),
            ("CAPSA_BUSYBOX", &self.busybox),
            ("CAPSA_INITRAMFS_NO_AGENT", &self.no_agent),
            ("CAPSA_INITRAMFS_NO_INIT", &self.no_init),
        ]
    }

    /// Passes the paths to `cmd` in the environment the tests read.
    fn export(&self, cmd: &mut Command) {
        cmd.envs(self.vars());
    }

    /// The same environment for the nested test machine, with the guests'
    /// folder and this machine's `PATH`.
    fn env(&self, root: &Path) -> Vec<(String, String)> {
        let guests = guests::out_dir(root);
        let mut env: Vec<(String, String)> = self
            .vars()
            .into_iter()
            .chain([(guests::ENV_VAR, guests.as_path())])
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        if let Some(path) = std::env::var_os("PATH") {
            env.push(("PATH".to_string(), path.to_string_lossy().into_owned()));
        }
        env
    }
}

/// What this machine's KVM can do for the microVM path.
enum Kvm {
    /// KVM runs guest code natively: microVMs run here.
    Native { ns: f64 },
    /// KVM emulates guest instructions (Linux user space cannot run), or
    /// there is no usable KVM: microVMs run in the nested test machine.
    Unusable { why: String },
}

/// Builds one of `capsa-microvm`'s examples (release) and returns its path.
fn build_microvm_example(root: &Path, name: &str) -> Result<PathBuf> {
    run(cargo(root).args([
        "build",
        "--release",
        "-p",
        "capsa-microvm",
        "--example",
        name,
    ]))?;
    Ok(native_target_dir(root).join("release/examples").join(name))
}

/// Builds and runs the microVM probe example and says what KVM can do here.
fn probe_kvm(root: &Path) -> Result<Kvm> {
    let probe = build_microvm_example(root, "probe")?;
    let out = match stdout_of(&mut Command::new(&probe)) {
        Ok(out) => out,
        Err(e) => {
            return Ok(Kvm::Unusable {
                why: format!("no usable KVM ({e:#})"),
            })
        }
    };
    let mut words = out.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let ns = words.next().and_then(|n| n.parse::<f64>().ok());
    match (kind, ns) {
        ("emulated", Some(ns)) => Ok(Kvm::Unusable {
            why: format!(
                "KVM emulates guest code here (probe: {ns:.0} ns per loop iteration; native runs ~1 ns)"
            ),
        }),
        ("native", Some(ns)) => Ok(Kvm::Native { ns }),
        _ => bail!("unexpected output from the KVM probe: {out:?}"),
    }
}

/// The microVM half of the demo: PID0 runs busybox in a microVM, here
/// where KVM is native, else inside the nested test machine.
fn demo_microvm(root: &Path, capsa: &Path, pid0: &Path) -> Result<ExitCode> {
    let kvm = step("probing KVM", || probe_kvm(root))?;
    let assets = MicrovmAssets::prepare(root)?;
    let argv = vec![
        capsa.display().to_string(),
        "run".to_string(),
        "--allow-vm".to_string(),
        pid0.display().to_string(),
        "--".to_string(),
        "microvm".to_string(),
    ];
    run_where_kvm_is_native(root, &kvm, "microVM demo", &assets, &[], argv)
}

/// Runs `argv` from `root` where KVM runs guests natively: here if it does,
/// else in the nested test machine; with the microVM assets and `env` in
/// its environment. Returns its exit code.
fn run_where_kvm_is_native(
    root: &Path,
    kvm: &Kvm,
    what: &str,
    assets: &MicrovmAssets,
    env: &[(String, String)],
    argv: Vec<String>,
) -> Result<ExitCode> {
    match kvm {
        Kvm::Native { ns } => {
            eprintln!(
                "==> {what}, here: KVM runs guests natively (probe: {ns:.1} ns per loop iteration)"
            );
            eprintln!("    $ {}", argv.join(" "));
            let mut command = Command::new(&argv[0]);
            command.args(&argv[1..]).current_dir(root);
            assets.export(&mut command);
            command.envs(env.iter().map(|(k, v)| (k, v)));
            let status = command
                .status()
                .with_context(|| format!("could not start {}", argv[0]))?;
            Ok(exit_code(status))
        }
        Kvm::Unusable { why } => {
            eprintln!("==> {what}, in the nested test machine: {why}");
            let machine = nested::NestedMachine::prepare(&native_target_dir(root))?;
            let mut nested_env = assets.env(root);
            nested_env.extend_from_slice(env);
            let start = Instant::now();
            let jobs = [nested::Job {
                title: argv.join(" "),
                dir: root.to_path_buf(),
                argv,
            }];
            let code = machine.run(&nested_env, &jobs, NESTED_DEADLINE)?.code;
            eprintln!(
                "==> {what} in the nested machine: exit code {code} ({} including its boot)",
                cmd::human(start.elapsed())
            );
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

/// `cargo xtask nested CMD...`: `CMD` in the nested test machine, from the
/// current folder, with the microVM assets built and in the environment.
fn nested_command(root: &Path, argv: &[String]) -> Result<ExitCode> {
    let assets = MicrovmAssets::prepare(root)?;
    let machine = nested::NestedMachine::prepare(&native_target_dir(root))?;
    let jobs = [nested::Job {
        title: argv.join(" "),
        dir: std::env::current_dir()?,
        argv: argv.to_vec(),
    }];
    let code = machine.run(&assets.env(root), &jobs, NESTED_DEADLINE)?.code;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// How long the nested test machine may run, boot and power-off included.
const NESTED_DEADLINE: std::time::Duration = std::time::Duration::from_secs(40 * 60);

/// The module every test that needs natively running KVM lives in, so one
/// filter selects or skips them all.
const NATIVE_KVM_TESTS: &str = "native_kvm::";

/// Guest crates only build for wasm; `cargo test --workspace` must skip them.
const WASM_ONLY: [&str; 6] = [
    "pid0",
    "child-echo",
    "hello",
    "faulty",
    "files",
    "guest-runtime",
];

fn test(root: &Path, skip_native_kvm: bool, test_args: &[String]) -> Result<()> {
    let start = Instant::now();
    step("checking formatting", || {
        tools::ensure_rustfmt()?;
        run(cargo(root).args(["fmt", "--all", "--", "--check"])).context(
            "some files are not formatted as rustfmt wants; \
             run `cargo fmt --all` and commit the result",
        )
    })?;
    prepare(root)?;
    // The initramfs writer's test reads its archive back with GNU cpio.
    tools::ensure_deb("cpio", "the initramfs test")?;
    build_host(root)?;
    step("linting (clippy, warnings are errors)", || {
        tools::ensure_clippy()?;
        run(cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"])).context(
            "clippy found something; fix it (or say in an `#[expect(..., reason)]` why not)",
        )
    })?;
    let microvm = MicrovmAssets::prepare(root)?;
    let python = step(
        "preparing the Python client (virtualenv with pycapnp)",
        || python::ensure_venv(&native_target_dir(root)),
    )?;
    let kvm = step("probing KVM", || probe_kvm(root))?;
    let test_command = || {
        let mut test = cargo(root);
        // The Python example's test runs this interpreter.
        test.env("CAPSA_PYTHON", &python);
        // The microVM tests boot the project's kernel and initramfs; they
        // read their paths from the environment.
        microvm.export(&mut test);
        test.args(["test", "--release", "--workspace"]);
        for crate_name in WASM_ONLY {
            test.args(["--exclude", crate_name]);
        }
        test
    };
    let nested_why = match &kvm {
        Kvm::Native { ns } => {
            eprintln!("==> KVM runs guests natively here (probe: {ns:.1} ns per loop iteration): every test runs here");
            step("running tests", || {
                let mut test = test_command();
                if !test_args.is_empty() {
                    test.arg("--").args(test_args);
                }
                run(&mut test)
            })?;
            eprintln!("==> all tests passed ({})", cmd::human(start.elapsed()));
            return Ok(());
        }
        Kvm::Unusable { why } => why.clone(),
    };
    step(
        "running tests (those needing native KVM come after, in the nested machine)",
        || {
            let mut test = test_command();
            test.arg("--")
                .args(test_args)
                .args(["--skip", NATIVE_KVM_TESTS]);
            run(&mut test)
        },
    )?;
    if skip_native_kvm {
        eprintln!(
            "==> all tests passed ({}), but the tests needing native KVM were SKIPPED as asked \
             (--skip-native-kvm): {nested_why}",
            cmd::human(start.elapsed())
        );
        return Ok(());
    }
    eprintln!("==> the tests needing native KVM run in the nested test machine: {nested_why}");
    let jobs = step("listing the tests that need native KVM", || {
        native_kvm_jobs(root, test_command(), test_args)
    })?;
    if jobs.is_empty() {
        if test_args.is_empty() {
            bail!("found no test named {NATIVE_KVM_TESTS}*: the microVM tests are missing");
        }
        eprintln!(
            "==> all tests passed ({}); none needing native KVM matches {test_args:?}",
            cmd::human(start.elapsed())
        );
        return Ok(());
    }
    let machine = nested::NestedMachine::prepare(&native_target_dir(root))?;
    let mut env = microvm.env(root);
    env.push(("CAPSA_PYTHON".to_string(), python.display().to_string()));
    // The long soaks' sizes (CAPSA_SOAK_BOOTS, ...) reach the machine too.
    env.extend(std::env::vars().filter(|(k, _)| k.starts_with("CAPSA_SOAK_")));
    // The machine is QEMU's emulation of a CPU with SVM, and it fails on
    // its own now and then: it froze, its kernel died (a page fault taken
    // with a nested guest's GS base loaded), and microVM guests
    // triple-faulted where the emulated CPU lost their state across a VM
    // exit. A failed nested run goes once more, in a fresh machine, only
    // when the evidence says so (`triage.rs` has the rule for guests'
    // triple faults); any other failure fails `cargo xtask test` at once,
    // and a pass on the second run is reported as FLAKY with the evidence.
    let mut first_failure = None;
    for attempt in 1..=2 {
        let outcome = step(
            "running the tests that need native KVM in the nested machine",
            || match machine.run(&env, &jobs, NESTED_DEADLINE) {
                // The job running when the machine froze, or when its own
                // kernel died, neither passed nor failed (its deadlines
                // cannot fire in a frozen machine, nor its checks in a
                // dead one).
                Err(e) if e.downcast_ref::<nested::MachineFailed>().is_some() => {
                    Ok(Err(format!("the nested machine itself failed: {e:#}")))
                }
                Ok(finished) if finished.code == 0 => Ok(Ok(())),
                Ok(finished) => {
                    if let Some(symbols) = triage::symbolize(&finished.transcript, &microvm.kernel)
                    {
                        eprintln!("==> guest kernel addresses above, by symbol:\n{symbols}");
                    }
                    let failed = format!(
                        "tests failed in the nested test machine (exit code {})",
                        finished.code
                    );
                    match triage::rerun_evidence(&finished.transcript) {
                        Ok(evidence) => Ok(Err(format!("{failed}; {evidence}"))),
                        Err(why) => Err(anyhow::anyhow!(
                            "{failed}; not run again: {why} (a failure the test machine is \
                             not shown to have caused is capsa's)"
                        )),
                    }
                }
                Err(e) => Err(e),
            },
        )?;
        match outcome {
            Ok(()) => break,
            Err(why) if attempt == 1 => {
                eprintln!("==> {why}");
                eprintln!("==> running the nested jobs once more in a fresh machine");
                first_failure = Some(why);
            }
            Err(why) => bail!("{why} (twice in a row; the first run's failure is further up)"),
        }
    }
    if let Some(why) = first_failure {
        // The whole report is above; its first line says what it was.
        eprintln!(
            "==> FLAKY: the nested tests failed once and then passed in a fresh machine; \
             the first failure ({}) is printed above",
            why.lines().next().unwrap_or_default()
        );
    }
    eprintln!("==> all tests passed ({})", cmd::human(start.elapsed()));
    Ok(())
}

/// One job per test binary that has `native_kvm::` tests matching
/// `test_args`: the binary with those tests named exactly, one at a time.
fn native_kvm_jobs(
    root: &Path,
    mut build: Command,
    test_args: &[String],
) -> Result<Vec<nested::Job>> {
    let out = stdout_of(build.args(["--no-run", "--message-format=json"]))?;
    let mut jobs = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let listed = stdout_of(Command::new(exe).arg("--list").args(test_args))?;
        let tests: Vec<String> = listed
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .filter(|name| name.starts_with(NATIVE_KVM_TESTS))
            .map(str::to_string)
            .collect();
        if tests.is_empty() {
            continue;
        }
        let manifest = msg["manifest_path"].as_str().map(PathBuf::from);
        let dir = manifest
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(root)
            .to_path_buf();
        let name = msg["target"]["name"].as_str().unwrap_or("tests");
        // The console is a terminal: no colour codes in the log.
        let mut argv = vec![
            exe.to_string(),
            "--exact".to_string(),
            "--test-threads=1".to_string(),
            "--color=never".to_string(),
        ];
        argv.extend(tests.iter().cloned());
        jobs.push(nested::Job {
            title: format!("{name}: {} test(s)", tests.len()),
            dir,
            argv,
        });
    }
    Ok(jobs)
}

/// StarlingMonkey (the SpiderMonkey-based JS engine of componentize-js,
/// a 10 MiB WASM module) for the compile figure on a large real-world
/// program: fetched once from npm into `target/peers`, its tarball checked
/// against a pinned SHA-256.
fn ensure_large_wasm(root: &Path) -> Result<PathBuf> {
    const TARBALL: &str =
        "https://registry.npmjs.org/@bytecodealliance/componentize-js/-/componentize-js-0.23.0.tgz";
    const SHA256: &str = "b2e4b6fdee055805370950f127c21d7c549dcc7a1e907f20c5ee769ebba7ad10";
    const MEMBER: &str = "package/lib/starlingmonkey_embedding.wasm";
    let dir = native_target_dir(root).join("peers/starlingmonkey");
    let wasm = dir.join("starlingmonkey_embedding.wasm");
    if wasm.exists() {
        return Ok(wasm);
    }
    step(
        "fetching StarlingMonkey (componentize-js 0.23.0 from npm, 12 MB) for the compile figure",
        || {
            std::fs::create_dir_all(&dir)?;
            let tgz = dir.join("componentize-js.tgz");
            run(Command::new("curl")
                .args(["-fsSL", "--retry", "3", "-o"])
                .arg(&tgz)
                .arg(TARBALL))?;
            let sum = stdout_of(Command::new("sha256sum").arg(&tgz))?;
            if sum.split_whitespace().next() != Some(SHA256) {
                let _ = std::fs::remove_file(&tgz);
                bail!("{TARBALL}: SHA-256 {sum:?}, expected {SHA256}");
            }
            run(Command::new("tar")
                .arg("-xzf")
                .arg(&tgz)
                .arg("-C")
                .arg(&dir)
                .arg(MEMBER))?;
            std::fs::rename(dir.join(MEMBER), &wasm)?;
            let _ = std::fs::remove_dir_all(dir.join("package"));
            let _ = std::fs::remove_file(&tgz);
            Ok(())
        },
    )?;
    Ok(wasm)
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
    let large = ensure_large_wasm(root);
    let python = step(
        "preparing the Python client (virtualenv with pycapnp)",
        || python::ensure_venv(&native_target_dir(root)),
    )?;
    step("running benchmarks", || {
        let mut bench = cargo(root);
        bench.env("CAPSA_PEER_WASMTIME", &wasmtime);
        match &large {
            Ok(path) => {
                bench.env("CAPSA_BENCH_LARGE_WASM", path);
            }
            Err(e) => eprintln!("==> no compile figure on a large program: {e:#}"),
        }
        // For the echo through `capsa serve` from Python.
        bench.env("CAPSA_PYTHON", &python);
        bench.args(["bench", "-p", "capsa-host", "--bench", "capsa"]);
        if !bench_args.is_empty() {
            bench.arg("--").args(bench_args);
        }
        run(&mut bench)
    })?;
    bench_microvm_boot(root)?;
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

/// The microVM boot benchmark (`microvm/examples/boot_bench.rs`): capsa's
/// VMM and QEMU boot the same kernel and initramfs where KVM runs guests
/// natively, here or in the nested test machine. Never on an emulating
/// KVM: there every guest instruction is emulated, so a boot takes minutes
/// whichever VMM drives it (the figures would measure the emulator, not the
/// VMM) and user space cannot run, so the agent never comes up.
fn bench_microvm_boot(root: &Path) -> Result<()> {
    let kvm = step("probing KVM", || probe_kvm(root))?;
    let assets = MicrovmAssets::prepare(root)?;
    let qemu = tools::ensure_nested_qemu()?;
    let boot_bench = build_microvm_example(root, "boot_bench")?;
    let env = [("CAPSA_QEMU".to_string(), qemu.display().to_string())];
    let code = run_where_kvm_is_native(
        root,
        &kvm,
        "microVM boot benchmark (capsa's VMM, QEMU as reference)",
        &assets,
        &env,
        vec![boot_bench.display().to_string()],
    )?;
    if code != ExitCode::SUCCESS {
        bail!("the microVM boot benchmark failed");
    }
    Ok(())
}
