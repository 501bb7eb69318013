//! RocketMQ remoting behind the dispatch seam, on the same log as Kafka.
//!
//! Two listener roles: the **name server** ([`Role::NameServer`], `rocketmq-namesrv://`)
//! answers route queries naming this broker's RocketMQ listener, and the **broker**
//! ([`Role::Broker`], `rocketmq://`) sends, pulls, and keeps consumer offsets and the
//! consumer registry. Both cut frames with the one remoting [`frame::Framer`].
//!
//! Topic = topic, queue = partition: a send appends a Kafka record batch (see
//! [`message`] for the mapping), a pull reads record batches and re-lays them out as the
//! messages RocketMQ clients decode. Consumer offsets live in the broker's group offset
//! store, keyed by group name, topic and queue: a RocketMQ consumer group and a Kafka
//! consumer group of the same name share committed offsets (not membership).
//!
//! # Invariants
//! - Partition logs are touched only through [`crate::broker::shard::PartOp`]s gathered to
//!   their owner cores; file work (topic creation, offset commits) goes to the file
//!   worker, and the request parks until it is done.
//! - One-way requests get no answer, whatever happens; every other request gets one, with
//!   a response code and a remark when it fails.

pub mod codes;
pub mod frame;
pub mod message;

pub mod grpc;
pub mod schedule;

mod broker;
mod clients;
mod lookup;
mod namesrv;

use bytes::{Bytes, BytesMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::broker::groups::Committed;
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{Broker, Notifier, PartKey};
use crate::buffer::{Chunk, IoChunks};
use crate::dispatch::session::{self, Cx, Fault, Protocol, Session, Step};
use crate::log::Pending;
use crate::metrics::{ApiStats, Names};
use clients::{Clients, Outbox};
use codes::Response;
use frame::{Command, Framer};

/// Which half of RocketMQ a listener plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    NameServer,
    Broker,
}

/// What every RocketMQ listener of one broker shares: its identity as RocketMQ clients
/// see it, and the consumer registry.
pub struct RocketMqState {
    pub cluster: String,
    pub broker_name: String,
    /// The broker listener's advertised `host:port` (what routes name).
    pub broker_addr: String,
    /// The address put in message ids (the advertised one when it is an IP address).
    pub store_host: SocketAddr,
    /// RocketMQ's `messageDelayLevel` table.
    pub delay_levels: Vec<Duration>,
    /// Transaction check-backs.
    pub tx: schedule::TxSettings,
    /// What waits in the timer queue (shared by the scheduler and END_TRANSACTION).
    pub timers: parking_lot::Mutex<schedule::Index>,
    clients: Clients,
    next_conn: AtomicU64,
    /// The delayed-delivery service is handed out once, whatever the listener count.
    scheduler_taken: AtomicBool,
    /// Sends a transaction check-back to a gRPC producer (set by the gRPC front).
    grpc_checks: OnceLock<CheckBack>,
}

/// Asks a gRPC producer about the half `record`, whose copy waits at `offset` of the timer
/// queue; false when none is connected.
pub type CheckBack = Box<dyn Fn(&kafka_protocol::records::Record, i64) -> bool + Send + Sync>;

