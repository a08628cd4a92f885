//! The optional per-VM Unix socket that speaks Firecracker's hybrid-vsock
//! handshake, so existing tooling can reach a guest port:
//!
//! ```text
//! client → "CONNECT <port>\n"      (host-initiated connection to guest <port>)
//! client ← "OK <host port>\n"      (the guest accepted; the stream is now raw)
//! ```
//!
//! A refused connection is simply closed. Guest-initiated connections to
//! port `P` are forwarded to a Unix socket listening at `<path>_P`, if one
//! exists. The socket is created with mode 0600 and removed when the VM goes.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A handshake line longer than this is refused.
const MAX_LINE: usize = 32;
/// Clients have this long to send their `CONNECT` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `CONNECT <port>\n` (the newline already stripped).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The listening socket and the clients still in their handshake.
pub struct HybridListener {
    path: PathBuf,
    listener: UnixListener,
    pending: Vec<Handshake>,
}

impl std::fmt::Debug for HybridListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridListener")
            .field("path", &self.path)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl HybridListener {
    /// Binds `path` (which must not exist) with mode 0600.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            path: path.to_owned(),
            listener,
            pending: Vec::new(),
        })
    }

    /// Path of the socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a guest-initiated connection to `port` is forwarded.
    pub fn forward_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        p.into()
    }

    /// Appends the fds to poll: the listener, then each pending handshake.
    pub fn fill_pollfds(&self, fds: &mut Vec<libc::pollfd>) {
        fds.push(libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for h in &self.pending {
            fds.push(libc::pollfd {
                fd: h.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }

    /// Number of fds [`HybridListener::fill_pollfds`] appends.
    pub fn pollfd_count(&self) -> usize {
        1 + self.pending.len()
    }

    /// Accepts clients and advances handshakes; returns the clients that
    /// asked for a guest port, as `(stream, port)`.
    pub fn on_ready(&mut self, fds: &[libc::pollfd]) -> Vec<(UnixStream, u32)> {
        let mut done = Vec::new();
        let now = Instant::now();
        let mut keep = Vec::with_capacity(self.pending.len());
        for (i, mut h) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let ready = fds.get(i + 1).map(|f| f.revents != 0).unwrap_or(false);
            if ready {
                match advance(&mut h) {
                    Step::Wait => {}
                    Step::Done(port) => {
                        done.push((h.stream, port));
                        continue;
                    }
                    Step::Fail => continue,
                }
            }
            if now < h.deadline {
                keep.push(h);
            }
        }
        self.pending = keep;
        if fds.first().map(|f| f.revents != 0).unwrap_or(false) {
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_ok() {
                            self.pending.push(Handshake {
                                stream,
                                line: Vec::new(),
                                deadline: now + HANDSHAKE_TIMEOUT,
                            });
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        }
        done
    }
}

enum Step {
    Wait,
    Done(u32),
    Fail,
}

/// Reads the handshake one byte at a time so that nothing after the newline
/// is consumed: those bytes belong to the guest.
fn advance(h: &mut Handshake) -> Step {
    let mut b = [0u8; 1];
    loop {
        match (&h.stream).read(&mut b) {
            Ok(0) => return Step::Fail,
            Ok(_) if b[0] == b'\n' => {
                return match parse_connect_line(&h.line) {
                    Some(port) => Step::Done(port),
                    None => Step::Fail,
                };
            }
            Ok(_) => {
                h.line.push(b[0]);
                if h.line.len() > MAX_LINE {
                    return Step::Fail;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
            Err(_) => return Step::Fail,
        }
    }
}

impl Drop for HybridListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line(b"connect 1"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }

    #[test]
    fn socket_mode_handshake_and_removal() {
        let dir = std::env::temp_dir().join(format!("capsa-hybrid-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("v.sock");
        let mut l = HybridListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 77\nrest").unwrap();
        let mut got = Vec::new();
        for _ in 0..10 {
            let mut fds = Vec::new();
            l.fill_pollfds(&mut fds);
            for f in &mut fds {
                f.revents = libc::POLLIN;
            }
            got.extend(l.on_ready(&fds));
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, 77);
        let mut rest = [0u8; 4];
        (&got[0].0).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
        drop(l);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
