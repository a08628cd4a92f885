//! The vsock muxer: every host-side endpoint of the vsock device.
//!
//! The guest sees one flat space of `(host port, guest port)` streams. On the
//! host each stream is a Unix stream socket: either one end of a socket pair
//! whose other end capsa holds as an async [`VsockStream`](super::VsockStream),
//! or a client of the hybrid-vsock socket (see `unix.rs`). Treating both the
//! same way keeps one code path for data, flow control and teardown.
//!
//! Packets from the guest arrive through [`VsockMuxer::send_pkt`], already
//! validated by the device. A packet for a known connection goes to its
//! state machine (`csm.rs`). A REQUEST for a port nobody listens on, or any
//! other packet for an unknown connection, is answered with RST; RST is never
//! answered, so two peers cannot bounce resets forever.
//!
//! Packets for the guest are produced lazily by [`VsockMuxer::recv_pkt`] when
//! the device has an RX buffer to fill: first resets for unknown connections,
//! then connections in the order they became ready. Host streams are read
//! only at that moment and only up to the guest's credit, so a host that
//! floods a connection fills a socket buffer and no host memory.
//!
//! The muxer never blocks: the device thread polls the fds it reports through
//! [`VsockMuxer::fill_pollfds`] and hands the results back with
//! [`VsockMuxer::on_ready`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use futures::channel::{mpsc, oneshot};

use super::csm::{ConnAction, ConnState, ConnectReply, Connection};
use super::packet::{PacketHeader, HOST_CID, OP_REQUEST, OP_RST};
use super::unix::HybridListener;

/// First port handed out for host-initiated connections.
const EPHEMERAL_PORT_START: u32 = 1 << 30;
/// Most resets waiting for RX buffers; beyond that, new ones are dropped.
const MAX_PENDING_RST: usize = 1024;
/// Most simultaneous connections per VM.
const MAX_CONNECTIONS: usize = 1024;
/// Most keys queued for RX at once. Each key is queued at most once; past
/// this bound (stale keys of closed connections can add up) the queue is
/// dropped and rebuilt from the connections once it has drained.
const MAX_RX_QUEUE: usize = 2 * MAX_CONNECTIONS;

/// `(host port, guest port)`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    /// Host-side port.
    pub local: u32,
    /// Guest-side port.
    pub peer: u32,
}

#[derive(Clone, Copy, Debug)]
enum Token {
    Hybrid,
    Conn(ConnKey),
}

/// Host endpoints of one vsock device.
pub struct VsockMuxer {
    guest_cid: u64,
    conns: HashMap<ConnKey, Connection>,
    /// Resets for connections that do not (or no longer) exist.
    rst_queue: VecDeque<PacketHeader>,
    /// Connections that may have a packet for the guest (may hold stale
    /// keys), each at most once: `rx_queued` holds what `rx_ready` does.
    rx_ready: VecDeque<ConnKey>,
    rx_queued: HashSet<ConnKey>,
    /// `rx_ready` overflowed: rebuild it from the connections.
    rx_overflowed: bool,
    listeners: HashMap<u32, mpsc::UnboundedSender<UnixStream>>,
    hybrid: Option<HybridListener>,
    next_port: u32,
    tokens: Vec<Token>,
    hybrid_fds: usize,
}

impl std::fmt::Debug for VsockMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxer")
            .field("guest_cid", &self.guest_cid)
            .field("connections", &self.conns.len())
            .field("hybrid", &self.hybrid)
            .finish()
    }
}

