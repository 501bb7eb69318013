//! What crosses an RDMA connection between a client end (the bridge) and the broker.
//!
//! A connection carries one Kafka byte stream each way, like a TCP connection:
//!
//! - **Setup** (rdma_cm private data). The client offers its *landing ring* — memory the
//!   broker may RDMA-WRITE into — as `(addr, rkey, len)` ([`Offer`]); the broker answers
//!   with the number of send credits and the size of its receive buffers ([`Grant`]).
//! - **Client → broker**: SEND messages, each at most the granted buffer size, landing in
//!   the broker's shared receive queue: an 8-byte [`SendHeader`] (landing-ring bytes the
//!   client has consumed since its last message; data length) and then the next bytes of
//!   the request stream. Each message spends one credit.
//! - **Broker → client**: the response stream is RDMA-WRITTEN into the landing ring at the
//!   broker's running offset (modulo its length) — fetch payloads straight from the
//!   registered log — and each batch of writes ends with a WRITE-WITH-IMMEDIATE whose
//!   32-bit immediate ([`Imm`]) says how many bytes the batch wrote and how many send
//!   credits it returns. The broker writes only into ring space the client has freed.
//!
//! # Invariants (checked by the receiving side; a violation closes the connection)
//! - A client never has more messages in flight than credits granted and returned.
//! - A message's header length equals the bytes that arrived after it.
//! - The broker never has more unconsumed bytes in the ring than its length.

use std::fmt;

pub const MAGIC: u32 = 0x534c_5244; // "SLRD"
pub const VERSION: u8 = 1;
pub const SEND_HEADER: usize = 8;
/// Largest batch of ring writes one immediate can describe.
pub const MAX_IMM_BYTES: usize = (1 << 24) - 1;
/// Most credits one immediate can return.
pub const MAX_IMM_CREDITS: u32 = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("{what}: {len} bytes, expected {want}")]
    Length { what: &'static str, len: usize, want: usize },
    #[error("bad magic {0:#x}: not a slipstream RDMA peer")]
    Magic(u32),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("{0}")]
    Invalid(&'static str),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn exact<'a>(b: &'a [u8], want: usize, what: &'static str) -> Result<&'a [u8], WireError> {
    if b.len() < want {
        return Err(WireError::Length { what, len: b.len(), want });
    }
    Ok(&b[..want])
}

fn check_magic(b: &[u8]) -> Result<(), WireError> {
    match (u32_at(b, 0), b[4]) {
        (MAGIC, VERSION) => Ok(()),
        (MAGIC, v) => Err(WireError::Version(v)),
        (m, _) => Err(WireError::Magic(m)),
    }
}

/// The client's landing ring, offered in the connect request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub ring_addr: u64,
    pub ring_rkey: u32,
    pub ring_len: u32,
}

impl Offer {
    pub const LEN: usize = 24;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4] = VERSION;
        b[8..16].copy_from_slice(&self.ring_addr.to_be_bytes());
        b[16..20].copy_from_slice(&self.ring_rkey.to_be_bytes());
        b[20..24].copy_from_slice(&self.ring_len.to_be_bytes());
        b
    }

    /// Checked: any input is refused or accepted, never a panic (fuzzed: `rdma_wire`).
    pub fn decode(b: &[u8]) -> Result<Offer, WireError> {
        let b = exact(b, Self::LEN, "connect private data")?;
        check_magic(b)?;
        let ring_addr = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        let o = Offer { ring_addr, ring_rkey: u32_at(b, 16), ring_len: u32_at(b, 20) };
        if o.ring_len < 4096 || o.ring_len as usize > MAX_IMM_BYTES {
            return Err(WireError::Invalid("landing ring must be 4 KiB .. 16 MiB"));
        }
        Ok(o)
    }
}

/// The broker's answer: send credits and receive buffer size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub credits: u32,
    pub recv_size: u32,
}

impl Grant {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4] = VERSION;
        b[8..12].copy_from_slice(&self.credits.to_be_bytes());
        b[12..16].copy_from_slice(&self.recv_size.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Grant, WireError> {
        let b = exact(b, Self::LEN, "accept private data")?;
        check_magic(b)?;
        let g = Grant { credits: u32_at(b, 8), recv_size: u32_at(b, 12) };
        if g.credits < 2 || g.recv_size as usize <= SEND_HEADER {
            return Err(WireError::Invalid("grant needs at least 2 credits and room for data"));
        }
        Ok(g)
    }
}

/// The header of every client → broker message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendHeader {
    /// Landing-ring bytes consumed since the previous message.
    pub ring_freed: u32,
    /// Data bytes following the header.
    pub len: u32,
}

