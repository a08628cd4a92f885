//! Seccomp filters for the VMM's own threads, in Firecracker's model: a
//! thread that runs guest-driven code installs, before it starts, a filter
//! allowing only the system calls that code makes. A vCPU thread handles
//! every exit of its guest (port and MMIO accesses reach the device models
//! from it), so it is the first thing a guest escaping KVM would hold.
//!
//! A system call outside the list fails with `EPERM` rather than killing
//! the process: the host serves many guests, and a refused call surfaces as
//! an error of that one machine.
//!
//! The lists were taken from the threads' own system calls (`strace -f`
//! over the VMM's tests and a real boot): the allocator's (`mmap`,
//! `munmap`, `madvise`, `brk`), locks (`futex`), the KVM ioctls, eventfd
//! and log writes, signal returns for the vCPU kick, and thread exit; a
//! vCPU thread may also send the kick signal to the threads of its own
//! process (a vCPU that stops the guest stops its siblings).
//!
//! The device thread reads and writes guest memory and the vsock
//! connections' host ends: besides the common calls it polls, makes Unix
//! socket pairs for guest-initiated connections, connects to and accepts
//! on Unix sockets (the hybrid-vsock listener and its forwards), makes
//! them non-blocking (`FIONBIO`) and shuts them down. It cannot open
//! files, make any other kind of socket, or run programs.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(String);

fn fail(e: impl std::fmt::Display) -> SeccompError {
    SeccompError(e.to_string())
}

/// The `ioctl` type byte of every KVM request (`KVMIO`).
const KVMIO: u64 = 0xAE;

/// System calls a vCPU thread makes with any arguments.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// System calls the device thread makes with any arguments, beside
/// `VCPU_SYSCALLS`.
const DEVICE_SYSCALLS: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_getsockopt,
];

/// Every call of `list` allowed with any arguments.
fn unconditional(list: &[i64]) -> BTreeMap<i64, Vec<SeccompRule>> {
    list.iter().map(|&call| (call, Vec::new())).collect()
}

/// One rule: argument `arg` (a 32-bit value) compared with `op`.
fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> Result<Vec<SeccompRule>, SeccompError> {
    let condition = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(fail)?;
    Ok(vec![SeccompRule::new(vec![condition]).map_err(fail)?])
}

/// `mprotect` that does not make memory executable: the allocator grows a
/// thread's heap arena with it; code cannot be made from data.
fn no_exec() -> Result<Vec<SeccompRule>, SeccompError> {
    rule(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)
}

/// `rules`, everything else refused with `EPERM`.
fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    filter.try_into().map_err(fail)
}

/// The filter of a vCPU thread: the calls above, and `ioctl` only with a
/// KVM request (on the vCPU, VM and irq fds).
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules = unconditional(VCPU_SYSCALLS);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    rules.insert(
        libc::SYS_ioctl,
        rule(1, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8)?,
    );
    // A vCPU that stops the guest kicks its siblings out of KVM_RUN: the
    // kick signal, to threads of this process only (`pthread_kill` asks
    // `getpid` first).
    rules.insert(libc::SYS_getpid, Vec::new());
    let condition = |arg, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).map_err(fail)
    };
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![
            condition(0, u64::from(std::process::id()))?,
            condition(2, crate::vstate::vcpu::kick_signal() as u64)?,
        ])
        .map_err(fail)?],
    );
    compile(rules)
}

/// The filter of the device thread: the vCPU's common calls and
/// `DEVICE_SYSCALLS`, sockets and socket pairs of the Unix family only,
/// and `ioctl` only to make a descriptor non-blocking.
pub fn device_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules = unconditional(VCPU_SYSCALLS);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    rules.extend(unconditional(DEVICE_SYSCALLS));
    let unix = libc::AF_UNIX as u64;
    rules.insert(libc::SYS_socket, rule(0, SeccompCmpOp::Eq, unix)?);
    rules.insert(libc::SYS_socketpair, rule(0, SeccompCmpOp::Eq, unix)?);
    rules.insert(libc::SYS_ioctl, rule(1, SeccompCmpOp::Eq, libc::FIONBIO)?);
    compile(rules)
}

