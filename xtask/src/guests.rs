//! Building the guest components and collecting them in one stable folder,
//! `target/guests/out/`, that tests, benchmarks and the demo read through
//! `CAPSA_GUESTS`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{cargo, run};

/// The variable that tells tests and benchmarks where the built guests are.
pub const ENV_VAR: &str = "CAPSA_GUESTS";

/// The cargo profile guests are built with (see the workspace `Cargo.toml`).
const PROFILE: &str = "guest";

/// Guests get their own target folder so that their builds never invalidate
/// the native ones.
fn target_dir(root: &Path) -> PathBuf {
    root.join("target/guests")
}

/// The stable folder holding every built guest.
pub fn out_dir(root: &Path) -> PathBuf {
    target_dir(root).join("out")
}

/// Where cargo leaves the binary `name` built for `target`.
fn built(root: &Path, target: &str, name: &str) -> PathBuf {
    target_dir(root)
        .join(target)
        .join(PROFILE)
        .join(format!("{name}.wasm"))
}

fn guest_build(root: &Path, target: &str, packages: &[&str]) -> Command {
    let mut build = cargo(root);
    build
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir(root))
        .args(["--profile", PROFILE, "--target", target]);
    for package in packages {
        build.args(["-p", package]);
    }
    build
}

pub fn build_guests(root: &Path) -> Result<()> {
    let child_echo = built(root, "wasm32-wasip2", "child-echo");
    let hello = built(root, "wasm32-wasip2", "hello");
    let hello_p1 = built(root, "wasm32-wasip1", "hello");
    let files = built(root, "wasm32-wasip2", "files");

    run(&mut guest_build(
        root,
        "wasm32-wasip2",
        &["child-echo", "hello", "faulty", "files"],
    ))?;
    run(&mut guest_build(root, "wasm32-wasip1", &["hello", "files"]))?;
    // PID0 embeds the other guests, so it is built last and told where they
    // are; its `microvm` mode carries Debian's static busybox.
    let busybox = crate::tools::ensure_busybox()?;
    run(guest_build(root, "wasm32-wasip2", &["pid0"])
        .env("CAPSA_CHILD_ECHO_WASM", &child_echo)
        .env("CAPSA_HELLO_WASM", &hello)
        .env("CAPSA_HELLO_P1_WASM", &hello_p1)
        .env("CAPSA_FILES_WASM", &files)
        .env("CAPSA_DEMO_ELF", &busybox))?;

    let out = out_dir(root);
    fs::create_dir_all(&out).with_context(|| format!("could not create {}", out.display()))?;
    let outputs = [
        (built(root, "wasm32-wasip2", "pid0"), "pid0.wasm"),
        (child_echo, "child-echo.wasm"),
        (hello, "hello.wasm"),
        (hello_p1, "hello-p1.wasm"),
        (built(root, "wasm32-wasip2", "faulty"), "faulty.wasm"),
        (files, "files.wasm"),
        (built(root, "wasm32-wasip1", "files"), "files-p1.wasm"),
    ];
    eprintln!("    guests in {}:", out.display());
    for (from, name) in outputs {
        let size = copy_if_changed(&from, &out.join(name))?;
        eprintln!("    {name:<16} {:>10}", human_size(size));
    }
    Ok(())
}

/// Copies `from` to `to` unless `to` already has the same bytes, so that
/// anything keyed on the file's modification time is not rebuilt for nothing.
/// Returns the size in bytes.
fn copy_if_changed(from: &Path, to: &Path) -> Result<u64> {
    let bytes = fs::read(from).with_context(|| format!("could not read {}", from.display()))?;
    if fs::read(to).ok().as_deref() != Some(bytes.as_slice()) {
        fs::write(to, &bytes).with_context(|| format!("could not write {}", to.display()))?;
    }
    Ok(bytes.len() as u64)
}

fn human_size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{:.1} MiB", b / (KIB * KIB))
    }
}