impl RocketMqState {
    /// `advertised`: the broker listener's advertised (host, port); `bound`: its socket.
    pub fn new(
        cluster: &str,
        node_id: i32,
        advertised: (&str, i32),
        bound: SocketAddr,
        delay_levels: Vec<Duration>,
        tx: schedule::TxSettings,
        notifier: Arc<Notifier>,
    ) -> Arc<RocketMqState> {
        let port = u16::try_from(advertised.1).unwrap_or(bound.port());
        let ip = advertised.0.parse::<IpAddr>().ok().unwrap_or(match bound.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        });
        Arc::new(RocketMqState {
            cluster: cluster.to_string(),
            broker_name: format!("broker-{node_id}"),
            broker_addr: host_port(&(advertised.0.to_string(), advertised.1)),
            store_host: SocketAddr::new(ip, port),
            delay_levels,
            tx,
            timers: Default::default(),
            clients: Clients::new(notifier),
            next_conn: AtomicU64::new(1),
            scheduler_taken: AtomicBool::new(false),
            grpc_checks: OnceLock::new(),
        })
    }

    /// Installs the gRPC front's check-back (once).
    pub fn set_grpc_checks(&self, f: CheckBack) {
        if self.grpc_checks.set(f).is_err() {
            log::error!("gRPC transaction check-backs installed twice");
        }
    }

    fn grpc_check(&self, record: &kafka_protocol::records::Record, offset: i64) -> bool {
        self.grpc_checks.get().is_some_and(|f| f(record, offset))
    }
}

/// A RocketMQ listener.
pub struct RocketMq {
    role: Role,
    state: Arc<RocketMqState>,
    framer: Framer,
    stats: Arc<ApiStats>,
}

/// RocketMQ's names for the metrics: request codes as `RequestCode` spells them (codes
/// slipstream does not serve count as `unknown`), response codes as `ResponseCode`.
static NAMES: Names = Names {
    api: |slot| codes::Request::ALL.get(slot).map_or_else(|| "unknown".to_string(), |r| r.name().to_string()),
    error: Response::name,
};

impl RocketMq {
    /// A listener of `role`, advertised as `advertised` (host, port).
    pub fn new(role: Role, state: Arc<RocketMqState>, advertised: &(String, i32)) -> RocketMq {
        let scheme = match role {
            Role::NameServer => "rocketmq-namesrv",
            Role::Broker => "rocketmq",
        };
        let stats = ApiStats::register(format!("{scheme}://{}", host_port(advertised)), &NAMES);
        RocketMq { role, state, framer: Framer::default(), stats }
    }

    /// The broker's RocketMQ services (delayed delivery, check-backs) for a broker whose
    /// only RocketMQ listener is gRPC: it serves no connection.
    pub fn services(state: Arc<RocketMqState>) -> RocketMq {
        let stats = ApiStats::unregistered(String::new(), &NAMES);
        RocketMq { role: Role::Broker, state, framer: Framer::default(), stats }
    }
}

impl Protocol for RocketMq {
    fn name(&self) -> &str {
        match self.role {
            Role::NameServer => "rocketmq-namesrv",
            Role::Broker => "rocketmq",
        }
    }

    fn open(&self, peer: SocketAddr) -> Box<dyn Session> {
        let conn = self.state.next_conn.fetch_add(1, Ordering::Relaxed);
        let state = self.state.clone();
        let stats = self.stats.clone();
        Box::new(RocketMqSession { role: self.role, state, framer: self.framer, peer, conn, watching: false, stats })
    }

    /// Delayed delivery (delay levels, timers, retry back-off), once per broker.
    fn service(&self) -> Option<Box<dyn session::Parked>> {
        let first = self.role == Role::Broker && !self.state.scheduler_taken.swap(true, Ordering::AcqRel);
        first.then(|| Box::new(schedule::Scheduler::new(self.state.clone())) as Box<dyn session::Parked>)
    }
}

/// One RocketMQ connection.
pub struct RocketMqSession {
    role: Role,
    state: Arc<RocketMqState>,
    framer: Framer,
    peer: SocketAddr,
    /// Names this connection in the client registry (its clients go when it closes).
    conn: u64,
    /// A [`Watch`] is parked for this connection (from its first heartbeat on).
    watching: bool,
    stats: Arc<ApiStats>,
}

impl Drop for RocketMqSession {
    fn drop(&mut self) {
        if self.role == Role::Broker {
            self.state.clients.connection_closed(self.conn);
        }
    }
}

