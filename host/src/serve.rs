//! `capsa serve`: the root Executor over a Unix or TCP socket, for clients
//! outside any guest (a Python test suite, a shell user, another host).
//!
//! The protocol is Cap'n Proto two-party RPC over the stream, with the
//! schema's `Executor` as the bootstrap capability. Every connection gets its
//! own root Executor in its own [`Scope`]: its own live-children quota, and
//! every process it started (at every nesting level) is killed when the
//! connection ends, however it ends.
//!
//! # Handshake
//!
//! On a `tls:` listener the client first completes a TLS handshake
//! ([`crate::tls`]); everything below then runs inside TLS. When the
//! server has a token (`--token-file`), the client sends one line before
//! any Cap'n Proto message:
//!
//! ```text
//! CAPSA-TOKEN <token>\n
//! ```
//!
//! where `<token>` is the token file's content without surrounding
//! whitespace. The server compares it in constant time and, if it matches,
//! starts Cap'n Proto on the same stream; it sends nothing back first. A
//! wrong or missing token, or no token within [`HANDSHAKE_TIMEOUT`] of
//! connecting (TLS included), closes the connection before any capability
//! exists on it. Without a token the stream is Cap'n Proto from its first
//! byte (after TLS, on a `tls:` listener).
//!
//! # Admission
//!
//! A connection takes one of the `--max-connections` served slots only
//! once it has authenticated; until then it holds a pending slot, bounded
//! overall and per source address, and the oldest pending handshake is
//! dropped to make room for a newcomer ([`crate::admission`]). Failed
//! tokens slow their address down. `--allow-remote` takes only a `tls:`
//! listener with a token: the secret never crosses a network in clear.

use std::cell::{Cell as Counter, RefCell};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use capsa_schema::capsa_capnp::executor;
use capsa_schema::rpc::SmallFirstSegments;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::admission::{Penalties, Pending, Source, Spoke, Ticket};
use crate::host::Host;
use crate::scope::{Scope, Share};
use crate::tls::{ServerTls, Trust};
use crate::transport;

/// What a client sends first when the server has a token.
pub const TOKEN_PREFIX: &str = "CAPSA-TOKEN ";
/// How long a client may take from connecting to being authenticated (TLS
/// handshake and token line): short, so a pending slot turns over.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the kernel may hold for a TCP listener before it accepts
/// them (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;
/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Longest token accepted.
const MAX_TOKEN: usize = 1024;

/// Where a server listens or a client connects: `unix:PATH`,
/// `tcp:HOST:PORT` (loopback only) or `tls:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
    Tls(String),
}

/// Why a server could not be bound or a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An address, token or setting that cannot be used, and why.
    #[error("{0}")]
    Invalid(String),
    /// Another server accepts connections at this socket path.
    #[error("{}: another server is listening there", .0.display())]
    InUse(PathBuf),
    /// A system call failed while doing `what` (the cause is its
    /// `source()`).
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses with [`ServeError::Invalid`].
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err(ServeError::Invalid(format!($($arg)*)))
    };
}

/// Says what was being done when an I/O call failed.
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, ServeError>;
}

impl<T> Doing<T> for std::io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, ServeError> {
        self.map_err(|source| ServeError::Io {
            what: what(),
            source,
        })
    }
}

impl FromStr for Address {
    type Err = ServeError;

    fn from_str(s: &str) -> Result<Address, ServeError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                invalid!("`unix:` needs a socket path, e.g. unix:/run/user/1000/capsa.sock");
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        for (scheme, make) in [
            ("tcp", Address::Tcp as fn(String) -> Address),
            ("tls", Address::Tls),
        ] {
            if let Some(hostport) = s.strip_prefix(scheme).and_then(|r| r.strip_prefix(':')) {
                if hostport.rsplit_once(':').is_none_or(|(h, _)| h.is_empty()) {
                    invalid!("`{scheme}:` needs HOST:PORT, e.g. {scheme}:127.0.0.1:7070");
                }
                return Ok(make(hostport.to_string()));
            }
        }
        invalid!("{s:?} is not an address: use unix:PATH, tcp:HOST:PORT or tls:HOST:PORT")
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
            Address::Tls(a) => write!(f, "tls:{a}"),
        }
    }
}

