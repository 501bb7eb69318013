//! The dispatch loop: thread-per-core, run-to-completion, protocol-neutral.
//!
//! Each core owns one transport instance (accepting from its clones of the broker's
//! listening sockets), the connections the kernel gave it with their request queues and
//! protocol [`Session`]s, and a [`Shard`]: the partitions it owns. A completion is handled
//! to the end on the core that received it: the connection's session cuts frames from the
//! receive buffer and handles each one, and the resulting [`Step`] is queued in the
//! connection's order. What a step is, and how a protocol plugs in, is [`session`]'s
//! documentation. Partition work is run inline when this
//! core owns the partition and otherwise sent to the owner as a [`CoreMsg::Op`]; the
//! request waits in a *gathering* slot until every result is back. Requests that must wait
//! for data or a rebalance are *parked* and re-polled when the broker's notifier wakes the
//! core or their deadline passes. Ready responses at the head of a connection's queue (on
//! an unordered session, all ready ones) are coalesced into one vectored send.
//!
//! Slow file-system work (msync for the `interval` flush policy, sealed-segment indexes,
//! retention's unlinks, creating the next segment file) goes from the logs straight to the
//! file worker (`log::files`), so an append never waits for it.
//!
//! One file, because the loop's parts share one state — a connection's queue of slots,
//! the tickets of its gathers and the parked count — and each of its invariants spans
//! them; the protocol seam is [`session`], its tests are in `tests.rs`.
//!
//! Protocols may also run a *service* ([`Protocol::service`]): work with no connection,
//! such as RocketMQ's delayed delivery. Core 0 runs each as a pseudo-connection (ids from
//! `SERVICE_BASE`, never seen by a transport) whose slot is the service's parked state.
//!
//! # Invariants
//! - Responses leave in request order per connection when its session is
//!   [`Session::ordered`] (Kafka pipelining): a parked or gathering slot holds back every
//!   slot behind it. Otherwise each leaves as soon as it is ready.
//! - A partition's log is touched only by its owner core's [`Shard`].
//! - A connection that sends bad input is closed alone, after any responses already
//!   queued for it; nothing it sent after the bad frame is executed.

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod session;
#[cfg(test)]
mod tests;
pub mod tls;

use crate::broker::shard::{PartOp, PartResult, Shard};
use crate::broker::{Broker, PartKey};
use crate::buffer::{self, Chunk, IoChunks};
use crate::log::now_ms;
use crate::metrics;
use crate::tls::ServerTls;
use crate::transport::{CloseReason, Completion, ConnId, Transport};
use crate::wake::Wake;
use session::{Cx, Fault, Finish, Parked, Protocol, Session, Step};

/// Stop reading from a connection while this much is queued for it unsent.
const MAX_UNSENT: usize = 32 << 20;
/// ...or while this many of its requests wait for answers.
const MAX_PIPELINED: usize = 1024;
/// How often a core does its housekeeping (background flush, retention checks...).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const RETENTION_EVERY: Duration = Duration::from_secs(5);
/// A TLS record's most ciphertext (16 KiB of plaintext and its overhead): with TLS a
/// receive may need a record beyond the largest frame.
const TLS_RECORD_MAX: usize = 16 * 1024 + 2048;
/// Hand freed memory back to the kernel once this many connections closed.
const TRIM_AFTER_CLOSES: usize = 256;
/// Protocol services ([`Protocol::service`]) run as connections with ids from here up:
/// no transport ever sees these ids.
const SERVICE_BASE: ConnId = 1 << 62;

fn is_service(conn: ConnId) -> bool {
    conn >= SERVICE_BASE
}

/// The session of a service's pseudo-connection: it never receives a byte.
struct NoPeer;

impl Session for NoPeer {
    fn cut(&mut self, _buf: &mut BytesMut) -> Result<Option<bytes::Bytes>, Fault> {
        Ok(None)
    }
    fn handle(&mut self, _cx: &Cx<'_>, _frame: bytes::Bytes) -> Result<Step, Fault> {
        Err(Fault::Internal("a service received a frame".into()))
    }
    fn recv_max(&self) -> usize {
        0
    }
    fn ordered(&self) -> bool {
        false
    }
}