impl SendHeader {
    pub fn encode(&self) -> [u8; SEND_HEADER] {
        let mut b = [0u8; SEND_HEADER];
        b[0..4].copy_from_slice(&self.ring_freed.to_be_bytes());
        b[4..8].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Parses a whole received message (`msg` = header + data) and checks its length.
    pub fn parse(msg: &[u8]) -> Result<(SendHeader, &[u8]), WireError> {
        let h = exact(msg, SEND_HEADER, "message header")?;
        let hdr = SendHeader { ring_freed: u32_at(h, 0), len: u32_at(h, 4) };
        let data = &msg[SEND_HEADER..];
        if data.len() != hdr.len as usize {
            return Err(WireError::Length { what: "message data", len: data.len(), want: hdr.len as usize });
        }
        Ok((hdr, data))
    }
}

/// The immediate of a broker → client write batch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Imm {
    pub bytes: u32,
    pub credits: u32,
}

impl Imm {
    pub fn encode(&self) -> u32 {
        debug_assert!(self.bytes as usize <= MAX_IMM_BYTES && self.credits <= MAX_IMM_CREDITS);
        (self.credits << 24) | self.bytes
    }

    pub fn decode(v: u32) -> Imm {
        Imm { bytes: v & 0x00ff_ffff, credits: v >> 24 }
    }
}

impl fmt::Debug for Imm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Imm({} bytes, {} credits)", self.bytes, self.credits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_messages_round_trip_and_reject_strangers() {
        let o = Offer { ring_addr: 0x7f00_dead_beef, ring_rkey: 42, ring_len: 1 << 20 };
        assert_eq!(Offer::decode(&o.encode()), Ok(o));
        let g = Grant { credits: 16, recv_size: 16384 };
        assert_eq!(Grant::decode(&g.encode()), Ok(g));
        assert!(matches!(Offer::decode(&[0u8; 24]), Err(WireError::Magic(0))));
        assert!(matches!(Offer::decode(&o.encode()[..10]), Err(WireError::Length { .. })));
        let mut v2 = o.encode();
        v2[4] = 2;
        assert_eq!(Offer::decode(&v2), Err(WireError::Version(2)));
        let huge = Offer { ring_len: 1 << 30, ..o };
        assert!(matches!(Offer::decode(&huge.encode()), Err(WireError::Invalid(_))));
        assert!(matches!(Grant::decode(&Grant { credits: 1, recv_size: 4096 }.encode()), Err(WireError::Invalid(_))));
    }

    #[test]
    fn message_header_must_match_the_data() {
        let mut m = SendHeader { ring_freed: 7, len: 3 }.encode().to_vec();
        m.extend_from_slice(b"abc");
        let (h, d) = SendHeader::parse(&m).expect("valid");
        assert_eq!((h.ring_freed, d), (7, &b"abc"[..]));
        m.push(b'd');
        assert!(SendHeader::parse(&m).is_err());
        assert!(SendHeader::parse(&m[..5]).is_err());
    }

    /// Deterministic mutations of valid setup data and messages (the fuzz target
    /// `rdma_wire` does the same open-ended): every decode refuses or accepts, none panics.
    #[test]
    fn mutated_input_never_panics() {
        let mut seeds = vec![
            Offer { ring_addr: 1 << 40, ring_rkey: 9, ring_len: 1 << 16 }.encode().to_vec(),
            Grant { credits: 16, recv_size: 16384 }.encode().to_vec(),
        ];
        let mut m = SendHeader { ring_freed: 100, len: 4 }.encode().to_vec();
        m.extend_from_slice(b"data");
        seeds.push(m);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for seed in &seeds {
            for cut in 0..=seed.len() {
                decode_all(&seed[..cut]);
            }
            for _ in 0..2000 {
                let mut v = seed.clone();
                for _ in 0..3 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x as usize) % v.len();
                    v[i] = (x >> 32) as u8;
                }
                decode_all(&v);
            }
        }
    }

    fn decode_all(b: &[u8]) {
        let _ = Offer::decode(b);
        let _ = Grant::decode(b);
        let _ = SendHeader::parse(b);
        if b.len() >= 4 {
            let _ = Imm::decode(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        }
    }

    #[test]
    fn immediates_pack_bytes_and_credits() {
        let i = Imm { bytes: MAX_IMM_BYTES as u32, credits: MAX_IMM_CREDITS };
        assert_eq!(Imm::decode(i.encode()), i);
        assert_eq!(Imm::decode(Imm { bytes: 5, credits: 3 }.encode()), Imm { bytes: 5, credits: 3 });
    }
}
