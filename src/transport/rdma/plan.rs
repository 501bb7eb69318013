//! Planning a connection's ring writes, sans-IO: which bytes of which queued responses go
//! into which RDMA WRITE, at which place of the peer's landing ring, from where (in place
//! or through the staging ring), and how many credits ride back on the batch's immediate.
//! The backend turns a [`Batch`] into work requests and posts them; everything here is
//! unit-tested without a NIC.
//!
//! # Invariants
//! - Only ring space the peer reported free is planned: `ring_written - ring_freed <=
//!   ring_len` holds after every batch.
//! - A write never crosses the end of the ring (it wraps into the next write) nor carries
//!   more than [`MAX_SGE`] pieces; a batch carries at most `MAX_IMM_BYTES` bytes and its
//!   last write carries the immediate.
//! - Staged pieces take the staging ring's free part (`staged_head - staged_tail <=
//!   staging_len`), contiguously; a batch's staged bytes are freed when it completes.

use std::collections::VecDeque;

use super::wire::{self, Imm};
use crate::buffer::{chunks_len, Chunk};

/// Bytes of response stream one batch carries at most.
pub const BATCH_BYTES: usize = 1 << 20;
/// Pieces (scatter/gather entries) per write.
pub const MAX_SGE: usize = 16;

/// Where the classifier says a chunk's bytes can be sent from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// In place, from registered memory: the key, and how many of the bytes asked about
    /// the registration covers.
    Direct { lkey: u32, covered: usize },
    /// Through the staging ring (a CPU copy); `counted`: a copy the fetch-copy counter must
    /// see (log bytes that could not be registered), not a header.
    Staged { counted: bool },
}

/// Where one piece of a write comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// `len` bytes at `addr`, registered under `lkey`.
    Direct { addr: u64, lkey: u32 },
    /// Copy the piece into the staging ring at `at` first.
    Staged { at: usize, counted: bool },
}

/// One piece of a write: `len` bytes of `chunk` from `off`.
#[derive(Debug, Clone)]
pub struct Piece {
    pub chunk: Chunk,
    pub off: usize,
    pub len: usize,
    pub from: From,
}

/// One RDMA WRITE: where it lands in the peer's ring, and its pieces.
#[derive(Debug, Clone)]
pub struct Write {
    pub ring_offset: u64,
    pub pieces: Vec<Piece>,
    /// The batch's last write: bytes landed and credits returned.
    pub imm: Option<Imm>,
}

/// A batch of writes for one post.
#[derive(Debug)]
pub struct Batch {
    pub writes: Vec<Write>,
    /// Response bytes it carries.
    pub bytes: usize,
    /// Credits it returns.
    pub credits: u32,
    /// Responses whose last byte it carries: handed back when it completes.
    pub done: Vec<Vec<Chunk>>,
    /// Chunks of a response it carries only part of: kept alive until it completes.
    pub keep: Vec<Chunk>,
    /// The staging ring's head after it: its tail once the batch completes.
    pub staged_end: u64,
}

/// Why nothing was planned.
#[derive(Debug, PartialEq, Eq)]
pub enum Idle {
    /// Nothing to send and no credits owed.
    Nothing,
    /// Responses wait, but the peer's ring is full (the stall clock runs).
    RingFull,
    /// The send queue has no room for another batch.
    SendQueueFull,
    /// The staging ring is full: its bytes free up as batches complete.
    StagingFull,
}

struct Msg {
    chunks: Vec<Chunk>,
    /// Bytes already planned.
    posted: usize,
    len: usize,
}

/// One connection's send side.
pub struct SendSide {
    tx: VecDeque<Msg>,
    ring_len: u64,
    /// Ring bytes written and freed by the peer, ever.
    pub ring_written: u64,
    pub ring_freed: u64,
    staging_len: usize,
    staged_head: u64,
    staged_tail: u64,
    /// Credits owed to the peer (go back with the next batch).
    pub owed: u32,
    /// Work requests posted and not completed.
    wrs_in_flight: u32,
    /// Most work requests in flight (the send queue's depth).
    max_wrs: u32,
    /// Bytes queued and not yet completed.
    unsent: usize,
}

impl SendSide {
    pub fn new(ring_len: u32, staging_len: usize, max_wrs: u32) -> SendSide {
        SendSide {
            tx: VecDeque::new(),
            ring_len: u64::from(ring_len),
            ring_written: 0,
            ring_freed: 0,
            staging_len,
            staged_head: 0,
            staged_tail: 0,
            owed: 0,
            wrs_in_flight: 0,
            max_wrs,
            unsent: 0,
        }
    }

    /// Queues a response.
    pub fn push(&mut self, chunks: Vec<Chunk>) {
        let len = chunks_len(&chunks);
        self.unsent += len;
        self.tx.push_back(Msg { chunks, posted: 0, len });
    }

