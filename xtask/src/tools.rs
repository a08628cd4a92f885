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
fn ensure_deb(pkg: &str, why: &str) -> Result<()> {
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

/// QEMU, the reference the microVM boot benchmark compares against (capsa
/// itself never runs it); returns the `qemu-system-x86_64` command.
pub(crate) fn ensure_qemu() -> Result<PathBuf> {
    ensure_deb(
        "qemu-system-x86",
        "the microVM boot benchmark (its QEMU reference)",
    )?;
    Ok(PathBuf::from("qemu-system-x86_64"))
}

/// rustfmt ships with rustup's default profile but not its minimal one.
pub fn ensure_rustfmt() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if succeeds(Command::new(cargo).args(["fmt", "--version"])) {
        return Ok(());
    }
    eprintln!("==> installing rustfmt: the tests start with a format check");
    run(Command::new("rustup").args(["component", "add", "rustfmt"]))
        .context("could not install rustfmt; run `rustup component add rustfmt` yourself")
}
