//! The virtio-vsock device (virtio spec 1.2, §5.10): three queues (RX, TX,
//! event), the guest's CID in configuration space, and a [`VsockMuxer`] that
//! owns every host-side endpoint. See `docs/vsock.md` for the user's view.

mod bench;
pub mod csm;
pub mod muxer;
pub mod packet;
pub mod stream;
mod test_utils;
pub mod unix;

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{ChainError, ParsedChain};
use super::{ActivateError, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1};
use muxer::VsockMuxer;
use packet::{PacketError, PacketHeader, HDR_SIZE, MAX_PKT_DATA};

pub use stream::{VsockListener, VsockStream};

/// Virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// What the device has seen of its driver; a boot test asserts on this.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockDeviceState {
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The driver's last write to `Status`.
    pub device_status: u32,
    /// The driver set DRIVER_OK and the device started.
    pub activated: bool,
    /// The device hit a guest error it cannot recover from without a reset.
    pub needs_reset: bool,
    /// RX buffers the driver has posted and the device has not used yet.
    pub rx_buffers_available: u16,
    /// RX buffers the device has filled since activation.
    pub rx_packets: u64,
    /// TX packets the device has consumed since activation.
    pub tx_packets: u64,
    /// Live connections.
    pub connections: usize,
    /// `InterruptStatus` as the driver would read it now (filled by the
    /// transport).
    pub interrupt_status: u32,
    /// How often the device thread raised a pending interrupt again (see
    /// [`Interrupt::reraise_if_unacknowledged`](crate::devices::virtio::Interrupt::reraise_if_unacknowledged)).
    pub interrupts_reraised: u64,
    /// Per queue (RX, TX, event): the driver's avail index, the device's
    /// next avail position and the used index it last published.
    pub queues: [QueueIndices; 3],
}

/// Where one virtqueue's rings stand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueIndices {
    pub avail: u16,
    pub next_avail: u16,
    pub used: u16,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    acked_features: u64,
    active: Option<Active>,
    muxer: VsockMuxer,
    needs_reset: bool,
    rx_starved: bool,
    rx_packets: u64,
    tx_packets: u64,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("active", &self.active.is_some())
            .field("muxer", &self.muxer)
            .finish()
    }
}