/// Installs `filter` on the calling thread only (and sets its
/// `no_new_privs`, which seccomp requires of an unprivileged caller).
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run on a thread of its own: filters cannot be removed.
    fn filtered<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        under(vcpu_filter().unwrap(), f)
    }

    fn under<T: Send + 'static>(filter: BpfProgram, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            apply(&filter).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno() -> Option<i32> {
        std::io::Error::last_os_error().raw_os_error()
    }

    #[test]
    fn the_device_thread_may_not_open_files_or_other_sockets_or_run_programs() {
        let refused = under(device_filter().unwrap(), || {
            // SAFETY: plain system calls on constant arguments; every
            // result is only inspected.
            unsafe {
                [
                    (libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY), errno()),
                    (libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0), errno()),
                    (libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0), errno()),
                    (
                        libc::syscall(
                            libc::SYS_execve,
                            std::ptr::null::<u8>(),
                            std::ptr::null::<u8>(),
                            std::ptr::null::<u8>(),
                        ) as i32,
                        errno(),
                    ),
                    (
                        libc::ioctl(0, libc::TIOCGWINSZ, [0u16; 4].as_mut_ptr()),
                        errno(),
                    ),
                    (
                        libc::mprotect(
                            libc::PTHREAD_STACK_MIN as *mut libc::c_void,
                            4096,
                            libc::PROT_READ | libc::PROT_EXEC,
                        ),
                        errno(),
                    ),
                ]
            }
        });
        for (i, outcome) in refused.iter().enumerate() {
            assert_eq!(*outcome, (-1, Some(libc::EPERM)), "call {i}");
        }
    }

    /// What the device thread does with the vsock device's host ends:
    /// socket pairs, a hybrid-vsock listener's accept and handshake, a
    /// forward's connect, non-blocking mode, poll, shutdown.
    #[test]
    fn the_device_thread_can_still_do_its_work() {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("capsa-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("listener");
        let _ = std::fs::remove_file(&path);
        // Bound before: binding creates a file, which the thread may not.
        let listener = UnixListener::bind(&path).unwrap();
        let outcome = under(
            device_filter().unwrap(),
            move || -> std::io::Result<Vec<u8>> {
                let (mut a, mut b) = UnixStream::pair()?;
                a.set_nonblocking(true)?;
                a.write_all(b"pair")?;
                let mut got = [0u8; 4];
                b.read_exact(&mut got)?;
                let mut client = UnixStream::connect(&path)?;
                listener.set_nonblocking(false)?;
                let (mut served, _) = listener.accept()?;
                client.write_all(b"CONNECT 1024\n")?;
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&served),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                crate::event_loop::poll(&mut fds, 1000)?;
                let mut line = [0u8; 13];
                served.read_exact(&mut line)?;
                served.shutdown(std::net::Shutdown::Write)?;
                let v: Vec<u8> = vec![7; 4 << 20];
                let mut out = got.to_vec();
                out.extend_from_slice(&line);
                out.push(v[v.len() - 1]);
                Ok(out)
            },
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(outcome.unwrap(), b"pairCONNECT 1024\n\x07");
    }

    #[test]
    fn a_vcpu_thread_may_not_open_files_or_sockets_or_run_programs() {
        let refused = filtered(|| {
            let errno = || std::io::Error::last_os_error().raw_os_error();
            // SAFETY: plain system calls on constant arguments; every
            // result is only inspected.
            let results = unsafe {
                [
                    (libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY), errno()),
                    (libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0), errno()),
                    // Null arguments: were execve allowed, EFAULT.
                    (
                        libc::syscall(
                            libc::SYS_execve,
                            std::ptr::null::<u8>(),
                            std::ptr::null::<u8>(),
                            std::ptr::null::<u8>(),
                        ) as i32,
                        errno(),
                    ),
                ]
            };
            // Another ioctl than KVM's: TIOCGWINSZ on stdin.
            let mut size = [0u16; 4];
            // SAFETY: TIOCGWINSZ writes a `struct winsize` (four u16s).
            let ioctl = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, size.as_mut_ptr()) };
            (results, (ioctl, errno()))
        });
        for (i, (result, errno)) in refused.0.iter().enumerate() {
            assert_eq!((*result, *errno), (-1, Some(libc::EPERM)), "call {i}");
        }
        assert_eq!(refused.1, (-1, Some(libc::EPERM)), "a non-KVM ioctl");
    }

    #[test]
    fn a_vcpu_thread_can_still_do_its_work() {
        let ok = filtered(|| {
            // Allocation, locks, an eventfd-like write to a pipe end, time.
            let v: Vec<u8> = vec![7; 8 << 20];
            let m = std::sync::Mutex::new(v.len());
            let n = *m.lock().unwrap();
            let t = std::time::Instant::now();
            std::thread::yield_now();
            eprintln!("written from a filtered thread");
            n == 8 << 20 && t.elapsed() < std::time::Duration::from_secs(60)
        });
        assert!(ok);
    }
}
