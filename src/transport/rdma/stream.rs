//! The client end of a slipstream RDMA connection ([`wire`](super::wire)): what the bridge
//! opens per Kafka TCP connection, and what tests use to talk to the broker directly.
//!
//! Non-blocking at heart: [`RdmaStream::write`] posts what credits allow,
//! [`RdmaStream::readable`] shows the response bytes that have landed, and
//! [`RdmaStream::progress`] handles completions and connection events; [`wait`] sleeps
//! on the completion and event channels.
//!
//! [`wait`]: RdmaStream::wait
//!
//! # Invariants
//! - Landing-ring bytes between `read` and `landed` were written by the broker and are not
//!   written again until we report them freed, so they may be read as a slice.
//! - A send slot is reused only after its SEND completed.
// Registers and posts memory to the NIC: unsafe allowed, each use saying why it holds.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::verbs::{
    self, Access, CmEventKind, CmId, CompChannel, Cq, EventChannel, Mr, Pd, QpCaps, SendOp, SendWr, Sge, WcExt,
};
use super::wire::{Grant, Imm, Offer, SendHeader, SEND_HEADER};
use crate::buffer::AnonMap;
use crate::framing::{Prefixed, PREFIX};

/// Receives kept posted for the broker's write-with-immediate batches.
const RECV_DEPTH: u32 = 256;

#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// Size of the landing ring the broker writes responses into.
    pub ring_len: usize,
    /// Address/route resolution and connection timeout.
    pub connect_timeout: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { ring_len: 4 << 20, connect_timeout: Duration::from_secs(10) }
    }
}

/// Per-message knobs for tests that play a misbehaving peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Misbehave {
    /// Never tell the broker that landing-ring bytes were consumed.
    pub withhold_ring_credits: bool,
    /// Send even without credits.
    pub ignore_credits: bool,
}

pub struct RdmaStream {
    // Drop order matters (verbs' invariants): the id (and its QP) first, then the queue,
    // the regions, the PD, the memory, the channels.
    id: CmId,
    cq: Cq,
    /// Registers the ring for the broker's writes; deregistered before the ring unmaps.
    _ring_mr: Mr,
    send_mr: Mr,
    _pd: Arc<Pd>,
    comp: Arc<CompChannel>,
    ring: AnonMap,
    send_buf: AnonMap,
    events: Arc<EventChannel>,
    grant: Grant,
    credits: u32,
    free_slots: Vec<u32>,
    /// Landing-ring bytes consumed / landed, as running totals.
    read: u64,
    landed: u64,
    /// Consumed but not yet reported to the broker.
    freed_unreported: u64,
    closed: Option<String>,
    pub misbehave: Misbehave,
}

fn wait_event(ch: &EventChannel, want: CmEventKind, deadline: Instant) -> io::Result<verbs::CmEvent> {
    loop {
        if let Some(ev) = ch.next_event()? {
            if ev.kind() == want {
                return Ok(ev);
            }
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("expected {want:?}, got {:?} (status {})", ev.kind(), ev.status()),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("timed out waiting for {want:?}")));
        }
        verbs::wait_readable(&[ch.fd()], Some(left))?;
    }
}