/// The most a connection's receive buffer must grow to: its largest frame, and with TLS
/// a record beyond it (the transport reads records).
fn recv_max(session: &dyn Session, tls: bool) -> usize {
    session.recv_max() + if tls { TLS_RECORD_MAX } else { 0 }
}

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
    /// Run `op` on a partition this core owns for a thread outside the loop (a [`Port`]),
    /// and hand the result to `reply` on this core.
    Call {
        key: PartKey,
        op: PartOp,
        reply: Box<dyn FnOnce(PartResult) + Send>,
    },
}

/// Partition operations from outside the loop (the RocketMQ gRPC front runs on its own
/// runtime): each goes to the partition's owner core through the channel cores use among
/// themselves, so a partition's log is still touched by its owner alone. An operation
/// queued when the cores stop is dropped with its `reply`, unanswered.
#[derive(Clone)]
pub struct Port {
    broker: Arc<Broker>,
    peers: Vec<Peer>,
}

impl Port {
    /// Runs `op` on `key`'s owner; `reply` gets the result there (keep it short: it runs
    /// on a dispatch core).
    pub fn call(&self, key: PartKey, op: PartOp, reply: impl FnOnce(PartResult) + Send + 'static) {
        let owner = self.broker.owner(key);
        match self.peers.get(owner) {
            Some(p) => p.send(CoreMsg::Call { key, op, reply: Box::new(reply) }),
            None => reply(PartResult::Unknown),
        }
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }
}

/// How to reach a core from another thread.
#[derive(Clone)]
pub struct Peer {
    tx: Sender<CoreMsg>,
    waker: Arc<dyn Wake>,
    sleeping: Arc<AtomicBool>,
}

impl Peer {
    fn new(tx: Sender<CoreMsg>, waker: Arc<dyn Wake>, sleeping: Arc<AtomicBool>) -> Peer {
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
    Ready(IoChunks),
    Parked(Box<dyn Parked>),
    Gathering(Box<Gathering>),
}

struct Gathering {
    ticket: u64,
    then: Box<dyn Finish>,
    results: Vec<Option<PartResult>>,
    pending: usize,
}

struct Conn {
    peer: SocketAddr,
    session: Box<dyn Session>,
    /// The receive buffer while no receive is outstanding (ciphertext, with TLS).
    rx: Option<BytesMut>,
    /// On a TLS listener: the records' state and the decrypted bytes.
    tls: Option<Box<tls::TlsConn>>,
    queue: VecDeque<Slot>,
    /// No more receives: bad input seen, or closing for idleness.
    closing: bool,
    /// A fault: close as soon as the ready answers ahead of it are handed to the
    /// transport (by the next [`Core::flush`]).
    close_after_flush: bool,
    /// When bytes last moved either way (for `connections_max_idle`).
    last_active: Instant,
}

/// One core's loop state.
pub struct Core {
    id: usize,
    broker: Arc<Broker>,
    transport: Box<dyn Transport>,
    /// The protocol of each listener, by the index the transport reports on accept.
    protocols: Vec<Arc<dyn Protocol>>,
    /// Each listener's TLS server, if it serves TLS.
    tls: Vec<Option<Arc<ServerTls>>>,
    /// Protocols with no listener here, asked for their services only.
    services: Vec<Arc<dyn Protocol>>,
    shard: Shard,
    inbox: Receiver<CoreMsg>,
    peers: Vec<Peer>,
    sleeping: Arc<AtomicBool>,
    conns: HashMap<ConnId, Conn>,
    /// Gathering tickets and the connection they belong to.
    tickets: HashMap<u64, ConnId>,
    next_ticket: u64,
    parked: usize,
    parked_flag: Arc<AtomicBool>,
    seen_epoch: u64,
    /// Connections closed since memory was last handed back to the kernel.
    closed_since_trim: usize,
    shutdown: Arc<AtomicBool>,
    /// Core 0 drives the group coordinator's timers.
    drives_groups: bool,
    busy_poll: bool,
}

/// What every core gets the same of.
pub struct Shared {
    /// The protocol of each of the transports' listeners, in listener order.
    pub protocols: Vec<Arc<dyn Protocol>>,
    /// Each listener's TLS server (same order), if it serves TLS; missing means none.
    pub tls: Vec<Option<Arc<ServerTls>>>,
    pub shutdown: Arc<AtomicBool>,
    /// Spin on the transport's poll instead of sleeping in it.
    pub busy_poll: bool,
    /// Protocols served off the loop (RocketMQ gRPC, on its own runtime), here only for
    /// their services ([`Protocol::service`]).
    pub services: Vec<Arc<dyn Protocol>>,
}

/// Makes one core per transport (core `i` owns `shards[i]`), wires every core to every
/// other, and installs them in the broker's notifier. Returns the cores, to be run each
/// on its own thread.
pub fn build_cores(
    broker: &Arc<Broker>,
    shards: Vec<Shard>,
    transports: Vec<Box<dyn Transport>>,
    shared: Shared,
) -> Vec<Core> {
    let mut peers = Vec::new();
    let mut wiring = Vec::new();
    for t in &transports {
        let (tx, rx) = crossbeam_channel::unbounded::<CoreMsg>();
        let sleeping = Arc::new(AtomicBool::new(false));
        peers.push(Peer::new(tx, t.waker(), sleeping.clone()));
        wiring.push((rx, sleeping));
    }
    let cores: Vec<Core> = transports
        .into_iter()
        .zip(shards)
        .zip(wiring)
        .enumerate()
        .map(|(id, ((transport, shard), (inbox, sleeping)))| Core {
            id,
            broker: broker.clone(),
            transport,
            protocols: shared.protocols.clone(),
            tls: shared.tls.clone(),
            services: shared.services.clone(),
            shard,
            inbox,
            peers: peers.clone(),
            sleeping,
            conns: HashMap::new(),
            tickets: HashMap::new(),
            next_ticket: 0,
            parked: 0,
            parked_flag: Arc::new(AtomicBool::new(false)),
            seen_epoch: 0,
            closed_since_trim: 0,
            shutdown: shared.shutdown.clone(),
            drives_groups: id == 0,
            busy_poll: shared.busy_poll,
        })
        .collect();
    broker.notifier.install(cores.iter().map(Core::notify_handle).collect());
    cores
}

impl Core {
    /// A handle for running partition operations from outside the loop.
    pub fn port(&self) -> Port {
        Port { broker: self.broker.clone(), peers: self.peers.clone() }
    }