    pub fn unsent(&self) -> usize {
        self.unsent
    }

    /// Whether every queued response has been planned.
    pub fn all_planned(&self) -> bool {
        self.tx.is_empty()
    }

    /// Ring bytes written and not yet freed by the peer.
    pub fn unread(&self) -> u64 {
        self.ring_written - self.ring_freed
    }

    /// A batch of `wrs` work requests completed: its staged bytes are free, its done
    /// responses no longer unsent.
    pub fn completed(&mut self, wrs: u32, staged_end: u64, done: &[Vec<Chunk>]) {
        self.wrs_in_flight -= wrs;
        self.staged_tail = staged_end;
        self.unsent -= done.iter().map(|d| chunks_len(d)).sum::<usize>();
    }

    /// Plans the next batch: as many queued bytes as the peer's free ring space, the
    /// staging ring and the send queue allow, each piece placed where `classify` says
    /// (`classify(chunk, off, len)`), and the credits owed.
    pub fn plan(&mut self, mut classify: impl FnMut(&Chunk, usize, usize) -> Source) -> Result<Batch, Idle> {
        let ring_room = (self.ring_len - self.unread()) as usize;
        let have_data = self.tx.iter().any(|m| m.posted < m.len);
        if (!have_data || ring_room == 0) && self.owed == 0 {
            return Err(if have_data { Idle::RingFull } else { Idle::Nothing });
        }
        // One request for the immediate, at least.
        if self.wrs_in_flight + 2 > self.max_wrs {
            return Err(Idle::SendQueueFull);
        }
        let max_writes = (self.max_wrs - self.wrs_in_flight - 1) as usize;
        let budget = ring_room.min(BATCH_BYTES).min(wire::MAX_IMM_BYTES);
        let mut writes: Vec<Write> = Vec::new();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut write_start = self.ring_written;
        let mut write_bytes = 0usize;
        let mut taken = 0usize;
        let mut done = Vec::new();
        'msgs: while let Some(m) = self.tx.front_mut() {
            // Walk the unplanned bytes of the front response.
            let mut skip = m.posted;
            for chunk in &m.chunks {
                if skip >= chunk.len() {
                    skip -= chunk.len();
                    continue;
                }
                let mut off = skip;
                skip = 0;
                while off < chunk.len() {
                    if taken == budget || writes.len() >= max_writes {
                        break 'msgs;
                    }
                    let pos = (write_start + write_bytes as u64) % self.ring_len;
                    let to_wrap = (self.ring_len - pos) as usize;
                    let mut n = (chunk.len() - off).min(budget - taken).min(to_wrap);
                    let from = match classify(chunk, off, n) {
                        Source::Direct { lkey, covered } => {
                            n = n.min(covered);
                            From::Direct { addr: chunk[off..].as_ptr() as u64, lkey }
                        }
                        Source::Staged { counted } => {
                            let used = (self.staged_head - self.staged_tail) as usize;
                            let at = (self.staged_head % self.staging_len as u64) as usize;
                            n = n.min(self.staging_len - used).min(self.staging_len - at);
                            if n == 0 {
                                break 'msgs;
                            }
                            self.staged_head += n as u64;
                            From::Staged { at, counted }
                        }
                    };
                    pieces.push(Piece { chunk: chunk.clone(), off, len: n, from });
                    off += n;
                    taken += n;
                    write_bytes += n;
                    m.posted += n;
                    let wrapped = (pos + n as u64).is_multiple_of(self.ring_len);
                    if pieces.len() == MAX_SGE || wrapped {
                        writes.push(Write {
                            ring_offset: write_start % self.ring_len,
                            pieces: std::mem::take(&mut pieces),
                            imm: None,
                        });
                        write_start += write_bytes as u64;
                        write_bytes = 0;
                    }
                }
            }
            if m.posted == m.len {
                if let Some(m) = self.tx.pop_front() {
                    done.push(m.chunks);
                }
            } else {
                break;
            }
        }
        let keep = match self.tx.front() {
            Some(m) if m.posted > 0 => m.chunks.clone(),
            _ => Vec::new(),
        };
        if taken == 0 && self.owed == 0 {
            // Nothing fitted: wait for completions.
            return Err(Idle::StagingFull);
        }
        // The batch's last write carries the immediate: bytes landed, credits back.
        let credits = self.owed.min(wire::MAX_IMM_CREDITS);
        self.owed -= credits;
        writes.push(Write {
            ring_offset: write_start % self.ring_len,
            pieces,
            imm: Some(Imm { bytes: taken as u32, credits }),
        });
        self.ring_written += taken as u64;
        self.wrs_in_flight += writes.len() as u32;
        Ok(Batch { writes, bytes: taken, credits, done, keep, staged_end: self.staged_head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn heap(n: usize, fill: u8) -> Chunk {
        Chunk::Heap(Bytes::from(vec![fill; n]))
    }

    fn staged(_: &Chunk, _: usize, _: usize) -> Source {
        Source::Staged { counted: false }
    }

    fn bytes_of(w: &Write) -> usize {
        w.pieces.iter().map(|p| p.len).sum()
    }

    #[test]
    fn nothing_to_do_is_said_apart_from_a_full_ring() {
        let mut s = SendSide::new(64, 1024, 16);
        assert_eq!(s.plan(staged).unwrap_err(), Idle::Nothing);
        s.push(vec![heap(100, 1)]);
        let b = s.plan(staged).expect("a batch");
        assert_eq!((b.bytes, b.done.len(), b.keep.len()), (64, 0, 1), "the ring holds 64 of 100 bytes");
        assert_eq!(s.plan(staged).unwrap_err(), Idle::RingFull);
        // Credits owed go back even with the ring full: a write of no bytes.
        s.owed = 3;
        let b = s.plan(staged).expect("credits");
        assert_eq!((b.bytes, b.credits, b.writes.len()), (0, 3, 1));
        assert_eq!(b.writes[0].imm, Some(Imm { bytes: 0, credits: 3 }));
    }

    #[test]
    fn writes_split_at_the_ring_end_and_the_last_carries_the_immediate() {
        let mut s = SendSide::new(100, 1 << 16, 64);
        s.ring_written = 70;
        s.ring_freed = 70;
        s.owed = 2;
        s.push(vec![heap(10, 1), heap(50, 2)]);
        let b = s.plan(staged).expect("a batch");
        assert_eq!(b.bytes, 60);
        // 30 bytes to the ring end, then the rest from offset 0.
        assert_eq!(b.writes.iter().map(|w| (w.ring_offset, bytes_of(w))).collect::<Vec<_>>(), vec![(70, 30), (0, 30)]);
        assert_eq!(b.writes.last().and_then(|w| w.imm), Some(Imm { bytes: 60, credits: 2 }));
        assert!(b.writes[..1].iter().all(|w| w.imm.is_none()));
        assert_eq!((s.ring_written, s.owed, b.done.len()), (130, 0, 1));
        s.completed(b.writes.len() as u32, b.staged_end, &b.done);
        assert_eq!(s.unsent(), 0);
    }

    #[test]
    fn direct_pieces_follow_their_registration_and_writes_hold_at_most_max_sge() {
        let mut s = SendSide::new(1 << 20, 1 << 16, 256);
        let chunks: Vec<Chunk> = (0..40).map(|i| heap(8, i)).collect();
        s.push(chunks);
        // Every other chunk "registered", covering only 5 of its 8 bytes at a time.
        let mut seen = 0;
        let b = s
            .plan(|c, off, len| {
                seen += 1;
                if c[0] % 2 == 0 {
                    Source::Direct { lkey: 7, covered: (5 - off % 5).min(len) }
                } else {
                    Source::Staged { counted: true }
                }
            })
            .expect("a batch");
        assert_eq!(b.bytes, 320);
        assert!(b.writes.iter().all(|w| w.pieces.len() <= MAX_SGE));
        let direct: usize = b
            .writes
            .iter()
            .flat_map(|w| &w.pieces)
            .filter(|p| matches!(p.from, From::Direct { .. }))
            .map(|p| p.len)
            .sum();
        assert_eq!(direct, 160);
        for p in b.writes.iter().flat_map(|w| &w.pieces) {
            if let From::Direct { addr, lkey } = p.from {
                assert_eq!((addr, lkey), (p.chunk[p.off..].as_ptr() as u64, 7));
                assert!(p.len <= 5);
            }
        }
        assert!(seen > 40, "registered chunks were cut where their registration ends");
    }

    #[test]
    fn a_full_staging_ring_waits_for_completions_and_loses_nothing() {
        let mut s = SendSide::new(1 << 20, 100, 64);
        s.push(vec![heap(250, 9)]);
        let mut batches = Vec::new();
        let mut sent = 0;
        while sent < 250 {
            let b = match s.plan(staged) {
                Ok(b) => b,
                Err(Idle::StagingFull) => {
                    // Staging full: complete the oldest batch, which frees its bytes.
                    let b: Batch = batches.remove(0);
                    s.completed(b.writes.len() as u32, b.staged_end, &b.done);
                    continue;
                }
                Err(other) => panic!("{other:?}"),
            };
            assert!(b
                .writes
                .iter()
                .flat_map(|w| &w.pieces)
                .all(|p| matches!(p.from, From::Staged { at, .. } if at + p.len <= 100)));
            sent += b.bytes;
            batches.push(b);
        }
        assert_eq!(sent, 250);
        assert!(batches.last().is_some_and(|b| b.done.len() == 1));
    }
}
