//! The transport itself: see the module docs of [`super`].
//!
//! What to write where is planned apart ([`super::plan`], sans-IO, unit-tested without a
//! NIC); this file is what touches the NIC: accepting connections onto the core's queues,
//! reaping completions, turning planned writes into work requests and posting them. It
//! stays one file because those share one state — the core's device objects and its
//! connections' queue pairs, registered windows and posts in flight — whose drop order
//! is the safety argument (see the invariants of [`super`]).
// The verbs backend posts memory to a NIC: unsafe is allowed here (and in `verbs`,
// `stream`), each use saying why it holds.
#![allow(unsafe_code)]

use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::super::staging::RecvStaging;
use super::super::{CloseReason, Completion, ConnId, Transport, TransportError, TransportKind};
use super::plan::{From, Idle, SendSide, Source, MAX_SGE};
use super::verbs::{
    self as verbs, Access, CmEventKind, CmId, CompChannel, Cq, EventChannel, Mr, Pd, QpCaps, SendOp, SendWr, Sge, Srq,
    WcExt,
};
use super::wire::{self, Grant, Offer, SendHeader};
use crate::buffer::{AnonMap, Chunk, Region};
use crate::metrics;
use crate::wake::{EventFd, Wake};

/// Settings of the RDMA backend.
#[derive(Debug, Clone, Copy)]
pub struct RdmaOptions {
    /// Messages a connection may have outstanding.
    pub credits: u32,
    /// Size of each shared-receive-queue buffer (largest message).
    pub recv_size: u32,
    /// Buffers in each core's shared receive queue.
    pub srq_depth: u32,
    /// How long responses may wait for a peer to free landing-ring space.
    pub stall_timeout: Duration,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions { credits: 16, recv_size: 16 * 1024, srq_depth: 1024, stall_timeout: Duration::from_secs(600) }
    }
}

/// The broker's one listening id, shared by the cores.
pub struct RdmaListener {
    events: Arc<EventChannel>,
    id: Mutex<CmId>,
}

impl RdmaListener {
    pub fn bind(addr: SocketAddr) -> Result<Arc<RdmaListener>, TransportError> {
        let events = EventChannel::new().map_err(|e| TransportError::Unsupported(format!("rdma_cm: {e}")))?;
        let mut id = CmId::new(&events).map_err(|e| TransportError::Unsupported(format!("rdma_cm: {e}")))?;
        id.listen(addr, 1024).map_err(|source| TransportError::Listen { addr, source })?;
        let port = id.local_port();
        let addr = SocketAddr::new(addr.ip(), port);
        log::info!("listening for RDMA connections on {addr}");
        Ok(Arc::new(RdmaListener { events, id: Mutex::new(id) }))
    }
}

/// Registered log windows are this large (pinned on first use).
const LOG_WINDOW: usize = 4 << 20;
const STAGING_LEN: usize = 1 << 20;
const SEND_WR: u32 = 256;
/// Stop returning credits to a connection whose staged request bytes reach this.
const STAGED_LIMIT: usize = 1 << 20;

/// A core's verbs objects, made when its first connection arrives (they need a device).
struct Device {
    // Dropped after every connection (the transport declares `conns` first).
    srq: Srq,
    cq: Cq,
    recv_mr: Mr,
    pd: Arc<Pd>,
    comp: Arc<CompChannel>,
    recv_buf: AnonMap,
    /// Registered log windows by start address.
    windows: BTreeMap<usize, LogWindow>,
}

struct LogWindow {
    seg: Weak<dyn Region>,
    len: usize,
    mr: Mr,
}

struct Post {
    id: u64,
    /// Messages whose last byte this post carried (handed back when it completes).
    done: Vec<Vec<Chunk>>,
    /// Keeps the bytes of partly posted messages alive (log windows) until completion.
    _keep: Vec<Chunk>,
    staged_end: u64,
    wrs: u32,
}