    /// This core's waker and has-parked-work flag, for the broker's notifier.
    pub fn notify_handle(&self) -> (Arc<dyn Wake>, Arc<AtomicBool>) {
        (self.transport.waker(), self.parked_flag.clone())
    }

    /// Starts the protocols' services (core 0 only), each as a pseudo-connection whose
    /// one slot is the service's parked state.
    fn start_services(&mut self) {
        if self.id != 0 {
            return;
        }
        let services: Vec<_> = self
            .protocols
            .iter()
            .chain(&self.services)
            .filter_map(|p| Some((p.name().to_string(), p.service()?)))
            .collect();
        for (i, (name, service)) in services.into_iter().enumerate() {
            log::info!("core {}: running the {name} service", self.id);
            let mut queue = VecDeque::new();
            queue.push_back(Slot::Parked(service));
            self.parked += 1;
            let conn = Conn {
                peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                session: Box::new(NoPeer),
                rx: None,
                tls: None,
                queue,
                closing: false,
                close_after_flush: false,
                last_active: Instant::now(),
            };
            self.conns.insert(SERVICE_BASE + i as ConnId, conn);
        }
    }

    /// Runs until shutdown is requested and in-flight work is answered.
    pub fn run(mut self) {
        self.start_services();
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
            // The flag goes up before the epoch is read (see `Notifier::notify`): a
            // notification after the read wakes this core, one before it is seen here.
            self.parked_flag.store(self.parked > 0, Ordering::SeqCst);
            let epoch = self.broker.notifier.epoch();
            if self.parked > 0 && (epoch != self.seen_epoch || self.any_deadline_passed(now)) {
                self.seen_epoch = epoch;
                self.repoll_parked(false);
            }
            self.seen_epoch = epoch;
            self.parked_flag.store(self.parked > 0, Ordering::SeqCst);
            if now >= next_housekeeping {
                let retention = now >= next_retention;
                if retention {
                    next_retention = now + RETENTION_EVERY;
                }
                self.housekeeping(retention);
                next_housekeeping = now + HOUSEKEEPING_EVERY;
            }
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().filter(|id| !is_service(*id)).collect();
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
        // Many connections gone since the last time: give their memory back.
        if self.closed_since_trim >= TRIM_AFTER_CLOSES {
            self.closed_since_trim = 0;
            buffer::return_free_memory();
        }
        self.shard.housekeeping(&self.broker, now_ms(), retention);
    }

