//! Installing what a fresh machine lacks: the wasm targets for the guests, the
//! Cap'n Proto compiler for the schema crate, and rustfmt for the format check.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{on_path, run, stdout_of, succeeds};

/// The targets the guests are built for.
const WASM_TARGETS: [&str; 2] = ["wasm32-wasip2", "wasm32-wasip1"];

pub fn ensure_tools() -> Result<()> {
    ensure_wasm_targets()?;
    ensure_capnp()
}

fn ensure_wasm_targets() -> Result<()> {
    let rustup_hint = || {
        format!(
            "the guests need the Rust targets {}; install rustup (https://rustup.rs) \
             or add those targets to your toolchain yourself",
            WASM_TARGETS.join(" and ")
        )
    };
    let installed = stdout_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .with_context(rustup_hint)?;
    let missing: Vec<&str> = WASM_TARGETS
        .into_iter()
        .filter(|target| !installed.lines().any(|line| line.trim() == *target))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "==> installing Rust target(s) {}: the guests are built for them",
        missing.join(", ")
    );
    run(Command::new("rustup")
        .args(["target", "add"])
        .args(&missing))
    .with_context(|| {
        format!(
            "could not add the Rust target(s) {}; check your network connection, \
             or run `rustup target add {}` yourself",
            missing.join(", "),
            missing.join(" ")
        )
    })
}

fn ensure_capnp() -> Result<()> {
    if capnp_works() {
        return Ok(());
    }
    let manual =
        "install Cap'n Proto (Debian and Ubuntu: `apt-get install capnproto libcapnp-dev`; \
                  others: https://capnproto.org/install.html) and run again";
    if !on_path("apt-get") {
        bail!("the Cap'n Proto compiler `capnp` is not on PATH and apt-get is not available; {manual}");
    }
    let as_root = as_root().with_context(|| {
        format!("the Cap'n Proto compiler `capnp` is not on PATH and installing it needs root; {manual}")
    })?;

    eprintln!("==> `capnp` or its standard schemas not found: updating the apt package lists to install capnproto");
    run(as_root("apt-get").arg("update"))
        .with_context(|| format!("`apt-get update` failed; {manual}"))?;
    eprintln!(
        "==> installing capnproto and libcapnp-dev: the schema crate is compiled with `capnp`"
    );
    run(as_root("apt-get").args(["install", "-y", "capnproto", "libcapnp-dev"]))
        .with_context(|| format!("installing capnproto failed; {manual}"))?;
    if !capnp_works() {
        bail!("capnproto was installed but `capnp --version` still fails; {manual}");
    }
    Ok(())
}