impl RdmaStream {
    /// Connects to a broker listening with `--transport rdma` at `addr`.
    pub fn connect(addr: SocketAddr, opts: StreamOptions) -> io::Result<RdmaStream> {
        let deadline = Instant::now() + opts.connect_timeout;
        let ms = opts.connect_timeout.as_millis().min(i32::MAX as u128) as i32;
        let events = EventChannel::new()?;
        let mut id = CmId::new(&events)?;
        id.resolve_addr(addr, ms)?;
        drop(wait_event(&events, CmEventKind::AddrResolved, deadline)?);
        id.resolve_route(ms)?;
        drop(wait_event(&events, CmEventKind::RouteResolved, deadline)?);
        let pd = id.alloc_pd()?;
        let comp = CompChannel::new(&pd)?;
        let cq = Cq::new(&pd, (RECV_DEPTH * 2 + 256) as i32, Some(&comp))?;
        id.create_qp(&pd, &cq, &cq, None, QpCaps { send_wr: 256, recv_wr: RECV_DEPTH, send_sge: 1 })?;
        let ring = AnonMap::new(opts.ring_len)?;
        // SAFETY: the ring outlives the region (field order); the broker writes it only
        // where we freed space, and we read only landed bytes (module invariants).
        let ring_mr = unsafe { Mr::register(&pd, ring.as_ptr(), ring.len(), Access::RemoteWrite)? };
        for i in 0..RECV_DEPTH {
            // SAFETY: zero-length receives name no memory.
            unsafe { id.post_recv(u64::from(i), None)? };
        }
        let offer = Offer { ring_addr: ring.as_ptr() as u64, ring_rkey: ring_mr.rkey(), ring_len: ring.len() as u32 };
        id.connect(&offer.encode())?;
        let ev = wait_event(&events, CmEventKind::Established, deadline)?;
        let grant = Grant::decode(ev.private_data()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        drop(ev);
        let send_buf = AnonMap::new(grant.credits as usize * grant.recv_size as usize)?;
        // SAFETY: the buffer outlives the region (field order); the NIC only reads it.
        let send_mr = unsafe { Mr::register(&pd, send_buf.as_ptr(), send_buf.len(), Access::LocalRead)? };
        cq.arm()?;
        Ok(RdmaStream {
            id,
            cq,
            _ring_mr: ring_mr,
            send_mr,
            _pd: pd,
            comp,
            ring,
            send_buf,
            events,
            credits: grant.credits,
            free_slots: (0..grant.credits).rev().collect(),
            grant,
            read: 0,
            landed: 0,
            freed_unreported: 0,
            closed: None,
            misbehave: Misbehave::default(),
        })
    }

    /// Descriptors to poll for readiness (completions, connection events).
    pub fn fds(&self) -> [RawFd; 2] {
        [self.comp.fd(), self.events.fd()]
    }

    /// Why the connection ended, if it did.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// Handles whatever completed and any connection event. Never blocks.
    pub fn progress(&mut self) -> io::Result<()> {
        while let Some(ev) = self.events.next_event()? {
            match ev.kind() {
                CmEventKind::Disconnected => self.closed = Some("the broker disconnected".into()),
                k => log::debug!("rdma stream: connection event {k:?}"),
            }
        }
        self.comp.drain();
        let mut wcs = [verbs::empty_wc(); 32];
        let mut armed = false;
        loop {
            let n = self.cq.poll(&mut wcs)?;
            for wc in &wcs[..n] {
                if !wc.ok() {
                    self.closed.get_or_insert_with(|| format!("work request failed: {}", wc.status_str()));
                    continue;
                }
                if wc.is_recv() {
                    let imm = Imm::decode(wc.imm());
                    self.landed += u64::from(imm.bytes);
                    self.credits += imm.credits;
                    if self.landed - self.read > self.ring.len() as u64 {
                        self.closed = Some("the broker overran the landing ring".into());
                    }
                    // SAFETY: zero-length receive.
                    unsafe { self.id.post_recv(wc.wr_id, None)? };
                } else {
                    self.free_slots.push(wc.wr_id as u32);
                }
            }
            if n < wcs.len() {
                // Drained: arm the channel, then look once more, since a completion that
                // arrived before the arming would not raise it.
                if n == 0 && armed {
                    break;
                }
                if n == 0 {
                    self.cq.arm()?;
                    armed = true;
                }
            }
        }
        Ok(())
    }

    /// Posts as much of `data` as credits allow (keeping one credit back for reporting
    /// freed ring space). Returns how many bytes were taken.
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut taken = 0;
        let room = self.grant.recv_size as usize - SEND_HEADER;
        while taken < data.len() {
            if self.credits <= 1 && !self.misbehave.ignore_credits {
                break;
            }
            let n = room.min(data.len() - taken);
            if !self.post_message(&data[taken..taken + n])? {
                break;
            }
            taken += n;
        }
        Ok(taken)
    }

