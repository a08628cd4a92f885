//! The virtio-vsock packet header (virtio spec 1.2, §5.10.6) and its
//! validation.
//!
//! Every field of a header that arrives on the TX queue is guest-controlled.
//! Parsing never panics: a short buffer is an error, unknown values are kept
//! as they are and rejected by [`PacketHeader::validate_tx`], which the device
//! calls before the muxer ever sees a packet.

use thiserror::Error;

/// Size of the packet header on the wire.
pub const HDR_SIZE: usize = 44;
/// The only socket type capsa supports.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset (refused or torn down).
pub const OP_RST: u16 = 3;
/// Half or full close; see [`SHUTDOWN_RCV`] and [`SHUTDOWN_SEND`].
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer to send a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// The sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;

/// Largest payload accepted in one packet (the Linux driver sends at most
/// 64 KiB per packet).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// A malformed packet.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    /// The header needs 44 bytes but only {0} were available.
    #[error("vsock header needs 44 bytes, got {0}")]
    ShortHeader(usize),
    /// The header claims {claimed} data bytes but the buffer holds {available}.
    #[error("vsock header claims {claimed} data bytes, buffer holds {available}")]
    LengthMismatch {
        /// `len` field of the header.
        claimed: u32,
        /// Readable bytes after the header.
        available: u64,
    },
    /// Payload larger than [`MAX_PKT_DATA`].
    #[error("vsock payload of {0} bytes exceeds the 64 KiB limit")]
    TooLarge(u32),
    /// The source CID is not the guest's.
    #[error("packet from CID {got}, guest CID is {expected}")]
    WrongSourceCid {
        /// CID in the header.
        got: u64,
        /// The guest's CID.
        expected: u64,
    },
}

/// A decoded virtio-vsock header. All fields are little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation-specific flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl PacketHeader {
    /// Decodes a header from the first [`HDR_SIZE`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() < HDR_SIZE {
            return Err(PacketError::ShortHeader(bytes.len()));
        }
        Ok(Self {
            src_cid: le_u64(bytes, 0),
            dst_cid: le_u64(bytes, 8),
            src_port: le_u32(bytes, 16),
            dst_port: le_u32(bytes, 20),
            len: le_u32(bytes, 24),
            type_: le_u16(bytes, 28),
            op: le_u16(bytes, 30),
            flags: le_u32(bytes, 32),
            buf_alloc: le_u32(bytes, 36),
            fwd_cnt: le_u32(bytes, 40),
        })
    }

    /// Encodes the header for the wire.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header read from the TX queue: it must come from the guest's
    /// CID and its payload length must fit both the limit and the bytes the
    /// descriptor chain actually holds after the header.
    pub fn validate_tx(&self, guest_cid: u64, available: u64) -> Result<(), PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::WrongSourceCid {
                got: self.src_cid,
                expected: guest_cid,
            });
        }
        if self.len > MAX_PKT_DATA {
            return Err(PacketError::TooLarge(self.len));
        }
        if u64::from(self.len) > available {
            return Err(PacketError::LengthMismatch {
                claimed: self.len,
                available,
            });
        }
        Ok(())
    }

    /// A header for a packet from the host to the guest.
    pub fn host_to_guest(guest_cid: u64, src_port: u32, dst_port: u32, op: u16) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::XorShift;

    #[test]
    fn round_trip() {
        let h = PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 9,
        };
        assert_eq!(PacketHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn short_header_is_an_error() {
        assert_eq!(
            PacketHeader::parse(&[0u8; 43]),
            Err(PacketError::ShortHeader(43))
        );
    }

    #[test]
    fn validate_rejects_bad_fields() {
        let mut h = PacketHeader::host_to_guest(3, 1, 2, OP_RW);
        h.src_cid = 3;
        h.len = 10;
        assert!(h.validate_tx(3, 10).is_ok());
        assert!(matches!(
            h.validate_tx(3, 9),
            Err(PacketError::LengthMismatch { .. })
        ));
        assert!(matches!(
            h.validate_tx(4, 10),
            Err(PacketError::WrongSourceCid { .. })
        ));
        h.len = MAX_PKT_DATA + 1;
        assert_eq!(
            h.validate_tx(3, u64::MAX),
            Err(PacketError::TooLarge(MAX_PKT_DATA + 1))
        );
    }

    /// Deterministic stand-in for the fuzz target: random bytes never panic
    /// the parser or the validator, and whatever parses re-encodes exactly.
    #[test]
    fn random_headers_never_panic() {
        let mut rng = XorShift::new(0x5eed_0001);
        for _ in 0..100_000 {
            let n = (rng.next() % 60) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if let Ok(h) = PacketHeader::parse(&bytes) {
                assert_eq!(&h.to_bytes()[..], &bytes[..HDR_SIZE]);
                let _ = h.validate_tx(3, rng.next());
            }
        }
    }
}
