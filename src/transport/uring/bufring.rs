//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): buffers the kernel picks from for
//! multishot receives, so one `RECV` serves a connection for its whole life.
//!
//! The ring is two anonymous mappings: the ring of 16-byte entries the kernel reads (its
//! tail is published by us with a release store) and the slab of equally sized buffers
//! the entries point at. A completion names the buffer the kernel filled by its id; the
//! transport copies the bytes out at once and gives the buffer back ([`BufRing::take`]),
//! so a slow connection never holds ring buffers.
//!
//! # Invariants
//! - A buffer id is either in the ring (the kernel may write its buffer at any time) or
//!   handed out by exactly one completion and not yet recycled; only in the second state is
//!   its memory read, and only inside [`BufRing::take`], which recycles it before returning.
//! - Both mappings outlive every receive op that selects from the group: the transport
//!   drops the ring only after all its ops completed (or leaks it with them).
#![allow(unsafe_code)]

use io_uring::types::BufRingEntry;
use io_uring::Submitter;
use std::io;

use crate::buffer::AnonMap as Mapping;
use std::sync::atomic::{AtomicU16, Ordering};

pub struct BufRing {
    entries: Mapping,
    slab: Mapping,
    count: u16,
    buf_size: usize,
    /// Our copy of the tail; the kernel reads the published one.
    tail: u16,
    group: u16,
}

// SAFETY: the mappings are owned by this value alone; moving it to another thread moves
// the only handle to them.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Maps `count` (a power of two, at most 32768) buffers of `buf_size` bytes, registers
    /// them with `submitter` as buffer group `group` and puts every buffer in the ring.
    pub fn new(submitter: &Submitter<'_>, group: u16, count: u16, buf_size: usize) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "ring size must be a power of two <= 32768"));
        }
        let entries = Mapping::new(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let slab = Mapping::new(count as usize * buf_size)?;
        // SAFETY: `entries` is page-aligned memory for exactly `count` entries and stays
        // mapped while registered (the ring unregisters on drop, before unmapping).
        unsafe { submitter.register_buf_ring_with_flags(entries.as_ptr() as u64, count, group, 0)? };
        let mut ring = BufRing { entries, slab, count, buf_size, tail: 0, group };
        for bid in 0..count {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// Writes the entry for buffer `bid` at our tail (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let base = self.entries.as_ptr().cast::<BufRingEntry>();
        let idx = (self.tail & (self.count - 1)) as usize;
        // SAFETY: `idx < count`, so the entry lies inside the entries mapping. The kernel
        // reads only entries between its head and the published tail, and this one is at
        // or past the published tail, so nobody else touches it now.
        let entry = unsafe { &mut *base.add(idx) };
        // SAFETY: `bid < count`: the buffer lies inside the slab.
        entry.set_addr(unsafe { self.slab.as_ptr().add(bid as usize * self.buf_size) } as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed entry visible to the kernel.
    fn publish(&self) {
        let base = self.entries.as_ptr().cast::<BufRingEntry>();
        // SAFETY: the tail field lives in entry 0 (which exists), is 2-byte aligned and is
        // only ever written by us; the kernel reads it with an acquire load.
        let tail = unsafe { &*(BufRingEntry::tail(base) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Hands the first `len` bytes of buffer `bid` (just named by a completion) to `f`,
    /// then gives the buffer back to the kernel.
    pub fn take<R>(&mut self, bid: u16, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let len = len.min(self.buf_size);
        let bid = bid & (self.count - 1);
        // SAFETY: the completion handed `bid` to us: the kernel wrote `len` bytes there
        // and will not touch it again until we push it back below.
        let bytes = unsafe { std::slice::from_raw_parts(self.slab.as_ptr().add(bid as usize * self.buf_size), len) };
        let r = f(bytes);
        self.push(bid);
        self.publish();
        r
    }

    /// Unregisters the group (call while the ring's fd is open, after its ops finished).
    pub fn unregister(&self, submitter: &Submitter<'_>) {
        if let Err(e) = submitter.unregister_buf_ring(self.group) {
            log::debug!("io_uring: unregistering buffer group {}: {e}", self.group);
        }
    }
}