/// The shared secret of `--token-file`.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads a token file: its content without surrounding whitespace. The
    /// file must not be readable by group or others.
    pub fn from_file(path: &Path) -> Result<Token, ServeError> {
        let meta = std::fs::metadata(path).doing(|| format!("reading {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            invalid!(
                "{}: the token file is readable by others; `chmod 600` it",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path).doing(|| format!("reading {}", path.display()))?;
        Token::new(text.trim())
    }

    pub fn new(token: &str) -> Result<Token, ServeError> {
        if token.len() < 16 || token.len() > MAX_TOKEN {
            invalid!("a token must be 16 to {MAX_TOKEN} characters long");
        }
        if token
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            invalid!("a token must not contain whitespace or control characters");
        }
        Ok(Token(token.as_bytes().to_vec()))
    }

    /// Compares in time that depends only on the lengths.
    fn matches(&self, given: &[u8]) -> bool {
        let mut diff = (self.0.len() != given.len()) as u8;
        for (i, &b) in self.0.iter().enumerate() {
            diff |= b ^ given.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// The handshake line a client sends.
    pub fn line(&self) -> Vec<u8> {
        let mut line = TOKEN_PREFIX.as_bytes().to_vec();
        line.extend_from_slice(&self.0);
        line.push(b'\n');
        line
    }
}

/// How `capsa serve` listens.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: Address,
    /// TLS only: bind a non-loopback address. Requires `token`.
    pub allow_remote: bool,
    pub token: Option<Token>,
    /// The certificate a `tls:` listener presents.
    pub tls: Option<ServerTls>,
    /// Connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Guests each connection may run at once; `None` takes
    /// [`fair_share`]'s.
    pub connection_cells: Option<u32>,
    /// Guest memory each connection may hold at once; `None` takes
    /// [`fair_share`]'s.
    pub connection_memory_bytes: Option<u64>,
}

impl ServeConfig {
    pub fn new(listen: Address) -> ServeConfig {
        ServeConfig {
            listen,
            allow_remote: false,
            token: None,
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connection_cells: None,
            connection_memory_bytes: None,
        }
    }
}

/// The share of `host` that lets `max_connections` clients all hold theirs
/// at once: its guests, and this machine's memory, divided between them
/// (never below one guest, or below one guest's memory limit).
pub fn fair_share(host: &Host, max_connections: usize) -> Share {
    let n = u64::try_from(max_connections.max(1)).unwrap_or(u64::MAX);
    let config = host.config();
    let cells = u64::from(config.max_cells) / n;
    let memory = crate::quota::machine_memory_bytes().map_or(u64::MAX, |m| m / n);
    Share {
        cells: u32::try_from(cells).unwrap_or(u32::MAX).max(1),
        memory_bytes: memory.max(config.limits.memory_bytes),
    }
}

/// A bound socket, before the runtime takes it over.
enum Bound {
    Unix(std::os::unix::net::UnixListener, OwnedSocket),
    /// TCP, with the TLS it speaks on a `tls:` listener.
    Tcp(std::net::TcpListener, Option<ServerTls>),
}

enum Listener {
    /// The socket file goes with the listener.
    Unix(
        UnixListener,
        #[expect(dead_code, reason = "held for its Drop, which removes the file")] OwnedSocket,
    ),
    Tcp(TcpListener),
}

impl Bound {
    fn into_listener(self) -> std::io::Result<(Listener, Option<ServerTls>)> {
        Ok(match self {
            Bound::Unix(l, owned) => {
                l.set_nonblocking(true)?;
                (Listener::Unix(UnixListener::from_std(l)?, owned), None)
            }
            Bound::Tcp(l, tls) => {
                l.set_nonblocking(true)?;
                (Listener::Tcp(TcpListener::from_std(l)?), tls)
            }
        })
    }
}

