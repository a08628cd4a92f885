//! Building the microVM guest kernel from Debian's `linux-source-6.1`.
//!
//! The kernel is `make tinyconfig` plus the fragment `microvm/kernel/capsa.config`,
//! with the patches of `microvm/kernel/patches/` applied. The result is cached
//! in `target/kernel/<key>/` where the key hashes the fragment and the patches,
//! so a second run with the same inputs returns at once.
//!
//! Layout under `target/kernel/`:
//! - `src/`: the unpacked, patched source tree (re-unpacked when the patches change);
//! - `build/`: kbuild's output tree (`make O=`), reused across configurations;
//! - `<key>/vmlinux`, `<key>/bzImage`: the cached results.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{human, on_path, run, step};
use crate::tools::{as_root, package_installed};

/// The Debian package whose tarball the kernel is built from.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The top folder inside the tarball.
const SOURCE_TOP: &str = "linux-source-6.1";

/// Debian packages the kernel build needs besides the source.
const BUILD_PACKAGES: [&str; 9] = [
    "make",
    "gcc",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "xz-utils",
    "patch",
    "perl",
];

/// Marker in the source tree naming the patch set applied to it.
const PATCHED_MARKER: &str = ".capsa-patches";

/// Builds the guest kernel if its cached copy is missing and returns the path
/// of the uncompressed `vmlinux` (a `bzImage` sits beside it).
pub fn ensure_kernel(root: &Path) -> Result<PathBuf> {
    let inputs = Inputs::read(root)?;
    let kernel_dir = crate::native_target_dir(root).join("kernel");
    let out_dir = kernel_dir.join(&inputs.key);
    let vmlinux = out_dir.join("vmlinux");
    if vmlinux.is_file() {
        eprintln!(
            "==> guest kernel is up to date: {} (key {})",
            vmlinux.display(),
            inputs.key
        );
        return Ok(vmlinux);
    }

    ensure_packages()?;
    let src = step("unpacking and patching the kernel source", || {
        prepare_source(&kernel_dir, &inputs)
    })?;
    let build = kernel_dir.join("build");
    step("configuring the kernel (tinyconfig + capsa.config)", || {
        configure(&src, &build, &inputs.fragment)
    })?;
    step("building the kernel (vmlinux bzImage)", || {
        make_with_progress(&src, &build)
    })?;

    let staging = kernel_dir.join(format!("{}.tmp", inputs.key));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    fs::copy(build.join("vmlinux"), staging.join("vmlinux"))
        .context("the kernel build produced no vmlinux")?;
    fs::copy(build.join("arch/x86/boot/bzImage"), staging.join("bzImage"))
        .context("the kernel build produced no bzImage")?;
    fs::copy(build.join(".config"), staging.join("config"))?;
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir)?;
    }
    fs::rename(&staging, &out_dir)?;
    let size = fs::metadata(&vmlinux)?.len();
    eprintln!(
        "==> guest kernel: {} ({:.1} MiB)",
        vmlinux.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(vmlinux)
}

/// The fragment and the patches, and the cache key they hash to.
struct Inputs {
    fragment: String,
    patches: Vec<PathBuf>,
    key: String,
}

impl Inputs {
    fn read(root: &Path) -> Result<Self> {
        let dir = root.join("microvm/kernel");
        let fragment_path = dir.join("capsa.config");
        let fragment = fs::read_to_string(&fragment_path)
            .with_context(|| format!("could not read {}", fragment_path.display()))?;
        let mut patches: Vec<PathBuf> = match fs::read_dir(dir.join("patches")) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        patches.retain(|p| p.extension().is_some_and(|e| e == "patch"));
        patches.sort();

        let mut hash = Fnv64::default();
        hash.add(SOURCE_PACKAGE.as_bytes());
        hash.add(fragment.as_bytes());
        for patch in &patches {
            hash.add(patch.file_name().unwrap_or_default().as_encoded_bytes());
            hash.add(&fs::read(patch)?);
        }
        Ok(Inputs {
            fragment,
            patches,
            key: format!("{:016x}", hash.0),
        })
    }
}

