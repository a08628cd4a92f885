//! Test helpers for the vsock device: [`Driver`] plays the Linux
//! virtio-vsock driver against it, through the MMIO registers and guest
//! memory only.
#![cfg(test)]

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::VsockMuxer;
use super::packet::*;
use super::{Vsock, QUEUE_SIZE, RXQ, TXQ, VIRTIO_ID_VSOCK};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::status;
use crate::devices::virtio::test_utils::{Desc, TestQueue, F_WRITE};
use crate::devices::virtio::{Interrupt, VIRTIO_F_VERSION_1};
use crate::event_loop::poll;

pub(super) const GUEST_CID: u64 = 3;
pub(super) const QSIZE: u16 = 16;
const RX_BUF_BASE: u64 = 0x10000;
const RX_DATA: u32 = 4096;
pub(super) const TX_HDR: u64 = 0x100000;
const TX_DATA: u64 = 0x101000;

/// Plays the Linux virtio-vsock driver against the device, through the
/// MMIO registers and guest memory only.
pub(super) struct Driver {
    pub(super) mem: GuestMemoryMmap,
    pub(super) t: MmioTransport<Vsock>,
    pub(super) queues: Vec<TestQueue>,
    pub(super) rx_bufs: HashMap<u16, u64>,
    next_rx_slot: u64,
    pub(super) wake: EventFd,
}

impl Driver {
    pub(super) fn new() -> Self {
        Self::with_muxer(VsockMuxer::new(GUEST_CID, None))
    }

    pub(super) fn with_muxer(muxer: VsockMuxer) -> Self {
        let d = Self::bare(muxer);
        let mut d = d;
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        assert_eq!(d.r32(0x70) & status::FEATURES_OK, status::FEATURES_OK);
        d.setup_queues();
        let st = d.r32(0x70);
        d.w32(0x70, st | status::DRIVER_OK);
        assert!(d.t.activated());
        for _ in 0..8 {
            d.post_rx();
        }
        d.notify(RXQ as u32);
        d
    }

    pub(super) fn bare(muxer: VsockMuxer) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Vsock::new(GUEST_CID, muxer),
            mem.clone(),
            irq,
            wake.try_clone().unwrap(),
        );
        let queues = (0..3)
            .map(|i| TestQueue::new(&mem, GuestAddress(0x1000 + 0x2000 * i), QSIZE))
            .collect();
        Self {
            mem,
            t,
            queues,
            rx_bufs: HashMap::new(),
            next_rx_slot: 0,
            wake,
        }
    }

    pub(super) fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub(super) fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub(super) fn negotiate(&mut self, features: u64) {
        assert_eq!(self.r32(0x0), 0x7472_6976);
        assert_eq!(self.r32(0x4), 2);
        assert_eq!(self.r32(0x8), VIRTIO_ID_VSOCK);
        self.w32(0x70, 0);
        self.w32(0x70, status::ACKNOWLEDGE);
        self.w32(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(0x14, 1);
        let hi = self.r32(0x10);
        assert_eq!(hi & 1, 1, "VIRTIO_F_VERSION_1 offered");
        self.w32(0x24, 0);
        self.w32(0x20, features as u32);
        self.w32(0x24, 1);
        self.w32(0x20, (features >> 32) as u32);
        self.w32(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    pub(super) fn setup_queues(&mut self) {
        for i in 0..3u32 {
            self.w32(0x30, i);
            assert_eq!(self.r32(0x34), u32::from(QUEUE_SIZE));
            self.w32(0x38, u32::from(QSIZE));
            let q = &self.queues[i as usize];
            let (d, a, u) = (q.desc.0, q.avail.0, q.used.0);
            self.w32(0x80, d as u32);
            self.w32(0x84, (d >> 32) as u32);
            self.w32(0x90, a as u32);
            self.w32(0x94, (a >> 32) as u32);
            self.w32(0xa0, u as u32);
            self.w32(0xa4, (u >> 32) as u32);
            self.w32(0x44, 1);
        }
    }

    /// Posts one RX buffer as Linux 6.1 does: header and data in two
    /// writable descriptors.
    pub(super) fn post_rx(&mut self) {
        let base = RX_BUF_BASE + (self.next_rx_slot % 8) * 0x2000;
        self.next_rx_slot += 1;
        let head = self.queues[RXQ].add_chain(
            &self.mem,
            &[
                Desc::new(base, HDR_SIZE as u32, F_WRITE, 0),
                Desc::new(base + 0x100, RX_DATA, F_WRITE, 0),
            ],
        );
        self.rx_bufs.insert(head, base);
    }

    pub(super) fn notify(&mut self, q: u32) {
        self.w32(0x50, q);
    }

    pub(super) fn hdr(&self, src_port: u32, dst_port: u32, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    /// Queues one packet on TX (header and data in separate descriptors).
    pub(super) fn send_raw(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_HDR))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(TX_DATA)).unwrap();
        let mut descs = vec![Desc::new(TX_HDR, HDR_SIZE as u32, 0, 0)];
        if !data.is_empty() {
            descs.push(Desc::new(TX_DATA, data.len() as u32, 0, 0));
        }
        self.queues[TXQ].add_chain(&self.mem, &descs);
        self.notify(TXQ as u32);
    }

    pub(super) fn send(&mut self, hdr: PacketHeader, data: &[u8]) {
        let mut h = hdr;
        h.len = data.len() as u32;
        self.send_raw(&h, data);
        self.step();
    }

    /// One turn of the device thread: drain queues, poll host sockets.
    pub(super) fn step(&mut self) {
        let _ = self.wake.read();
        let dev = self.t.device_mut();
        dev.process();
        for _ in 0..3 {
            let mut fds = Vec::new();
            dev.fill_pollfds(&mut fds);
            if fds.is_empty() {
                break;
            }
            poll(&mut fds, 20).unwrap();
            dev.on_ready(&fds);
        }
    }

    /// Packets the device delivered; their buffers are reposted.
    pub(super) fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let used = self.queues[RXQ].take_used(&self.mem);
        let mut out = Vec::new();
        for (id, len) in used {
            let base = self.rx_bufs.remove(&(id as u16)).expect("known buffer");
            if len == 0 {
                // A buffer the device refused (too small); not reposted.
                continue;
            }
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(base)).unwrap();
            let h = PacketHeader::parse(&raw).unwrap();
            assert_eq!(len as usize, HDR_SIZE + h.len as usize);
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(base + 0x100))
                .unwrap();
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
            out.push((h, data));
            self.post_rx();
        }
        if !out.is_empty() {
            self.notify(RXQ as u32);
        }
        out
    }

    pub(super) fn recv_ops(&mut self) -> Vec<u16> {
        self.recv().into_iter().map(|(h, _)| h.op).collect()
    }

    pub(super) fn muxer(&mut self) -> &mut VsockMuxer {
        self.t.device_mut().muxer_mut()
    }

    /// Guest connects from `src` to host `port`, which has a listener.
    pub(super) fn guest_connect(&mut self, src: u32, port: u32) -> UnixStream {
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        self.muxer().listen(port, tx);
        self.send(self.hdr(src, port, OP_REQUEST), &[]);
        assert_eq!(self.recv_ops(), vec![OP_RESPONSE]);
        let s = rx.try_recv().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        s
    }
}
