//! The dispatch loop: thread-per-core, run-to-completion.
//!
//! Each core owns one transport instance (with its clone of the broker's listening socket), the
//! connections the kernel gave it with their request queues, and a [`Shard`]: the
//! partitions it owns. A completion is handled to the end on the core that received it:
//! frames are cut from the receive buffer, each request is decoded and run, and its
//! response is queued in the connection's order. Partition work is run inline when this
//! core owns the partition and otherwise sent to the owner as a [`CoreMsg::Op`]; the
//! request waits in a *gathering* slot until every result is back. Requests that must wait
//! for data or a rebalance are *parked* and re-polled when the broker's notifier wakes the
//! core or their deadline passes. Ready responses at the head of a connection's queue are
//! coalesced into one vectored send.
//!
//! Slow file-system work (msync for the `interval` flush policy, sealed-segment indexes,
//! retention's unlinks, creating the next segment file) is handed to the I/O thread, so
//! an append never waits for it.
//!
//! # Invariants
//! - Responses leave in request order per connection (Kafka pipelining): a parked or
//!   gathering slot holds back every slot behind it.
//! - A partition's log is touched only by its owner core's [`Shard`].
//! - A connection that sends bad input is closed alone, after any responses already
//!   queued for it; nothing it sent after the bad frame is executed.