impl VsockMuxer {
    /// A muxer for a guest with `guest_cid`, optionally serving a hybrid
    /// socket.
    pub fn new(guest_cid: u64, hybrid: Option<HybridListener>) -> Self {
        Self {
            guest_cid,
            conns: HashMap::new(),
            rst_queue: VecDeque::new(),
            rx_ready: VecDeque::new(),
            rx_queued: HashSet::new(),
            rx_overflowed: false,
            listeners: HashMap::new(),
            hybrid,
            next_port: EPHEMERAL_PORT_START,
            tokens: Vec::new(),
            hybrid_fds: 0,
        }
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Keys waiting in the RX queue (bounded by `MAX_RX_QUEUE`).
    pub fn rx_queue_len(&self) -> usize {
        self.rx_ready.len()
    }

    /// Marks `key` as having something for the guest: queued once, however
    /// often the guest asks, so a flood of CREDIT_REQUESTs without RX
    /// buffers cannot grow the queue by a key per packet.
    fn queue_rx(&mut self, key: ConnKey) {
        if self.rx_queued.contains(&key) {
            return;
        }
        if self.rx_ready.len() >= MAX_RX_QUEUE {
            self.rx_overflowed = true;
            return;
        }
        self.rx_queued.insert(key);
        self.rx_ready.push_back(key);
    }

    /// The next queued key; after an overflow, the queue is rebuilt from
    /// the connections that have something once it has drained.
    fn next_rx_key(&mut self) -> Option<ConnKey> {
        if self.rx_ready.is_empty() && self.rx_overflowed {
            self.rx_overflowed = false;
            let ready: Vec<ConnKey> = self
                .conns
                .iter()
                .filter(|(_, c)| c.has_rx())
                .map(|(k, _)| *k)
                .collect();
            for key in ready {
                self.queue_rx(key);
            }
        }
        let key = self.rx_ready.pop_front()?;
        self.rx_queued.remove(&key);
        Some(key)
    }

    /// Path of the hybrid socket, if any.
    pub fn hybrid_path(&self) -> Option<&Path> {
        self.hybrid.as_ref().map(|h| h.path())
    }

    /// Accepts guest-initiated connections to `port`: each arrives as the
    /// host end of a new stream on `tx`.
    pub fn listen(&mut self, port: u32, tx: mpsc::UnboundedSender<UnixStream>) {
        self.listeners.insert(port, tx);
    }

    /// Opens a connection to guest `port`, bridged to `stream`.
    pub fn connect(&mut self, port: u32, stream: UnixStream, reply: ConnectReply) {
        if self.conns.len() >= MAX_CONNECTIONS {
            if let ConnectReply::Channel(tx) = reply {
                let _ = tx.send(Err(std::io::ErrorKind::OutOfMemory));
            }
            return;
        }
        let local = self.alloc_port(port);
        match Connection::host_initiated(self.guest_cid, local, port, stream, reply) {
            Ok(c) => {
                let key = ConnKey { local, peer: port };
                self.conns.insert(key, c);
                self.queue_rx(key);
            }
            Err(e) => tracing::warn!("vsock: cannot set up host connection: {e}"),
        }
    }

    /// In-process variant of [`VsockMuxer::connect`].
    pub fn connect_channel(
        &mut self,
        port: u32,
        stream: UnixStream,
    ) -> oneshot::Receiver<Result<(), std::io::ErrorKind>> {
        let (tx, rx) = oneshot::channel();
        self.connect(port, stream, ConnectReply::Channel(tx));
        rx
    }

    fn alloc_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self
                .next_port
                .checked_add(1)
                .unwrap_or(EPHEMERAL_PORT_START);
            if !self.conns.contains_key(&ConnKey { local: p, peer }) {
                return p;
            }
        }
    }

    fn push_rst(&mut self, local: u32, peer: u32) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(PacketHeader::host_to_guest(
                self.guest_cid,
                local,
                peer,
                OP_RST,
            ));
        }
    }

    fn apply(&mut self, key: ConnKey, action: ConnAction) {
        match action {
            ConnAction::Keep => {
                if self.conns.get(&key).is_some_and(|c| c.has_rx()) {
                    self.queue_rx(key);
                }
            }
            ConnAction::Kill { rst } => {
                if let Some(mut c) = self.conns.remove(&key) {
                    c.refuse();
                }
                if rst {
                    self.push_rst(key.local, key.peer);
                }
            }
        }
    }

    /// Handles a validated packet from the guest.
    pub fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        let key = ConnKey {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if hdr.dst_cid != HOST_CID || hdr.type_ != super::packet::TYPE_STREAM {
            if hdr.op != OP_RST {
                self.push_rst(key.local, key.peer);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            let action = conn.recv_pkt(hdr, data);
            self.apply(key, action);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.accept_guest_connection(hdr),
            OP_RST => {}
            _ => self.push_rst(key.local, key.peer),
        }
    }

    fn accept_guest_connection(&mut self, hdr: &PacketHeader) {
        let key = ConnKey {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.push_rst(key.local, key.peer);
            return;
        }
        let mut host_end = None;
        if let Some(tx) = self.listeners.get(&key.local) {
            match UnixStream::pair() {
                Ok((ours, theirs)) => {
                    if tx.unbounded_send(theirs).is_ok() {
                        host_end = Some(ours);
                    } else {
                        self.listeners.remove(&key.local);
                    }
                }
                Err(e) => tracing::warn!("vsock: socketpair failed: {e}"),
            }
        }
        if host_end.is_none() {
            if let Some(h) = &self.hybrid {
                host_end = UnixStream::connect(h.forward_path(key.local)).ok();
            }
        }
        match host_end.map(|s| Connection::guest_initiated(self.guest_cid, hdr, s)) {
            Some(Ok(c)) => {
                self.conns.insert(key, c);
                self.queue_rx(key);
            }
            _ => self.push_rst(key.local, key.peer),
        }
    }

    /// Whether [`VsockMuxer::recv_pkt`] may have something.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty() || self.rx_overflowed
    }

    /// The next packet for the guest with at most `capacity` payload bytes.
    pub fn recv_pkt(&mut self, capacity: usize) -> Option<(PacketHeader, Vec<u8>)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.next_rx_key() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if let Some(pkt) = conn.next_rx(capacity) {
                if conn.has_rx() {
                    self.queue_rx(key);
                }
                return Some(pkt);
            }
        }
        None
    }

    /// Appends the fds to poll. `rx_possible` says whether the guest has RX
    /// buffers; without them host streams are not read.
    pub fn fill_pollfds(&mut self, fds: &mut Vec<libc::pollfd>, rx_possible: bool) {
        self.tokens.clear();
        self.hybrid_fds = 0;
        if let Some(h) = &self.hybrid {
            let before = fds.len();
            h.fill_pollfds(fds);
            self.hybrid_fds = fds.len() - before;
            self.tokens.push(Token::Hybrid);
        }
        for (key, c) in &self.conns {
            let events = c.poll_events(rx_possible);
            if events != 0 {
                fds.push(libc::pollfd {
                    fd: c.stream().as_raw_fd(),
                    events,
                    revents: 0,
                });
                self.tokens.push(Token::Conn(*key));
            }
        }
    }

    /// Handles poll results for the fds from the last
    /// [`VsockMuxer::fill_pollfds`] (`fds` starts at the muxer's first fd).
    pub fn on_ready(&mut self, fds: &[libc::pollfd]) {
        let mut at = 0usize;
        let tokens = std::mem::take(&mut self.tokens);
        for token in &tokens {
            match *token {
                Token::Hybrid => {
                    let n = self.hybrid_fds;
                    let slice = fds.get(at..at + n).unwrap_or(&[]);
                    at += n;
                    let accepted = self
                        .hybrid
                        .as_mut()
                        .map(|h| h.on_ready(slice))
                        .unwrap_or_default();
                    for (stream, port) in accepted {
                        self.connect(port, stream, ConnectReply::Hybrid);
                    }
                }
                Token::Conn(key) => {
                    let revents = fds.get(at).map(|f| f.revents).unwrap_or(0);
                    at += 1;
                    if revents == 0 {
                        continue;
                    }
                    if let Some(c) = self.conns.get_mut(&key) {
                        let action = c.on_ready(revents);
                        self.apply(key, action);
                    }
                }
            }
        }
        self.sweep();
    }

    /// Drops host-initiated connections whose caller stopped waiting.
    fn sweep(&mut self) {
        let abandoned: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state() == ConnState::Connecting && c.connect_abandoned())
            .map(|(k, _)| *k)
            .collect();
        for key in abandoned {
            self.apply(key, ConnAction::Kill { rst: true });
        }
    }

    /// Forgets every connection (device reset): host streams see EOF.
    pub fn reset(&mut self) {
        for (_, mut c) in self.conns.drain() {
            c.refuse();
        }
        self.rst_queue.clear();
        // All three together: a key left in `rx_queued` would make
        // `queue_rx` skip the same connection's next packet forever.
        self.rx_ready.clear();
        self.rx_queued.clear();
        self.rx_overflowed = false;
    }
}
