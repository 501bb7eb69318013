//! The dispatch loop: thread-per-core, run-to-completion.
//!
//! Each core owns one transport instance (its own listener, via `SO_REUSEPORT`), the
//! connections the kernel gave it, and their request queues. A completion is handled to
//! the end on the core that received it: frames are cut from the receive buffer, each
//! request is decoded and run, and its response is queued in the connection's order.
//! Responses ready at the head of a connection's queue are coalesced into one vectored
//! send. Requests that must wait (long-poll fetch, group joins) are *parked* in their
//! slot and re-polled when the broker's notifier wakes the core or their deadline passes.
//!
//! # Invariants
//! - Responses leave in request order per connection (Kafka pipelining): a parked slot
//!   holds back every slot behind it.
//! - A connection that sends bad input is closed alone, after any responses already
//!   queued for it; nothing it sent after the bad frame is executed.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::Broker;
use crate::metrics;
use crate::protocol::kafka::{self, InFlight, Outcome, Parked};
use crate::transport::{CloseReason, Completion, ConnId, Transport};

/// Stop reading from a connection while this much is queued for it unsent.
const MAX_UNSENT: usize = 32 << 20;
/// ...or while this many of its requests wait for answers.
const MAX_PIPELINED: usize = 1024;

enum Slot {
    Ready(Vec<Bytes>),
    Parked(Box<(InFlight, Parked)>),
}

struct Conn {
    peer: SocketAddr,
    host: String,
    /// The receive buffer while no receive is outstanding.
    rx: Option<BytesMut>,
    queue: VecDeque<Slot>,
    /// Bad input seen: answer what is queued, then close.
    closing: bool,
}

/// One core's loop state.
pub struct Core {
    id: usize,
    broker: Arc<Broker>,
    transport: Box<dyn Transport>,
    conns: HashMap<ConnId, Conn>,
    parked: usize,
    parked_flag: Arc<AtomicBool>,
    seen_epoch: u64,
    shutdown: Arc<AtomicBool>,
    /// Core 0 drives the group coordinator's timers.
    drives_groups: bool,
}

impl Core {
    pub fn new(
        id: usize,
        broker: Arc<Broker>,
        transport: Box<dyn Transport>,
        shutdown: Arc<AtomicBool>,
    ) -> Core {
        let parked_flag = broker.notifier.register(transport.waker());
        Core {
            id,
            broker,
            transport,
            conns: HashMap::new(),
            parked: 0,
            parked_flag,
            seen_epoch: 0,
            shutdown,
            drives_groups: id == 0,
        }
    }

    /// A handle that wakes this core's poll from another thread.
    pub fn waker(&self) -> Arc<dyn crate::transport::Wake> {
        self.transport.waker()
    }

    fn max_frame(&self) -> usize {
        self.broker.settings.max_request_bytes
    }

    /// Runs until shutdown is requested and in-flight work is answered.
    pub fn run(mut self) {
        let mut completions = Vec::with_capacity(256);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            if self.shutdown.load(Ordering::Acquire) && drain_deadline.is_none() {
                log::info!(
                    "core {}: stopping; answering {} parked requests",
                    self.id,
                    self.parked
                );
                self.transport.stop_accepting();
                drain_deadline = Some(Instant::now() + Duration::from_secs(5));
                self.repoll_parked(true);
            }
            if let Some(d) = drain_deadline {
                let idle = self.conns.values().all(|c| c.queue.is_empty());
                let unsent: usize = self
                    .conns
                    .keys()
                    .map(|id| self.transport.unsent_bytes(*id))
                    .sum();
                if (idle && unsent == 0) || Instant::now() >= d {
                    break;
                }
            }
            let timeout = self.next_timeout(drain_deadline.is_some());
            completions.clear();
            if let Err(e) = self.transport.poll(timeout, &mut completions) {
                log::error!("core {}: transport poll failed: {e}", self.id);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let now = Instant::now();
            for c in completions.drain(..) {
                self.on_completion(c, now);
            }
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
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.transport.close(id);
        }
    }

