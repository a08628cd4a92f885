//! The agent's confinement of itself: a seccomp filter on every thread that
//! serves clients, and one thread kept outside it to start programs.
//!
//! A seccomp filter passes to children across `fork` and `execve`, so a
//! filter on the whole agent would confine the programs it runs as well,
//! and an ELF given to `runBytes` is the user's own program, owed the
//! machine's whole kernel. Filters belong to threads (installed without
//! `SECCOMP_FILTER_FLAG_TSYNC`) and a new thread inherits its creator's,
//! so `main`, before anything else:
//!
//! 1. starts the [`Spawner`], a thread that receives `Command`s over a
//!    channel, spawns them and hands back the `Child`: programs fork from
//!    it and start unfiltered. It lives as long as the agent: a child's
//!    parent-death signal fires when the thread that forked it ends.
//! 2. installs [`filter`] on itself: the async runtime, its blocking pool
//!    and every task that parses a client's message are made afterwards and
//!    inherit it.
//!
//! The filter is an allow-list (Firecracker's model), taken from the
//! agent's own system calls under `strace -f` over its tests, glibc and
//! musl builds alike (musl still calls `open`, `stat`, `fork`): memory,
//! locks, time, signals, epoll, the listening and connected sockets, the
//! file operations of the work folder, grants and the `Directory`
//! capability, `wait4` and `kill` for its children, and `reboot` only to
//! end the machine. Anything else fails with `EPERM` (the operation that
//! needed it fails, the agent goes on): among them `execve`, `fork` and
//! every `clone` that is not a thread's, `ptrace`, `mount`, `unshare`,
//! `setns`, `bpf`, module and kexec loading. `clone3`, whose flags live in
//! memory a filter cannot read, answers `ENOSYS` from a second filter, so
//! glibc falls back to `clone` for threads.

use std::collections::BTreeMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Starts programs from the one thread outside the filter.
pub struct Spawner {
    requests: mpsc::Sender<(Command, mpsc::SyncSender<io::Result<Child>>)>,
}

impl Spawner {
    /// Starts the spawning thread; call it before [`confine`].
    pub fn start() -> io::Result<Spawner> {
        let (requests, incoming) =
            mpsc::channel::<(Command, mpsc::SyncSender<io::Result<Child>>)>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Spawner { requests })
    }

    /// Spawns `command` on the spawning thread and waits for it to have
    /// started (as `Command::spawn` does: until `execve` succeeded or
    /// failed). Blocking on purpose: the caller registers the child with
    /// the reaper before it next yields, so no exit can be missed.
    pub fn spawn(&self, command: Command) -> io::Result<Child> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send((command, reply))
            .map_err(|_| io::Error::other("the spawning thread has ended"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the spawning thread has ended"))?
    }
}

/// Installs [`filter`] on the calling thread (and so on every thread it
/// makes from now on).
pub fn confine() -> io::Result<()> {
    for program in filter()? {
        seccompiler::apply_filter(&program).map_err(io::Error::other)?;
    }
    Ok(())
}

/// System calls allowed with any arguments.
const ALLOWED: &[i64] = &[
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads, locks, time, randomness.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    // Signals: SIGCHLD and SIGTERM handlers, thread stacks, panics.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_tgkill,
    // Its children: reaping and killing their process groups.
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    // The event loop.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pipe2,
    // Sockets: the listener and its connections.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // Descriptors and files: the work folder, grants, `Directory`.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_utimensat,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_umask,
    libc::SYS_getcwd,
    // Flushing before the machine ends.
    libc::SYS_sync,
];

/// Why a rule could not be built.
fn fail(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("seccomp: {e}"))
}

/// Argument `arg` (its low 32 bits) compared with `op`.
fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> io::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(fail)
}

/// One rule per value: argument `arg` equal to any of `values`.
fn any_of(arg: u8, values: &[u64]) -> io::Result<Vec<SeccompRule>> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![condition(arg, SeccompCmpOp::Eq, v)?]).map_err(fail))
        .collect()
}

/// An `ioctl` request as the filter compares it: `Ioctl` is an `int` in
/// musl and an `unsigned long` in glibc.
#[allow(
    clippy::unnecessary_cast,
    reason = "needed where `Ioctl` is not already u64 (musl), needless where it is"
)]
fn request(r: libc::Ioctl) -> u64 {
    r as u64
}

/// The agent's filters: `clone3` answered with `ENOSYS`, then the
/// allow-list (everything else `EPERM`).
pub fn filter() -> io::Result<Vec<BpfProgram>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    // Threads, never processes: `clone` only with CLONE_THREAD.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![
            SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(thread), thread)?])
                .map_err(fail)?,
        ],
    );
    // Let through here, refused by the second filter.
    rules.insert(libc::SYS_clone3, Vec::new());
    // Memory is never made executable.
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![condition(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])
        .map_err(fail)?],
    );
    // Naming its threads.
    rules.insert(
        libc::SYS_prctl,
        any_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?,
    );
    // Non-blocking and close-on-exec flags, and "is this a terminal".
    rules.insert(
        libc::SYS_ioctl,
        any_of(
            1,
            &[
                libc::FIONBIO,
                libc::FIOCLEX,
                libc::FIONCLEX,
                libc::TCGETS,
                libc::TIOCGWINSZ,
            ]
            .map(request),
        )?,
    );
    // Ending the machine (PID 1 only has the right), nothing else.
    rules.insert(
        libc::SYS_reboot,
        any_of(2, &[libc::LINUX_REBOOT_CMD_RESTART as u32 as u64])?,
    );
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    // Installed in this order: installing takes `prctl` calls that the
    // allow-list refuses once it is in place.
    Ok(vec![
        no_clone3.try_into().map_err(fail)?,
        allow.try_into().map_err(fail)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::Stdio;

    fn seccomp_field(status: &str) -> &str {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim)
            .unwrap_or("missing")
    }

    /// A confined thread cannot start a program or mount, its own new
    /// threads are confined too and still work, and the spawner started
    /// before it runs programs that are not confined at all.
    #[test]
    fn a_confined_thread_cannot_run_programs_but_its_spawner_can() {
        let spawner = Spawner::start().unwrap();
        std::thread::spawn(move || {
            confine().unwrap();
            let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert_eq!(seccomp_field(&own), "2", "filter mode");

            let refused = Command::new("/bin/sh").arg("-c").arg("true").spawn();
            assert_eq!(
                refused.map(|_| ()).map_err(|e| e.raw_os_error()),
                Err(Some(libc::EPERM)),
                "fork from a confined thread"
            );
            let mount = nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            );
            assert_eq!(mount, Err(nix::errno::Errno::EPERM), "mount");

            // Threads still start (glibc's clone3 falls back to clone).
            let inner = std::thread::spawn(|| {
                seccomp_field(&std::fs::read_to_string("/proc/thread-self/status").unwrap())
                    .to_string()
            });
            assert_eq!(inner.join().unwrap(), "2", "a confined thread's thread");

            let mut command = Command::new("/bin/sh");
            command
                .arg("-c")
                .arg("grep Seccomp: /proc/self/status; /bin/sh -c 'echo exec works'")
                .stdout(Stdio::piped());
            let mut child = spawner.spawn(command).unwrap();
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            assert!(child.wait().unwrap().success());
            assert!(out.contains("Seccomp:\t0\n"), "{out}");
            assert!(out.contains("exec works"), "{out}");
        })
        .join()
        .unwrap();
    }
}