/// What a handler needs to know about the request's connection.
pub(crate) struct Conn<'a> {
    pub state: &'a Arc<RocketMqState>,
    pub peer: SocketAddr,
    pub id: u64,
}

impl Session for RocketMqSession {
    fn cut(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Fault> {
        self.framer.cut(buf).map_err(|e| Fault::BadInput(e.to_string()))
    }

    fn handle(&mut self, cx: &Cx<'_>, frame: Bytes) -> Result<Step, Fault> {
        // The clock, not the loop's `now`: a request answered at once still took its time.
        let started = Instant::now();
        // The request code, for counting a frame that fails to decode under it.
        // (Readable only in a binary header, where it comes first.)
        let raw_code = match frame.first() {
            Some(1) => frame.get(4..6).map_or(-1, |c| i16::from_be_bytes([c[0], c[1]]).into()),
            _ => -1,
        };
        let cmd = Command::decode(frame).map_err(|e| {
            self.stats.failed(slot(raw_code));
            Fault::BadInput(e.to_string())
        })?;
        if cmd.is_response() {
            // Answers to broker-initiated requests: nothing here waits for one.
            return Ok(Step::Silent);
        }
        let track = Track { stats: self.stats.clone(), slot: slot(cmd.code), started };
        log::trace!("rocketmq request {} from {}: {:?}", cmd.code, self.peer, cmd.ext);
        let conn = Conn { state: &self.state, peer: self.peer, id: self.conn };
        let reply = match self.role {
            Role::NameServer => namesrv::handle(cx, &conn, &cmd),
            Role::Broker => broker::handle(cx, &conn, &cmd),
        };
        if self.role != Role::Broker || cmd.code != codes::HEART_BEAT || self.watching {
            return Ok(track.step(step(&cmd, reply)));
        }
        // A client that heartbeats may be sent requests (rebalance notices, transaction
        // check-backs): from its first heartbeat on, a watch waits on this connection's
        // outbox (once the heartbeat is answered, if that waits for the file worker).
        self.watching = true;
        let watch = Box::new(Watch { outbox: self.state.clients.outbox(self.conn) });
        let oneway = cmd.is_oneway();
        // The watch outlives the heartbeat: the heartbeat is counted here, not by tracking
        // the steps (which would wait for the watch's first frame).
        Ok(match reply {
            Reply::Blocking(pending) => {
                Step::Park(Box::new(Blocking { pending, oneway, watch: Some(watch), track: Some(track) }))
            }
            Reply::Done(resp) => {
                track.count(Some(resp.code));
                match oneway {
                    true => Step::Park(watch),
                    false => Step::Emit(encode(resp), watch),
                }
            }
            Reply::Step(s) => {
                self.watching = false;
                track.step(s)
            }
        })
    }

    fn recv_max(&self) -> usize {
        self.framer.recv_max()
    }

    /// Answers carry their request's opaque: a parked pull must not hold back the
    /// heartbeat or the send behind it on a client's one connection.
    fn ordered(&self) -> bool {
        false
    }
}

/// Waits for frames the broker sends a connection's client, and sends them.
struct Watch {
    outbox: Arc<Outbox>,
}

impl session::Parked for Watch {
    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn poll(&mut self, _cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        if force {
            return Some(Ok(Step::Silent));
        }
        let frames = self.outbox.take();
        if frames.is_empty() {
            return None;
        }
        let watch = Box::new(Watch { outbox: self.outbox.clone() });
        Some(Ok(Step::Emit(frames.into_iter().map(Chunk::Heap).collect(), watch)))
    }
}

/// `host:port` (an IPv6 host in brackets), as routes and metrics name a listener.
pub(crate) fn host_port((host, port): &(String, i32)) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

/// A request code's counter slot (see [`NAMES`]).
fn slot(code: i32) -> usize {
    codes::Request::from_code(code).map_or(usize::MAX, |r| r as usize)
}

/// A request's place in its listener's counters, carried through the parks and gathers
/// its handling takes until its answer leaves (or it finishes without one).
struct Track {
    stats: Arc<ApiStats>,
    slot: usize,
    started: Instant,
}

impl Track {
    /// Counts the request: answered now, with response `code` when it has an answer.
    fn count(&self, code: Option<i32>) {
        self.stats.answered(self.slot, self.started.elapsed());
        if let Some(code) = code.filter(|c| *c != Response::Success.code()) {
            self.stats.error_answered(self.slot, code);
        }
    }