    fn next_timeout(&self, draining: bool, housekeeping: Instant) -> Option<Duration> {
        let now = Instant::now();
        let mut t = housekeeping;
        // Only parked requests have deadlines: no walk over every connection without one.
        let conns = if self.parked > 0 { self.conns.values() } else { Default::default() };
        for c in conns {
            for s in &c.queue {
                if let Slot::Parked(p) = s {
                    if let Some(d) = p.deadline() {
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
        self.parked > 0
            && self
                .conns
                .values()
                .any(|c| c.queue.iter().any(|s| matches!(s, Slot::Parked(p) if p.deadline().is_some_and(|d| d <= now))))
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
                CoreMsg::Call { key, op, reply } => reply(self.shard.execute(&self.broker, key, op)),
            }
        }
    }

    fn on_completion(&mut self, c: Completion, now: Instant) {
        match c {
            Completion::Accepted { conn, peer, listener } => {
                let Some(protocol) = self.protocols.get(listener) else {
                    log::error!("core {}: connection from {peer} on unknown listener {listener}", self.id);
                    self.transport.abort(conn);
                    return;
                };
                log::debug!("core {}: {} connection {conn} from {peer}", self.id, protocol.name());
                let tls = match self.tls.get(listener).and_then(Option::as_ref) {
                    Some(server) => match tls::TlsConn::new(server.current()) {
                        Ok(t) => Some(Box::new(t)),
                        Err(e) => {
                            log::error!("core {}: TLS for the connection from {peer}: {e}", self.id);
                            self.transport.abort(conn);
                            return;
                        }
                    },
                    None => None,
                };
                let session = protocol.open(peer);
                metrics::count_connection_accepted();
                let max = recv_max(session.as_ref(), tls.is_some());
                self.conns.insert(
                    conn,
                    Conn {
                        peer,
                        session,
                        rx: None,
                        tls,
                        queue: VecDeque::new(),
                        closing: false,
                        close_after_flush: false,
                        last_active: now,
                    },
                );
                // No buffer until bytes come: the transport sizes it when it reads.
                self.transport.recv(conn, BytesMut::new(), max);
            }
            Completion::Received { conn, buf, n } => {
                if n == 0 {
                    self.transport.close(conn);
                    return;
                }
                let Some(c) = self.conns.get_mut(&conn) else { return };
                c.last_active = now;
                if c.tls.is_some() {
                    self.on_records(conn, buf, now);
                } else {
                    self.on_bytes(conn, buf, now);
                }
            }
            Completion::Sent { conn, .. } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.last_active = now;
                }
                self.maybe_resume(conn);
            }
            Completion::Closed { conn, reason } => {
                if let Some(c) = self.conns.remove(&conn) {
                    metrics::count_connection_closed();
                    crate::transport::shrink_after_remove(&mut self.conns);
                    self.closed_since_trim += 1;
                    self.forget_slots(&c.queue);
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
        self.run_frames(conn, &mut buf, now);
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.closing {
                // Empty or not, the transport decides what a connection between requests
                // holds (a pool, a small buffer, nothing).
                c.rx = Some(buf);
            }
        }
        self.flush(conn);
        self.maybe_resume(conn);
    }

    /// TLS records received: decrypts them, runs the frames now complete, sends what the
    /// handshake wants sent, and re-arms the receive.
    fn on_records(&mut self, conn: ConnId, mut cipher: BytesMut, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let Some(tls) = c.tls.as_mut() else { return };
        let received = tls.receive(&cipher);
        cipher.clear();
        let received = match received {
            Ok(r) => r,
            Err(fault) => {
                if let Some(alert) = fault.alert.clone() {
                    self.transport.send(conn, vec![Chunk::Heap(alert)]);
                }
                self.fail(conn, Fault::BadInput(fault.to_string()));
                self.flush(conn);
                return;
            }
        };
        if let Some(records) = received.to_send {
            self.transport.send(conn, vec![Chunk::Heap(records)]);
        }
        if let Some(subject) = received.identified {
            c.session.tls_established(subject);
        }
        let mut plain = c.tls.as_mut().map(|t| std::mem::take(&mut t.plain)).unwrap_or_default();
        self.run_frames(conn, &mut plain, now);
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(t) = c.tls.as_mut() {
                t.plain = plain;
            }
            if received.closed {
                // close_notify: answer what was asked, then close.
                c.closing = true;
                c.close_after_flush = true;
            } else if !c.closing {
                c.rx = Some(cipher);
            }
        }
        self.flush(conn);
        self.maybe_resume(conn);
    }

    /// Cuts and runs every complete frame in `buf`, queueing their steps.
    fn run_frames(&mut self, conn: ConnId, buf: &mut BytesMut, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let cx = Cx { broker: &self.broker, now };
            let step = match c.session.cut(buf) {
                Ok(None) => break,
                Ok(Some(frame)) => c.session.handle(&cx, frame),
                Err(fault) => Err(fault),
            };
            match step {
                Ok(step) => {
                    if let Some(slot) = self.slot_for(conn, step, now) {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.queue.push_back(slot);
                        }
                    }
                }
                Err(fault) => {
                    self.fail(conn, fault);
                    break;
                }
            }
        }
    }