use bytes::{Buf, Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::shard::{PartOp, PartResult, Shard, SpareRequest};
use crate::broker::{Broker, PartKey};
use crate::log::mmap::SegmentFile;
use crate::log::{now_ms, IoWork};
use crate::metrics;
use crate::protocol::kafka::data::{self, Then};
use crate::protocol::kafka::{self, InFlight, Outcome, Parked};
use crate::transport::{CloseReason, Completion, ConnId, Transport, Wake};

/// Stop reading from a connection while this much is queued for it unsent.
const MAX_UNSENT: usize = 32 << 20;
/// ...or while this many of its requests wait for answers.
const MAX_PIPELINED: usize = 1024;
/// How often a core does its housekeeping (background flush, retention checks...).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const RETENTION_EVERY: Duration = Duration::from_secs(5);

/// Messages between cores.
pub enum CoreMsg {
    /// Run `op` on a partition this core owns and answer `from` with [`CoreMsg::Done`].
    Op {
        from: usize,
        ticket: u64,
        idx: usize,
        key: PartKey,
        op: PartOp,
    },
    Done {
        ticket: u64,
        idx: usize,
        result: PartResult,
    },
    /// A spare segment file the I/O thread made for one of this core's partitions.
    Spare {
        key: PartKey,
        file: SegmentFile,
    },
}

/// Work for the I/O thread.
pub enum IoJob {
    Work(IoWork),
    Spare { req: SpareRequest, core: usize },
}

/// How to reach a core from another thread.
#[derive(Clone)]
pub struct Peer {
    tx: Sender<CoreMsg>,
    waker: Arc<dyn Wake>,
    sleeping: Arc<AtomicBool>,
}

impl Peer {
    pub fn new(tx: Sender<CoreMsg>, waker: Arc<dyn Wake>, sleeping: Arc<AtomicBool>) -> Peer {
        Peer { tx, waker, sleeping }
    }

    /// Queues `msg` and wakes the core if it is asleep in its poll. (The core raises its
    /// flag before checking its inbox one last time, and we check the flag after queueing:
    /// one of the two always sees the other.)
    pub fn send(&self, msg: CoreMsg) {
        if self.tx.send(msg).is_ok() && self.sleeping.load(Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

enum Slot {
    Ready(Vec<Bytes>),
    Parked(Box<(InFlight, Parked)>),
    Gathering(Box<Gathering>),
}

struct Gathering {
    ticket: u64,
    req: InFlight,
    then: Then,
    results: Vec<Option<PartResult>>,
    pending: usize,
}

struct Conn {
    peer: SocketAddr,
    host: String,
    /// The receive buffer while no receive is outstanding.
    rx: Option<BytesMut>,
    queue: VecDeque<Slot>,
    /// Bad input seen: answer what is queued, then close.
    closing: bool,
    /// When bytes last moved either way (for `connections_max_idle`).
    last_active: Instant,
}

/// One core's loop state.
pub struct Core {
    id: usize,
    broker: Arc<Broker>,
    transport: Box<dyn Transport>,
    shard: Shard,
    inbox: Receiver<CoreMsg>,
    peers: Vec<Peer>,
    sleeping: Arc<AtomicBool>,
    io: Sender<IoJob>,
    conns: HashMap<ConnId, Conn>,
    /// Gathering tickets and the connection they belong to.
    tickets: HashMap<u64, ConnId>,
    next_ticket: u64,
    parked: usize,
    parked_flag: Arc<AtomicBool>,
    seen_epoch: u64,
    shutdown: Arc<AtomicBool>,
    /// Core 0 drives the group coordinator's timers.
    drives_groups: bool,
    busy_poll: bool,
}

/// What a core needs besides its transport; see [`Core::new`].
pub struct CoreParts {
    pub shard: Shard,
    pub inbox: Receiver<CoreMsg>,
    pub peers: Vec<Peer>,
    pub sleeping: Arc<AtomicBool>,
    pub io: Sender<IoJob>,
    pub shutdown: Arc<AtomicBool>,
    /// Spin on the transport's poll instead of sleeping in it.
    pub busy_poll: bool,
}

impl Core {
    pub fn new(id: usize, broker: Arc<Broker>, transport: Box<dyn Transport>, parts: CoreParts) -> Core {
        Core {
            id,
            broker,
            transport,
            shard: parts.shard,
            inbox: parts.inbox,
            peers: parts.peers,
            sleeping: parts.sleeping,
            io: parts.io,
            conns: HashMap::new(),
            tickets: HashMap::new(),
            next_ticket: 0,
            parked: 0,
            parked_flag: Arc::new(AtomicBool::new(false)),
            seen_epoch: 0,
            shutdown: parts.shutdown,
            drives_groups: id == 0,
            busy_poll: parts.busy_poll,
        }
    }

    /// This core's waker and has-parked-work flag, for the broker's notifier.
    pub fn notify_handle(&self) -> (Arc<dyn Wake>, Arc<AtomicBool>) {
        (self.transport.waker(), self.parked_flag.clone())
    }

    fn max_frame(&self) -> usize {
        self.broker.settings.max_request_bytes
    }

    /// Runs until shutdown is requested and in-flight work is answered.
    pub fn run(mut self) {
        let mut completions = Vec::with_capacity(256);
        let mut drain_deadline: Option<Instant> = None;
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING_EVERY;
        let mut next_retention = Instant::now() + RETENTION_EVERY;
        loop {
            if self.shutdown.load(Ordering::Acquire) && drain_deadline.is_none() {
                log::info!("core {}: stopping; answering {} parked requests", self.id, self.parked);
                self.transport.stop_accepting();
                drain_deadline = Some(Instant::now() + Duration::from_secs(5));
                self.repoll_parked(true);
            }
            if let Some(d) = drain_deadline {
                let idle = self.conns.values().all(|c| c.queue.is_empty());
                let unsent: usize = self.conns.keys().map(|id| self.transport.unsent_bytes(*id)).sum();
                if (idle && unsent == 0) || Instant::now() >= d {
                    break;
                }
            }
            self.drain_inbox();
            self.notify_appends();
            let mut timeout = self.next_timeout(drain_deadline.is_some(), next_housekeeping);
            // A busy-polling core never sleeps, so peers never need to wake it.
            self.sleeping.store(!self.busy_poll, Ordering::SeqCst);
            if self.busy_poll || !self.inbox.is_empty() {
                timeout = Some(Duration::ZERO);
            }
            completions.clear();
            let polled = self.transport.poll(timeout, &mut completions);
            self.sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = polled {
                log::error!("core {}: transport poll failed: {e}", self.id);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let now = Instant::now();
            for c in completions.drain(..) {
                self.on_completion(c, now);
            }
            self.drain_inbox();
            self.notify_appends();
            if self.drives_groups && self.broker.groups.lock().tick(now) {
                self.broker.notifier.notify();
            }
            let epoch = self.broker.notifier.epoch();
            if self.parked > 0 && (epoch != self.seen_epoch || self.any_deadline_passed(now)) {
                self.seen_epoch = epoch;
                self.repoll_parked(false);
            }
            self.seen_epoch = epoch;
            self.parked_flag.store(self.parked > 0, Ordering::Release);
            if now >= next_housekeeping {
                let retention = now >= next_retention;
                if retention {
                    next_retention = now + RETENTION_EVERY;
                }
                self.housekeeping(retention);
                next_housekeeping = now + HOUSEKEEPING_EVERY;
            }
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.transport.close(id);
        }
        self.shard.close();
    }

    /// One notification for everything this core appended since the last one.
    fn notify_appends(&mut self) {
        if self.shard.take_appended() {
            self.broker.notifier.notify();
        }
    }

    fn housekeeping(&mut self, retention: bool) {
        self.close_idle(Instant::now());
        let (work, spares) = self.shard.housekeeping(&self.broker, now_ms(), retention);
        for w in work {
            if self.io.send(IoJob::Work(w)).is_err() {
                log::error!("core {}: I/O thread gone", self.id);
            }
        }
        for req in spares {
            let _ = self.io.send(IoJob::Spare { req, core: self.id });
        }
    }

    fn next_timeout(&self, draining: bool, housekeeping: Instant) -> Option<Duration> {
        let now = Instant::now();
        let mut t = housekeeping;
        for c in self.conns.values() {
            for s in &c.queue {
                if let Slot::Parked(b) = s {
                    if let Some(d) = kafka::parked_deadline(&b.1) {
                        t = t.min(d);
                    }
                }
            }
        }
        if self.drives_groups {
            if let Some(d) = self.broker.groups.lock().next_deadline() {
                t = t.min(d);
            }
        }
        // Wake at least this often: shutdown flag, parked joins, coordinator timers.
        let cap = if draining { Duration::from_millis(10) } else { Duration::from_millis(250) };
        Some(t.saturating_duration_since(now).min(cap))
    }

    fn any_deadline_passed(&self, now: Instant) -> bool {
        self.conns.values().any(|c| {
            c.queue
                .iter()
                .any(|s| matches!(s, Slot::Parked(b) if kafka::parked_deadline(&b.1).is_some_and(|d| d <= now)))
        })
    }

    fn drain_inbox(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                CoreMsg::Op { from, ticket, idx, key, op } => {
                    let result = self.shard.execute(&self.broker, key, op);
                    if let Some(p) = self.peers.get(from) {
                        p.send(CoreMsg::Done { ticket, idx, result });
                    }
                }
                CoreMsg::Done { ticket, idx, result } => self.on_done(ticket, idx, result),
                CoreMsg::Spare { key, file } => self.shard.set_spare(key, file),
            }
        }
    }

    fn on_completion(&mut self, c: Completion, now: Instant) {
        match c {
            Completion::Accepted { conn, peer } => {
                log::debug!("core {}: connection {conn} from {peer}", self.id);
                self.conns.insert(
                    conn,
                    Conn {
                        peer,
                        host: peer.ip().to_string(),
                        rx: None,
                        queue: VecDeque::new(),
                        closing: false,
                        last_active: now,
                    },
                );
                let max = self.max_frame() + 4;
                self.transport.recv(conn, BytesMut::with_capacity(64 * 1024), max);
            }
            Completion::Received { conn, buf, n } => {
                if n == 0 {
                    self.transport.close(conn);
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.last_active = now;
                }
                self.on_bytes(conn, buf, now);
            }
            Completion::Sent { conn, .. } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.last_active = now;
                }
                self.maybe_resume(conn);
            }
            Completion::Closed { conn, reason } => {
                if let Some(c) = self.conns.remove(&conn) {
                    for s in &c.queue {
                        match s {
                            Slot::Parked(_) => self.parked -= 1,
                            Slot::Gathering(g) => {
                                // Results still on their way are dropped on arrival.
                                self.tickets.remove(&g.ticket);
                            }
                            Slot::Ready(_) => {}
                        }
                    }
                    match reason {
                        CloseReason::Error(e) => log::debug!("connection from {} ended: {e}", c.peer),
                        _ => log::debug!("connection from {} closed", c.peer),
                    }
                }
            }
        }
    }

    /// Cuts and runs every complete frame in `buf`, then re-arms the receive.
    fn on_bytes(&mut self, conn: ConnId, mut buf: BytesMut, now: Instant) {
        let max = self.max_frame();
        loop {
            if buf.len() < 4 {
                break;
            }
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len < 0 || len as usize > max {
                self.bad_input(conn, &format!("frame length {len} outside 0..={max}"));
                return;
            }
            let len = len as usize;
            if buf.len() < 4 + len {
                // Make room for the whole frame now, so it arrives contiguous and the
                // partial bytes are moved at most once.
                buf.reserve(4 + len - buf.len());
                break;
            }
            buf.advance(4);
            let frame = buf.split_to(len).freeze();
            let Some(c) = self.conns.get(&conn) else { return };
            let host = c.host.clone();
            match kafka::handle_frame(&self.broker, frame, &host, now) {
                Ok((req, outcome)) => {
                    if let Some(slot) = self.slot_for(conn, req, outcome, now) {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.queue.push_back(slot);
                        }
                    }
                }
                Err(e) => {
                    self.bad_input(conn, &e.to_string());
                    return;
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.rx = Some(buf);
        }
        self.flush(conn);
        self.maybe_resume(conn);
    }

    /// Closes connections idle past `connections_max_idle`: nothing queued, and no bytes
    /// either way — a peer sitting on half a request counts, and so does one that stopped
    /// reading its answers (no send completes), as in Kafka, where idleness is the socket's.
    fn close_idle(&mut self, now: Instant) {
        let limit = self.broker.settings.connections_max_idle;
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing && c.queue.is_empty() && now.duration_since(c.last_active) > limit)
            .map(|(id, _)| *id)
            .collect();
        for conn in idle {
            let unsent = self.transport.unsent_bytes(conn);
            if let Some(c) = self.conns.get_mut(&conn) {
                let partial = c.rx.as_ref().map_or(0, BytesMut::len);
                log::info!(
                    "closing connection from {}: idle for more than {} ms (connections-max-idle-ms){}",
                    c.peer,
                    limit.as_millis(),
                    if partial > 0 {
                        format!(", holding {partial} bytes of an incomplete request")
                    } else if unsent > 0 {
                        format!(", not reading: {unsent} bytes of answers unsent")
                    } else {
                        String::new()
                    }
                );
                c.closing = true;
            }
            if unsent > 0 {
                // A graceful close would wait for the peer to read them.
                self.transport.abort(conn);
            } else {
                self.transport.close(conn);
            }
        }
    }

    fn bad_input(&mut self, conn: ConnId, why: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            log::warn!("closing connection from {}: {why}", c.peer);
            c.closing = true;
            c.rx = None;
            metrics::count_bad_input_close();
        }
        self.flush(conn);
        self.transport.close(conn);
    }

    /// Turns a handler's outcome into a queue slot (`None`: nothing to answer).
    fn slot_for(&mut self, conn: ConnId, req: InFlight, outcome: Outcome, now: Instant) -> Option<Slot> {
        match outcome {
            Outcome::NoResponse => None,
            Outcome::Respond(body, by_ref) => match kafka::encode_response(&req, &body, by_ref) {
                Ok(chunks) => Some(Slot::Ready(chunks)),
                Err(e) => {
                    // A response we cannot encode is our bug: say so and drop the client
                    // rather than leave it waiting forever.
                    log::error!("{e}");
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.closing = true;
                    }
                    self.transport.close(conn);
                    None
                }
            },
            Outcome::Park(p) => {
                self.parked += 1;
                Some(Slot::Parked(Box::new((req, p))))
            }
            Outcome::Gather(g) => self.start_gather(conn, req, g, now),
        }
    }

    /// Runs a gather's partition operations: inline for partitions this core owns, on
    /// their owners for the rest.
    fn start_gather(&mut self, conn: ConnId, req: InFlight, g: data::Gather, now: Instant) -> Option<Slot> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let mut results: Vec<Option<PartResult>> = Vec::with_capacity(g.ops.len());
        let mut pending = 0;
        for (idx, (key, op)) in g.ops.into_iter().enumerate() {
            let owner = self.broker.owner(key);
            if owner == self.id {
                results.push(Some(self.shard.execute(&self.broker, key, op)));
            } else {
                results.push(None);
                pending += 1;
                self.peers[owner].send(CoreMsg::Op { from: self.id, ticket, idx, key, op });
            }
        }
        if pending == 0 {
            let results = results.into_iter().flatten().collect();
            let host = self.conns.get(&conn).map(|c| c.host.clone()).unwrap_or_default();
            let outcome = data::finish(g.then, results, &host, now);
            return self.slot_for(conn, req, outcome, now);
        }
        self.tickets.insert(ticket, conn);
        Some(Slot::Gathering(Box::new(Gathering { ticket, req, then: g.then, results, pending })))
    }

    fn on_done(&mut self, ticket: u64, idx: usize, result: PartResult) {
        let Some(&conn) = self.tickets.get(&ticket) else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let Some(pos) = c.queue.iter().position(|s| matches!(s, Slot::Gathering(g) if g.ticket == ticket)) else {
            return;
        };
        let Some(Slot::Gathering(g)) = c.queue.get_mut(pos) else { return };
        if let Some(r) = g.results.get_mut(idx) {
            if r.is_none() {
                g.pending -= 1;
            }
            *r = Some(result);
        }
        if g.pending > 0 {
            return;
        }
        self.tickets.remove(&ticket);
        let host = c.host.clone();
        let Slot::Gathering(g) = std::mem::replace(&mut c.queue[pos], Slot::Ready(Vec::new())) else { return };
        let Gathering { req, then, results, .. } = *g;
        let now = Instant::now();
        let outcome = data::finish(then, results.into_iter().flatten().collect(), &host, now);
        let slot = self.slot_for(conn, req, outcome, now).unwrap_or(Slot::Ready(Vec::new()));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.queue[pos] = slot;
        }
        self.flush(conn);
        self.maybe_resume(conn);
    }

    /// Sends the ready responses at the head of `conn`'s queue as one vectored write.
    fn flush(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let mut out: Vec<Bytes> = Vec::new();
        while let Some(Slot::Ready(_)) = c.queue.front() {
            if let Some(Slot::Ready(chunks)) = c.queue.pop_front() {
                out.extend(chunks);
            }
        }
        if !out.is_empty() {
            self.transport.send(conn, out);
        }
    }

    /// Re-arms the receive unless the connection is closing or backpressured.
    fn maybe_resume(&mut self, conn: ConnId) {
        let unsent = self.transport.unsent_bytes(conn);
        let max = self.max_frame() + 4;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.closing || unsent > MAX_UNSENT || c.queue.len() > MAX_PIPELINED {
            return;
        }
        if let Some(buf) = c.rx.take() {
            self.transport.recv(conn, buf, max);
        }
    }

    fn repoll_parked(&mut self, force: bool) {
        let now = Instant::now();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let mut progressed = false;
            let len = self.conns.get(&id).map_or(0, |c| c.queue.len());
            for pos in 0..len {
                let outcome = {
                    let Some(c) = self.conns.get(&id) else { break };
                    let Some(Slot::Parked(b)) = c.queue.get(pos) else { continue };
                    let force_this = force || kafka::parked_deadline(&b.1).is_some_and(|d| d <= now);
                    kafka::poll_parked(&self.broker, &b.1, now, force_this)
                };
                let Some(outcome) = outcome else { continue };
                let Some(c) = self.conns.get_mut(&id) else { break };
                let Slot::Parked(b) = std::mem::replace(&mut c.queue[pos], Slot::Ready(Vec::new())) else { continue };
                self.parked -= 1;
                progressed = true;
                let (req, _) = *b;
                let slot = self.slot_for(id, req, outcome, now).unwrap_or(Slot::Ready(Vec::new()));
                if let Some(c) = self.conns.get_mut(&id) {
                    c.queue[pos] = slot;
                }
            }
            if progressed {
                self.flush(id);
                self.maybe_resume(id);
            }
        }
    }
}
