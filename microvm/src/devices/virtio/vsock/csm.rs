//! The connection state machine: one vsock stream between a guest port and a
//! host-side Unix stream.
//!
//! A [`Connection`] turns guest packets into bytes on its host stream and
//! host bytes into packets for the guest, honouring credit-based flow
//! control in both directions:
//!
//! - guest → host: we advertise `buf_alloc` = [`CONN_BUF_SIZE`] and count the
//!   bytes handed to the host stream in `fwd_cnt`. Bytes the host cannot take
//!   yet wait in `tx_buf`, which the guest can never overflow without breaking
//!   the protocol (that resets the connection). A `CREDIT_UPDATE` goes out
//!   once a quarter of the buffer has been forwarded, or on `CREDIT_REQUEST`.
//! - host → guest: we send at most `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`
//!   bytes; with no credit left we ask once with `CREDIT_REQUEST` and stop
//!   reading the host stream until the guest updates us.
//!
//! Every counter the guest controls is combined with wrapping or saturating
//! arithmetic, so bogus values cost the guest its own connection and nothing
//! else.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use futures::channel::oneshot;

use super::packet::{
    PacketHeader, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// Receive buffer we advertise to the guest for each connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;

/// How a host-initiated connection reports the guest's answer.
#[derive(Debug)]
pub enum ConnectReply {
    /// An in-process caller waiting on a channel.
    Channel(oneshot::Sender<Result<(), std::io::ErrorKind>>),
    /// A hybrid-vsock Unix socket client: write `OK <local port>\n` on success.
    Hybrid,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent or queued, waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// What the muxer must do after the connection handled something.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnAction {
    /// Nothing; the connection lives on.
    Keep,
    /// Drop the connection; queue an RST to the guest if `rst`.
    Kill {
        /// Tell the guest.
        rst: bool,
    },
}

/// Control packets waiting for an RX buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pending {
    request: bool,
    response: bool,
    shutdown: u32,
    credit_update: bool,
    credit_request: bool,
}

/// One vsock stream connection.
#[derive(Debug)]
pub struct Connection {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    guest_cid: u64,
    state: ConnState,
    stream: UnixStream,
    reply: Option<ConnectReply>,
    pending: Pending,
    /// Guest bytes the host stream has not taken yet.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    /// `SHUTDOWN_*` flags the guest sent.
    peer_shut: u32,
    /// The host stream reached EOF (we told the guest with SHUTDOWN_SEND).
    host_eof: bool,
    host_write_shut: bool,
    /// The last poll said the host stream has bytes (or EOF) for us.
    readable: bool,
}

impl Connection {
    /// A connection the guest asked for (it sent REQUEST); RESPONSE is queued.
    pub fn guest_initiated(
        guest_cid: u64,
        hdr: &PacketHeader,
        stream: UnixStream,
    ) -> std::io::Result<Self> {
        let mut c = Self::new(guest_cid, hdr.dst_port, hdr.src_port, stream)?;
        c.state = ConnState::Established;
        c.update_peer_credit(hdr);
        c.pending.response = true;
        Ok(c)
    }

    /// A connection the host asked for; REQUEST is queued.
    pub fn host_initiated(
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        stream: UnixStream,
        reply: ConnectReply,
    ) -> std::io::Result<Self> {
        let mut c = Self::new(guest_cid, local_port, peer_port, stream)?;
        c.state = ConnState::Connecting;
        c.reply = Some(reply);
        c.pending.request = true;
        Ok(c)
    }