/// The socket file this server created; removed when dropped, if it is
/// still ours.
struct OwnedSocket {
    path: PathBuf,
    ino: u64,
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A bound server, not yet accepting.
pub struct Server {
    listener: Bound,
    config: ServeConfig,
    address: Address,
}

impl Server {
    /// Binds the socket. A Unix socket is created with mode 0600; an
    /// existing `PATH` is replaced only if it is a stale socket (one nobody
    /// accepts on). TCP binds only loopback addresses; TLS binds any with
    /// `allow_remote`, which requires a token.
    pub fn bind(config: ServeConfig) -> Result<Server, ServeError> {
        if config.max_connections == 0 {
            invalid!("--max-connections must be at least 1");
        }
        let (listener, address) = match &config.listen {
            Address::Unix(path) => {
                if config.allow_remote {
                    invalid!("--allow-remote is for TCP; a Unix socket is local by nature");
                }
                let (listener, owned) = bind_unix(path)?;
                (Bound::Unix(listener, owned), config.listen.clone())
            }
            Address::Tcp(hostport) | Address::Tls(hostport) => {
                let tls = matches!(config.listen, Address::Tls(_));
                if config.allow_remote && !tls {
                    invalid!(
                        "--allow-remote needs a TLS listener (--listen tls:{hostport}): over \
                         plain TCP the token would cross the network in clear text"
                    );
                }
                if tls != config.tls.is_some() {
                    invalid!(
                        "a tls: listener needs a certificate, and only a tls: listener takes one"
                    );
                }
                let addrs: Vec<SocketAddr> = hostport
                    .to_socket_addrs()
                    .doing(|| format!("resolving {hostport}"))?
                    .collect();
                let Some(addr) = addrs.first().copied() else {
                    invalid!("{hostport} resolves to no address");
                };
                if config.allow_remote && config.token.is_none() {
                    invalid!(
                        "--allow-remote needs --token-file: a remote client must prove it \
                         holds the shared secret before it gets any capability"
                    );
                }
                if !config.allow_remote && !addr.ip().is_loopback() {
                    invalid!(
                        "{addr} is not a loopback address; pass --allow-remote (with \
                         --listen tls:HOST:PORT and --token-file) to accept connections from \
                         other machines"
                    );
                }
                let std = std::net::TcpListener::bind(addr).doing(|| format!("binding {addr}"))?;
                // std listens with a backlog of 128: under a connection
                // flood the kernel then drops a client's SYN and the
                // client waits a second to retry, whatever admission does.
                rustix::net::listen(&std, LISTEN_BACKLOG)
                    .map_err(std::io::Error::from)
                    .doing(|| format!("listening on {addr}"))?;
                let bound = std
                    .local_addr()
                    .doing(|| format!("binding {addr}"))?
                    .to_string();
                let address = match tls {
                    true => Address::Tls(bound),
                    false => Address::Tcp(bound),
                };
                (Bound::Tcp(std, config.tls.clone()), address)
            }
        };
        Ok(Server {
            listener,
            config,
            address,
        })
    }