    fn next_timeout(&self, draining: bool) -> Option<Duration> {
        let now = Instant::now();
        let mut t: Option<Instant> = None;
        let mut consider = |d: Instant| t = Some(t.map_or(d, |x| x.min(d)));
        for c in self.conns.values() {
            for s in &c.queue {
                if let Slot::Parked(b) = s {
                    let p = &b.1;
                    if let Some(d) = kafka::parked_deadline(p) {
                        consider(d);
                    }
                }
            }
        }
        if self.drives_groups {
            if let Some(d) = self.broker.groups.lock().next_deadline() {
                consider(d);
            }
        }
        // Wake at least this often: shutdown flag, parked joins, coordinator timers.
        let cap = if draining {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(250)
        };
        Some(t.map_or(cap, |d| d.saturating_duration_since(now).min(cap)))
    }

    fn any_deadline_passed(&self, now: Instant) -> bool {
        self.conns.values().any(|c| {
            c.queue.iter().any(|s| matches!(s, Slot::Parked(b) if kafka::parked_deadline(&b.1).is_some_and(|d| d <= now)))
        })
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
                    },
                );
                let max = self.max_frame() + 4;
                self.transport
                    .recv(conn, BytesMut::with_capacity(64 * 1024), max);
            }
            Completion::Received { conn, buf, n } => {
                if n == 0 {
                    self.transport.close(conn);
                    return;
                }
                self.on_bytes(conn, buf, now);
            }
            Completion::Sent { conn, .. } => {
                self.maybe_resume(conn);
            }
            Completion::Closed { conn, reason } => {
                if let Some(c) = self.conns.remove(&conn) {
                    let parked = c
                        .queue
                        .iter()
                        .filter(|s| matches!(s, Slot::Parked(..)))
                        .count();
                    self.parked -= parked;
                    match reason {
                        CloseReason::Error(e) => {
                            log::debug!("connection from {} ended: {e}", c.peer)
                        }
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
            let Some(c) = self.conns.get(&conn) else {
                return;
            };
            let host = c.host.clone();
            match kafka::handle_frame(&self.broker, frame, &host, now) {
                Ok((req, outcome)) => self.enqueue(conn, req, outcome),
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

    fn enqueue(&mut self, conn: ConnId, req: InFlight, outcome: Outcome) {
        let slot = match outcome {
            Outcome::NoResponse => return,
            Outcome::Respond(body, by_ref) => match kafka::encode_response(&req, &body, by_ref) {
                Ok(chunks) => Slot::Ready(chunks),
                Err(e) => {
                    log::error!("{e}");
                    self.bad_input(conn, "response could not be encoded");
                    return;
                }
            },
            Outcome::Park(p) => {
                self.parked += 1;
                Slot::Parked(Box::new((req, p)))
            }
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.queue.push_back(slot);
        }
    }

    /// Sends the ready responses at the head of `conn`'s queue as one vectored write.
    fn flush(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
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
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
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
            if let Some(c) = self.conns.get_mut(&id) {
                for slot in c.queue.iter_mut() {
                    let Slot::Parked(b) = slot else { continue };
                    let (req, p) = &**b;
                    let force_this = force || kafka::parked_deadline(p).is_some_and(|d| d <= now);
                    let Some(outcome) = kafka::poll_parked(&self.broker, p, now, force_this) else {
                        continue;
                    };
                    self.parked -= 1;
                    progressed = true;
                    *slot = match outcome {
                        Outcome::Respond(body, by_ref) => {
                            match kafka::encode_response(req, &body, by_ref) {
                                Ok(chunks) => Slot::Ready(chunks),
                                Err(e) => {
                                    log::error!("{e}");
                                    Slot::Ready(Vec::new())
                                }
                            }
                        }
                        Outcome::NoResponse | Outcome::Park(_) => Slot::Ready(Vec::new()),
                    };
                }
            }
            if progressed {
                self.flush(id);
                self.maybe_resume(id);
            }
        }
    }
}