    /// Sends `bytes` as one message exactly as given (header included), for tests that
    /// forge messages. Returns false if no send slot is free.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<bool> {
        let Some(slot) = self.free_slots.pop() else { return Ok(false) };
        let size = self.grant.recv_size as usize;
        let bytes = &bytes[..bytes.len().min(size)];
        let off = slot as usize * size;
        // SAFETY: the slot's previous SEND completed (it was in `free_slots`), so the
        // NIC does not read it now.
        unsafe { self.send_buf.write(off, bytes) };
        self.credits = self.credits.saturating_sub(1);
        let sge = Sge {
            addr: self.send_buf.as_ptr() as u64 + off as u64,
            len: bytes.len() as u32,
            lkey: self.send_mr.lkey(),
        };
        let wr = SendWr { wr_id: u64::from(slot), op: SendOp::Send, sges: vec![sge], signaled: true };
        // SAFETY: the slot stays untouched until this SEND's completion frees it.
        unsafe { self.id.post_chain(&[wr])? };
        Ok(true)
    }

    fn post_message(&mut self, data: &[u8]) -> io::Result<bool> {
        if self.free_slots.is_empty() || (self.credits == 0 && !self.misbehave.ignore_credits) {
            return Ok(false);
        }
        let freed = if self.misbehave.withhold_ring_credits { 0 } else { std::mem::take(&mut self.freed_unreported) };
        let hdr = SendHeader { ring_freed: freed as u32, len: data.len() as u32 };
        let mut msg = Vec::with_capacity(SEND_HEADER + data.len());
        msg.extend_from_slice(&hdr.encode());
        msg.extend_from_slice(data);
        self.send_raw(&msg)
    }

    /// Response bytes that have landed and not been consumed (up to the ring's end; the
    /// rest follows after [`consume`](Self::consume)).
    pub fn readable(&self) -> &[u8] {
        let len = self.ring.len() as u64;
        let start = (self.read % len) as usize;
        let n = ((self.landed - self.read) as usize).min(self.ring.len() - start);
        // SAFETY: landed, unconsumed bytes are not written again until freed (module
        // invariant), and `&self` keeps `consume` from freeing them meanwhile.
        unsafe { self.ring.slice(start, n) }
    }

    /// Marks `n` readable bytes consumed; the space is reported to the broker with the
    /// next message, or on its own once a quarter of the ring is waiting.
    pub fn consume(&mut self, n: usize) -> io::Result<()> {
        let n = n.min((self.landed - self.read) as usize);
        self.read += n as u64;
        self.freed_unreported += n as u64;
        if self.freed_unreported >= (self.ring.len() / 4) as u64 && !self.misbehave.withhold_ring_credits {
            // The credit kept back by `write` is for exactly this.
            self.post_message(&[])?;
        }
        Ok(())
    }

    /// Reports any consumed space now (e.g. before sleeping with nothing to send).
    pub fn report_freed(&mut self) -> io::Result<()> {
        if self.freed_unreported > 0 && !self.misbehave.withhold_ring_credits && self.credits > 0 {
            self.post_message(&[])?;
        }
        Ok(())
    }

    /// Sleeps until a completion or connection event may be pending, or `timeout`.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        verbs::wait_readable(&self.fds(), timeout).map(|_| ())
    }

    /// Blocking helper: sends all of `data`.
    pub fn write_all(&mut self, mut data: &[u8], timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !data.is_empty() {
            self.progress()?;
            if let Some(why) = self.closed() {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, why.to_string()));
            }
            let n = self.write(data)?;
            data = &data[n..];
            if !data.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no credits"));
                }
                self.wait(Some(left.min(Duration::from_millis(50))))?;
            }
        }
        Ok(())
    }

    /// Blocking helper: reads one length-prefixed frame (without its prefix) of at most
    /// `MAX_FRAME_READ` bytes.
    pub fn read_frame(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        const MAX_FRAME_READ: usize = 256 << 20;
        let framing = Prefixed::new(0, MAX_FRAME_READ);
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        loop {
            self.progress()?;
            loop {
                let need = framing.missing(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let r = self.readable();
                if need == 0 || r.is_empty() {
                    break;
                }
                let n = r.len().min(need);
                buf.extend_from_slice(&r[..n]);
                self.consume(n)?;
            }
            if framing.peek(&buf).ok().flatten().is_some_and(|len| buf.len() == PREFIX + len) {
                self.report_freed()?;
                return Ok(buf.split_off(PREFIX));
            }
            if let Some(why) = self.closed() {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, why.to_string()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no response"));
            }
            self.wait(Some(left.min(Duration::from_millis(50))))?;
        }
    }
}

impl Drop for RdmaStream {
    fn drop(&mut self) {
        self.id.disconnect();
    }
}
