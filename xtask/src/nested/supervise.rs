//! Supervision of a running machine: its console streamed out, its
//! heartbeat watched, its deadline kept, and how it ended told apart (the
//! jobs' exit code, or the machine itself failing).

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{ChildStdout, Command};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::image::READY_MARKER;
use super::qemu::ask_qemu_about_cpus;
use crate::cmd::human;

/// How long the machine's second serial port (its heartbeat, every 5 s, and
/// its kernel log) may stay silent before the machine counts as frozen: a
/// job that is merely slow keeps the heartbeat going, a machine whose
/// kernel or emulated CPUs stopped does not.
const FROZEN_AFTER: Duration = Duration::from_secs(120);

/// The nested machine itself failed while a job ran, so the job neither
/// passed nor failed: it froze (its heartbeat went silent; the job's own
/// deadlines cannot fire inside a frozen machine), or its own kernel died
/// (an oops or panic in its log and no exit status: seen once, the L1
/// kernel taking a page fault with a nested guest's GS base still loaded
/// and recursing until its stack guard page, on capsa's `vcpu0` thread).
/// Says which job and test were running, the kernel log's tail and, for
/// a freeze, the emulated CPUs' state.
#[derive(Debug)]
pub struct MachineFailed {
    pub report: String,
}

impl std::fmt::Display for MachineFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report)
    }
}

impl std::error::Error for MachineFailed {}

/// How the machine's jobs ended.
pub struct Finished {
    /// The exit code of the last job run.
    pub code: i32,
    /// Everything the jobs printed on the console.
    pub transcript: String,
}