    /// Where clients reach this server (with the real port when 0 was asked).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Serves `host` until `shutdown` resolves, then stops accepting, kills
    /// every process and waits for them to end; the socket file is removed
    /// when this returns. Must run inside a `LocalSet`.
    pub async fn run(self, host: &Host, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let Server {
            listener, config, ..
        } = self;
        let (listener, tls) = listener.into_listener()?;
        let gate = Rc::new(Gate {
            token: config.token,
            tls: tls.map(|tls| tls.acceptor()),
            pending: Rc::new(RefCell::new(Pending::default())),
            penalties: RefCell::new(Penalties::default()),
        });
        let open = Rc::new(Counter::new(0usize));
        let fair = fair_share(host, config.max_connections);
        let share = Share {
            cells: config.connection_cells.unwrap_or(fair.cells),
            memory_bytes: config.connection_memory_bytes.unwrap_or(fair.memory_bytes),
        };
        tracing::info!(
            "each connection may run {} guests and {} MiB of guest memory at once",
            share.cells,
            share.memory_bytes >> 20
        );
        let mut next_id = 0u64;
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = accept(&listener) => r,
            };
            let (stream, socket, source, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // A flood of connections must not starve the handshakes
            // already under way.
            tokio::task::yield_now().await;
            next_id += 1;
            let id = next_id;
            // A pending slot, never a served one, until it authenticates
            // (at once where there is neither TLS nor a token).
            let mut ticket = gate
                .checks()
                .then(|| Pending::admit(&gate.pending, source, socket));
            let spoke = ticket.as_ref().map(Ticket::spoke);
            let gate = gate.clone();
            let open = open.clone();
            let host = host.clone();
            let max_connections = config.max_connections;
            tokio::task::spawn_local(async move {
                let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                let authenticated = tokio::select! {
                    biased;
                    () = Ticket::dropped_if_any(ticket.as_mut()) => Err(ConnectionError::Crowded),
                    r = tokio::time::timeout_at(deadline, gate.authenticate(stream, source, spoke, deadline)) => {
                        r.unwrap_or(Err(ConnectionError::Handshake(HANDSHAKE_TIMEOUT)))
                    }
                };
                drop(ticket);
                let stream = match authenticated {
                    Ok(stream) => {
                        gate.pending.borrow_mut().unflag(source);
                        stream
                    }
                    Err(e) => {
                        tracing::debug!("connection {id} from {peer} not admitted: {e}");
                        gate.pending.borrow_mut().flag(source);
                        return;
                    }
                };
                if open.get() >= max_connections {
                    tracing::info!(
                        "connection {id} from {peer} refused: all {max_connections} served slots \
                         are taken"
                    );
                    return;
                }
                open.set(open.get() + 1);
                tracing::info!("connection {id} from {peer} opened");
                let result = serve_authenticated(&host, stream, Some(share)).await;
                open.set(open.get() - 1);
                match result {
                    Ok(killed) => tracing::info!(
                        "connection {id} closed; {killed} of its processes were still running \
                         and were killed"
                    ),
                    Err(e) => tracing::info!("connection {id} dropped: {e}"),
                }
            });
        }
        drop(listener);
        tracing::info!("shutting down: killing every process");
        host.shutdown().await;
        // Let the connections tell their clients how their processes ended.
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

/// What a connection must get through before it is served: TLS, the
/// token, and the admission bounds.
struct Gate {
    token: Option<Token>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pending: Rc<RefCell<Pending>>,
    penalties: RefCell<Penalties>,
}

impl Gate {
    /// Whether a connection has anything to get through before it is
    /// served.
    fn checks(&self) -> bool {
        self.tls.is_some() || self.token.is_some()
    }

