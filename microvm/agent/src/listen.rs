//! The stream sockets the agent serves on: vsock inside a VM, and a Unix or
//! loopback TCP socket (or an inherited listening fd) when it runs as an
//! ordinary host process.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use nix::sys::socket::{
    accept4, bind, getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrLike, SockaddrStorage, VsockAddr,
};
use nix::sys::stat::{umask, Mode};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// Where to listen, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Vsock(u32),
    Fd(RawFd),
}

impl Endpoint {
    /// `unix:PATH`, `tcp:127.0.0.1:PORT` or `vsock:PORT`.
    pub fn parse(spec: &str) -> Result<Endpoint, BadEndpoint> {
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(BadEndpoint::NoPath);
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        if let Some(addr) = spec.strip_prefix("tcp:") {
            let addr: SocketAddr = addr.parse().map_err(|e| BadEndpoint::Address {
                given: addr.to_string(),
                why: e,
            })?;
            if !addr.ip().is_loopback() {
                return Err(BadEndpoint::NotLoopback(addr));
            }
            return Ok(Endpoint::Tcp(addr));
        }
        if let Some(port) = spec.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Endpoint::Vsock)
                .map_err(|e| BadEndpoint::Port {
                    given: port.to_string(),
                    why: e,
                });
        }
        Err(BadEndpoint::Unknown(spec.to_string()))
    }
}

/// Why a `--listen` endpoint was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadEndpoint {
    #[error("unix: needs a path")]
    NoPath,
    #[error("{given:?} is not an address and port: {why}")]
    Address {
        given: String,
        why: std::net::AddrParseError,
    },
    #[error(
        "refusing to listen on {0}: the agent serves whoever connects, \
         so TCP is for loopback addresses only"
    )]
    NotLoopback(SocketAddr),
    #[error("{given:?} is not a vsock port: {why}")]
    Port {
        given: String,
        why: std::num::ParseIntError,
    },
    #[error("{0:?}: expected unix:PATH, tcp:127.0.0.1:PORT or vsock:PORT")]
    Unknown(String),
}

/// A connection, as the two halves capnp-rpc's transport takes.
pub type Halves = (Box<dyn AsyncRead + Unpin>, Box<dyn AsyncWrite + Unpin>);

pub enum Listener {
    /// The socket file is removed when the listener goes.
    Unix(UnixListener, Option<PathBuf>),
    Tcp(TcpListener),
    Vsock(AsyncFd<OwnedFd>),
}

impl Listener {
    pub fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        match endpoint {
            Endpoint::Unix(path) => {
                // The socket is created mode 0600 from the start: whoever can
                // connect can run programs as the agent's user.
                let old = umask(Mode::from_bits_truncate(0o177));
                let bound = UnixListener::bind(path);
                umask(old);
                let listener = bound?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(listener, Some(path.clone())))
            }
            Endpoint::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(listener)?))
            }
            Endpoint::Vsock(port) => {
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                    None,
                )?;
                bind(
                    fd.as_raw_fd(),
                    &VsockAddr::new(nix::libc::VMADDR_CID_ANY, *port),
                )?;
                listen(&fd, Backlog::new(64)?)?;
                Ok(Listener::Vsock(register(fd)?))
            }
            Endpoint::Fd(raw) => {
                // SAFETY: the fd number was handed to the agent on its command
                // line to be its listening socket; nothing else in this process
                // opened or owns it, and from here on the OwnedFd is its only owner.
                let fd = unsafe { OwnedFd::from_raw_fd(*raw) };
                let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())?.family();
                match family {
                    Some(AddressFamily::Unix) => {
                        let std = std::os::unix::net::UnixListener::from(fd);
                        std.set_nonblocking(true)?;
                        Ok(Listener::Unix(UnixListener::from_std(std)?, None))
                    }
                    Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                        let std = std::net::TcpListener::from(fd);
                        std.set_nonblocking(true)?;
                        Ok(Listener::Tcp(TcpListener::from_std(std)?))
                    }
                    Some(AddressFamily::Vsock) => {
                        nix::fcntl::fcntl(
                            &fd,
                            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                        )?;
                        Ok(Listener::Vsock(register(fd)?))
                    }
                    other => Err(io::Error::other(format!(
                        "fd {raw} is not a Unix, TCP or vsock socket ({other:?})"
                    ))),
                }
            }
        }
    }

    /// What to print: `unix:/run/agent.sock`, `tcp:127.0.0.1:4000`, `vsock:1024`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(l, _) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
            {
                Some(path) => format!("unix:{}", path.display()),
                None => "unix:(unnamed)".into(),
            },
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("tcp:{addr}"),
                Err(_) => "tcp:(unknown)".into(),
            },
            Listener::Vsock(fd) => match getsockname::<VsockAddr>(fd.get_ref().as_raw_fd()) {
                Ok(addr) => format!("vsock:{}", addr.port()),
                Err(_) => "vsock:(unknown)".into(),
            },
        }
    }

    pub async fn accept(&self) -> io::Result<Halves> {
        match self {
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                stream.set_nodelay(true)?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Listener::Vsock(fd) => loop {
                let mut ready = fd.readable().await?;
                let accepted = ready.try_io(|fd| {
                    accept4(
                        fd.get_ref().as_raw_fd(),
                        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                    )
                    .map_err(io::Error::from)
                });
                let raw = match accepted {
                    Ok(result) => result?,
                    Err(_would_block) => continue,
                };
                // SAFETY: accept4 just returned this descriptor; nothing else
                // refers to it, so the OwnedFd becomes its only owner.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                // A connected vsock socket is read and written like any stream
                // socket; tokio's Unix stream type only issues read/write/shutdown
                // on it.
                let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(owned))?;
                let (r, w) = stream.into_split();
                return Ok((Box::new(r), Box::new(w)));
            },
        }
    }
}

/// Hands a non-blocking listening socket to the runtime's reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and its
    // `as_raw_fd` keeps returning the same number, for as long as the AsyncFd
    // owns it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/a/b"),
            Ok(Endpoint::Unix("/a/b".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:4000"),
            Ok(Endpoint::Tcp("127.0.0.1:4000".parse().unwrap()))
        );
        assert_eq!(Endpoint::parse("vsock:1024"), Ok(Endpoint::Vsock(1024)));
        assert!(Endpoint::parse("tcp:0.0.0.0:4000").is_err());
        assert!(Endpoint::parse("unix:").is_err());
        assert!(Endpoint::parse("http://x").is_err());
    }
}