impl Vsock {
    /// A device for a guest with `cid`, whose host side is `muxer`.
    pub fn new(cid: u64, muxer: VsockMuxer) -> Self {
        Self {
            cid,
            acked_features: 0,
            active: None,
            muxer,
            needs_reset: false,
            rx_starved: false,
            rx_packets: 0,
            tx_packets: 0,
        }
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host endpoints.
    pub fn muxer_mut(&mut self) -> &mut VsockMuxer {
        &mut self.muxer
    }

    /// Counters for [`VsockDeviceState`] (status is filled by the transport).
    pub fn state(&self) -> VsockDeviceState {
        let rx_buffers_available = self
            .active
            .as_ref()
            .and_then(|a| {
                let q = &a.queues[RXQ];
                q.avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
                    .ok()
                    .map(|idx| (idx - std::num::Wrapping(q.next_avail())).0)
            })
            .unwrap_or(0);
        let mut queues = [QueueIndices::default(); 3];
        if let Some(a) = &self.active {
            for (out, q) in queues.iter_mut().zip(&a.queues) {
                *out = QueueIndices {
                    avail: q
                        .avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
                        .map_or(0, |i| i.0),
                    next_avail: q.next_avail(),
                    used: q.next_used(),
                };
            }
        }
        VsockDeviceState {
            queues,
            interrupt_status: 0,
            interrupts_reraised: 0,
            acked_features: self.acked_features,
            device_status: 0,
            activated: self.active.is_some(),
            needs_reset: self.needs_reset,
            rx_buffers_available,
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
            connections: self.muxer.connection_count(),
        }
    }

    /// Appends the fds the device thread should poll.
    pub fn fill_pollfds(&mut self, fds: &mut Vec<libc::pollfd>) {
        let rx_possible = self.active.is_some() && !self.rx_starved && !self.needs_reset;
        self.muxer.fill_pollfds(fds, rx_possible);
    }

    /// Hands poll results back (slice starts at the device's first fd), then
    /// processes the queues.
    pub fn on_ready(&mut self, fds: &[libc::pollfd]) {
        self.muxer.on_ready(fds);
        self.process();
    }

    /// Drains the TX queue into the muxer and fills RX buffers from it.
    /// Called after a queue notification or host-side activity.
    pub fn process(&mut self) {
        if self.needs_reset || self.active.is_none() {
            return;
        }
        let mut used = self.process_tx();
        // A TX packet can queue replies (RESPONSE, RST, credit updates).
        self.rx_starved = false;
        used |= self.process_rx();
        if used {
            if let Some(a) = &self.active {
                a.interrupt.trigger(INT_VRING);
            }
        }
    }

    fn fail(&mut self, why: &str) {
        tracing::warn!("vsock: device needs reset: {why}");
        self.needs_reset = true;
        self.muxer.reset();
        if let Some(a) = &self.active {
            a.interrupt.trigger(INT_CONFIG);
        }
    }

    fn process_tx(&mut self) -> bool {
        let mut used = false;
        loop {
            let Some(a) = self.active.as_mut() else {
                return used;
            };
            let chain = match a.queues[TXQ].iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.fail(&format!("TX queue: {e}"));
                    return used;
                }
            };
            let Some(chain) = chain else {
                return used;
            };
            let head = chain.head_index();
            let pkt = ParsedChain::parse(chain)
                .map_err(TxPacketError::from)
                .and_then(|c| read_tx_packet(&a.mem, &c, self.cid));
            if let Err(e) = a.queues[TXQ].add_used(&a.mem, head, 0) {
                self.fail(&format!("TX used ring: {e}"));
                return used;
            }
            used = true;
            self.tx_packets += 1;
            match pkt {
                Ok((hdr, data)) => self.muxer.send_pkt(&hdr, &data),
                Err(e) => tracing::debug!("vsock: dropped TX packet: {e}"),
            }
        }
    }

    fn process_rx(&mut self) -> bool {
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(a) = self.active.as_mut() else {
                return used;
            };
            let chain = match a.queues[RXQ].iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.fail(&format!("RX queue: {e}"));
                    return used;
                }
            };
            let Some(chain) = chain else {
                self.rx_starved = true;
                return used;
            };
            let head = chain.head_index();
            let len = match ParsedChain::parse(chain) {
                Ok(c) if c.writable_len >= HDR_SIZE as u64 => {
                    let capacity = (c.writable_len - HDR_SIZE as u64).min(u64::from(MAX_PKT_DATA));
                    match self.muxer.recv_pkt(capacity as usize) {
                        Some((hdr, data)) => write_rx_packet(&a.mem, &c, &hdr, &data),
                        None => {
                            a.queues[RXQ].go_to_previous_position();
                            return used;
                        }
                    }
                }
                Ok(_) => {
                    tracing::debug!("vsock: RX buffer too small for a header");
                    0
                }
                Err(e) => {
                    tracing::debug!("vsock: bad RX chain: {e}");
                    0
                }
            };
            if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, len) {
                self.fail(&format!("RX used ring: {e}"));
                return used;
            }
            used = true;
            self.rx_packets += 1;
        }
        used
    }
}

/// Why a TX chain was dropped instead of sent on.
#[derive(Debug, thiserror::Error)]
pub enum TxPacketError {
    /// The descriptor chain is malformed or reaches outside guest memory.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The header is short, malformed, or not a packet this guest may send.
    #[error(transparent)]
    Packet(#[from] PacketError),
}

/// Reads one TX packet (header, then exactly `len` payload bytes) from a
/// validated chain.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: &ParsedChain,
    guest_cid: u64,
) -> Result<(PacketHeader, Vec<u8>), TxPacketError> {
    let mut raw = [0u8; HDR_SIZE];
    let n = chain.read_at(mem, 0, &mut raw)?;
    let hdr = PacketHeader::parse(&raw[..n])?;
    hdr.validate_tx(
        guest_cid,
        chain.readable_len.saturating_sub(HDR_SIZE as u64),
    )?;
    let mut data = vec![0u8; hdr.len as usize];
    chain.read_at(mem, HDR_SIZE as u64, &mut data)?;
    Ok((hdr, data))
}

