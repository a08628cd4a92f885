//! Assembling the microVM initramfs: the agent as `/init`, and nothing else
//! but the folders it mounts on and the console device.
//!
//! The archive is a `newc` cpio written here (no host `cpio` needed), left
//! uncompressed: under an emulated KVM the guest spends its time per byte
//! unpacked, and decompressing costs more there than it saves. The agent is
//! built with the size-optimised `guest` profile (stripped, `panic = "abort"`)
//! for the same reason. The result is cached by the agent binary's hash.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{cargo, run, stdout_of, step};

/// The target the agent is built for: a static binary with no C dependencies.
const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";
const AGENT_PROFILE: &str = "guest";

/// Builds the agent and, if it changed, the initramfs around it; returns the
/// path of `initramfs.cpio`.
pub fn ensure_initramfs(root: &Path) -> Result<PathBuf> {
    ensure_musl_target()?;
    step("building the microVM agent (static, musl)", || {
        run(cargo(root).args([
            "build",
            "--profile",
            AGENT_PROFILE,
            "-p",
            "capsa-agent",
            "--target",
            AGENT_TARGET,
        ]))
    })?;
    let target = crate::native_target_dir(root);
    let agent_path = agent_binary(root);
    let agent = fs::read(&agent_path)
        .with_context(|| format!("could not read the agent at {}", agent_path.display()))?;

    let out_dir = target.join("initramfs");
    let out = out_dir.join("initramfs.cpio");
    let key_path = out_dir.join("initramfs.cpio.key");
    let key = format!("{:016x}", fnv64(&agent));
    if out.is_file() && fs::read_to_string(&key_path).is_ok_and(|k| k == key) {
        eprintln!("==> initramfs is up to date: {}", out.display());
        return Ok(out);
    }
    fs::create_dir_all(&out_dir)?;
    let archive = initramfs(&agent);
    let staging = out_dir.join("initramfs.cpio.tmp");
    fs::write(&staging, &archive)?;
    fs::rename(&staging, &out)?;
    fs::write(&key_path, &key)?;
    eprintln!(
        "==> initramfs: {} ({} KiB, agent {} KiB)",
        out.display(),
        archive.len() >> 10,
        agent.len() >> 10
    );
    Ok(out)
}

/// Two broken initramfs archives for the microVM tests' failure cases,
/// written beside the real one: `no-agent.cpio`, whose `/init` is busybox
/// (its init applet never listens on vsock), and `no-init.cpio`, with no
/// `/init` at all (the kernel finds no root and panics). Returns their
/// paths in that order.
pub fn ensure_test_initramfs(root: &Path, busybox: &Path) -> Result<(PathBuf, PathBuf)> {
    let out_dir = crate::native_target_dir(root).join("initramfs");
    fs::create_dir_all(&out_dir)?;
    let busybox =
        fs::read(busybox).with_context(|| format!("could not read {}", busybox.display()))?;
    let no_agent = out_dir.join("no-agent.cpio");
    let mut cpio = Newc::default();
    for dir in ["dev", "proc", "sys"] {
        cpio.entry(dir, S_IFDIR | 0o755, (0, 0), &[]);
    }
    cpio.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[]);
    cpio.entry("init", S_IFREG | 0o755, (0, 0), &busybox);
    fs::write(&no_agent, cpio.finish())?;
    let no_init = out_dir.join("no-init.cpio");
    let mut cpio = Newc::default();
    cpio.entry("dev", S_IFDIR | 0o755, (0, 0), &[]);
    cpio.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[]);
    fs::write(&no_init, cpio.finish())?;
    Ok((no_agent, no_init))
}

/// Where the static agent binary is built (by [`ensure_initramfs`]).
pub fn agent_binary(root: &Path) -> PathBuf {
    crate::native_target_dir(root)
        .join(AGENT_TARGET)
        .join(AGENT_PROFILE)
        .join("capsa-agent")
}