    /// `step` (or the fault that ends the request and its connection), counted if it
    /// ends the request, else carrying the count along.
    fn result(self, result: Result<Step, Fault>) -> Result<Step, Fault> {
        match result {
            Ok(step) => Ok(self.step(step)),
            Err(fault) => {
                self.stats.failed(self.slot);
                Err(fault)
            }
        }
    }

    /// `step`, counted if it ends the request, else carrying the count along.
    fn step(self, step: Step) -> Step {
        let code = |chunks: &IoChunks| match chunks.first() {
            Some(Chunk::Heap(head)) => frame::code_of_head(head),
            _ => None,
        };
        match step {
            Step::Respond(chunks) => {
                self.count(code(&chunks));
                Step::Respond(chunks)
            }
            Step::Refuse(chunks, why) => {
                self.count(code(&chunks));
                Step::Refuse(chunks, why)
            }
            Step::Emit(chunks, then) => {
                self.count(code(&chunks));
                Step::Emit(chunks, then)
            }
            Step::Silent => {
                self.count(None);
                Step::Silent
            }
            Step::Park(inner) => Step::Park(Box::new(Tracked { inner, track: Some(self) })),
            Step::Gather(g) => Step::Gather(session::Gather {
                ops: g.ops,
                then: Box::new(Tracked { inner: g.then, track: Some(self) }),
            }),
        }
    }
}

/// A parked request or a gather's finish, with its [`Track`].
struct Tracked<T: ?Sized> {
    track: Option<Track>,
    inner: Box<T>,
}

impl session::Parked for Tracked<dyn session::Parked> {
    fn deadline(&self) -> Option<Instant> {
        self.inner.deadline()
    }

    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        let next = self.inner.poll(cx, force)?;
        // A parked request is polled until it yields a step, once: the track is here.
        Some(match self.track.take() {
            Some(track) => track.result(next),
            None => next,
        })
    }
}

