//! QEMU, the L1 machine's emulator: its command line and the questions
//! asked of its monitor (QMP) about a machine that froze.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};

use super::NestedMachine;

/// How much memory and how many CPUs the L1 machine gets: room for the
/// test binaries and a few 128 MiB microVMs at once.
const L1_MEMORY_MIB: u32 = 4096;
const L1_CPUS: u32 = 2;

/// QEMU booting `machine` under `setpriv --pdeathsig KILL` (it dies with
/// this process), with `scratch` shared writable over 9p beside this
/// machine's `/` read-only, its console on stdout (piped), its second
/// serial port (heartbeat and kernel log) written to `l1_log` and QMP
/// listening at `monitor`.
pub(super) fn command(
    machine: &NestedMachine,
    scratch: &str,
    l1_log: &Path,
    monitor: &Path,
) -> Command {
    let mut qemu = Command::new("setpriv");
    qemu.args(["--pdeathsig", "KILL", "--"])
        .arg(&machine.qemu)
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args([
            "-smp",
            &L1_CPUS.to_string(),
            "-m",
            &L1_MEMORY_MIB.to_string(),
        ])
        .args(["-display", "none", "-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", l1_log.display()))
        .args(["-monitor", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .args(["-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(&machine.kernel)
        .arg("-initrd")
        .arg(&machine.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet loglevel=3 panic=-1 i8042.noaux i8042.nokbd \
             capsa_scratch={scratch}{}",
            // The workspace under /tmp (a checkout there): keep the
            // host's /tmp visible instead of a fresh one over it.
            if Path::new(scratch).starts_with("/tmp") {
                " capsa_keep_tmp=1"
            } else {
                ""
            }
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={scratch},mount_tag=scratch,security_model=none"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    qemu
}

/// Asks QEMU (over QMP at `socket`) where the machine's CPUs are, twice a
/// few seconds apart (a CPU spinning in a loop moves or stays put, a halted
/// one says so), and for their general registers; or says why it could not.
/// A frozen machine's QEMU still answers: QMP runs on QEMU's main loop, not
/// on a vCPU.
pub(super) fn ask_qemu_about_cpus(socket: &Path) -> String {
    let ask = || -> Result<String> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line)?; // the greeting
        let mut call = |command: &str| -> Result<String> {
            let request = if command == "qmp_capabilities" {
                serde_json::json!({ "execute": command })
            } else {
                serde_json::json!({
                    "execute": "human-monitor-command",
                    "arguments": { "command-line": command },
                })
            };
            writeln!(writer, "{request}")?;
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    bail!("QEMU closed its monitor");
                }
                let answer: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(r) = answer.get("return") {
                    return Ok(r.as_str().unwrap_or_default().to_string());
                }
                if let Some(e) = answer.get("error") {
                    bail!("{e}");
                }
                // An event: read on.
            }
        };
        call("qmp_capabilities")?;
        let first = call("info cpus")?;
        std::thread::sleep(Duration::from_secs(3));
        let second = call("info cpus")?;
        let registers = call("info registers -a")?;
        // The general registers tell where and in what mode; the FPU and
        // vector registers are noise here.
        let general: Vec<&str> = registers
            .lines()
            .filter(|l| {
                !["FPR", "YMM", "XMM", "FCW", "DR", "ZMM", "Opmask"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        Ok(format!(
            "info cpus:\n{first}3 s later:\n{second}registers:\n{}",
            general.join("\n")
        ))
    };
    ask().unwrap_or_else(|e| format!("could not ask QEMU: {e:#}"))
}
