//! The 8250 UART at 0x3f8 (COM1), the guest's console.
//!
//! Output is captured into a bounded in-memory log ([`SerialLog`]) that
//! keeps the most recent bytes, so a panicking kernel's last words are there
//! for the error message while a chatty guest cannot grow host memory. The
//! console never carries data: vsock does.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports COM1 decodes.
pub const COM1_LEN: u16 = 8;
/// Default bytes of console output kept.
pub const DEFAULT_LOG_CAPACITY: usize = 256 * 1024;

/// The tail of a guest's console output.
#[derive(Clone, Debug)]
pub struct SerialLog {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Debug)]
struct LogInner {
    buf: VecDeque<u8>,
    capacity: usize,
    dropped: u64,
}

impl SerialLog {
    /// A log that keeps the last `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogInner {
                buf: VecDeque::new(),
                capacity: capacity.max(1),
                dropped: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends guest output, dropping the oldest bytes beyond capacity.
    pub fn push(&self, bytes: &[u8]) {
        let mut l = self.lock();
        l.buf.extend(bytes);
        let excess = l.buf.len().saturating_sub(l.capacity);
        if excess > 0 {
            l.buf.drain(..excess);
            l.dropped += excess as u64;
        }
    }

    /// Everything kept, lossily decoded.
    pub fn contents(&self) -> String {
        let l = self.lock();
        let (a, b) = l.buf.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// The last `n` lines.
    pub fn last_lines(&self, n: usize) -> String {
        let all = self.contents();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Bytes dropped from the front so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

/// `io::Write` into a [`SerialLog`].
#[derive(Debug)]
pub struct LogWriter(SerialLog);

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises IRQ 4 through an eventfd (a KVM irqfd in a running VM).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1.
pub struct Serial {
    uart: Uart<IrqTrigger, vm_superio::serial::NoEvents, LogWriter>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serial")
    }
}

impl Serial {
    /// A UART writing into `log` and raising `irq`.
    pub fn new(irq: EventFd, log: SerialLog) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(irq), LogWriter(log)),
        }
    }

    /// A guest read at `offset` (0..8) from the base port.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest write at `offset` (0..8) from the base port.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_the_tail() {
        let log = SerialLog::new(8);
        log.push(b"hello ");
        log.push(b"world\n");
        assert_eq!(log.contents(), "o world\n");
        assert_eq!(log.dropped(), 4);
        let log = SerialLog::new(100);
        log.push(b"a\nb\nc\n");
        assert_eq!(log.last_lines(2), "b\nc");
    }

    #[test]
    fn uart_transmits_into_log() {
        let log = SerialLog::new(100);
        let mut s = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), log.clone());
        for b in b"hi\n" {
            s.write(0, *b);
        }
        assert_eq!(log.contents(), "hi\n");
        // Line status: transmitter empty.
        assert_ne!(s.read(5) & 0x20, 0);
    }
}