impl session::Finish for Tracked<dyn session::Finish> {
    fn finish(self: Box<Self>, cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault> {
        let Tracked { track, inner } = *self;
        let next = inner.finish(cx, results);
        match track {
            Some(track) => track.result(next),
            None => next,
        }
    }
}

/// What a handler decided.
pub(crate) enum Reply {
    /// The response command (header fields, body).
    Done(Command),
    /// File work on the worker; its response comes back through the pending.
    Blocking(Pending<Command>),
    /// Anything else the dispatch loop runs (gathers, parked pulls): already a step.
    Step(Step),
}

/// A failure answer.
pub(crate) fn error(req: &Command, code: Response, remark: impl Into<String>) -> Reply {
    Reply::Done(Command::response_to(req, code.code(), Some(remark.into())))
}

pub(crate) fn ok(req: &Command) -> Command {
    Command::response_to(req, Response::Success.code(), None)
}

/// Encodes a reply into the loop's step; one-way requests answer nothing.
pub(crate) fn step(req: &Command, reply: Reply) -> Step {
    let oneway = req.is_oneway();
    match reply {
        Reply::Step(s) => s,
        _ if oneway && !matches!(reply, Reply::Blocking(_)) => Step::Silent,
        Reply::Done(cmd) => Step::Respond(encode(cmd)),
        Reply::Blocking(pending) => Step::Park(Box::new(Blocking { pending, oneway, watch: None, track: None })),
    }
}

fn encode(cmd: Command) -> IoChunks {
    let mut out: IoChunks = vec![Chunk::Heap(cmd.encode_head(cmd.body.len()))];
    if !cmd.body.is_empty() {
        out.push(Chunk::Heap(cmd.body));
    }
    out
}

/// A [`Finish`](session::Finish) that runs a closure on the gathered results.
struct FinishWith<F>(F);

impl<F> session::Finish for FinishWith<F>
where
    F: FnOnce(&Cx<'_>, Vec<PartResult>) -> Step + Send,
{
    fn finish(self: Box<Self>, cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault> {
        Ok((self.0)(cx, results))
    }
}

/// Partition operations on their owners, then `then` on their results.
pub(crate) fn gather_then<F>(ops: Vec<(PartKey, PartOp)>, then: F) -> Step
where
    F: FnOnce(&Cx<'_>, Vec<PartResult>) -> Step + Send + 'static,
{
    Step::Gather(session::Gather { ops, then: Box::new(FinishWith(then)) })
}

/// Stores a consumer offset (for the file worker). RocketMQ consumers (and the scheduler's
/// cursor) commit without a Kafka group membership, as a standalone Kafka consumer does.
pub(crate) fn commit(
    broker: &Broker,
    group: &str,
    topic: &str,
    queue: i32,
    offset: i64,
    now: Instant,
) -> Result<(), String> {
    let c = Committed { offset, leader_epoch: -1, metadata: None };
    broker.commit_offsets(group, "", -1, vec![(topic.to_string(), queue, c)], now).map_err(|e| e.to_string())
}

/// The record at `offset` in a read's result (a read returns whole batches, from the one
/// holding `offset`).
pub(crate) fn record_at(result: Option<PartResult>, offset: i64) -> Option<kafka_protocol::records::Record> {
    let Some(PartResult::Read(r)) = result else { return None };
    let mut b = r.records.bytes().clone();
    let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut b).ok()?;
    set.records.into_iter().find(|r| r.offset == offset)
}

/// What to do with a file-work result.
type AndThen<T> = Box<dyn FnOnce(&Cx<'_>, T) -> Step + Send>;

/// File work, then whatever comes of its result (e.g. a topic made, then a send).
pub(crate) struct AfterFiles<T> {
    pending: Pending<T>,
    then: Option<AndThen<T>>,
}

impl<T: Send + 'static> AfterFiles<T> {
    pub fn step(pending: Pending<T>, then: impl FnOnce(&Cx<'_>, T) -> Step + Send + 'static) -> Step {
        Step::Park(Box::new(AfterFiles { pending, then: Some(Box::new(then)) }))
    }
}

impl<T: Send> session::Parked for AfterFiles<T> {
    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn poll(&mut self, cx: &Cx<'_>, _force: bool) -> Option<Result<Step, Fault>> {
        let value = self.pending.try_take()?;
        let then = self.then.take()?;
        Some(Ok(then(cx, value)))
    }
}

/// A request waiting for the file worker (and the watch its connection gets after it).
struct Blocking {
    pending: Pending<Command>,
    oneway: bool,
    watch: Option<Box<Watch>>,
    /// Set with a watch (a heartbeat): counted here, when its answer is known.
    track: Option<Track>,
}

impl session::Parked for Blocking {
    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn poll(&mut self, _cx: &Cx<'_>, _force: bool) -> Option<Result<Step, Fault>> {
        // Not even a shutdown answers it early: what it writes may be half done.
        let cmd = self.pending.try_take()?;
        if let Some(track) = self.track.take() {
            track.count(Some(cmd.code));
        }
        Some(Ok(match (self.watch.take(), self.oneway) {
            (Some(watch), true) => Step::Park(watch),
            (Some(watch), false) => Step::Emit(encode(cmd), watch),
            (None, true) => Step::Silent,
            (None, false) => Step::Respond(encode(cmd)),
        }))
    }
}