/// The compiler alone is not enough: the schema's `-> stream` methods import
/// `/capnp/stream.capnp`, which Debian ships in `libcapnp-dev`.
fn capnp_works() -> bool {
    succeeds(Command::new("capnp").arg("--version"))
        && [
            "/usr/include/capnp/stream.capnp",
            "/usr/local/include/capnp/stream.capnp",
        ]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

/// Makes commands that run as root: directly when we are root, else through sudo.
pub(crate) fn as_root() -> Result<fn(&str) -> Command> {
    fn direct(program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }
    fn sudo(program: &str) -> Command {
        let mut cmd = Command::new("sudo");
        cmd.args(["DEBIAN_FRONTEND=noninteractive", program]);
        cmd
    }
    let uid = stdout_of(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() == "0" {
        Ok(direct)
    } else if on_path("sudo") {
        Ok(sudo)
    } else {
        bail!("not running as root and sudo is not available")
    }
}

pub(crate) fn package_installed(pkg: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|status| status.trim_end().ends_with(" installed"))
}

/// Installs the Debian package `pkg` with apt unless it is installed;
/// `why` says what needs it.
pub(crate) fn ensure_deb(pkg: &str, why: &str) -> Result<()> {
    if package_installed(pkg) {
        return Ok(());
    }
    let manual = format!("install it yourself (`apt-get install {pkg}`) and run again");
    if !on_path("apt-get") {
        bail!("{why} needs the Debian package {pkg} and apt-get is not available; {manual}");
    }
    let root_cmd = as_root().with_context(|| {
        format!("{why} needs the Debian package {pkg} and installing it needs root; {manual}")
    })?;
    eprintln!("==> installing {pkg}: {why} needs it");
    run(root_cmd("apt-get").arg("update"))
        .with_context(|| format!("`apt-get update` failed; {manual}"))?;
    run(root_cmd("apt-get").args(["install", "-y", "--no-install-recommends", pkg]))
        .with_context(|| format!("installing {pkg} failed; {manual}"))
}

/// Debian's static busybox, the ELF the microVM tests run in a guest;
/// returns its path.
pub(crate) fn ensure_busybox() -> Result<PathBuf> {
    ensure_deb("busybox-static", "the microVM end-to-end test")?;
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context(
            "busybox-static is installed but /bin/busybox is missing; reinstall busybox-static",
        )
}

/// Runs `apt-get update` as root, with a message saying why.
pub(crate) fn apt_update() -> Result<()> {
    let manual = "run `apt-get update` yourself and try again";
    let root_cmd =
        as_root().with_context(|| format!("updating apt's package lists needs root; {manual}"))?;
    eprintln!("==> updating apt's package lists");
    run(root_cmd("apt-get").arg("update"))
        .with_context(|| format!("`apt-get update` failed; {manual}"))
}

/// The oldest QEMU the nested test machine accepts: bookworm's own 7.2
/// locks up (soft lockup in the L1 kernel) as soon as a nested guest boots
/// under TCG's SVM emulation; 10.0 from bookworm-backports runs it.
const NESTED_QEMU_MAJOR: u32 = 10;

/// QEMU able to run the nested test machine (and the benchmark's QEMU
/// peer inside it); installs `qemu-system-x86` from the distribution's
/// backports when the installed one is missing or too old. Returns the
/// `qemu-system-x86_64` command.
pub(crate) fn ensure_nested_qemu() -> Result<PathBuf> {
    let qemu = PathBuf::from("qemu-system-x86_64");
    let major = || {
        stdout_of(Command::new(&qemu).arg("--version"))
            .ok()
            .and_then(|v| qemu_major(&v))
    };
    if major().is_some_and(|m| m >= NESTED_QEMU_MAJOR) {
        return Ok(qemu);
    }
    let manual = format!(
        "install qemu-system-x86 {NESTED_QEMU_MAJOR} or newer yourself \
         (Debian bookworm: `apt-get install -t bookworm-backports qemu-system-x86`) and run again"
    );
    if !on_path("apt-get") {
        bail!("the nested test machine needs QEMU {NESTED_QEMU_MAJOR} or newer and apt-get is not available; {manual}");
    }
    let root_cmd = as_root().with_context(|| {
        format!("the nested test machine needs QEMU {NESTED_QEMU_MAJOR} or newer and installing it needs root; {manual}")
    })?;
    let codename = os_release("VERSION_CODENAME").with_context(|| {
        format!("cannot tell which Debian release this is (no VERSION_CODENAME in /etc/os-release); {manual}")
    })?;
    let suite = format!("{codename}-backports");
    ensure_apt_suite(&suite).with_context(|| manual.clone())?;
    eprintln!(
        "==> installing qemu-system-x86 from {suite}: the nested test machine needs QEMU {NESTED_QEMU_MAJOR} \
         (the installed one is {})",
        major().map_or("missing".to_string(), |m| format!("version {m}"))
    );
    run(root_cmd("apt-get").args([
        "install",
        "-y",
        "--no-install-recommends",
        "-t",
        &suite,
        "qemu-system-x86",
    ]))
    .with_context(|| format!("installing qemu-system-x86 from {suite} failed; {manual}"))?;
    match major() {
        Some(m) if m >= NESTED_QEMU_MAJOR => Ok(qemu),
        other => bail!("after installing, qemu-system-x86_64 reports version {other:?}; {manual}"),
    }
}

/// `QEMU emulator version 10.0.2 (Debian ...)` -> 10.
fn qemu_major(version: &str) -> Option<u32> {
    let rest = version.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

/// A field of `/etc/os-release`, unquoted.
fn os_release(field: &str) -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix('='))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// Makes apt know `suite` (e.g. `bookworm-backports`) from the same mirror
/// as the system's own sources. Adds one file of its own to
/// `sources.list.d` and nothing else: backports have a low default
/// priority, so nothing else on the system changes until a package is
/// asked for with `-t`.
fn ensure_apt_suite(suite: &str) -> Result<()> {
    let sources = apt_source_texts();
    if sources
        .iter()
        .any(|(_, text)| text.split_whitespace().any(|w| w == suite))
    {
        if !apt_knows_suite(suite) {
            apt_update()?;
        }
        return Ok(());
    }
    let mirror = sources
        .iter()
        .find_map(|(_, text)| debian_mirror(text))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string());
    let root_cmd = as_root()?;
    let file = format!("/etc/apt/sources.list.d/capsa-{suite}.sources");
    eprintln!("==> adding {suite} ({mirror}) to apt's sources in {file}");
    let entry = format!(
        "# Added by capsa's xtask: QEMU for the nested test machine.\n\
         Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    let mut tee = root_cmd("tee");
    tee.arg(&file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = tee.spawn().context("could not run tee")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(entry.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("could not write {file}");
    }
    apt_update()
}

/// Whether apt's package lists include `suite`.
fn apt_knows_suite(suite: &str) -> bool {
    stdout_of(Command::new("apt-cache").arg("policy"))
        .is_ok_and(|p| p.contains(&format!("{suite}/")))
}

/// The text of every apt source file, one-line and deb822 alike.
fn apt_source_texts() -> Vec<(PathBuf, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
        .into_iter()
        .filter_map(|p| Some((p.clone(), std::fs::read_to_string(&p).ok()?)))
        .collect()
}

/// The first Debian archive URI in a source file (not the security archive).
fn debian_mirror(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .find(|w| {
            (w.starts_with("http://") || w.starts_with("https://"))
                && w.trim_end_matches('/').ends_with("/debian")
        })
        .map(|w| w.trim_end_matches('/').to_string())
}

/// Installs rustup component `component` (whose cargo subcommand is
/// `subcommand`) if cargo lacks it, saying `why` it is needed: rustfmt and
/// clippy ship with rustup's default profile but not its minimal one.
fn ensure_component(component: &str, subcommand: &str, why: &str) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if succeeds(Command::new(cargo).args([subcommand, "--version"])) {
        return Ok(());
    }
    eprintln!("==> installing {component}: {why}");
    run(Command::new("rustup").args(["component", "add", component])).with_context(|| {
        format!("could not install {component}; run `rustup component add {component}` yourself")
    })
}

/// Installs clippy if cargo lacks it.
pub fn ensure_clippy() -> Result<()> {
    ensure_component("clippy", "clippy", "the tests lint the code")
}

/// Installs rustfmt if cargo lacks it.
pub fn ensure_rustfmt() -> Result<()> {
    ensure_component("rustfmt", "fmt", "the tests start with a format check")
}
