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
//! and log writes, signal returns for the vCPU kick, and thread exit.

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

/// The filter of a vCPU thread: the calls above, and `ioctl` only with a
/// KVM request (on the vCPU, VM and irq fds).
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = VCPU_SYSCALLS
        .iter()
        .map(|&call| (call, Vec::new()))
        .collect();
    let kvm_request = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )
    .map_err(fail)?;
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![kvm_request]).map_err(fail)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    filter.try_into().map_err(fail)
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
        std::thread::spawn(move || {
            apply(&vcpu_filter().unwrap()).unwrap();
            f()
        })
        .join()
        .unwrap()
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