/// FNV-1a, 64 bits: a cache key, not a security boundary. Each input is
/// length-prefixed so that moving bytes between inputs changes the key.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn add(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Installs the kernel source and build tools with apt when any is missing.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = std::iter::once(SOURCE_PACKAGE)
        .chain(BUILD_PACKAGES)
        .filter(|pkg| !package_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let manual = format!(
        "install them yourself (`apt-get install {}`) and run again",
        missing.join(" ")
    );
    if !on_path("apt-get") {
        bail!(
            "the kernel build needs the Debian packages {} and apt-get is not available; {manual}",
            missing.join(", ")
        );
    }
    let root_cmd = as_root().with_context(|| {
        format!(
            "the kernel build needs the Debian packages {} and installing them needs root; {manual}",
            missing.join(", ")
        )
    })?;
    eprintln!(
        "==> installing {}: the guest kernel is built from Debian's kernel source",
        missing.join(", ")
    );
    run(root_cmd("apt-get").arg("update"))
        .with_context(|| format!("`apt-get update` failed; {manual}"))?;
    run(root_cmd("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| format!("installing the kernel build packages failed; {manual}"))?;
    Ok(())
}

/// Unpacks the source once and applies the patches; a tree patched with an
/// older patch set is unpacked again, since patches cannot be reliably undone.
fn prepare_source(kernel_dir: &Path, inputs: &Inputs) -> Result<PathBuf> {
    let src = kernel_dir.join("src");
    let tree = src.join(SOURCE_TOP);
    let marker = tree.join(PATCHED_MARKER);
    if fs::read_to_string(&marker).is_ok_and(|applied| applied == inputs.key) {
        return Ok(tree);
    }
    if src.exists() {
        eprintln!("    the source tree carries other patches: unpacking it again");
        fs::remove_dir_all(&src)?;
    }
    let unpacking = kernel_dir.join("src.tmp");
    if unpacking.exists() {
        fs::remove_dir_all(&unpacking)?;
    }
    fs::create_dir_all(&unpacking)?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(SOURCE_TARBALL)
        .arg("-C")
        .arg(&unpacking))
    .with_context(|| format!("could not unpack {SOURCE_TARBALL}"))?;
    fs::rename(&unpacking, &src)?;

    for patch in &inputs.patches {
        run(Command::new("patch")
            .args(["-p1", "--forward", "--batch", "--quiet", "-d"])
            .arg(&tree)
            .arg("-i")
            .arg(patch))
        .with_context(|| {
            format!(
                "{} does not apply to {SOURCE_PACKAGE}; update it for the installed source",
                patch.display()
            )
        })?;
    }
    fs::write(&marker, &inputs.key)?;
    Ok(tree)
}

/// `make tinyconfig`, the fragment on top, `make olddefconfig`, then a check
/// that every option of the fragment survived (an option whose dependencies
/// are missing is silently dropped by kconfig).
fn configure(src: &Path, build: &Path, fragment: &str) -> Result<()> {
    fs::create_dir_all(build)?;
    run(make(src, build).arg("tinyconfig"))?;
    let config_path = build.join(".config");
    let mut config = fs::read_to_string(&config_path)?;
    config.push_str("\n# capsa.config\n");
    config.push_str(fragment);
    fs::write(&config_path, config)?;
    run(make(src, build).arg("olddefconfig"))?;

    let wanted = parse_config(fragment);
    let got = parse_config(&fs::read_to_string(&config_path)?);
    let wrong: Vec<String> = wanted
        .iter()
        .filter(|(name, value)| got.get(*name).map_or("n", String::as_str) != value.as_str())
        .map(|(name, value)| {
            format!(
                "{name}: wanted {value}, got {}",
                got.get(name).map_or("n", String::as_str)
            )
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "kconfig did not keep these options of microvm/kernel/capsa.config \
             (usually a dependency is missing from the fragment; see `make menuconfig`'s help \
             for each):\n  {}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}

/// Option name to value; `# CONFIG_X is not set` reads as `n`.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                name.starts_with("CONFIG_")
                    .then(|| (name.to_string(), "n".to_string()))
            } else {
                let (name, value) = line.split_once('=')?;
                name.starts_with("CONFIG_")
                    .then(|| (name.to_string(), value.to_string()))
            }
        })
        .collect()
}

fn make(src: &Path, build: &Path) -> Command {
    let mut make = Command::new("make");
    make.arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()));
    make
}

/// Runs `make vmlinux bzImage`, printing a progress line every few seconds
/// instead of kbuild's thousands of lines. Compiler diagnostics (stderr) go
/// straight through; on failure the last lines of make's output are shown.
fn make_with_progress(src: &Path, build: &Path) -> Result<()> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut cmd = make(src, build);
    cmd.arg(format!("-j{jobs}"))
        .args(["vmlinux", "bzImage"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("    $ make -j{jobs} vmlinux bzImage (about 4 minutes on 2 cores)");
    let mut child = cmd.spawn().context("could not start make")?;
    let stdout = child.stdout.take().context("make's stdout")?;

    let (lines_tx, lines_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut compiled = 0usize;
    let mut tail: Vec<String> = Vec::new();
    loop {
        match lines_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                if line.trim_start().starts_with("CC ") || line.trim_start().starts_with("AS ") {
                    compiled += 1;
                }
                tail.push(line);
                if tail.len() > 40 {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let last = tail.last().map_or("", |l| l.trim());
            eprintln!(
                "    [{}] {compiled} files compiled; {last}",
                human(start.elapsed())
            );
        }
    }
    let _ = reader.join();
    let status = child.wait()?;
    if !status.success() {
        eprintln!("    last lines of make's output:");
        for line in &tail {
            eprintln!("    | {line}");
        }
        bail!("the kernel build failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_and_unset_options() {
        let config = parse_config("CONFIG_A=y\n# CONFIG_B is not set\n# comment\nCONFIG_C=\"x\"\n");
        assert_eq!(config.get("CONFIG_A").map(String::as_str), Some("y"));
        assert_eq!(config.get("CONFIG_B").map(String::as_str), Some("n"));
        assert_eq!(config.get("CONFIG_C").map(String::as_str), Some("\"x\""));
        assert_eq!(config.len(), 3);
    }

    #[test]
    fn fragment_parses() {
        let root = crate::workspace_root();
        let inputs = Inputs::read(&root).unwrap();
        let wanted = parse_config(&inputs.fragment);
        assert_eq!(
            wanted.get("CONFIG_VIRTIO_VSOCKETS").map(String::as_str),
            Some("y")
        );
        assert_eq!(wanted.get("CONFIG_PCI").map(String::as_str), Some("n"));
        assert!(!inputs.patches.is_empty());
    }
}