/// Starts `qemu` and watches the machine until it powers off, freezes or
/// outlives `deadline`: its heartbeat and kernel log are written to
/// `l1_log`, QMP listens at `monitor`, and the jobs' exit code comes back
/// in `scratch`'s `status`.
pub(super) fn supervise(
    mut qemu: Command,
    scratch: &Path,
    l1_log: &Path,
    monitor: &Path,
    deadline: Duration,
) -> Result<Finished> {
    let start = Instant::now();
    let mut child = qemu
        .spawn()
        .context("could not start QEMU for the nested test machine")?;

    let stdout = child.stdout.take().expect("piped");
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let running = Arc::new(Mutex::new(Running::default()));
    let reader = stream_console(stdout, lines_tx, Arc::clone(&running));

    let mut announced = false;
    let mut heard = (0, Instant::now());
    let mut frozen = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        let size = fs::metadata(l1_log).map_or(0, |m| m.len());
        if size != heard.0 {
            heard = (size, Instant::now());
        } else if announced && heard.1.elapsed() > FROZEN_AFTER {
            let cpus = ask_qemu_about_cpus(monitor);
            let _ = child.kill();
            let _ = child.wait();
            frozen = Some(cpus);
            break None;
        }
        if !announced {
            if let Ok(line) = lines_rx.try_recv() {
                eprintln!(
                    "==> nested machine up in {} ({})",
                    human(start.elapsed()),
                    line.trim_start_matches(READY_MARKER)
                        .trim_start_matches([':', ' '])
                );
                announced = true;
            }
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = reader.join().unwrap_or_default();
    let tail = || {
        let from = console.boot.len().saturating_sub(30);
        console.boot[from..].join("\n")
    };
    let running = || running.lock().unwrap_or_else(|e| e.into_inner()).describe();
    if let Some(cpus) = frozen {
        let l1 = fs::read_to_string(l1_log).unwrap_or_default();
        return Err(MachineFailed {
            report: format!(
                "the nested test machine froze: no heartbeat for {} while running {}; \
                 it was killed after {}\n\
                 its kernel log and heartbeat, last lines:\n{}\n\
                 its CPUs (QEMU):\n{}",
                human(FROZEN_AFTER),
                running(),
                human(start.elapsed()),
                last_lines(&l1, 40),
                cpus
            ),
        }
        .into());
    }
    let Some(status) = status else {
        bail!(
            "the nested test machine did not finish within {}; it was killed{}",
            human(deadline),
            if announced {
                String::new()
            } else {
                format!("\nconsole:\n{}", tail())
            }
        );
    };
    match fs::read_to_string(scratch.join("status")) {
        Ok(code) => Ok(Finished {
            code: code
                .trim()
                .parse::<i32>()
                .with_context(|| format!("unreadable exit status {code:?}"))?,
            transcript: console.transcript,
        }),
        Err(_) => {
            let l1 = fs::read_to_string(l1_log).unwrap_or_default();
            let last = Vec::from(console.tail).join("\n");
            if let Some(line) = kernel_failure(&l1).or_else(|| kernel_failure(&last)) {
                return Err(MachineFailed {
                    report: format!(
                        "the nested test machine's kernel failed ({}) while running {}; \
                         its kernel log, last lines:\n{}",
                        line.trim(),
                        running(),
                        last_lines(&l1, 40),
                    ),
                }
                .into());
            }
            bail!(
                "the nested test machine stopped ({status}) before its jobs ended{}",
                if announced {
                    String::new()
                } else {
                    format!("\nconsole:\n{}", tail())
                }
            )
        }
    }
}

/// What the console said.
#[derive(Default)]
struct Console {
    /// The lines before the ready marker: boot noise, kept for an error
    /// report.
    boot: Vec<String>,
    /// The last lines once jobs run: where a dying kernel prints its oops.
    tail: VecDeque<String>,
    /// Everything the jobs printed, for the triage of a failure.
    transcript: String,
}

/// Reads QEMU's console in a thread: the jobs' output is shown as it
/// comes and told to `running`; the ready line goes to `ready`.
fn stream_console(
    stdout: ChildStdout,
    ready: mpsc::Sender<String>,
    running: Arc<Mutex<Running>>,
) -> JoinHandle<Console> {
    std::thread::spawn(move || {
        let mut stdout_lock = std::io::stdout();
        let mut up = false;
        let mut console = Console::default();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\r');
            if up {
                let _ = writeln!(stdout_lock, "{text}");
                running.lock().unwrap_or_else(|e| e.into_inner()).saw(text);
                console.transcript.push_str(text);
                console.transcript.push('\n');
                if console.tail.len() == 200 {
                    console.tail.pop_front();
                }
                console.tail.push_back(text.to_string());
            } else if text.contains(READY_MARKER) {
                up = true;
                let _ = ready.send(text.to_string());
            } else {
                console.boot.push(text.to_string());
            }
        }
        console
    })
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The first line of a kernel log that says the kernel itself failed.
fn kernel_failure(log: &str) -> Option<&str> {
    log.lines().find(|line| {
        ["BUG: ", "Oops", "Kernel panic", "general protection fault"]
            .iter()
            .any(|mark| line.contains(mark))
    })
}

/// What the console last said: the job running and its last whole line (a
/// test's name is printed before it ends, on the line it ends on, which
/// shows above the report once the machine is killed).
#[derive(Default)]
struct Running {
    job: Option<String>,
    line: Option<String>,
}

impl Running {
    /// "JOB (its console's last whole line: LINE)", for reports.
    fn describe(&self) -> String {
        format!(
            "{} (its console's last whole line: {})",
            self.job.as_deref().unwrap_or("no job yet"),
            self.line.as_deref().unwrap_or("none")
        )
    }

    fn saw(&mut self, line: &str) {
        if let Some(job) = line.strip_prefix("==> [nested] ") {
            self.job = Some(job.to_string());
        }
        if !line.trim().is_empty() {
            self.line = Some(line.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dying_kernel_is_told_from_test_output() {
        let log = "test native_kvm::twenty_boots_leave_nothing_behind ... \
                   [  204.924301] BUG: TASK stack guard page was hit at 000000009a1f5592\n\
                   [  204.924943] stack guard page: 0000 [#1] PREEMPT SMP NOPTI";
        assert!(kernel_failure(log).is_some_and(|line| line.contains("stack guard page was hit")));
        assert!(kernel_failure("test native_kvm::a ... ok\ntest result: ok.").is_none());
    }
}