    /// TLS (on a `tls:` listener), then the token line (if the server has
    /// a token), checked no earlier than `source`'s penalties allow and
    /// refused unchecked if that is past `deadline`.
    async fn authenticate(
        &self,
        stream: Box<dyn Stream>,
        source: Source,
        spoke: Option<Spoke>,
        deadline: tokio::time::Instant,
    ) -> Result<Box<dyn Stream>, ConnectionError> {
        let mut stream: Box<dyn Stream> = match &self.tls {
            Some(acceptor) => {
                let mut stream = stream;
                let mut first = [0u8; 1];
                if stream.read(&mut first).await.map_err(ConnectionError::Io)? == 0 {
                    return Err(ConnectionError::Closed);
                }
                if let Some(spoke) = &spoke {
                    spoke.now();
                }
                if first[0] != TLS_HANDSHAKE_RECORD {
                    // A plain client (its token line, or Cap'n Proto): a
                    // TLS alert tells it what this port speaks.
                    let _ = stream.write_all(&TLS_ALERT_UNEXPECTED_MESSAGE).await;
                    let _ = stream.shutdown().await;
                    return Err(ConnectionError::NotTls);
                }
                let replayed = FirstBytes {
                    inner: stream,
                    replay: Some(first[0]),
                    refuse_tls: false,
                };
                Box::new(
                    acceptor
                        .accept(buffered(replayed))
                        .await
                        .map_err(ConnectionError::Tls)?,
                )
            }
            None => Box::new(buffered(stream)),
        };
        let Some(token) = &self.token else {
            return Ok(stream);
        };
        let mut first = [0u8; 1];
        // A peer that closes before sending anything (a port probe) tried
        // no token: it is not held against its address.
        if stream.read(&mut first).await.map_err(ConnectionError::Io)? == 0 {
            return Err(ConnectionError::Closed);
        }
        if let Some(spoke) = &spoke {
            spoke.now();
        }
        if self.tls.is_none() && first[0] == TLS_HANDSHAKE_RECORD {
            // A TLS client on a plain port: a mistake, not a guess.
            return Err(ConnectionError::TlsOnPlain);
        }
        let line = read_line(&mut (&first[..]).chain(&mut stream)).await;
        let now = tokio::time::Instant::now();
        let wait = self.penalties.borrow_mut().reserve(source, now.into_std());
        if now + wait >= deadline {
            self.penalties
                .borrow_mut()
                .unreserve(source, now.into_std());
            return Err(ConnectionError::SlowedDown);
        }
        tokio::time::sleep(wait).await;
        let given = line
            .as_deref()
            .and_then(|l| l.strip_prefix(TOKEN_PREFIX.as_bytes()));
        match given {
            Some(given) if token.matches(given) => Ok(stream),
            _ => {
                let now = std::time::Instant::now();
                self.penalties.borrow_mut().failed(source, now);
                Err(ConnectionError::WrongToken)
            }
        }
    }
}

/// The first byte of every TLS client's first record (a handshake).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How much of a connection's socket is read and written at a time. Cap'n
/// Proto writes a message's segment table and segments one by one, and
/// rustls reads a record in pieces and writes each record as it is made;
/// through a buffer, a burst of them costs a system call per buffer, not
/// per piece (see the bench's `tls` rows).
const SOCKET_BUFFER: usize = 64 << 10;

/// `stream`, read and written through [`SOCKET_BUFFER`]s; the layer above
/// (capnp-rpc's writer, TLS) flushes whenever it must send what it has.
fn buffered<S: AsyncRead + AsyncWrite>(stream: S) -> tokio::io::BufStream<S> {
    tokio::io::BufStream::with_capacity(SOCKET_BUFFER, SOCKET_BUFFER, stream)
}

/// A stream whose first bytes get special care: one already read to look
/// at is handed back (`replay`, the server's TLS sniffing), or a TLS
/// record where Cap'n Proto was expected fails the read (`refuse_tls`, a
/// plain client that reached a `tls:` listener), saying so instead of
/// Cap'n Proto choking on it. A Cap'n Proto stream never starts so: its
/// first word counts segments, and no message has 22 or 23.
struct FirstBytes<S> {
    inner: S,
    replay: Option<u8>,
    refuse_tls: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(byte) = self.replay {
            if buf.remaining() > 0 {
                buf.put_slice(&[byte]);
                self.replay = None;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.refuse_tls && buf.filled().len() > before {
            self.refuse_tls = false;
            if let [0x15 | 0x16, 0x03, ..] = &buf.filled()[before..] {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the server speaks TLS: connect with tls:HOST:PORT",
                )));
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A fatal `unexpected_message` alert record (TLS 1.2 framing, which TLS
/// 1.3 keeps for alerts sent in clear).
const TLS_ALERT_UNEXPECTED_MESSAGE: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0a];

/// A connection's byte stream, whichever the transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Stream for T {}

/// The next connection, a duplicate of its socket for admission to look
/// at, where it comes from (as admission counts it) and its peer's address
/// for the log.
type Accepted = (Box<dyn Stream>, Option<OwnedFd>, Source, String);

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    Ok(match listener {
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            (Box::new(s), None, Source::Local, "the Unix socket".into())
        }
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            let socket = s.as_fd().try_clone_to_owned().ok();
            (Box::new(s), socket, Source::of(peer.ip()), peer.to_string())
        }
    })
}

fn bind_unix(path: &Path) -> Result<(std::os::unix::net::UnixListener, OwnedSocket), ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServeError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!("removing the stale socket {}", path.display());
                    std::fs::remove_file(path)
                        .doing(|| format!("removing the stale socket {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e)
                        .doing(|| format!("{}: exists and cannot be probed", path.display()))
                }
            }
        }
        Ok(_) => invalid!(
            "{}: exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).doing(|| path.display().to_string()),
    }
    // Bind inside a fresh directory only this user can enter, make the
    // socket 0600, then move it into place: no moment exists at which
    // anyone else could connect.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name() else {
        invalid!("{}: not a file path", path.display());
    };
    let private = parent.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .doing(|| format!("creating {}", private.display()))?;
    let staged = private.join("s");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)
            .doing(|| format!("binding a Unix socket in {}", parent.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .doing(|| format!("making {} private", staged.display()))?;
        std::fs::rename(&staged, path).doing(|| format!("creating {}", path.display()))?;
        let ino = std::fs::symlink_metadata(path)
            .doing(|| format!("creating {}", path.display()))?
            .ino();
        Ok::<_, ServeError>((
            listener,
            OwnedSocket {
                path: path.to_path_buf(),
                ino,
            },
        ))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("not authenticated within {0:?}")]
    Handshake(Duration),
    #[error("wrong token")]
    WrongToken,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("a plain client on a TLS port")]
    NotTls,
    #[error("a TLS client on a plain port")]
    TlsOnPlain,
    #[error("dropped to make room for newer handshakes")]
    Crowded,
    #[error("closed before sending a token")]
    Closed,
    #[error("reading the token: {0}")]
    Io(std::io::Error),
    #[error("refused unchecked: too many wrong tokens from this address lately")]
    SlowedDown,
    #[error("broken connection: {0}")]
    Rpc(#[from] capnp::Error),
}