fn ensure_musl_target() -> Result<()> {
    let installed = stdout_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("the microVM agent needs the Rust target x86_64-unknown-linux-musl; install rustup or add that target to your toolchain")?;
    if installed.lines().any(|l| l.trim() == AGENT_TARGET) {
        return Ok(());
    }
    eprintln!("==> installing Rust target {AGENT_TARGET}: the microVM agent is built for it");
    run(Command::new("rustup").args(["target", "add", AGENT_TARGET])).with_context(|| {
        format!("could not add the Rust target; run `rustup target add {AGENT_TARGET}` yourself")
    })
}

/// FNV-1a, 64 bits: a cache key, not a security boundary.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub(crate) const S_IFDIR: u32 = 0o040_000;
pub(crate) const S_IFREG: u32 = 0o100_000;
pub(crate) const S_IFCHR: u32 = 0o020_000;

/// The archive: folders, `/dev/console` (char 5:1, so the kernel can give
/// `/init` a console before devtmpfs is mounted), and the agent as `/init`.
fn initramfs(agent: &[u8]) -> Vec<u8> {
    let mut cpio = Newc::default();
    for dir in ["dev", "proc", "sys"] {
        cpio.entry(dir, S_IFDIR | 0o755, (0, 0), &[]);
    }
    cpio.entry("tmp", S_IFDIR | 0o1777, (0, 0), &[]);
    cpio.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[]);
    cpio.entry("init", S_IFREG | 0o755, (0, 0), agent);
    cpio.finish()
}

/// A writer for the `newc` cpio format the kernel unpacks: per entry a
/// 110-byte ASCII header ("070701" and 13 eight-digit hex fields), the
/// NUL-terminated name padded to 4 bytes, the data padded to 4 bytes; a
/// `TRAILER!!!` entry ends the archive. Owner root, mtime 0: the same agent
/// always makes the same bytes.
#[derive(Default)]
pub(crate) struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    pub(crate) fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        self.raw(self.next_ino, mode, nlink, rdev, name, data);
    }

    fn raw(&mut self, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs entries are under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short names"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() & 3 != 0 {
            self.out.push(0);
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.raw(0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Reads a newc archive back the way the kernel's unpacker does.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                let hex = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (mode, size, rdev) = (field(1), field(6) as usize, (field(9), field(10)));
            let namesize = field(11) as usize;
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(bytes[110 + namesize - 1], 0);
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            bytes = &bytes[(data_at + size).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                assert_eq!(total % 4, 0);
                return entries;
            }
            entries.push(Entry {
                name,
                mode,
                rdev,
                data,
            });
        }
    }

    #[test]
    fn the_archive_round_trips() {
        let agent = b"\x7fELF pretend agent, 27 bytes".to_vec();
        let entries = parse(&initramfs(&agent));
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "proc", "sys", "tmp", "dev/console", "init"]);
        let init = &entries[5];
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, agent);
        let console = &entries[4];
        assert_eq!((console.mode, console.rdev), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(entries[3].mode, S_IFDIR | 0o1777);
    }

    /// GNU cpio, an independent reader, lists the archive as written.
    /// `cargo xtask test` installs cpio; without it this test fails
    /// rather than pass unchecked.
    #[test]
    fn cpio_lists_the_archive() {
        assert!(
            crate::cmd::on_path("cpio"),
            "cpio is not installed (`cargo xtask test` installs it; else `apt-get install cpio`)"
        );
        let dir = std::env::temp_dir().join(format!("capsa-initramfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.cpio");
        fs::write(&path, initramfs(b"agent")).unwrap();
        let listed = stdout_of(
            Command::new("cpio")
                .args(["-t", "--quiet", "-F"])
                .arg(&path),
        )
        .unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            listed.lines().collect::<Vec<_>>(),
            ["dev", "proc", "sys", "tmp", "dev/console", "init"]
        );
    }
}