    fn new(
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        stream: UnixStream,
    ) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            local_port,
            peer_port,
            guest_cid,
            state: ConnState::Connecting,
            stream,
            reply: None,
            pending: Pending::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            peer_shut: 0,
            host_eof: false,
            host_write_shut: false,
            readable: false,
        })
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host end of the connection.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether an in-process connector gave up waiting.
    pub fn connect_abandoned(&self) -> bool {
        matches!(&self.reply, Some(ConnectReply::Channel(tx)) if tx.is_canceled())
    }

    /// Tells a waiting connector that the guest refused.
    pub fn refuse(&mut self) {
        if let Some(ConnectReply::Channel(tx)) = self.reply.take() {
            let _ = tx.send(Err(ErrorKind::ConnectionRefused));
        }
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles one packet from the guest addressed to this connection.
    pub fn recv_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) -> ConnAction {
        match (self.state, hdr.op) {
            (_, OP_RST) => {
                self.refuse();
                ConnAction::Kill { rst: false }
            }
            (ConnState::Connecting, OP_RESPONSE) => {
                self.update_peer_credit(hdr);
                self.state = ConnState::Established;
                let delivered = match self.reply.take() {
                    Some(ConnectReply::Channel(tx)) => tx.send(Ok(())).is_ok(),
                    Some(ConnectReply::Hybrid) => {
                        let line = format!("OK {}\n", self.local_port);
                        // A fresh socket's buffer always holds a dozen bytes.
                        (&self.stream).write_all(line.as_bytes()).is_ok()
                    }
                    None => true,
                };
                if !delivered {
                    return ConnAction::Kill { rst: true };
                }
                ConnAction::Keep
            }
            (ConnState::Connecting, _) => ConnAction::Kill { rst: true },
            (ConnState::Established, OP_RW) => {
                self.update_peer_credit(hdr);
                if self.peer_shut & SHUTDOWN_SEND != 0 {
                    return ConnAction::Kill { rst: true };
                }
                let buffered = self.tx_buf.len() as u64 + data.len() as u64;
                if buffered > u64::from(CONN_BUF_SIZE) {
                    // The guest ignored our credit.
                    return ConnAction::Kill { rst: true };
                }
                self.tx_buf.extend(data);
                self.flush_tx()
            }
            (ConnState::Established, OP_CREDIT_UPDATE) => {
                self.update_peer_credit(hdr);
                ConnAction::Keep
            }
            (ConnState::Established, OP_CREDIT_REQUEST) => {
                self.update_peer_credit(hdr);
                self.pending.credit_update = true;
                ConnAction::Keep
            }
            (ConnState::Established, OP_SHUTDOWN) => {
                self.update_peer_credit(hdr);
                self.peer_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.after_progress()
            }
            // REQUEST or RESPONSE on an established connection, or an unknown op.
            (ConnState::Established, _) => ConnAction::Kill { rst: true },
        }
    }

    /// Writes buffered guest bytes to the host stream.
    fn flush_tx(&mut self) -> ConnAction {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return ConnAction::Kill { rst: true },
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return ConnAction::Kill { rst: true },
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_SIZE / 4 {
            self.pending.credit_update = true;
        }
        self.after_progress()
    }

    /// Applies the guest's shutdown flags once buffered data is out.
    fn after_progress(&mut self) -> ConnAction {
        if !self.tx_buf.is_empty() {
            return ConnAction::Keep;
        }
        if self.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // Full close from the guest: it waits for our RST.
            return ConnAction::Kill { rst: true };
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        ConnAction::Keep
    }

    /// Poll events to wait for on the host stream.
    pub fn poll_events(&self, rx_possible: bool) -> i16 {
        let mut ev = 0;
        if !self.tx_buf.is_empty() {
            ev |= libc::POLLOUT;
        }
        if rx_possible && self.wants_host_bytes() && !self.readable {
            ev |= libc::POLLIN;
        }
        ev
    }

    fn wants_host_bytes(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Handles poll results for the host stream.
    pub fn on_ready(&mut self, revents: i16) -> ConnAction {
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.readable = true;
        }
        if revents & libc::POLLOUT != 0 {
            return self.flush_tx();
        }
        if revents & libc::POLLERR != 0 && !self.tx_buf.is_empty() {
            return ConnAction::Kill { rst: true };
        }
        ConnAction::Keep
    }

    /// Whether [`Connection::next_rx`] may produce a packet.
    pub fn has_rx(&self) -> bool {
        let p = self.pending;
        p.request
            || p.response
            || p.shutdown != 0
            || p.credit_update
            || p.credit_request
            || (self.readable && self.wants_host_bytes())
            || (self.readable
                && self.state == ConnState::Established
                && !self.host_eof
                && self.peer_credit() == 0
                && !self.credit_requested)
    }

    fn header(&self, op: u16) -> PacketHeader {
        let mut h =
            PacketHeader::host_to_guest(self.guest_cid, self.local_port, self.peer_port, op);
        h.buf_alloc = CONN_BUF_SIZE;
        h.fwd_cnt = self.fwd_cnt.0;
        h
    }

    /// The next packet for the guest, with at most `capacity` payload bytes.
    /// Data is read from the host stream only here, so nothing is read that
    /// has no RX buffer to go to.
    pub fn next_rx(&mut self, capacity: usize) -> Option<(PacketHeader, Vec<u8>)> {
        let hdr = if self.pending.request {
            self.pending.request = false;
            self.header(OP_REQUEST)
        } else if self.pending.response {
            self.pending.response = false;
            self.header(OP_RESPONSE)
        } else if self.pending.shutdown != 0 {
            let mut h = self.header(OP_SHUTDOWN);
            h.flags = self.pending.shutdown;
            self.pending.shutdown = 0;
            h
        } else if self.pending.credit_update {
            self.pending.credit_update = false;
            self.header(OP_CREDIT_UPDATE)
        } else if self.pending.credit_request {
            self.pending.credit_request = false;
            self.header(OP_CREDIT_REQUEST)
        } else if self.readable && self.state == ConnState::Established && !self.host_eof {
            return self.read_host(capacity);
        } else {
            return None;
        };
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some((hdr, Vec::new()))
    }

    fn read_host(&mut self, capacity: usize) -> Option<(PacketHeader, Vec<u8>)> {
        if self.peer_shut & SHUTDOWN_RCV != 0 {
            self.readable = false;
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return Some((self.header(OP_CREDIT_REQUEST), Vec::new()));
        }
        let mut buf = vec![0u8; capacity.min(credit)];
        if buf.is_empty() {
            return None;
        }
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.readable = false;
                    self.host_eof = true;
                    self.last_fwd_cnt_sent = self.fwd_cnt;
                    let mut h = self.header(OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    return Some((h, Vec::new()));
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.rx_cnt += Wrapping(n as u32);
                    let mut h = self.header(OP_RW);
                    h.len = n as u32;
                    self.last_fwd_cnt_sent = self.fwd_cnt;
                    return Some((h, buf));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(_) => {
                    // Treat a broken host stream like EOF on both halves.
                    self.readable = false;
                    self.host_eof = true;
                    let mut h = self.header(OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
                    return Some((h, Vec::new()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::{HOST_CID, TYPE_STREAM};

    fn guest_hdr(op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 8,
            ..Default::default()
        }
    }

    fn established() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Connection::guest_initiated(3, &guest_hdr(OP_REQUEST), a).unwrap();
        let (h, _) = c.next_rx(100).unwrap();
        assert_eq!(h.op, OP_RESPONSE);
        (c, b)
    }

    #[test]
    fn credit_limits_host_to_guest() {
        let (mut c, mut host) = established();
        host.write_all(b"0123456789").unwrap();
        c.on_ready(libc::POLLIN);
        let (h, d) = c.next_rx(100).unwrap();
        assert_eq!((h.op, d.as_slice()), (OP_RW, &b"01234567"[..]));
        // Out of credit: one CREDIT_REQUEST, then silence.
        c.readable = true;
        assert_eq!(c.next_rx(100).unwrap().0.op, OP_CREDIT_REQUEST);
        assert!(c.next_rx(100).is_none());
        let mut upd = guest_hdr(OP_CREDIT_UPDATE);
        upd.fwd_cnt = 8;
        assert_eq!(c.recv_pkt(&upd, &[]), ConnAction::Keep);
        let (h, d) = c.next_rx(100).unwrap();
        assert_eq!((h.op, d.as_slice()), (OP_RW, &b"89"[..]));
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut c, _host) = established();
        let mut h = guest_hdr(OP_RW);
        let big = vec![0u8; CONN_BUF_SIZE as usize + 1];
        h.len = big.len() as u32;
        assert_eq!(c.recv_pkt(&h, &big), ConnAction::Kill { rst: true });
    }

    #[test]
    fn full_shutdown_from_guest_resets() {
        let (mut c, _host) = established();
        let mut h = guest_hdr(OP_SHUTDOWN);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        assert_eq!(c.recv_pkt(&h, &[]), ConnAction::Kill { rst: true });
    }

    #[test]
    fn host_eof_sends_shutdown() {
        let (mut c, host) = established();
        drop(host);
        c.on_ready(libc::POLLHUP);
        let (h, _) = c.next_rx(100).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    }
}