/// Serves one connection: the token handshake if `token` is set, then a
/// root Executor in a new [`Scope`], holding at most `share` of the host,
/// until the stream ends. Returns how many of the connection's processes
/// were still running and were killed.
pub async fn serve_connection(
    host: &Host,
    stream: impl Stream,
    token: Option<&Token>,
    share: Option<Share>,
) -> Result<usize, ConnectionError> {
    let mut stream = stream;
    if let Some(token) = token {
        let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line(&mut stream))
            .await
            .map_err(|_| ConnectionError::Handshake(HANDSHAKE_TIMEOUT))?
            .ok_or(ConnectionError::Handshake(HANDSHAKE_TIMEOUT))?;
        let given = line.strip_prefix(TOKEN_PREFIX.as_bytes()).unwrap_or(&[]);
        if !token.matches(given) {
            return Err(ConnectionError::WrongToken);
        }
    }
    serve_authenticated(host, stream, share).await
}

/// Serves an authenticated connection: a root Executor in a new [`Scope`]
/// holding at most `share`, until the stream ends.
async fn serve_authenticated(
    host: &Host,
    stream: impl Stream,
    share: Option<Share>,
) -> Result<usize, ConnectionError> {
    let scope = share.map_or_else(Scope::new, Scope::with_share);
    let (read, write) = tokio::io::split(stream);
    let network = transport::bounded(
        read.compat(),
        write.compat_write(),
        Side::Server,
        host.config().flow,
    );
    let outcome = network.outcome();
    let rpc = RpcSystem::new(
        Box::new(network),
        Some(host.root_executor_in(&scope).client),
    );
    let result = outcome.of(rpc.await);
    // The connection's capabilities are gone with it; whatever still runs
    // (a Process passed on elsewhere) ends here.
    let killed = scope.close().await;
    result?;
    Ok(killed)
}

/// One line of at most a token's length, without its `\n`; `None` if the
/// stream ended or the line is too long.
async fn read_line(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    while line.len() <= TOKEN_PREFIX.len() + MAX_TOKEN {
        match stream.read_u8().await.ok()? {
            b'\n' => return Some(line),
            b => line.push(b),
        }
    }
    None
}

/// The client's end of a connection to a host.
pub struct Connection {
    /// The server's root Executor for this connection.
    pub executor: executor::Client,
    disconnector: capnp_rpc::Disconnector<twoparty::VatId>,
}

impl Connection {
    /// Ends the connection; the server then kills every process this
    /// connection started. (Dropping the capabilities alone releases them,
    /// but keeps the connection open.)
    pub async fn close(self) {
        let _ = self.disconnector.await;
    }
}

