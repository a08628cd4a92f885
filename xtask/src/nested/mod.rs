//! The nested test machine: a QEMU virtual machine whose own KVM runs
//! capsa's microVMs natively, for machines whose `/dev/kvm` only emulates
//! guests (or that have none).
//!
//! QEMU's TCG emulates AMD SVM with nested paging, so a Linux kernel inside
//! it (the "L1" machine) loads `kvm_amd` and offers a `/dev/kvm` on which
//! capsa's VMM boots its own kernel with guest code running at the speed of
//! the emulation. The L1 machine is
//!
//! - Debian's own `linux-image-*-amd64` kernel, fetched with `apt-get
//!   download` and unpacked (never installed), cached under
//!   `target/nested/l1/<version>/` with the modules it needs;
//! - an initramfs written here: a static busybox, those modules and an
//!   `/init` script that mounts this machine's `/` read-only over 9p, a
//!   writable scratch folder at its own path, fresh `/proc`, `/sys`, `/dev`,
//!   `/run` and `/tmp` (`TMPDIR` is `/run/capsa-tmp`, and `/tmp` stays this
//!   machine's when the workspace is under it), and runs a script from the
//!   scratch folder in a `chroot`.
//!
//! So the binaries already built here run unchanged, at their own paths,
//! against the real KVM of the L1 kernel. Their output streams to this
//! process's stdout over the machine's serial console; their exit status
//! comes back in a file of the scratch folder. The machine always powers
//! off: the script's end powers it off, a deadline kills it, and QEMU runs
//! under `setpriv --pdeathsig KILL`, so it dies with this process (Ctrl-C
//! included). A heartbeat and the kernel's log go to a second serial port;
//! when it stays silent for [`FROZEN_AFTER`](supervise::FROZEN_AFTER) the machine is frozen (seen
//! under QEMU's emulation: every deadline inside it stops with it), and it
//! is killed with a [`MachineFailed`] report of the job, the log's tail and the
//! CPUs' registers asked of QEMU over QMP.
//!
//! What it is not: hardware. Guest code runs under QEMU's emulation, one to
//! two orders of magnitude slower than on a real CPU; absolute times mean
//! little, ratios against a peer run in the same L1 machine do.
//!
//! Its parts: [`image`] (the L1 kernel and initramfs), [`qemu`] (QEMU's
//! command line and its monitor), [`jobs`] (the script the machine runs)
//! and [`supervise`] (watching a run to its end).

mod image;
mod jobs;
mod qemu;
mod supervise;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::step;
use crate::tools;

pub use jobs::Job;
pub use supervise::{Finished, MachineFailed};

/// The L1 machine's kernel, initramfs and QEMU, ready to boot.
pub struct NestedMachine {
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// Parent of the per-run scratch folders.
    runs: PathBuf,
}

impl NestedMachine {
    /// Installs QEMU (from bookworm-backports) if needed, fetches and
    /// caches the L1 kernel and writes the initramfs.
    pub fn prepare(target: &Path) -> Result<NestedMachine> {
        let qemu = tools::ensure_nested_qemu()?;
        let base = target.join("nested");
        let l1 = step("preparing the nested test machine's kernel", || {
            image::ensure_l1_kernel(&base)
        })?;
        let initramfs = step("writing the nested test machine's initramfs", || {
            image::ensure_l1_initramfs(&base, &l1)
        })?;
        Ok(NestedMachine {
            qemu,
            kernel: l1.join("vmlinuz"),
            initramfs,
            runs: base.join("runs"),
        })
    }

    /// Boots the machine, runs `jobs` one after another with `env` set
    /// (stopping at the first failure), streams their output, powers off.
    /// Returns the exit code of the last job run and what the jobs printed;
    /// fails if the machine did not finish within `deadline` or stopped
    /// without an exit code.
    pub fn run(
        &self,
        env: &[(String, String)],
        jobs: &[Job],
        deadline: Duration,
    ) -> Result<Finished> {
        let scratch = self.runs.join(std::process::id().to_string());
        if scratch.exists() {
            fs::remove_dir_all(&scratch)?;
        }
        fs::create_dir_all(&scratch)
            .with_context(|| format!("could not create {}", scratch.display()))?;
        let result = self.run_in(&scratch, env, jobs, deadline);
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    fn run_in(
        &self,
        scratch: &Path,
        env: &[(String, String)],
        jobs: &[Job],
        deadline: Duration,
    ) -> Result<Finished> {
        let scratch = scratch
            .canonicalize()
            .with_context(|| format!("{}", scratch.display()))?;
        let scratch_str = scratch
            .to_str()
            .context("the scratch folder's path is not UTF-8")?;
        if scratch_str.contains(char::is_whitespace) {
            bail!("the nested machine cannot use a folder whose path has spaces: {scratch_str}");
        }
        fs::write(scratch.join("run.sh"), jobs::job_script(env, jobs))?;
        // The machine's heartbeat and kernel log (its second serial port),
        // and QEMU's monitor, asked for the CPUs' state if it freezes.
        let l1_log = scratch.join("l1.log");
        let monitor = scratch.join("qmp.sock");
        let qemu = qemu::command(self, scratch_str, &l1_log, &monitor);
        supervise::supervise(qemu, &scratch, &l1_log, &monitor, deadline)
    }
}