    /// Closes connections idle past `connections_max_idle`: nothing queued, and no bytes
    /// either way — a peer sitting on half a request counts, and so does one that stopped
    /// reading its answers (no send completes), as in Kafka, where idleness is the socket's.
    fn close_idle(&mut self, now: Instant) {
        let limit = self.broker.settings.connections_max_idle;
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, c)| {
                !is_service(**id) && !c.closing && c.queue.is_empty() && now.duration_since(c.last_active) > limit
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in idle {
            let unsent = self.transport.unsent_bytes(conn);
            if let Some(c) = self.conns.get_mut(&conn) {
                let partial = c.rx.as_ref().map_or(0, BytesMut::len);
                log::info!(
                    peer:% = c.peer,
                    idle_ms = limit.as_millis() as u64,
                    partial_request_bytes = partial,
                    unsent_answer_bytes = unsent;
                    "closing connection: idle past connections-max-idle-ms{}",
                    if partial > 0 {
                        ", holding part of a request"
                    } else if unsent > 0 {
                        ", not reading its answers"
                    } else {
                        ""
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

    /// Marks `conn` to be closed after the answers ready ahead of the fault (the caller
    /// flushes): its peer sent something its protocol refuses, or we failed it. It does
    /// not flush itself: callers replace queue slots by position around it.
    fn fail(&mut self, conn: ConnId, fault: Fault) {
        if let Some(c) = self.conns.get_mut(&conn) {
            match &fault {
                Fault::BadInput(why) => {
                    log::warn!(peer:% = c.peer, reason = why.as_str(); "closing connection: bad input");
                    metrics::count_bad_input_close();
                }
                Fault::Internal(why) => log::error!(peer:% = c.peer, reason = why.as_str(); "closing connection"),
                Fault::Refused(why) => {
                    log::warn!(peer:% = c.peer, reason = why.as_str(); "closing connection: refused");
                    metrics::count_refused_close();
                }
            }
            c.closing = true;
            c.close_after_flush = true;
            c.rx = None;
        }
    }

    /// Turns a step into a queue slot (`None`: nothing to answer, or the connection
    /// failed).
    fn slot_for(&mut self, conn: ConnId, step: Step, now: Instant) -> Option<Slot> {
        match step {
            Step::Silent => None,
            Step::Respond(chunks) => Some(Slot::Ready(chunks)),
            Step::Refuse(chunks, why) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.queue.push_back(Slot::Ready(chunks));
                }
                self.fail(conn, Fault::Refused(why));
                None
            }
            Step::Park(p) => {
                self.parked += 1;
                Some(Slot::Parked(p))
            }
            Step::Gather(g) => self.start_gather(conn, g, now),
            Step::Emit(chunks, p) => {
                // At the back: no slot ahead moves (callers hold positions).
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.queue.push_back(Slot::Ready(chunks));
                }
                self.parked += 1;
                Some(Slot::Parked(p))
            }
        }
    }

    /// Like [`Core::slot_for`] for a step that may have failed.
    fn slot_or_fail(&mut self, conn: ConnId, step: Result<Step, Fault>, now: Instant) -> Option<Slot> {
        match step {
            Ok(step) => self.slot_for(conn, step, now),
            Err(fault) => {
                self.fail(conn, fault);
                None
            }
        }
    }

    /// Runs a gather's partition operations: inline for partitions this core owns, on
    /// their owners for the rest.
    fn start_gather(&mut self, conn: ConnId, g: session::Gather, now: Instant) -> Option<Slot> {
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
            let step = g.then.finish(&Cx { broker: &self.broker, now }, results);
            return self.slot_or_fail(conn, step, now);
        }
        self.tickets.insert(ticket, conn);
        Some(Slot::Gathering(Box::new(Gathering { ticket, then: g.then, results, pending })))
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
        let Slot::Gathering(g) = std::mem::replace(&mut c.queue[pos], Slot::Ready(Vec::new())) else { return };
        let Gathering { then, results, .. } = *g;
        let now = Instant::now();
        let step = then.finish(&Cx { broker: &self.broker, now }, results.into_iter().flatten().collect());
        let slot = self.slot_or_fail(conn, step, now).unwrap_or(Slot::Ready(Vec::new()));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.queue[pos] = slot;
        }
        self.flush(conn);
        self.maybe_resume(conn);
    }