/// Writes a packet into an RX chain; returns the bytes written.
fn write_rx_packet(
    mem: &GuestMemoryMmap,
    chain: &ParsedChain,
    hdr: &PacketHeader,
    data: &[u8],
) -> u32 {
    let mut h = *hdr;
    h.len = data.len() as u32;
    let a = chain.write_at(mem, 0, &h.to_bytes()).unwrap_or(0);
    let b = chain.write_at(mem, HDR_SIZE as u64, data).unwrap_or(0);
    (a + b) as u32
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The configuration space is read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        for (i, q) in queues.iter().enumerate() {
            if !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        self.needs_reset = false;
        self.rx_starved = false;
        self.process();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.needs_reset = false;
        self.rx_starved = false;
        self.rx_packets = 0;
        self.tx_packets = 0;
        self.muxer.reset();
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use vm_memory::{Bytes, GuestAddress};

    use super::csm::CONN_BUF_SIZE;
    use super::packet::*;
    use super::test_utils::{Driver, GUEST_CID, QSIZE, TX_HDR};
    use super::unix::HybridListener;
    use super::*;
    use crate::devices::virtio::status;
    use crate::devices::virtio::test_utils::{Desc, TestQueue, XorShift, F_WRITE};

    #[test]
    fn negotiation_and_state() {
        let mut d = Driver::new();
        let mut cid = [0u8; 8];
        d.t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
        let st = d.t.device().state();
        assert!(st.activated && !st.needs_reset);
        assert_eq!(st.acked_features, 1 << VIRTIO_F_VERSION_1);
        assert_eq!(st.rx_buffers_available, 8);
        assert_eq!(
            st.queues[RXQ],
            QueueIndices {
                avail: 8,
                next_avail: 0,
                used: 0
            }
        );
        assert_eq!(d.r32(0x70) & status::DRIVER_OK, status::DRIVER_OK);
        // Reset returns the device to its initial state.
        d.w32(0x70, 0);
        assert_eq!(d.r32(0x70), 0);
        assert!(!d.t.device().state().activated);
    }

    #[test]
    fn a_reply_queued_before_a_reset_does_not_hide_the_same_reply_after_it() {
        let mut d = Driver::bare(VsockMuxer::new(GUEST_CID, None));
        let (tx, _rx) = futures::channel::mpsc::unbounded();
        d.muxer().listen(52, tx);
        // A driver that has posted no RX buffer yet asks to connect: the
        // RESPONSE waits in the device.
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        let st = d.r32(0x70);
        d.w32(0x70, st | status::DRIVER_OK);
        d.send(d.hdr(1000, 52, OP_REQUEST), &[]);
        assert!(d.recv().is_empty());
        // The driver resets the device and starts over, as a guest
        // kernel does when it rebinds the driver.
        d.w32(0x70, 0);
        d.queues = (0..3)
            .map(|i| TestQueue::new(&d.mem, GuestAddress(0x1000 + 0x2000 * i), QSIZE))
            .collect();
        d.rx_bufs.clear();
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        let st = d.r32(0x70);
        d.w32(0x70, st | status::DRIVER_OK);
        for _ in 0..8 {
            d.post_rx();
        }
        d.notify(RXQ as u32);
        // Nothing from before the reset comes through...
        assert!(d.recv().is_empty());
        // ...and the same request is answered.
        d.send(d.hdr(1000, 52, OP_REQUEST), &[]);
        assert_eq!(d.recv_ops(), vec![OP_RESPONSE]);
    }

    #[test]
    fn legacy_driver_cannot_set_features_ok() {
        let mut d = Driver::bare(VsockMuxer::new(GUEST_CID, None));
        d.negotiate(0);
        assert_eq!(d.r32(0x70) & status::FEATURES_OK, 0);
        // Features the device never offered are refused too.
        let mut d = Driver::bare(VsockMuxer::new(GUEST_CID, None));
        d.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 29));
        assert_eq!(d.r32(0x70) & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let mut d = Driver::bare(VsockMuxer::new(GUEST_CID, None));
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        d.w32(0x30, 1);
        // Too late: the queue is ready, so its address is frozen.
        d.w32(0x80, 0xffff_0000);
        d.w32(0x30, 2);
        d.w32(0x44, 0);
        d.w32(0x80, 0xfff0_0000);
        d.w32(0x44, 1);
        let st = d.r32(0x70);
        d.w32(0x70, st | status::DRIVER_OK);
        assert_ne!(d.r32(0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(d.r32(0x60) & INT_CONFIG, 0);
        assert!(!d.t.activated());
    }

    #[test]
    fn guest_initiated_connection_data_both_ways() {
        let mut d = Driver::new();
        let mut host = d.guest_connect(1000, 52);
        d.send(d.hdr(1000, 52, OP_RW), b"ping");
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        host.write_all(b"pong").unwrap();
        d.step();
        let pkts = d.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, OP_RW);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (52, 1000));
        assert_eq!(pkts[0].1, b"pong");
        assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_SIZE);
        assert_eq!(pkts[0].0.fwd_cnt, 4);
        assert_eq!(d.t.device().state().connections, 1);
        assert_ne!(
            d.t.interrupt().status() & crate::devices::virtio::INT_VRING,
            0
        );
    }

    #[test]
    fn host_initiated_connection() {
        let mut d = Driver::new();
        let (ours, mut host) = UnixStream::pair().unwrap();
        let mut reply = d.muxer().connect_channel(1024, ours);
        d.step();
        let pkts = d.recv();
        assert_eq!(pkts.len(), 1);
        let req = pkts[0].0;
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
        assert!(req.src_port >= 1 << 30);
        assert!(reply.try_recv().unwrap().is_none());
        d.send(d.hdr(1024, req.src_port, OP_RESPONSE), &[]);
        assert_eq!(reply.try_recv().unwrap(), Some(Ok(())));
        host.write_all(b"hello guest").unwrap();
        d.step();
        let pkts = d.recv();
        assert_eq!(pkts[0].1, b"hello guest");
        d.send(d.hdr(1024, req.src_port, OP_RW), b"hello host");
        let mut buf = [0u8; 10];
        host.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host");

        // The guest refuses a second connection.
        let (ours, _host2) = UnixStream::pair().unwrap();
        let mut reply = d.muxer().connect_channel(1025, ours);
        d.step();
        let req = d.recv()[0].0;
        d.send(d.hdr(1025, req.src_port, OP_RST), &[]);
        assert_eq!(
            reply.try_recv().unwrap(),
            Some(Err(std::io::ErrorKind::ConnectionRefused))
        );
    }

    #[test]
    fn unknown_port_gets_rst() {
        let mut d = Driver::new();
        d.send(d.hdr(1000, 9999, OP_REQUEST), &[]);
        let pkts = d.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, OP_RST);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (9999, 1000));
        // Data for a connection that does not exist: RST; an RST: nothing.
        d.send(d.hdr(1000, 9999, OP_RW), b"x");
        assert_eq!(d.recv_ops(), vec![OP_RST]);
        d.send(d.hdr(1000, 9999, OP_RST), &[]);
        assert!(d.recv().is_empty());
        // Wrong destination CID.
        let mut h = d.hdr(1000, 52, OP_REQUEST);
        h.dst_cid = 7;
        d.send(h, &[]);
        assert_eq!(d.recv_ops(), vec![OP_RST]);
    }

    #[test]
    fn credit_exhaustion_and_update() {
        let mut d = Driver::new();
        let mut host = d.guest_connect(1000, 52);
        // The guest only has 100 bytes of buffer.
        let mut h = d.hdr(1000, 52, OP_CREDIT_UPDATE);
        h.buf_alloc = 100;
        d.send(h, &[]);
        host.write_all(&[7u8; 250]).unwrap();
        d.step();
        let pkts = d.recv();
        let ops: Vec<u16> = pkts.iter().map(|p| p.0.op).collect();
        assert_eq!(ops, vec![OP_RW, OP_CREDIT_REQUEST]);
        assert_eq!(pkts[0].1.len(), 100);
        // No credit: nothing more, however long we wait.
        d.step();
        assert!(d.recv().is_empty());
        // The guest consumed 100 bytes.
        h.op = OP_CREDIT_UPDATE;
        h.fwd_cnt = 100;
        d.send(h, &[]);
        d.step();
        let pkts = d.recv();
        assert_eq!(pkts[0].0.op, OP_RW);
        assert_eq!(pkts[0].1.len(), 100);

        // Guest to host: after a quarter of our buffer is forwarded, the
        // device volunteers a credit update.
        let chunk = vec![1u8; MAX_PKT_DATA as usize];
        h.op = OP_RW;
        h.fwd_cnt = 200;
        d.send(h, &chunk);
        let mut sink = vec![0u8; chunk.len()];
        host.read_exact(&mut sink).unwrap();
        d.step();
        let pkts = d.recv();
        let upd = pkts.iter().find(|p| p.0.op == OP_CREDIT_UPDATE).unwrap();
        assert_eq!(upd.0.fwd_cnt, MAX_PKT_DATA);
        // A CREDIT_REQUEST is answered.
        h.op = OP_CREDIT_REQUEST;
        d.send(h, &[]);
        assert_eq!(d.recv_ops(), vec![OP_CREDIT_UPDATE]);
    }

    /// A guest flooding CREDIT_REQUESTs without ever taking its RX packets
    /// queues the connection once, not once per packet; the answer still
    /// comes once RX buffers are there.
    #[test]
    fn credit_request_flood_without_rx_buffers_stays_bounded() {
        let mut d = Driver::new();
        let _host = d.guest_connect(1000, 52);
        // Use up the posted RX buffers and never repost them.
        for _ in 0..64 {
            d.send(d.hdr(1000, 52, OP_CREDIT_REQUEST), &[]);
        }
        for _ in 0..100_000 {
            let h = d.hdr(1000, 52, OP_CREDIT_REQUEST);
            d.send_raw(&h, &[]);
            let _ = d.wake.read();
            d.t.device_mut().process();
        }
        let queued = d.muxer().rx_queue_len();
        assert!(queued <= 1, "{queued} RX keys queued for one connection");
        d.step();
        assert!(d.recv_ops().contains(&OP_CREDIT_UPDATE));
    }

    #[test]
    fn guest_ignoring_credit_is_reset() {
        let mut d = Driver::new();
        let _host = d.guest_connect(1000, 52);
        let chunk = vec![1u8; MAX_PKT_DATA as usize];
        let mut ops = Vec::new();
        for _ in 0..64 {
            d.send(d.hdr(1000, 52, OP_RW), &chunk);
            ops.extend(d.recv_ops());
            if ops.contains(&OP_RST) {
                break;
            }
        }
        assert!(ops.contains(&OP_RST), "{ops:?}");
        assert_eq!(d.t.device().state().connections, 0);
    }

    #[test]
    fn shutdown_both_ways() {
        let mut d = Driver::new();
        let mut host = d.guest_connect(1000, 52);
        // Guest half-closes: the host reads EOF but the connection lives.
        let mut h = d.hdr(1000, 52, OP_SHUTDOWN);
        h.flags = SHUTDOWN_SEND;
        d.send(h, &[]);
        let mut buf = Vec::new();
        host.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty());
        host.write_all(b"late").unwrap();
        d.step();
        assert_eq!(d.recv()[0].1, b"late");
        // The host closes: the guest gets SHUTDOWN, then closes fully and
        // gets the RST it waits for.
        drop(host);
        d.step();
        let pkts = d.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.flags),
            (OP_SHUTDOWN, SHUTDOWN_SEND)
        );
        h.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        d.send(h, &[]);
        assert_eq!(d.recv_ops(), vec![OP_RST]);
        assert_eq!(d.t.device().state().connections, 0);
    }

    #[test]
    fn malformed_tx_chains_are_dropped() {
        let mut d = Driver::new();
        let txq = TXQ;
        // Header descriptor outside guest memory.
        d.queues[txq].add_chain(&d.mem, &[Desc::new(0xffff_ffff_0000, 44, 0, 0)]);
        // Header shorter than 44 bytes.
        d.queues[txq].add_chain(&d.mem, &[Desc::new(TX_HDR, 10, 0, 0)]);
        // Device-writable TX buffer.
        d.queues[txq].add_chain(&d.mem, &[Desc::new(TX_HDR, 44, F_WRITE, 0)]);
        // `len` larger than the data present.
        let mut h = d.hdr(1000, 52, OP_RW);
        h.len = 1000;
        d.send_raw(&h, b"short");
        // Wrong source CID.
        let mut h = d.hdr(1000, 52, OP_REQUEST);
        h.src_cid = 99;
        d.send_raw(&h, &[]);
        d.step();
        assert_eq!(d.queues[txq].take_used(&d.mem).len(), 5);
        assert!(d.recv().is_empty());
        // RX buffer too small for a header: used with length 0, skipped.
        let small = d.queues[RXQ].add_chain(&d.mem, &[Desc::new(0x300000, 8, F_WRITE, 0)]);
        d.rx_bufs.insert(small, 0x300000);
        // The device still works.
        let _host = d.guest_connect(1000, 52);
        assert!(!d.t.device().state().needs_reset);
    }

    #[test]
    fn corrupt_avail_index_needs_reset() {
        let mut d = Driver::new();
        // An avail index more than a queue size ahead is impossible.
        let avail = d.queues[TXQ].avail;
        d.mem
            .write_obj(1000u16.to_le(), GuestAddress(avail.0 + 2))
            .unwrap();
        d.notify(TXQ as u32);
        d.step();
        assert_ne!(d.r32(0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert!(d.t.device().state().needs_reset);
    }

    #[test]
    fn hybrid_socket_handshake() {
        let dir = std::env::temp_dir().join(format!("capsa-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.sock");
        let l = HybridListener::bind(&path).unwrap();
        let mut d = Driver::with_muxer(VsockMuxer::new(GUEST_CID, Some(l)));
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let mut req = None;
        for _ in 0..10 {
            d.step();
            if let Some(p) = d.recv().into_iter().next() {
                req = Some(p.0);
                break;
            }
        }
        let req = req.expect("REQUEST for the guest");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
        d.send(d.hdr(52, req.src_port, OP_RESPONSE), &[]);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let expect = format!("OK {}\n", req.src_port);
        let mut line = vec![0u8; expect.len()];
        client.read_exact(&mut line).unwrap();
        assert_eq!(line, expect.as_bytes());
        d.send(d.hdr(52, req.src_port, OP_RW), b"data");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"data");
        drop(d);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Random TX traffic (random headers, lengths and descriptor layouts,
    /// some connections real) never panics the device.
    #[test]
    fn random_tx_packets_never_panic() {
        let mut d = Driver::new();
        let _host = d.guest_connect(1000, 52);
        let mut rng = XorShift::new(0xdead_beef);
        for _ in 0..3000 {
            let mut h = PacketHeader {
                src_cid: if rng.next() % 8 == 0 {
                    rng.next()
                } else {
                    GUEST_CID
                },
                dst_cid: if rng.next() % 8 == 0 {
                    rng.next()
                } else {
                    HOST_CID
                },
                src_port: if rng.next() % 2 == 0 {
                    1000
                } else {
                    rng.next() as u32
                },
                dst_port: if rng.next() % 2 == 0 {
                    52
                } else {
                    rng.next() as u32 % 64
                },
                len: 0,
                type_: (rng.next() % 3) as u16,
                op: (rng.next() % 9) as u16,
                flags: rng.next() as u32,
                buf_alloc: rng.next() as u32,
                fwd_cnt: rng.next() as u32,
            };
            let n = (rng.next() % 300) as usize;
            let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            h.len = if rng.next() % 4 == 0 {
                rng.next() as u32
            } else {
                n as u32
            };
            d.send_raw(&h, &data);
            if rng.next() % 8 == 0 {
                d.step();
                d.recv();
            }
            // Memory stays bounded: the RX queue holds each key once.
            let queued = d.muxer().rx_queue_len();
            assert!(
                queued <= d.t.device().state().connections + 1024,
                "{queued}"
            );
        }
        d.step();
        d.recv();
    }
}
