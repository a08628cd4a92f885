//! The device thread: waits on the vsock device's host sockets and on one
//! wake eventfd (queue notifications from vCPU threads, commands from the
//! [`Vm`](crate::Vm) handle, shutdown), and drives the device.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::csm::ConnectReply;
use crate::devices::virtio::vsock::Vsock;

/// `poll(2)` over `fds`; returns the number of ready fds.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `pollfd` whose
    // length is passed alongside; the kernel only writes `revents` fields.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Requests from the [`Vm`](crate::Vm) handle to the device thread.
pub enum Command {
    /// Open a host-initiated connection to a guest port.
    Connect {
        /// Guest port.
        port: u32,
        /// Host end kept by the muxer.
        stream: UnixStream,
        /// Told when the guest accepts or refuses.
        reply: oneshot::Sender<Result<(), io::ErrorKind>>,
    },
    /// Accept guest-initiated connections to a host port.
    Listen {
        /// Host port.
        port: u32,
        /// Where the host ends go.
        tx: mpsc::UnboundedSender<UnixStream>,
    },
}

/// How long the vsock device's interrupt may stay pending and unacknowledged
/// before the device thread raises it again (see
/// [`Interrupt::reraise_if_unacknowledged`](crate::devices::virtio::Interrupt::reraise_if_unacknowledged)); the thread wakes at least this
/// often.
const REMIND_AFTER: Duration = Duration::from_millis(500);

/// Everything the device thread works with.
pub struct DeviceThread {
    /// The vsock device behind its transport, shared with vCPU threads.
    pub vsock: Arc<Mutex<MmioTransport<Vsock>>>,
    /// Written by queue notifications, commands and shutdown.
    pub wake: EventFd,
    /// Set when the VM is going away.
    pub stop: Arc<AtomicBool>,
    /// Commands from the handle.
    pub commands: Receiver<Command>,
}

impl DeviceThread {
    /// Runs until `stop` is set.
    pub fn run(self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            fds.clear();
            fds.push(libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            {
                let mut t = lock(&self.vsock);
                while let Ok(cmd) = self.commands.try_recv() {
                    let muxer = t.device_mut().muxer_mut();
                    match cmd {
                        Command::Connect {
                            port,
                            stream,
                            reply,
                        } => muxer.connect(port, stream, ConnectReply::Channel(reply)),
                        Command::Listen { port, tx } => muxer.listen(port, tx),
                    }
                }
                t.device_mut().process();
                t.device_mut().fill_pollfds(&mut fds);
            }
            if let Err(e) = poll(&mut fds, REMIND_AFTER.as_millis() as i32) {
                tracing::error!("device thread: poll failed: {e}");
                break;
            }
            if fds[0].revents != 0 {
                let _ = self.wake.read();
            }
            let mut t = lock(&self.vsock);
            t.device_mut().on_ready(&fds[1..]);
            if t.interrupt().reraise_if_unacknowledged(REMIND_AFTER) {
                tracing::warn!(
                    "vsock: interrupt status {:#x} unacknowledged for {} ms; raised again \
                     ({} time(s) so far)",
                    t.interrupt().status(),
                    REMIND_AFTER.as_millis(),
                    t.interrupt().reraised()
                );
            }
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