/// The client's end of a connection over `stream`. The connection runs as a
/// local task, so this must be called inside a `LocalSet`.
pub fn client_over(stream: impl Stream) -> Connection {
    let (read, write) = tokio::io::split(stream);
    // Calls start in 1 KiB first segments, as on every other side.
    let network = SmallFirstSegments(twoparty::VatNetwork::new(
        read.compat(),
        write.compat_write(),
        Side::Client,
        capnp::message::ReaderOptions::new(),
    ));
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let executor: executor::Client = rpc.bootstrap(Side::Server);
    let disconnector = rpc.get_disconnector();
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            tracing::debug!("connection to the host ended: {e}");
        }
    });
    Connection {
        executor,
        disconnector,
    }
}

/// Connects to a serving host: TLS first on a `tls:` address (trusting the
/// server as `trust` says; required there), then `token` if given. Must be
/// called inside a `LocalSet`.
pub async fn connect(
    address: &Address,
    token: Option<&Token>,
    trust: Option<&Trust>,
) -> Result<Connection, ServeError> {
    match address {
        Address::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .doing(|| format!("connecting to {address}"))?;
            connect_over(Box::new(stream), address, token, trust).await
        }
        Address::Tcp(hostport) | Address::Tls(hostport) => {
            let stream = tokio::net::TcpStream::connect(hostport.as_str())
                .await
                .doing(|| format!("connecting to {address}"))?;
            let _ = stream.set_nodelay(true);
            connect_over(Box::new(stream), address, token, trust).await
        }
    }
}

/// As [`connect`], over a stream already connected to `address` (a
/// socket bound to an address of the caller's choosing, say).
pub async fn connect_over(
    stream: Box<dyn Stream>,
    address: &Address,
    token: Option<&Token>,
    trust: Option<&Trust>,
) -> Result<Connection, ServeError> {
    let mut stream =
        match (address, trust) {
            (Address::Tls(hostport), Some(trust)) => {
                let tls_error =
                    |e: crate::tls::TlsError| ServeError::Invalid(format!("{address}: {e}"));
                let connector = crate::tls::connector(trust).map_err(tls_error)?;
                let name = crate::tls::server_name(hostport).map_err(tls_error)?;
                let stream: Box<dyn Stream> =
                    Box::new(connector.connect(name, buffered(stream)).await.doing(|| {
                        format!("TLS handshake with {address} (is it a tls: listener?)")
                    })?);
                stream
            }
            (Address::Tcp(_), None) => Box::new(FirstBytes {
                inner: buffered(stream),
                replay: None,
                refuse_tls: true,
            }),
            (Address::Tls(_), None) => invalid!(
                "{address}: say how to trust the server: --tls-ca FILE (its CA) or \
             --tls-fingerprint SHA256 (its certificate, as `capsa serve` prints it)"
            ),
            (_, Some(_)) => invalid!("{address}: TLS options are for tls: addresses"),
            (_, None) => Box::new(buffered(stream)),
        };
    if let Some(token) = token {
        stream
            .write_all(&token.line())
            .await
            .doing(|| format!("sending the token to {address}"))?;
        stream
            .flush()
            .await
            .doing(|| format!("sending the token to {address}"))?;
    }
    Ok(client_over(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for s in [
            "unix:/tmp/capsa.sock",
            "tcp:127.0.0.1:7070",
            "tcp:[::1]:0",
            "tls:capsa.example:7443",
        ] {
            assert_eq!(s.parse::<Address>().unwrap().to_string(), s);
        }
        for bad in [
            "/tmp/x.sock",
            "unix:",
            "tcp:7070",
            "tcp::7070",
            "tls:7443",
            "tlsx:a:1",
            "http://x",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_match_only_themselves() {
        let t = Token::new("0123456789abcdef").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b""));
        assert_eq!(t.line(), b"CAPSA-TOKEN 0123456789abcdef\n");
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in the middle").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_handshake_reads_one_line_and_no_more() {
        let mut input: &[u8] = b"CAPSA-TOKEN abc\n\0\0\0\0";
        assert_eq!(read_line(&mut input).await.unwrap(), b"CAPSA-TOKEN abc");
        assert_eq!(input, b"\0\0\0\0");
        let long = vec![b'x'; 4096];
        assert!(read_line(&mut &long[..]).await.is_none());
        assert!(read_line(&mut &b"no newline"[..]).await.is_none());
    }
}