struct RConn {
    // The id (and its QP) drops before the staging region it uses.
    id: CmId,
    staging_mr: Mr,
    staging: AnonMap,
    offer: Offer,
    peer: SocketAddr,
    established: bool,
    // Receive side.
    rx: RecvStaging,
    /// Messages received whose credits have not been sent back yet (the peer's view).
    outstanding: u32,
    /// Credits held back while the dispatch loop is behind on this connection.
    withheld: u32,
    // Send side: what to write where (sans-IO), and the posts in flight.
    send: SendSide,
    posts: VecDeque<Post>,
    stalled_since: Option<Instant>,
    closing: bool,
}

pub struct RdmaTransport {
    // Field order is drop order: connections (queue pairs) before the device's queues.
    conns: HashMap<ConnId, RConn>,
    dev: Option<Device>,
    by_qp: HashMap<u32, ConnId>,
    listener: Option<Arc<RdmaListener>>,
    events: Arc<EventChannel>,
    waker: Arc<EventFd>,
    opts: RdmaOptions,
    next_conn: u64,
    next_post: u64,
    ready: Vec<Completion>,
    dirty: Vec<ConnId>,
    last_stall_check: Instant,
}

fn io_other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl RdmaTransport {
    pub fn new(listener: Arc<RdmaListener>, opts: RdmaOptions) -> Result<Self, TransportError> {
        Ok(RdmaTransport {
            conns: HashMap::new(),
            dev: None,
            by_qp: HashMap::new(),
            listener: Some(listener),
            events: EventChannel::new()?,
            waker: Arc::new(EventFd::new()?),
            opts,
            next_conn: 1,
            next_post: 1,
            ready: Vec::new(),
            dirty: Vec::new(),
            last_stall_check: Instant::now(),
        })
    }

    fn device(&mut self, id: &CmId) -> io::Result<&mut Device> {
        if self.dev.is_none() {
            let pd = id.alloc_pd()?;
            let comp = CompChannel::new(&pd)?;
            let cq = Cq::new(&pd, 8192, Some(&comp))?;
            let srq = Srq::new(&pd, self.opts.srq_depth)?;
            let recv_buf = AnonMap::new(self.opts.srq_depth as usize * self.opts.recv_size as usize)?;
            // SAFETY: the buffer outlives the region (field order of `Device`); we read a
            // buffer only between its completion and its repost (module invariant).
            let recv_mr = unsafe { Mr::register(&pd, recv_buf.as_ptr(), recv_buf.len(), Access::LocalWrite)? };
            let dev = Device { srq, cq, recv_mr, pd, comp, recv_buf, windows: BTreeMap::new() };
            for i in 0..self.opts.srq_depth {
                Self::repost(&dev, &self.opts, i)?;
            }
            dev.cq.arm()?;
            self.dev = Some(dev);
        }
        self.dev.as_mut().ok_or_else(|| io::Error::other("no device"))
    }

    fn repost(dev: &Device, opts: &RdmaOptions, idx: u32) -> io::Result<()> {
        let size = opts.recv_size as usize;
        let sge = Sge {
            addr: dev.recv_buf.as_ptr() as u64 + (idx as usize * size) as u64,
            len: size as u32,
            lkey: dev.recv_mr.lkey(),
        };
        // SAFETY: buffer `idx` lies in the registered receive slab and is not read by us
        // until its completion (module invariant).
        unsafe { dev.srq.post_recv(u64::from(idx), sge) }
    }

    fn on_listener_events(&mut self) {
        let Some(l) = self.listener.clone() else { return };
        // Every core polls the shared channel; whoever gets the lock takes the event.
        let Some(_guard) = l.id.try_lock() else { return };
        loop {
            let ev = match l.events.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("rdma: listener events: {e}");
                    return;
                }
            };
            if ev.kind() != CmEventKind::ConnectRequest {
                log::debug!("rdma: listener event {:?}", ev.kind());
                continue;
            }
            let offer = Offer::decode(ev.private_data());
            let id = match ev.take_request_id(&self.events) {
                Ok(id) => id,
                Err(e) => {
                    log::warn!("rdma: taking a connect request: {e}");
                    continue;
                }
            };
            self.accept(id, offer);
        }
    }

    fn accept(&mut self, mut id: CmId, offer: Result<Offer, wire::WireError>) {
        let peer = id.peer_addr().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let offer = match offer {
            Ok(o) => o,
            Err(e) => {
                log::warn!("rdma: rejecting {peer}: {e}");
                metrics::count_bad_input_close();
                id.reject(&[]);
                return;
            }
        };
        let opts = self.opts;
        let setup = (|| -> io::Result<(Mr, AnonMap)> {
            let dev = self.device(&id)?;
            id.create_qp(
                &dev.pd,
                &dev.cq,
                &dev.cq,
                Some(&dev.srq),
                QpCaps { send_wr: SEND_WR, recv_wr: 0, send_sge: MAX_SGE as u32 },
            )?;
            let staging = AnonMap::new(STAGING_LEN)?;
            // SAFETY: the staging buffer outlives the region (`RConn` field order); the
            // NIC only reads it, and we write only the part no post names.
            let mr = unsafe { Mr::register(&dev.pd, staging.as_ptr(), staging.len(), Access::LocalRead)? };
            let grant = Grant { credits: opts.credits, recv_size: opts.recv_size };
            id.accept(&grant.encode())?;
            Ok((mr, staging))
        })();
        let (staging_mr, staging) = match setup {
            Ok(s) => s,
            Err(e) => {
                log::warn!("rdma: cannot accept {peer}: {e}");
                id.reject(&[]);
                return;
            }
        };
        let conn = self.next_conn;
        self.next_conn += 1;
        id.set_token(conn);
        self.by_qp.insert(id.qp_num(), conn);
        self.conns.insert(
            conn,
            RConn {
                id,
                staging_mr,
                staging,
                offer,
                peer,
                established: false,
                rx: RecvStaging::default(),
                outstanding: 0,
                withheld: 0,
                send: SendSide::new(offer.ring_len, STAGING_LEN, SEND_WR),
                posts: VecDeque::new(),
                stalled_since: None,
                closing: false,
            },
        );
    }

    fn on_core_events(&mut self) {
        loop {
            let ev = match self.events.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("rdma: connection events: {e}");
                    return;
                }
            };
            let conn = ev.token();
            match ev.kind() {
                CmEventKind::Established => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.established = true;
                        self.ready.push(Completion::Accepted { conn, peer: c.peer, listener: 0 });
                    }
                }
                CmEventKind::Disconnected => {
                    drop(ev);
                    self.peer_gone(conn);
                }
                other => {
                    let status = ev.status();
                    drop(ev);
                    log::debug!("rdma: connection {conn}: event {other:?} (status {status})");
                    if matches!(other, CmEventKind::Rejected | CmEventKind::Other(_)) {
                        self.shutdown(conn, CloseReason::Error(io_other("rdma_cm", format!("{other:?}"))));
                    }
                }
            }
        }
    }

    /// The peer disconnected: no more bytes will come.
    fn peer_gone(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if !c.established {
            self.shutdown(conn, CloseReason::PeerClosed);
            return;
        }
        if let Some(buf) = c.rx.set_eof() {
            self.ready.push(Completion::Received { conn, buf, n: 0 });
        }
        // Nothing can be sent any more either: pending responses are dropped with it
        // once the dispatch loop closes the connection.
    }

    fn on_cq(&mut self) -> io::Result<bool> {
        let mut wcs = [verbs::empty_wc(); 64];
        let mut any = false;
        loop {
            let n = match self.dev.as_ref() {
                Some(dev) => dev.cq.poll(&mut wcs)?,
                None => return Ok(false),
            };
            for wc in &wcs[..n] {
                any = true;
                if wc.is_recv() {
                    self.on_recv(wc);
                } else {
                    self.on_send_done(wc);
                }
            }
            if n < wcs.len() {
                return Ok(any);
            }
        }
    }

    fn on_recv(&mut self, wc: &verbs::WorkCompletion) {
        let idx = wc.wr_id as u32;
        let conn = self.by_qp.get(&wc.qp_num).copied();
        let result = match (conn, wc.ok()) {
            (Some(conn), true) => self.take_message(conn, idx, wc.byte_len as usize),
            (Some(conn), false) => Err((conn, format!("receive failed: {}", wc.status_str()))),
            (None, _) => Ok(()),
        };
        if let Some(dev) = self.dev.as_ref() {
            if let Err(e) = Self::repost(dev, &self.opts, idx) {
                log::error!("rdma: reposting a receive buffer: {e}");
            }
        }
        if let Err((conn, why)) = result {
            log::warn!("rdma: closing connection {conn}: {why}");
            metrics::count_bad_input_close();
            self.shutdown(conn, CloseReason::Error(io::Error::new(io::ErrorKind::InvalidData, why)));
        }
    }

    /// Checks one received message and moves its data to the connection.
    fn take_message(&mut self, conn: ConnId, idx: u32, len: usize) -> Result<(), (ConnId, String)> {
        let size = self.opts.recv_size as usize;
        let credits = self.opts.credits;
        let Some(dev) = self.dev.as_ref() else { return Ok(()) };
        let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
        if c.rx.is_eof() || c.closing {
            return Ok(());
        }
        if len > size {
            return Err((conn, format!("message of {len} bytes exceeds the {size}-byte buffers")));
        }
        // SAFETY: the completion handed buffer `idx` to us; the NIC does not write it until
        // we repost it (after this function returns).
        let msg = unsafe { dev.recv_buf.slice(idx as usize * size, len) };
        let (hdr, data) = SendHeader::parse(msg).map_err(|e| (conn, format!("malformed message: {e}")))?;
        c.outstanding += 1;
        if c.outstanding > credits {
            return Err((conn, format!("peer sent beyond its {credits} credits")));
        }
        let unread = c.send.unread();
        if u64::from(hdr.ring_freed) > unread {
            return Err((conn, format!("peer freed {} ring bytes but only {unread} were written", hdr.ring_freed)));
        }
        c.send.ring_freed += u64::from(hdr.ring_freed);
        if !data.is_empty() {
            if let Some((buf, k)) = c.rx.arrived(data) {
                self.ready.push(Completion::Received { conn, buf, n: k });
            }
        }
        // Credit it back (with the next write batch) unless the dispatch loop is behind on
        // this connection.
        if data.is_empty() || c.rx.staged_len() < STAGED_LIMIT {
            c.send.owed += 1;
        } else {
            c.withheld += 1;
        }
        self.dirty.push(conn);
        Ok(())
    }

    fn on_send_done(&mut self, wc: &verbs::WorkCompletion) {
        let Some(&conn) = self.by_qp.get(&wc.qp_num) else { return };
        if !wc.ok() {
            let why = format!("write to the peer failed: {}", wc.status_str());
            self.shutdown(conn, CloseReason::Error(io::Error::other(why)));
            return;
        }
        let Some(c) = self.conns.get_mut(&conn) else { return };
        // Completions of a queue pair arrive in posting order; only each post's last
        // request is signalled.
        while let Some(p) = c.posts.front() {
            if p.id > wc.wr_id {
                break;
            }
            let Some(p) = c.posts.pop_front() else { break };
            c.send.completed(p.wrs, p.staged_end, &p.done);
            for chunks in p.done {
                self.ready.push(Completion::Sent { conn, chunks });
            }
        }
        self.dirty.push(conn);
    }

    /// Where `len` bytes of `chunk` from `off` come from, as the chunk says: a window of
    /// its mapped region (registered on first use; its lkey and how many of the bytes it
    /// covers), a region that could not be registered, or ordinary memory.
    fn source(dev: &mut Device, chunk: &Chunk, off: usize, len: usize) -> Source {
        let Some(region) = chunk.region() else { return Source::Staged { counted: false } };
        let a = chunk[off..].as_ptr() as usize;
        while let Some((&start, w)) = dev.windows.range(..=a).next_back() {
            if a >= start + w.len {
                break;
            }
            if w.seg.strong_count() > 0 {
                return Source::Direct { lkey: w.mr.lkey(), covered: len.min(start + w.len - a) };
            }
            // A window of a deleted segment overlaps: no chunk of that segment exists, so
            // no post names its region; unpin it and look again.
            dev.windows.remove(&start);
        }
        let base = region.base() as usize;
        if a < base || a + len > base + region.len() {
            // A chunk that names a region it does not lie in is a bug upstream: send it,
            // but through the staging copy.
            log::error!("rdma: a chunk outside the region it names; staging it");
            return Source::Staged { counted: true };
        }
        let start = base + (a - base) / LOG_WINDOW * LOG_WINDOW;
        let wlen = LOG_WINDOW.min(base + region.len() - start);
        // SAFETY: the window lies inside the region's mapping (checked above), which stays
        // mapped while any chunk of it exists; posts hold such chunks until completion, and
        // a window whose region is gone is never used again (checked above) and dropped.
        let mr = match unsafe { Mr::register(&dev.pd, start as *const u8, wlen, Access::LocalRead) } {
            Ok(mr) => mr,
            Err(e) => {
                log::warn!("rdma: cannot register a log window ({e}); staging fetch payloads (a CPU copy)");
                return Source::Staged { counted: true };
            }
        };
        let lkey = mr.lkey();
        dev.windows.insert(start, LogWindow { seg: Arc::downgrade(region), len: wlen, mr });
        Source::Direct { lkey, covered: len.min(start + wlen - a) }
    }

    /// Posts what the ring, the send queue and the staging buffer allow for `conn`.
    fn flush(&mut self, conn: ConnId) {
        if let Err(e) = self.try_flush(conn) {
            self.shutdown(conn, CloseReason::Error(e));
        }
    }

    fn try_flush(&mut self, conn: ConnId) -> io::Result<()> {
        loop {
            let Some(dev) = self.dev.as_mut() else { return Ok(()) };
            let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
            if !c.established || c.rx.is_eof() {
                return Ok(());
            }
            let batch = match c.send.plan(|chunk, off, len| Self::source(dev, chunk, off, len)) {
                Ok(b) => b,
                Err(idle) => {
                    // The stall clock runs while responses wait for ring space only; waiting
                    // for our own completions is no stall of the peer's.
                    match idle {
                        Idle::RingFull => c.stalled_since = c.stalled_since.or(Some(Instant::now())),
                        Idle::Nothing => c.stalled_since = None,
                        Idle::SendQueueFull | Idle::StagingFull => {}
                    }
                    return Ok(());
                }
            };
            // The peer may send again only once these credits arrive.
            c.outstanding -= batch.credits;
            let post_id = self.next_post;
            self.next_post += 1;
            let ring_addr = c.offer.ring_addr;
            let rkey = c.offer.ring_rkey;
            let mut wrs = Vec::with_capacity(batch.writes.len());
            for w in &batch.writes {
                let mut sges = Vec::with_capacity(w.pieces.len());
                for p in &w.pieces {
                    let sge = match p.from {
                        From::Direct { addr, lkey } => {
                            metrics::count_rdma_log_bytes(p.len);
                            Sge { addr, len: p.len as u32, lkey }
                        }
                        From::Staged { at, counted } => {
                            // SAFETY: the planner placed `[at, at + len)` in the free part of
                            // the staging ring (between its tail and head), so no posted
                            // request names it.
                            unsafe { c.staging.write(at, &p.chunk[p.off..p.off + p.len]) };
                            if counted {
                                metrics::count_copy(metrics::Path::FetchOut, p.len);
                            }
                            metrics::count_rdma_tx_staged(p.len);
                            Sge {
                                addr: c.staging.as_ptr() as u64 + at as u64,
                                len: p.len as u32,
                                lkey: c.staging_mr.lkey(),
                            }
                        }
                    };
                    sges.push(sge);
                }
                let remote_addr = ring_addr + w.ring_offset;
                let (op, signaled) = match w.imm {
                    Some(imm) => (SendOp::WriteImm { remote_addr, rkey, imm: imm.encode() }, true),
                    None => (SendOp::Write { remote_addr, rkey }, false),
                };
                wrs.push(SendWr { wr_id: if signaled { post_id } else { 0 }, op, sges, signaled });
            }
            // SAFETY: every SGE names a registered log window kept mapped by the batch's
            // `done`/`keep` chunks (held in the post until its completion) or the staging
            // ring's in-flight part (released only at that completion): the module invariant.
            unsafe { c.id.post_chain(&wrs)? };
            c.stalled_since = None;
            c.posts.push_back(Post {
                id: post_id,
                done: batch.done,
                _keep: batch.keep,
                staged_end: batch.staged_end,
                wrs: wrs.len() as u32,
            });
        }
    }

    fn shutdown(&mut self, conn: ConnId, reason: CloseReason) {
        let Some(mut c) = self.conns.remove(&conn) else { return };
        super::super::shrink_after_remove(&mut self.conns);
        c.id.disconnect();
        self.by_qp.remove(&c.id.qp_num());
        // Dropping `c` destroys the queue pair: the NIC is done with every buffer its posts
        // named once that returns, so the chunks held in `c.posts` may go with it.
        drop(c);
        self.ready.push(Completion::Closed { conn, reason });
    }

    fn check_stalls(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_stall_check) < Duration::from_millis(100) {
            return;
        }
        self.last_stall_check = now;
        let limit = self.opts.stall_timeout;
        let stalled: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.stalled_since.is_some_and(|t| now.duration_since(t) > limit))
            .map(|(id, _)| *id)
            .collect();
        for conn in stalled {
            log::warn!("rdma: closing connection {conn}: the peer stopped freeing its landing ring for {limit:?}");
            metrics::count_bad_input_close();
            self.shutdown(
                conn,
                CloseReason::Error(io::Error::new(io::ErrorKind::TimedOut, "peer withheld ring credits")),
            );
        }
        // Windows of deleted segments: unpin them.
        if let Some(dev) = self.dev.as_mut() {
            dev.windows.retain(|_, w| w.seg.strong_count() > 0);
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for conn in dirty {
            self.flush(conn);
            let finished =
                self.conns.get(&conn).is_some_and(|c| c.closing && c.send.all_planned() && c.posts.is_empty());
            if finished {
                self.shutdown(conn, CloseReason::Local);
            }
        }
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn recv(&mut self, conn: ConnId, buf: BytesMut, max: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let Some((buf, n)) = c.rx.recv(buf, max) {
            self.ready.push(Completion::Received { conn, buf, n });
        }
        // Credits held back while the loop was behind go out once it has caught up.
        if c.withheld > 0 && c.rx.staged_len() < STAGED_LIMIT {
            c.send.owed += c.withheld;
            c.withheld = 0;
            self.dirty.push(conn);
        }
    }

    fn send(&mut self, conn: ConnId, chunks: Vec<Chunk>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.send.push(chunks);
        self.dirty.push(conn);
    }

    fn close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if (c.send.all_planned() && c.posts.is_empty()) || c.rx.is_eof() {
            self.shutdown(conn, CloseReason::Local);
        } else {
            c.closing = true;
            self.dirty.push(conn);
        }
    }

    fn abort(&mut self, conn: ConnId) {
        self.shutdown(conn, CloseReason::Local);
    }

    fn stop_accepting(&mut self) {
        self.listener = None;
    }

    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        self.on_listener_events();
        self.on_core_events();
        self.on_cq()?;
        self.flush_dirty();
        self.check_stalls();
        if self.ready.is_empty() && timeout != Some(Duration::ZERO) {
            // Arm, then look once more: a completion that raced the arming would not
            // raise the channel.
            if let Some(dev) = self.dev.as_ref() {
                dev.cq.arm()?;
            }
            if !self.on_cq()? {
                let mut fds = vec![self.events.fd(), self.waker.fd()];
                if let Some(l) = &self.listener {
                    fds.push(l.events.fd());
                }
                if let Some(dev) = &self.dev {
                    fds.push(dev.comp.fd());
                }
                // Wake at least every 100 ms for stall checks.
                let t = timeout.map_or(Duration::from_millis(100), |t| t.min(Duration::from_millis(100)));
                verbs::wait_readable(&fds, Some(t))?;
                self.waker.drain();
                if let Some(dev) = &self.dev {
                    dev.comp.drain();
                }
            }
            self.on_listener_events();
            self.on_core_events();
            self.on_cq()?;
            self.flush_dirty();
        }
        out.append(&mut self.ready);
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn unsent_bytes(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.send.unsent())
    }
}