    /// Accounts for the slots of a connection that is gone: its parked requests no longer
    /// count, and results still on their way to its gathers are dropped on arrival.
    fn forget_slots(&mut self, queue: &VecDeque<Slot>) {
        for s in queue {
            match s {
                Slot::Parked(_) => self.parked -= 1,
                Slot::Gathering(g) => {
                    self.tickets.remove(&g.ticket);
                }
                Slot::Ready(_) => {}
            }
        }
    }

    /// Sends the ready responses of `conn` as one vectored write: those at the head of its
    /// queue, or on an unordered session every ready one.
    fn flush(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let mut out: IoChunks = Vec::new();
        if c.session.ordered() {
            while let Some(Slot::Ready(_)) = c.queue.front() {
                if let Some(Slot::Ready(chunks)) = c.queue.pop_front() {
                    out.extend(chunks);
                }
            }
        } else {
            // The protocol matches answers to requests itself: every ready answer goes
            // now, whatever still waits ahead of it.
            c.queue.retain_mut(|s| match s {
                Slot::Ready(chunks) => {
                    out.append(chunks);
                    false
                }
                _ => true,
            });
        }
        let close = std::mem::take(&mut c.close_after_flush);
        if is_service(conn) {
            // A service's answers go nowhere; it ends when it stops waiting or fails.
            if close || c.queue.is_empty() {
                log::info!("core {}: a service ended", self.id);
                if let Some(c) = self.conns.remove(&conn) {
                    self.forget_slots(&c.queue);
                }
            }
            return;
        }
        if let Some(tls) = c.tls.as_mut() {
            if !out.is_empty() {
                match tls.seal(out) {
                    Ok(records) => out = records,
                    Err(e) => {
                        log::error!(peer:% = c.peer, reason:% = e; "closing connection");
                        self.transport.abort(conn);
                        return;
                    }
                }
            }
            if close {
                out.extend(tls.close().map(Chunk::Heap));
            }
        }
        if !out.is_empty() {
            self.transport.send(conn, out);
        }
        if close {
            self.transport.close(conn);
        }
    }

    /// Re-arms the receive unless the connection is closing or backpressured.
    fn maybe_resume(&mut self, conn: ConnId) {
        let unsent = self.transport.unsent_bytes(conn);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let max = recv_max(c.session.as_ref(), c.tls.is_some());
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
                let step = {
                    let Some(c) = self.conns.get_mut(&id) else { break };
                    let Some(Slot::Parked(p)) = c.queue.get_mut(pos) else { continue };
                    let force_this = force || p.deadline().is_some_and(|d| d <= now);
                    p.poll(&Cx { broker: &self.broker, now }, force_this)
                };
                let Some(step) = step else { continue };
                let Some(c) = self.conns.get_mut(&id) else { break };
                c.queue[pos] = Slot::Ready(Vec::new());
                self.parked -= 1;
                progressed = true;
                let slot = self.slot_or_fail(id, step, now).unwrap_or(Slot::Ready(Vec::new()));
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
