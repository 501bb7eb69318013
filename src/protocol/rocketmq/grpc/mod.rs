//! RocketMQ 5's gRPC API (`apache.rocketmq.v2.MessagingService`), served from the log,
//! so the 5.x SDKs connect unchanged, with no proxy and no separate broker.
//!
//! HTTP/2 needs an async stack, so this front runs on its own thread with a
//! single-threaded tokio runtime (tonic), beside the dispatch cores. It keeps the remoting
//! data model rather than a second one: a send is planned by the remoting broker's
//! `broker::plan_send` (delay and timer messages into the timer
//! queue, transactional halves held there), messages and records convert through
//! [`message`], transactions resolve through
//! [`schedule::resolution`], offsets go to the broker's offset store, and every partition
//! operation travels to its owner core through a [`Port`], the channel cores use among
//! themselves. What gRPC adds is simple consumption ([`pop`]): per-message invisibility,
//! receipt handles, delivery attempts and the dead-letter queue after the last one.
//!
//! Copies of a message body: a send decodes the body as a slice of the request buffer
//! (no copy), copies it once into the record batch (`rocketmq_send_bytes_copied`, as a
//! remoting send), and the kernel copies the batch into the log. A receive reads the
//! record batch from the mapping and decodes it with the body as a slice of the mapping
//! (no copy); protobuf's encoding into the HTTP/2 frame is the one copy
//! (`rocketmq_grpc_bytes_copied`). A gzip body is inflated once on send (counted there).
//!
//! FIFO: a message with a message group is not delivered while an earlier message of
//! its group in the same queue is in flight, and one scan takes at most one message per
//! group, so a group's messages reach consumers in order, one at a time, whatever the
//! client's consume service (see [`pop`]).
//!
//! # Invariants
//! - A partition's log is touched only on its owner core (through the [`Port`]); this
//!   thread never blocks on the file system except inside `spawn_blocking`.
//! - Every RPC answers a `Status`; an RPC this front does not serve answers gRPC
//!   UNIMPLEMENTED, never a made-up OK.

pub mod convert;
pub mod incoming;
pub mod pb;
pub mod pop;

use kafka_protocol::records::{Record, RecordBatchDecoder};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::broker::{plan_send, SendPlan};
use super::codes::Response as RemotingCode;
use super::message::{self, TagFilter};
use super::namesrv::ensure_topic;
use super::schedule::{self, header};
use super::{commit, record_at, RocketMqState};
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{Broker, PartKey, PartitionShared, Topic};
use crate::dispatch::Port;
use crate::log::now_ms;
use crate::metrics::{ApiStats, Names};
use crate::wake::Wake;
use convert::Delivery;
use pb::messaging_service_server::{MessagingService, MessagingServiceServer};
use pop::{Lease, Pop};

/// The longest long poll, whatever a client asks.
const MAX_POLL: Duration = Duration::from_secs(30);
/// The most messages one receive returns.
const MAX_BATCH: usize = 1024;
/// How long a push consumer's message stays invisible (they ask for auto-renewal, not a
/// duration); renewed while its client still heartbeats.
const AUTO_RENEW_MS: i64 = 60_000;
/// How long a stopping front waits for open streams to end.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often acknowledged offsets are written.
const OFFSET_FLUSH: Duration = Duration::from_millis(500);
/// A client silent this long is gone (they heartbeat every 10 s).
const CLIENT_GONE: Duration = Duration::from_secs(35);
/// A client with no telemetry stream, silent this long, is forgotten.
const CLIENT_FORGOTTEN: Duration = Duration::from_secs(600);
/// The bytes one read of a queue takes.
const READ_BYTES: usize = 1 << 20;
/// A request larger than this is refused (bodies are at most 4 MiB; batches a few).
const MAX_REQUEST: usize = 32 << 20;

/// Settings of the gRPC front.
#[derive(Debug, Clone, Copy)]
pub struct GrpcSettings {
    /// Deliveries of a message before it goes to the dead-letter queue (RocketMQ's 16
    /// retries plus the first delivery).
    pub max_delivery_attempts: i32,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        GrpcSettings { max_delivery_attempts: 17 }
    }
}

/// Starts the front on its own thread, serving on `listener` until `shutdown`.
pub fn spawn(
    listener: std::net::TcpListener,
    advertised: (String, i32),
    port: Port,
    state: Arc<RocketMqState>,
    settings: GrpcSettings,
    shutdown: Arc<AtomicBool>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let data = Arc::new(Notify::new());
    port.broker().notifier.listen(Arc::new(DataWaker(data.clone())));
    let front = Arc::new(Front {
        broker: port.broker().clone(),
        port,
        state: state.clone(),
        endpoint: endpoints(&advertised),
        pop: Mutex::new(Pop::default()),
        clients: Mutex::new(HashMap::new()),
        data,
        settings,
        dirty: Mutex::new(HashMap::new()),
        stats: ApiStats::register(format!("rocketmq-grpc://{}", super::host_port(&advertised)), &NAMES),
    });
    let weak = Arc::downgrade(&front);
    state.set_grpc_checks(Box::new(move |record, offset| {
        Weak::upgrade(&weak).is_some_and(|f| f.check_back(record, offset))
    }));
    std::thread::Builder::new().name("rocketmq-grpc".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return log::error!("rocketmq-grpc: cannot use the listener: {e}"),
            };
            let incoming = incoming::incoming(listener, tls);
            tokio::spawn(front.clone().offset_flusher());
            let service = MessagingServiceServer::new(Counting(Service(front.clone())))
                .max_decoding_message_size(MAX_REQUEST)
                .max_encoding_message_size(MAX_REQUEST);
            let stopping = |shutdown: Arc<AtomicBool>| async move {
                while !shutdown.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            let server = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopping(shutdown.clone()));
            // A graceful stop waits for open streams, and a client's Telemetry stream
            // never ends by itself: give them a moment, then close them.
            let cut = async {
                stopping(shutdown).await;
                tokio::time::sleep(STOP_GRACE).await;
            };
            tokio::select! {
                r = server => {
                    if let Err(e) = r {
                        log::error!("rocketmq-grpc: server stopped: {e}");
                    }
                }
                _ = cut => log::info!("rocketmq-grpc: closing the streams still open"),
            }
            // What was acknowledged last is not lost to the shutdown.
            let dirty = std::mem::take(&mut *front.dirty.lock());
            Front::store_offsets(&front.broker, dirty);
        })
    })
}

/// Wakes the long polls when the broker's notifier says something was appended.
struct DataWaker(Arc<Notify>);

impl Wake for DataWaker {
    fn wake(&self) {
        self.0.notify_waiters();
    }
}

fn endpoints(advertised: &(String, i32)) -> pb::Endpoints {
    let scheme = match advertised.0.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => pb::AddressScheme::IPv4,
        Ok(IpAddr::V6(_)) => pb::AddressScheme::IPv6,
        Err(_) => pb::AddressScheme::DomainName,
    };
    pb::Endpoints {
        scheme: scheme as i32,
        addresses: vec![pb::Address { host: advertised.0.clone(), port: advertised.1 }],
    }
}

fn status(code: pb::Code, message: impl Into<String>) -> Option<pb::Status> {
    Some(pb::Status { code: code as i32, message: message.into() })
}

fn ok() -> Option<pb::Status> {
    status(pb::Code::Ok, "OK")
}

/// A remoting refusal as a gRPC status code.
fn code_of(r: RemotingCode) -> pb::Code {
    match r {
        RemotingCode::MessageIllegal => pb::Code::BadRequest,
        RemotingCode::NoPermission => pb::Code::Forbidden,
        RemotingCode::TopicNotExist => pb::Code::TopicNotFound,
        RemotingCode::ServiceNotAvailable => pb::Code::InternalServerError,
        _ => pb::Code::InternalError,
    }
}

/// What a connected client told us about itself.
struct Client {
    kind: pb::ClientType,
    /// Topics it publishes to (producers).
    topics: Vec<String>,
    telemetry: Option<mpsc::UnboundedSender<Result<pb::TelemetryCommand, Status>>>,
    seen: Instant,
}

struct Front {
    broker: Arc<Broker>,
    port: Port,
    state: Arc<RocketMqState>,
    endpoint: pb::Endpoints,
    pop: Mutex<Pop>,
    clients: Mutex<HashMap<String, Client>>,
    data: Arc<Notify>,
    settings: GrpcSettings,
    /// Committed offsets not yet written (see [`Front::store_offset`]).
    dirty: Mutex<HashMap<(String, String, i32), i64>>,
    /// This listener's requests, for the metrics endpoint.
    stats: Arc<ApiStats>,
}

/// A message read for delivery.
struct Leased {
    record: Record,
    queue: i32,
    handle: String,
    attempt: i32,
}

impl Front {
    /// Runs `op` on the partition's owner core.
    async fn call(&self, key: PartKey, op: PartOp) -> PartResult {
        let (tx, rx) = oneshot::channel();
        self.port.call(key, op, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or(PartResult::Unknown)
    }

    /// A consumer's read on the partition's owner core that never waits there on the
    /// disk: pages out of memory are brought in by the file worker while this waits for
    /// them (here, off the cores), then it reads again — three times at most, then it
    /// reads whatever it costs (pages evicted as fast as they come back).
    async fn read(&self, key: PartKey, shared: Option<&Arc<PartitionShared>>, offset: i64, max: usize) -> PartResult {
        for _ in 0..3 {
            let warmed = shared.map_or(0, |s| s.warmed());
            match self.call(key, PartOp::ReadResident { offset, max_bytes: max }).await {
                PartResult::Read(r) if r.cold => {}
                other => return other,
            }
            let Some(shared) = shared else { return self.call(key, PartOp::Read { offset, max_bytes: max }).await };
            // The notifier fires when the file worker is done (armed before the check, as
            // the other waits here: no wake is missed).
            loop {
                let notified = self.data.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.warmed() != warmed {
                    break;
                }
                notified.await;
            }
        }
        self.call(key, PartOp::Read { offset, max_bytes: max }).await
    }

    /// File-system work (topic creation, offset commits) off this thread's event loop.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Arc<Broker>) -> T + Send + 'static) -> Option<T> {
        let broker = self.broker.clone();
        tokio::task::spawn_blocking(move || f(&broker)).await.ok()
    }

    /// The topic, made if missing when the broker auto-creates topics.
    async fn topic(&self, r: Option<&pb::Resource>, create: bool) -> Result<Arc<Topic>, Option<pb::Status>> {
        let name = r.map(|r| r.name.as_str()).unwrap_or_default();
        if name.is_empty() || !crate::broker::valid_topic_name(name) || name == schedule::TIMER_TOPIC {
            return Err(status(pb::Code::IllegalTopic, format!("topic '{name}' is not a valid topic")));
        }
        if let Some(t) = self.broker.topic(name) {
            return Ok(t);
        }
        if !create || !self.broker.settings.auto_create_topics {
            return Err(status(pb::Code::TopicNotFound, format!("topic '{name}' does not exist")));
        }
        let owned = name.to_string();
        match self.blocking(move |b| ensure_topic(b, &owned)).await {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(status(pb::Code::InternalError, format!("creating topic '{name}': {e}"))),
            None => Err(status(pb::Code::InternalError, "topic creation was interrupted")),
        }
    }

    fn queue(&self, topic: &Topic, id: i32, perm: pb::Permission) -> pb::MessageQueue {
        pb::MessageQueue {
            topic: Some(pb::Resource { resource_namespace: String::new(), name: topic.name().to_string() }),
            id,
            permission: perm as i32,
            broker: Some(pb::Broker {
                name: self.state.broker_name.clone(),
                id: 0,
                endpoints: Some(self.endpoint.clone()),
            }),
            accept_message_types: [
                pb::MessageType::Normal,
                pb::MessageType::Fifo,
                pb::MessageType::Delay,
                pb::MessageType::Transaction,
            ]
            .iter()
            .map(|t| *t as i32)
            .collect(),
        }
    }

    /// The transaction id of a half waiting at `offset` of the timer queue: an offset
    /// message id, as RocketMQ's are.
    fn transaction_id(&self, offset: i64) -> Option<String> {
        let timer = self.broker.topic(schedule::TIMER_TOPIC)?;
        let physical = message::physical_offset(message::topic_tag(&timer.meta.id), 0, offset);
        Some(message::offset_msg_id(self.state.store_host, physical))
    }

    fn timer_offset(&self, id: &str) -> Option<i64> {
        let timer = self.broker.topic(schedule::TIMER_TOPIC)?;
        let tail = id.get(id.len().checked_sub(16)?..)?;
        let (tag, queue, offset) = message::split_physical_offset(i64::from_str_radix(tail, 16).ok()?);
        (tag == message::topic_tag(&timer.meta.id) && queue == 0).then_some(offset)
    }

    /// Sends messages for one queue of one topic: one append for all of them (a batch),
    /// or one each when any waits in the timer queue (delay, transaction). One result per
    /// message, in order.
    async fn send_to_queue(&self, ms: Vec<pb::Message>, peer: Option<SocketAddr>) -> Vec<pb::SendResultEntry> {
        let ids: Vec<String> =
            ms.iter().map(|m| m.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default()).collect();
        let failed = |i: usize, status: Option<pb::Status>| pb::SendResultEntry {
            status,
            message_id: ids[i].clone(),
            ..Default::default()
        };
        let all = |status: Option<pb::Status>| (0..ids.len()).map(|i| failed(i, status.clone())).collect();
        let topic = match self.topic(ms.first().and_then(|m| m.topic.as_ref()), false).await {
            Ok(t) => t,
            Err(s) => return all(s),
        };
        let qid = ms.first().and_then(|m| m.system_properties.as_ref()).map(|s| s.queue_id).unwrap_or(0);
        let Some(key) = topic.key(qid) else {
            let why = format!("queue {qid} of {} does not exist ({} queues)", topic.name(), topic.meta.partitions);
            return all(status(pb::Code::BadRequest, why));
        };
        let mut out: Vec<Option<pb::SendResultEntry>> = vec![None; ids.len()];
        let mut good = Vec::new();
        for (i, m) in ms.into_iter().enumerate() {
            match convert::from_pb(m, peer) {
                Ok(msg) => good.push((i, msg)),
                Err((code, why)) => out[i] = Some(failed(i, status(code, why))),
            }
        }
        let waits = |m: &message::Message| {
            m.property(convert::P_TIMER_DELIVER_MS).is_some() || m.property("TRAN_MSG").is_some()
        };
        let groups: Vec<Vec<(usize, message::Message)>> = if good.len() > 1 && !good.iter().any(|(_, m)| waits(m)) {
            vec![good]
        } else {
            good.into_iter().map(|g| vec![g]).collect()
        };
        for group in groups {
            let (idx, mut msgs): (Vec<usize>, Vec<message::Message>) = group.into_iter().unzip();
            let batch = msgs.len() > 1;
            let plan = plan_send(&self.broker, &self.state, &topic, qid, key, &mut msgs, 0, "", batch);
            let SendPlan { key, batch, transaction_id, .. } = match plan {
                Ok(p) => p,
                Err((code, why)) => {
                    for &i in &idx {
                        out[i] = Some(failed(i, status(code_of(code), why.clone())));
                    }
                    continue;
                }
            };
            let result = self.call(key, PartOp::Append { records: batch }).await;
            for (n, &i) in idx.iter().enumerate() {
                out[i] = Some(match &result {
                    PartResult::Appended(info, _) => pb::SendResultEntry {
                        status: ok(),
                        message_id: ids[i].clone(),
                        transaction_id: transaction_id
                            .as_ref()
                            .and_then(|_| self.transaction_id(info.base_offset))
                            .unwrap_or_default(),
                        offset: info.base_offset + n as i64,
                        recall_handle: String::new(),
                    },
                    PartResult::Failed { error, .. } => {
                        log::warn!("rocketmq-grpc: send to {}-{qid} refused: {error}", topic.name());
                        failed(i, status(pb::Code::InternalError, error.to_string()))
                    }
                    _ => failed(i, status(pb::Code::TopicNotFound, format!("topic {} is gone", topic.name()))),
                });
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, e)| e.unwrap_or_else(|| failed(i, status(pb::Code::InternalError, "not sent"))))
            .collect()
    }

    /// Where a group starts on a queue it has no state for: its committed offset, else
    /// the start of the log.
    fn start_offset(&self, group: &str, topic: &Topic, queue: i32) -> i64 {
        let start = topic.shared(queue).map(|s| s.log_start()).unwrap_or(0);
        match self.broker.groups.lock().committed(group, topic.name(), queue) {
            Some(c) => c.offset.max(start),
            None => start,
        }
    }

    /// Notes a group's new committed offset for a queue; [`Front::store_offsets`] writes
    /// what changed every [`OFFSET_FLUSH`] (and at shutdown), as RocketMQ brokers persist
    /// consumer offsets periodically: one file write per interval, not one per ack.
    fn store_offset(&self, group: &str, topic: &str, queue: i32, offset: i64) {
        self.dirty.lock().insert((group.to_string(), topic.to_string(), queue), offset);
    }

    /// Writes the offsets noted since the last call (blocking: the file worker's kind of
    /// work, run from `spawn_blocking` or at shutdown).
    fn store_offsets(broker: &Broker, dirty: HashMap<(String, String, i32), i64>) {
        for ((group, topic, queue), offset) in dirty {
            if let Err(e) = commit(broker, &group, &topic, queue, offset, Instant::now()) {
                log::warn!("rocketmq-grpc: storing the offset of {group} on {topic}-{queue}: {e}");
            }
        }
    }

    /// Flushes noted offsets every [`OFFSET_FLUSH`] until the runtime stops, and forgets
    /// clients that left without saying so.
    async fn offset_flusher(self: Arc<Self>) {
        loop {
            tokio::time::sleep(OFFSET_FLUSH).await;
            self.clients.lock().retain(|_, c| c.telemetry.is_some() || c.seen.elapsed() < CLIENT_FORGOTTEN);
            let dirty = std::mem::take(&mut *self.dirty.lock());
            if !dirty.is_empty() {
                let broker = self.broker.clone();
                let _ = tokio::task::spawn_blocking(move || Front::store_offsets(&broker, dirty)).await;
            }
        }
    }

    /// The record at `offset` of a queue.
    async fn read_one(&self, key: PartKey, offset: i64) -> Option<Record> {
        record_at(Some(self.call(key, PartOp::Read { offset, max_bytes: 1 }).await), offset)
    }

    /// Whether a client is still with us (it heartbeats every 10 s and has not said
    /// goodbye).
    fn alive(&self, client: &str) -> bool {
        self.clients.lock().get(client).is_some_and(|c| c.seen.elapsed() < CLIENT_GONE)
    }

    /// One pass over `queues`: expired messages again (or to the dead-letter queue), then
    /// new ones, up to `max`.
    #[allow(clippy::too_many_arguments)]
    async fn pop_once(
        &self,
        group: &str,
        topic: &Arc<Topic>,
        queues: &[i32],
        filter: &TagFilter,
        max: usize,
        invisible_ms: i64,
        renew_for: Option<&str>,
    ) -> Vec<Leased> {
        let mut out: Vec<Leased> = Vec::new();
        let name = topic.name();
        for &q in queues {
            if out.len() >= max {
                break;
            }
            let Some(key) = topic.key(q) else { continue };
            // Load the queue's state, and take what is due again.
            let now = now_ms();
            let expired = {
                let mut pop = self.pop.lock();
                if pop.queue(group, name, q).next.is_none() {
                    let start = self.start_offset(group, topic, q);
                    pop.queue(group, name, q).next = Some(start);
                }
                let due = pop.queue(group, name, q).expired(now, max - out.len());
                let mut again = Vec::new();
                for (offset, f) in due {
                    // A push consumer's message stays invisible while that client lives.
                    let renew = f.renew_for.as_deref().is_some_and(|c| self.alive(c));
                    let next = if renew { f.attempt } else { f.attempt + 1 };
                    let lease =
                        Lease { attempt: next, visible_at: now + invisible_ms, renew_for: f.renew_for, group: f.group };
                    let handle = pop.lease(group, name, q, offset, lease);
                    if !renew {
                        again.push((offset, next, handle));
                    }
                }
                again
            };
            // Held-back FIFO messages whose group is free again.
            let released: Vec<(i64, i32, String)> = {
                let mut pop = self.pop.lock();
                let free = pop.queue(group, name, q).release(max.saturating_sub(out.len() + expired.len()));
                free.into_iter()
                    .map(|(offset, g)| {
                        let lease = Lease {
                            attempt: 1,
                            visible_at: now + invisible_ms,
                            renew_for: renew_for.map(str::to_string),
                            group: Some(g),
                        };
                        (offset, 1, pop.lease(group, name, q, offset, lease))
                    })
                    .collect()
            };
            for (offset, attempt, handle) in expired.into_iter().chain(released) {
                let Some(record) = self.read_one(key, offset).await else {
                    // Gone (retention): nothing to deliver.
                    let _ = self.finish(group, name, &handle);
                    continue;
                };
                if attempt > self.settings.max_delivery_attempts {
                    self.dead_letter(group, name, q, &record, &handle).await;
                    continue;
                }
                out.push(Leased { record, queue: q, handle, attempt });
            }
            if out.len() >= max {
                break;
            }
            // New messages from the queue's next offset.
            let (next, full) = {
                let mut pop = self.pop.lock();
                let queue = pop.queue(group, name, q);
                (queue.next, queue.inflight.len() >= pop::MAX_INFLIGHT)
            };
            let Some(next) = next.filter(|_| !full) else { continue };
            let shared = topic.shared(q).cloned();
            if shared.as_ref().is_some_and(|s| s.next_offset() <= next) {
                continue;
            }
            let records = match self.read(key, shared.as_ref(), next, READ_BYTES).await {
                PartResult::Read(r) => {
                    let mut buf = r.records.bytes().clone();
                    let mut all = Vec::new();
                    while !buf.is_empty() {
                        match RecordBatchDecoder::decode(&mut buf) {
                            Ok(set) => all.extend(set.records),
                            Err(e) => {
                                log::warn!("rocketmq-grpc: a batch of {name}-{q} cannot be read: {e}");
                                break;
                            }
                        }
                    }
                    all
                }
                PartResult::Failed { error: crate::log::LogError::OffsetOutOfRange { .. }, .. } => {
                    // Retention passed the group: go on from the log start.
                    let start = shared.map(|s| s.log_start()).unwrap_or(next);
                    let mut pop = self.pop.lock();
                    let queue = pop.queue(group, name, q);
                    queue.next = queue.next.map(|n| n.max(start));
                    continue;
                }
                _ => continue,
            };
            let now = now_ms();
            let mut pop = self.pop.lock();
            let before = pop.queue(group, name, q).committed();
            let mut taken_groups: Vec<String> = Vec::new();
            for rec in records {
                let queue = pop.queue(group, name, q);
                let Some(next) = queue.next else { break };
                if rec.offset < next {
                    continue;
                }
                if out.len() >= max {
                    break;
                }
                if queue.held.len() >= pop::MAX_HELD {
                    break;
                }
                queue.next = Some(rec.offset + 1);
                if rec.control || !filter.matches(message::record_tag(&rec)) {
                    continue;
                }
                let msg_group = header(&rec, convert::P_SHARDING_KEY).map(str::to_string);
                if let Some(g) = &msg_group {
                    // An earlier message of its group is in flight, held back, or taken
                    // in this pass: this one waits its turn.
                    let waiting = queue.held.values().any(|h| h == g);
                    if queue.group_busy(g) || waiting || taken_groups.contains(g) {
                        queue.held.insert(rec.offset, g.clone());
                        continue;
                    }
                }
                let lease = Lease {
                    attempt: 1,
                    visible_at: now + invisible_ms,
                    renew_for: renew_for.map(str::to_string),
                    group: msg_group.clone(),
                };
                let handle = pop.lease(group, name, q, rec.offset, lease);
                if let Some(g) = msg_group {
                    taken_groups.push(g);
                }
                out.push(Leased { record: rec, queue: q, handle, attempt: 1 });
            }
            let after = pop.queue(group, name, q).committed();
            drop(pop);
            if after != before {
                if let Some(offset) = after {
                    self.store_offset(group, name, q, offset);
                }
            }
        }
        out
    }

    /// Moves a message that had all its deliveries to `%DLQ%group`, then ends it.
    async fn dead_letter(&self, group: &str, topic: &str, queue: i32, record: &Record, handle: &str) -> pb::Code {
        let dlq = format!("%DLQ%{group}");
        let owned = dlq.clone();
        let Some(Ok(t)) = self.blocking(move |b| ensure_topic(b, &owned)).await else {
            log::warn!("rocketmq-grpc: cannot make {dlq}");
            return pb::Code::InternalError;
        };
        let Some(key) = t.key(0) else { return pb::Code::InternalError };
        let mut m = message::record_to_message(record, self.state.store_host);
        m.properties.retain(|(k, _)| k != "RETRY_TOPIC" && k != "DLQ_ORIGIN_TOPIC");
        m.properties.push(("RETRY_TOPIC".into(), topic.to_string()));
        m.properties.push(("DLQ_ORIGIN_TOPIC".into(), topic.to_string()));
        m.properties.push(("DLQ_ORIGIN_QUEUE_ID".into(), queue.to_string()));
        m.properties.push(("DLQ_ORIGIN_QUEUE_OFFSET".into(), record.offset.to_string()));
        let Ok(batch) = message::encode_batch(&[message::to_record(&m)]) else { return pb::Code::InternalError };
        match self.call(key, PartOp::Append { records: batch }).await {
            PartResult::Appended(..) => {
                log::info!("rocketmq-grpc: {topic}-{queue}@{} of {group} moved to {dlq}", record.offset);
                let _ = self.finish(group, topic, handle);
                pb::Code::Ok
            }
            other => {
                log::warn!("rocketmq-grpc: moving a message to {dlq} failed: {other:?}");
                pb::Code::InternalError
            }
        }
    }

    /// Ends a delivery and stores the offset it lets the group commit.
    fn finish(&self, group: &str, topic: &str, handle: &str) -> Result<(), pop::HandleError> {
        let (queue, committed) = self.pop.lock().finish(group, topic, handle)?;
        // A FIFO group may be free now: waiting receives look again.
        self.data.notify_waiters();
        if let Some(offset) = committed {
            self.store_offset(group, topic, queue, offset);
        }
        Ok(())
    }

    fn delivered(&self, topic: &Topic, l: &Leased, invisible_ms: i64) -> pb::Message {
        let physical = message::physical_offset(message::topic_tag(&topic.meta.id), l.queue, l.record.offset);
        let at = Delivery {
            topic: topic.name(),
            queue_id: l.queue,
            store_host: self.state.store_host,
            fallback_id: message::offset_msg_id(self.state.store_host, physical),
            receipt_handle: Some(l.handle.clone()),
            attempt: l.attempt,
            invisible_ms: Some(invisible_ms),
        };
        convert::to_pb(&l.record, &at)
    }

    /// Sends a transaction check-back to a gRPC producer of the half's topic (any gRPC
    /// producer when none publishes to it). Runs on the scheduler's core: no waiting.
    fn check_back(&self, record: &Record, offset: i64) -> bool {
        let Some(topic) = header(record, schedule::P_REAL_TOPIC).map(str::to_string) else { return false };
        let queue: i32 = header(record, schedule::P_REAL_QID).and_then(|q| q.parse().ok()).unwrap_or(0);
        let Some(txid) = self.transaction_id(offset) else { return false };
        let clients = self.clients.lock();
        let producers = || clients.values().filter(|c| c.kind == pb::ClientType::Producer && c.telemetry.is_some());
        let Some(client) = producers().find(|c| c.topics.contains(&topic)).or_else(|| producers().next()) else {
            return false;
        };
        let mut copy = record.clone();
        copy.offset = offset;
        let at = Delivery {
            topic: &topic,
            queue_id: queue,
            store_host: self.state.store_host,
            fallback_id: txid.clone(),
            receipt_handle: None,
            attempt: 1,
            invisible_ms: None,
        };
        let cmd = pb::TelemetryCommand {
            status: ok(),
            command: Some(pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                pb::RecoverOrphanedTransactionCommand {
                    message: Some(convert::to_pb(&copy, &at)),
                    transaction_id: txid,
                },
            )),
        };
        client.telemetry.as_ref().is_some_and(|tx| tx.send(Ok(cmd)).is_ok())
    }

    /// The settings a client gets back on its telemetry stream.
    fn settings_for(&self, mine: &pb::Settings) -> pb::Settings {
        let backoff = |max_attempts: i32, initial: i64, max: i64| pb::RetryPolicy {
            max_attempts,
            strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(pb::ExponentialBackoff {
                initial: Some(convert::duration(initial)),
                max: Some(convert::duration(max)),
                multiplier: 2.0,
            })),
        };
        let mut s = mine.clone();
        match &mut s.pub_sub {
            Some(pb::settings::PubSub::Publishing(p)) => {
                p.max_body_size = convert::MAX_BODY as i32;
                p.validate_message_type = false;
                s.backoff_policy = Some(backoff(3, 10, 1000));
            }
            Some(pb::settings::PubSub::Subscription(sub)) => {
                // Order is kept by the broker (see the module doc): consumers need not
                // serialise themselves.
                sub.fifo = Some(false);
                sub.receive_batch_size = Some(sub.receive_batch_size.unwrap_or(32));
                if sub.long_polling_timeout.is_none() {
                    sub.long_polling_timeout = Some(convert::duration(MAX_POLL.as_millis() as i64));
                }
                s.backoff_policy = Some(backoff(self.settings.max_delivery_attempts, 1000, 60_000));
            }
            None => {}
        }
        s
    }

    fn seen(&self, id: &str, kind: Option<pb::ClientType>) {
        let mut clients = self.clients.lock();
        let c = clients.entry(id.to_string()).or_insert_with(|| Client {
            kind: kind.unwrap_or(pb::ClientType::Unspecified),
            topics: Vec::new(),
            telemetry: None,
            seen: Instant::now(),
        });
        c.seen = Instant::now();
        if let Some(k) = kind.filter(|k| *k != pb::ClientType::Unspecified) {
            c.kind = k;
        }
    }
}

/// The client id every request carries (`x-mq-client-id`).
fn client_id<T>(req: &Request<T>) -> Result<String, Status> {
    req.metadata()
        .get("x-mq-client-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Status::invalid_argument("x-mq-client-id metadata is required"))
}

fn group_name(r: Option<&pb::Resource>) -> Result<String, Option<pb::Status>> {
    let g = r.map(|r| r.name.clone()).unwrap_or_default();
    if g.is_empty() || g.len() > 255 || g.contains(['\u{1}', '\u{2}', '/']) {
        return Err(status(pb::Code::IllegalConsumerGroup, format!("consumer group '{g}' is not valid")));
    }
    Ok(g)
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn once<T: Send + 'static>(items: Vec<T>) -> Stream_<T> {
    Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))
}

/// The tonic service: a handle on the front.
struct Service(Arc<Front>);

/// The handlers; [`Counting`] serves them, counted.
impl Service {
    async fn query_route(
        &self,
        req: Request<pb::QueryRouteRequest>,
    ) -> Result<Response<pb::QueryRouteResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        Ok(Response::new(match f.topic(req.topic.as_ref(), true).await {
            Ok(t) => pb::QueryRouteResponse {
                status: ok(),
                message_queues: (0..t.meta.partitions).map(|q| f.queue(&t, q, pb::Permission::ReadWrite)).collect(),
            },
            Err(s) => pb::QueryRouteResponse { status: s, message_queues: Vec::new() },
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = client_id(&req)?;
        let kind = pb::ClientType::try_from(req.get_ref().client_type).ok();
        self.0.seen(&id, kind);
        Ok(Response::new(pb::HeartbeatResponse { status: ok() }))
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let peer = req.remote_addr();
        let messages = req.into_inner().messages;
        if messages.is_empty() {
            return Ok(Response::new(pb::SendMessageResponse {
                status: status(pb::Code::BadRequest, "no message to send"),
                entries: Vec::new(),
            }));
        }
        // Consecutive messages for the same queue go as one batch.
        let mut entries = Vec::with_capacity(messages.len());
        let mut run: Vec<pb::Message> = Vec::new();
        let same = |a: &pb::Message, b: &pb::Message| {
            a.topic.as_ref().map(|t| &t.name) == b.topic.as_ref().map(|t| &t.name)
                && a.system_properties.as_ref().map(|s| s.queue_id) == b.system_properties.as_ref().map(|s| s.queue_id)
        };
        for m in messages {
            if run.last().is_some_and(|last| !same(last, &m)) {
                entries.extend(self.0.send_to_queue(std::mem::take(&mut run), peer).await);
            }
            run.push(m);
        }
        entries.extend(self.0.send_to_queue(run, peer).await);
        // The request's status: the one failure when all failed alike, else OK or
        // MULTIPLE_RESULTS (clients read each entry).
        let codes: Vec<i32> = entries.iter().map(|e| e.status.as_ref().map(|s| s.code).unwrap_or(0)).collect();
        let status = if codes.iter().all(|c| *c == pb::Code::Ok as i32) {
            ok()
        } else if entries.len() == 1 {
            entries[0].status.clone()
        } else {
            status(pb::Code::MultipleResults, "see each entry")
        };
        Ok(Response::new(pb::SendMessageResponse { status, entries }))
    }

    async fn query_assignment(
        &self,
        req: Request<pb::QueryAssignmentRequest>,
    ) -> Result<Response<pb::QueryAssignmentResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        if let Err(s) = group_name(req.group.as_ref()) {
            return Ok(Response::new(pb::QueryAssignmentResponse { status: s, assignments: Vec::new() }));
        }
        Ok(Response::new(match f.topic(req.topic.as_ref(), false).await {
            // One assignment for the broker: queue -1, every queue (consumers of a group
            // share them message by message, not queue by queue).
            Ok(t) => pb::QueryAssignmentResponse {
                status: ok(),
                assignments: vec![pb::Assignment { message_queue: Some(f.queue(&t, -1, pb::Permission::ReadWrite)) }],
            },
            Err(s) => pb::QueryAssignmentResponse { status: s, assignments: Vec::new() },
        }))
    }

    async fn receive_message(
        &self,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> Result<Response<Stream_<pb::ReceiveMessageResponse>>, Status> {
        let id = client_id(&req)?;
        let req = req.into_inner();
        log::trace!("rocketmq-grpc: receive from {id}: {req:?}");
        let f = &self.0;
        let fail = |s: Option<pb::Status>| {
            log::trace!("rocketmq-grpc: receive answered {s:?}");
            Ok(Response::new(once(vec![pb::ReceiveMessageResponse {
                content: s.map(pb::receive_message_response::Content::Status),
            }])))
        };
        let group = match group_name(req.group.as_ref()) {
            Ok(g) => g,
            Err(s) => return fail(s),
        };
        let mq = req.message_queue.unwrap_or_default();
        let topic = match f.topic(mq.topic.as_ref(), false).await {
            Ok(t) => t,
            Err(s) => return fail(s),
        };
        let filter = match req.filter_expression {
            Some(e) if e.r#type == pb::FilterType::Sql as i32 => {
                return fail(status(pb::Code::NotImplemented, "SQL92 filters are not supported; use tags"))
            }
            Some(e) => TagFilter::parse(&e.expression),
            None => TagFilter::All,
        };
        // Pop consumption is per broker, not per queue: the proxy takes from every queue
        // of the broker the request's queue names (and 1.0.8 of the Node.js client only
        // ever names queue 0). A queue this topic does not have is still refused.
        if mq.id < -1 || mq.id >= topic.meta.partitions {
            return fail(status(pb::Code::BadRequest, format!("queue {} of {} does not exist", mq.id, topic.name())));
        }
        let queues: Vec<i32> = (0..topic.meta.partitions).collect();
        let batch = usize::try_from(req.batch_size).unwrap_or(0);
        if batch == 0 || batch > MAX_BATCH {
            return fail(status(
                pb::Code::BadRequest,
                format!("batch size {} is not within 1..{MAX_BATCH}", req.batch_size),
            ));
        }
        let invisible_ms = match (req.invisible_duration.as_ref().map(convert::millis), req.auto_renew) {
            (Some(ms), _) if ms > 0 => ms,
            (_, true) => AUTO_RENEW_MS,
            _ => return fail(status(pb::Code::IllegalInvisibleTime, "an invisible duration is required")),
        };
        let poll = req.long_polling_timeout.as_ref().map(convert::millis).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_millis(poll.max(0) as u64).min(MAX_POLL);
        f.seen(&id, None);
        // Start from a different queue each time, so one busy queue does not starve others.
        let mut queues = queues;
        let turn = (now_ms() as usize) % queues.len().max(1);
        queues.rotate_left(turn);
        let leased = loop {
            let notified = f.data.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let renew_for = req.auto_renew.then_some(id.as_str());
            let leased = f.pop_once(&group, &topic, &queues, &filter, batch, invisible_ms, renew_for).await;
            if !leased.is_empty() || Instant::now() >= deadline {
                break leased;
            }
            // New data, the next redelivery, or the deadline, whichever comes first.
            let wake = deadline.min(Instant::now() + Duration::from_millis(500));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        };
        if leased.is_empty() {
            return fail(status(pb::Code::MessageNotFound, "no new message"));
        }
        let mut out =
            vec![pb::ReceiveMessageResponse { content: ok().map(pb::receive_message_response::Content::Status) }];
        for l in &leased {
            out.push(pb::ReceiveMessageResponse {
                content: Some(pb::receive_message_response::Content::Message(f.delivered(&topic, l, invisible_ms))),
            });
        }
        let now = now_ms();
        out.push(pb::ReceiveMessageResponse {
            content: Some(pb::receive_message_response::Content::DeliveryTimestamp(prost_types::Timestamp {
                seconds: now / 1000,
                nanos: ((now % 1000) * 1_000_000) as i32,
            })),
        });
        Ok(Response::new(once(out)))
    }

    async fn ack_message(
        &self,
        req: Request<pb::AckMessageRequest>,
    ) -> Result<Response<pb::AckMessageResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let group = match group_name(req.group.as_ref()) {
            Ok(g) => g,
            Err(s) => return Ok(Response::new(pb::AckMessageResponse { status: s, entries: Vec::new() })),
        };
        let topic = req.topic.map(|t| t.name).unwrap_or_default();
        let mut entries = Vec::new();
        let mut failed = 0;
        for e in req.entries {
            let s = match f.finish(&group, &topic, &e.receipt_handle) {
                Ok(()) => ok(),
                Err(why) => {
                    failed += 1;
                    status(pb::Code::InvalidReceiptHandle, format!("receipt handle is {why:?}").to_lowercase())
                }
            };
            entries.push(pb::AckMessageResultEntry {
                message_id: e.message_id,
                receipt_handle: e.receipt_handle,
                status: s,
            });
        }
        let status = match (failed, entries.len()) {
            (0, _) => ok(),
            (_, 1) => entries[0].status.clone(),
            _ => status(pb::Code::MultipleResults, "see each entry"),
        };
        Ok(Response::new(pb::AckMessageResponse { status, entries }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<pb::ForwardMessageToDeadLetterQueueResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let reply = |s| Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse { status: s }));
        let group = match group_name(req.group.as_ref()) {
            Ok(g) => g,
            Err(s) => return reply(s),
        };
        let topic = match f.topic(req.topic.as_ref(), false).await {
            Ok(t) => t,
            Err(s) => return reply(s),
        };
        let checked = f.pop.lock().check(&group, topic.name(), &req.receipt_handle);
        let (h, _) = match checked {
            Ok(x) => x,
            Err(why) => return reply(status(pb::Code::InvalidReceiptHandle, format!("receipt handle is {why:?}"))),
        };
        let Some(key) = topic.key(h.queue) else { return reply(status(pb::Code::BadRequest, "no such queue")) };
        let Some(record) = f.read_one(key, h.offset).await else {
            return reply(status(pb::Code::MessageNotFound, "the message is no longer in the log"));
        };
        let code = f.dead_letter(&group, topic.name(), h.queue, &record, &req.receipt_handle).await;
        reply(status(code, if code == pb::Code::Ok { "OK" } else { "the dead-letter queue refused the message" }))
    }

    async fn pull_message(
        &self,
        req: Request<pb::PullMessageRequest>,
    ) -> Result<Response<Stream_<pb::PullMessageResponse>>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let fail = |s: Option<pb::Status>| {
            Ok(Response::new(once(vec![pb::PullMessageResponse {
                content: s.map(pb::pull_message_response::Content::Status),
            }])))
        };
        let mq = req.message_queue.unwrap_or_default();
        let topic = match f.topic(mq.topic.as_ref(), false).await {
            Ok(t) => t,
            Err(s) => return fail(s),
        };
        let (Some(key), Some(shared)) = (topic.key(mq.id), topic.shared(mq.id).cloned()) else {
            return fail(status(pb::Code::BadRequest, format!("queue {} of {} does not exist", mq.id, topic.name())));
        };
        let filter = TagFilter::parse(&req.filter_expression.map(|e| e.expression).unwrap_or_default());
        let batch = usize::try_from(req.batch_size).unwrap_or(0).clamp(1, MAX_BATCH);
        let poll = req.long_polling_timeout.as_ref().map(convert::millis).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_millis(poll as u64).min(MAX_POLL);
        if req.offset < shared.log_start() || req.offset > shared.next_offset() {
            return fail(status(pb::Code::IllegalOffset, format!("offset {} is outside the queue", req.offset)));
        }
        loop {
            let notified = f.data.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.next_offset() > req.offset {
                break;
            }
            if Instant::now() >= deadline {
                return fail(status(pb::Code::MessageNotFound, "no new message"));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        let PartResult::Read(r) = f.read(key, Some(&shared), req.offset, READ_BYTES).await else {
            return fail(status(pb::Code::InternalError, "the queue cannot be read"));
        };
        let mut buf = r.records.bytes().clone();
        let mut out = vec![pb::PullMessageResponse { content: ok().map(pb::pull_message_response::Content::Status) }];
        let mut next = req.offset;
        'read: while !buf.is_empty() {
            let Ok(set) = RecordBatchDecoder::decode(&mut buf) else { break };
            for rec in set.records {
                if rec.offset < next {
                    continue;
                }
                if out.len() > batch {
                    break 'read;
                }
                next = rec.offset + 1;
                if rec.control || !filter.matches(message::record_tag(&rec)) {
                    continue;
                }
                let physical = message::physical_offset(message::topic_tag(&topic.meta.id), mq.id, rec.offset);
                let at = Delivery {
                    topic: topic.name(),
                    queue_id: mq.id,
                    store_host: f.state.store_host,
                    fallback_id: message::offset_msg_id(f.state.store_host, physical),
                    receipt_handle: None,
                    attempt: 1,
                    invisible_ms: None,
                };
                out.push(pb::PullMessageResponse {
                    content: Some(pb::pull_message_response::Content::Message(convert::to_pb(&rec, &at))),
                });
            }
        }
        out.push(pb::PullMessageResponse { content: Some(pb::pull_message_response::Content::NextOffset(next)) });
        Ok(Response::new(once(out)))
    }

    async fn update_offset(
        &self,
        req: Request<pb::UpdateOffsetRequest>,
    ) -> Result<Response<pb::UpdateOffsetResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let reply = |s| Ok(Response::new(pb::UpdateOffsetResponse { status: s }));
        let group = match group_name(req.group.as_ref()) {
            Ok(g) => g,
            Err(s) => return reply(s),
        };
        let mq = req.message_queue.unwrap_or_default();
        let topic = match f.topic(mq.topic.as_ref(), false).await {
            Ok(t) => t,
            Err(s) => return reply(s),
        };
        if topic.key(mq.id).is_none() || req.offset < 0 {
            return reply(status(pb::Code::BadRequest, "no such queue, or a negative offset"));
        }
        let (name, offset, q) = (topic.name().to_string(), req.offset, mq.id);
        let stored = f.blocking(move |b| commit(b, &group, &name, q, offset, Instant::now())).await;
        reply(match stored {
            Some(Ok(())) => ok(),
            Some(Err(e)) => status(pb::Code::InternalError, e),
            None => status(pb::Code::InternalError, "interrupted"),
        })
    }

    async fn get_offset(&self, req: Request<pb::GetOffsetRequest>) -> Result<Response<pb::GetOffsetResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let reply = |s, offset| Ok(Response::new(pb::GetOffsetResponse { status: s, offset }));
        let group = match group_name(req.group.as_ref()) {
            Ok(g) => g,
            Err(s) => return reply(s, 0),
        };
        let mq = req.message_queue.unwrap_or_default();
        let topic = match f.topic(mq.topic.as_ref(), false).await {
            Ok(t) => t,
            Err(s) => return reply(s, 0),
        };
        let committed = f.broker.groups.lock().committed(&group, topic.name(), mq.id).map(|c| c.offset);
        match committed {
            Some(o) => reply(ok(), o),
            None => reply(status(pb::Code::OffsetNotFound, "the group has no offset on this queue"), 0),
        }
    }

    async fn query_offset(
        &self,
        req: Request<pb::QueryOffsetRequest>,
    ) -> Result<Response<pb::QueryOffsetResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let reply = |s, offset| Ok(Response::new(pb::QueryOffsetResponse { status: s, offset }));
        let mq = req.message_queue.unwrap_or_default();
        let topic = match f.topic(mq.topic.as_ref(), false).await {
            Ok(t) => t,
            Err(s) => return reply(s, 0),
        };
        let (Some(key), Some(shared)) = (topic.key(mq.id), topic.shared(mq.id).cloned()) else {
            return reply(status(pb::Code::BadRequest, "no such queue"), 0);
        };
        match pb::QueryOffsetPolicy::try_from(req.query_offset_policy) {
            Ok(pb::QueryOffsetPolicy::Beginning) => reply(ok(), shared.log_start()),
            Ok(pb::QueryOffsetPolicy::End) => reply(ok(), shared.next_offset()),
            Ok(pb::QueryOffsetPolicy::Timestamp) => {
                let Some(ts) = req.timestamp else {
                    return reply(status(pb::Code::BadRequest, "timestamp missing"), 0);
                };
                let ms = ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000;
                match f.call(key, PartOp::OffsetForTime { timestamp: ms }).await {
                    PartResult::Offset(o) => reply(ok(), o.unwrap_or_else(|| shared.next_offset())),
                    _ => reply(status(pb::Code::InternalError, "the queue cannot be searched"), 0),
                }
            }
            Err(_) => reply(status(pb::Code::BadRequest, "unknown offset policy"), 0),
        }
    }

    async fn end_transaction(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let reply = |s| Ok(Response::new(pb::EndTransactionResponse { status: s }));
        let Some(offset) = f.timer_offset(&req.transaction_id) else {
            return reply(status(
                pb::Code::InvalidTransactionId,
                format!("unknown transaction id '{}'", req.transaction_id),
            ));
        };
        let commit_it = match pb::TransactionResolution::try_from(req.resolution) {
            Ok(pb::TransactionResolution::Commit) => true,
            Ok(pb::TransactionResolution::Rollback) => false,
            // Unknown: the check-backs will ask again.
            _ => return reply(ok()),
        };
        let Some(timer) = f.broker.topic(schedule::TIMER_TOPIC).and_then(|t| t.key(0)) else {
            return reply(status(pb::Code::InvalidTransactionId, "no transaction is pending"));
        };
        if !f.state.timers.lock().claim(offset) {
            // Resolved already, or being checked right now: its next check asks again.
            return reply(ok());
        }
        let unclaim = |why: String, code: pb::Code| {
            f.state.timers.lock().unclaim(offset, now_ms() + f.state.tx.interval.as_millis() as i64);
            reply(status(code, why))
        };
        let Some(record) = f.read_one(timer, offset).await else {
            return unclaim(format!("no half message at {offset}"), pb::Code::InvalidTransactionId);
        };
        if header(&record, convert::P_UNIQ_KEY) != Some(req.message_id.as_str()) {
            return unclaim("the transaction id names another message".into(), pb::Code::InvalidTransactionId);
        }
        let ops = match schedule::resolution(&f.broker, &record, commit_it) {
            Ok(ops) => ops,
            Err(why) => return unclaim(why, pb::Code::InternalError),
        };
        for (key, op) in ops {
            if let PartResult::Failed { error, .. } = f.call(key, op).await {
                return unclaim(format!("committing the transaction: {error}"), pb::Code::InternalError);
            }
        }
        match schedule::marker_batch(&[offset]) {
            Ok(mark) => {
                if !matches!(f.call(timer, PartOp::Append { records: mark }).await, PartResult::Appended(..)) {
                    log::warn!(
                        "rocketmq-grpc: the resolution of half {offset} was not marked; a restart checks it again"
                    );
                }
            }
            Err(e) => log::warn!("rocketmq-grpc: marker: {e}"),
        }
        reply(ok())
    }

    async fn telemetry(
        &self,
        req: Request<tonic::Streaming<pb::TelemetryCommand>>,
    ) -> Result<Response<Stream_<pb::TelemetryCommand>>, Status> {
        let id = client_id(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let front = self.0.clone();
        tokio::spawn(async move {
            loop {
                let cmd = match inbound.message().await {
                    Ok(Some(cmd)) => cmd,
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("rocketmq-grpc: telemetry of {id} ended: {e}");
                        break;
                    }
                };
                match cmd.command {
                    Some(pb::telemetry_command::Command::Settings(s)) => {
                        let kind = s.client_type.and_then(|k| pb::ClientType::try_from(k).ok());
                        front.seen(&id, kind);
                        if let Some(c) = front.clients.lock().get_mut(&id) {
                            c.telemetry = Some(tx.clone());
                            if let Some(pb::settings::PubSub::Publishing(p)) = &s.pub_sub {
                                c.topics = p.topics.iter().map(|t| t.name.clone()).collect();
                            }
                        }
                        let answer = pb::TelemetryCommand {
                            status: ok(),
                            command: Some(pb::telemetry_command::Command::Settings(front.settings_for(&s))),
                        };
                        if tx.send(Ok(answer)).is_err() {
                            break;
                        }
                    }
                    Some(other) => log::debug!("rocketmq-grpc: telemetry from {id}: {other:?}"),
                    None => {}
                }
            }
            if let Some(c) = front.clients.lock().get_mut(&id) {
                c.telemetry = None;
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn notify_client_termination(
        &self,
        req: Request<pb::NotifyClientTerminationRequest>,
    ) -> Result<Response<pb::NotifyClientTerminationResponse>, Status> {
        let id = client_id(&req)?;
        self.0.clients.lock().remove(&id);
        Ok(Response::new(pb::NotifyClientTerminationResponse { status: ok() }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<pb::ChangeInvisibleDurationResponse>, Status> {
        let req = req.into_inner();
        let f = &self.0;
        let reply = |s, handle: String| {
            Ok(Response::new(pb::ChangeInvisibleDurationResponse { status: s, receipt_handle: handle }))
        };
        let group = match group_name(req.group.as_ref()) {
            Ok(g) => g,
            Err(s) => return reply(s, String::new()),
        };
        let topic = req.topic.map(|t| t.name).unwrap_or_default();
        let Some(ms) = req.invisible_duration.as_ref().map(convert::millis) else {
            return reply(status(pb::Code::IllegalInvisibleTime, "an invisible duration is required"), String::new());
        };
        if ms > 12 * 3600 * 1000 {
            return reply(status(pb::Code::IllegalInvisibleTime, "at most 12 hours"), String::new());
        }
        let extended = f.pop.lock().extend(&group, &topic, &req.receipt_handle, now_ms() + ms);
        match extended {
            Ok(handle) => reply(ok(), handle),
            Err(why) => {
                reply(status(pb::Code::InvalidReceiptHandle, format!("receipt handle is {why:?}")), String::new())
            }
        }
    }

    async fn recall_message(
        &self,
        _: Request<pb::RecallMessageRequest>,
    ) -> Result<Response<pb::RecallMessageResponse>, Status> {
        Err(Status::unimplemented("RecallMessage is not served by slipstream"))
    }

    async fn sync_lite_subscription(
        &self,
        _: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> Result<Response<pb::SyncLiteSubscriptionResponse>, Status> {
        Err(Status::unimplemented("lite topics are not served by slipstream"))
    }
}

/// The rpcs by metrics slot, named as the service definition names them.
const RPCS: [&str; 17] = [
    "QueryRoute",
    "Heartbeat",
    "SendMessage",
    "QueryAssignment",
    "ReceiveMessage",
    "AckMessage",
    "ForwardMessageToDeadLetterQueue",
    "PullMessage",
    "UpdateOffset",
    "GetOffset",
    "QueryOffset",
    "EndTransaction",
    "Telemetry",
    "NotifyClientTermination",
    "ChangeInvisibleDuration",
    "RecallMessage",
    "SyncLiteSubscription",
];

/// The metrics' names: rpcs, and status codes as `apache.rocketmq.v2.Code` spells them.
static NAMES: Names = Names {
    api: |slot| RPCS.get(slot).map_or_else(|| "unknown".to_string(), |r| r.to_string()),
    error: |code| pb::Code::try_from(code).map_or_else(|_| code.to_string(), |c| c.as_str_name().to_string()),
};

/// A status code other than OK, for the error counts.
fn error_code(s: Option<&pb::Status>) -> Option<i32> {
    s.map(|s| s.code).filter(|c| *c != pb::Code::Ok as i32)
}

impl Front {
    /// Counts an rpc that began at `started` and ended now: a gRPC error status
    /// (rejected before a handler answered) as a failure, else its status code.
    fn count(&self, slot: usize, started: Instant, result: Result<Option<i32>, ()>) {
        match result {
            Ok(code) => {
                self.stats.answered(slot, started.elapsed());
                if let Some(code) = code {
                    self.stats.error_answered(slot, code);
                }
            }
            Err(()) => self.stats.failed(slot),
        }
    }
}

/// A response stream that counts the status codes it carries, and its rpc when it ends
/// (or the client goes): a long poll's wait, or a telemetry session's life, is its
/// duration.
struct CountedStream<T> {
    inner: Stream_<T>,
    front: Arc<Front>,
    slot: usize,
    started: Instant,
    code_of: fn(&T) -> Option<i32>,
}

impl<T> Stream for CountedStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        let next = self.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(item))) = &next {
            if let Some(code) = (self.code_of)(item) {
                self.front.stats.error_answered(self.slot, code);
            }
        }
        next
    }
}

impl<T> Drop for CountedStream<T> {
    fn drop(&mut self) {
        self.front.stats.answered(self.slot, self.started.elapsed());
    }
}

/// The tonic service: each rpc of [`Service`], counted in the listener's metrics.
struct Counting(Service);

impl Counting {
    fn stream<T: Send + 'static>(
        &self,
        slot: usize,
        started: Instant,
        result: Result<Response<Stream_<T>>, Status>,
        code_of: fn(&T) -> Option<i32>,
    ) -> Result<Response<Stream_<T>>, Status> {
        let front = self.0 .0.clone();
        match result {
            Ok(r) => {
                Ok(r.map(|inner| -> Stream_<T> { Box::pin(CountedStream { inner, front, slot, started, code_of }) }))
            }
            Err(e) => {
                front.count(slot, started, Err(()));
                Err(e)
            }
        }
    }
}

/// The unary rpcs, each counted with its status code (slots as in [`RPCS`]).
macro_rules! counting {
    ($($slot:literal $rpc:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl MessagingService for Counting {
            $(
                async fn $rpc(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    let started = Instant::now();
                    let result = self.0.$rpc(req).await;
                    let code = result.as_ref().map(|r| error_code(r.get_ref().status.as_ref())).map_err(|_| ());
                    self.0 .0.count($slot, started, code);
                    result
                }
            )*

            type ReceiveMessageStream = Stream_<pb::ReceiveMessageResponse>;

            async fn receive_message(
                &self,
                req: Request<pb::ReceiveMessageRequest>,
            ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
                let started = Instant::now();
                let result = self.0.receive_message(req).await;
                self.stream(4, started, result, |r| match &r.content {
                    Some(pb::receive_message_response::Content::Status(s)) => error_code(Some(s)),
                    _ => None,
                })
            }

            type PullMessageStream = Stream_<pb::PullMessageResponse>;

            async fn pull_message(
                &self,
                req: Request<pb::PullMessageRequest>,
            ) -> Result<Response<Self::PullMessageStream>, Status> {
                let started = Instant::now();
                let result = self.0.pull_message(req).await;
                self.stream(7, started, result, |r| match &r.content {
                    Some(pb::pull_message_response::Content::Status(s)) => error_code(Some(s)),
                    _ => None,
                })
            }

            type TelemetryStream = Stream_<pb::TelemetryCommand>;

            async fn telemetry(
                &self,
                req: Request<tonic::Streaming<pb::TelemetryCommand>>,
            ) -> Result<Response<Self::TelemetryStream>, Status> {
                let started = Instant::now();
                let result = self.0.telemetry(req).await;
                self.stream(12, started, result, |c| error_code(c.status.as_ref()))
            }
        }
    };
}

counting! {
    0 query_route(pb::QueryRouteRequest) -> pb::QueryRouteResponse;
    1 heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
    2 send_message(pb::SendMessageRequest) -> pb::SendMessageResponse;
    3 query_assignment(pb::QueryAssignmentRequest) -> pb::QueryAssignmentResponse;
    5 ack_message(pb::AckMessageRequest) -> pb::AckMessageResponse;
    6 forward_message_to_dead_letter_queue(pb::ForwardMessageToDeadLetterQueueRequest)
        -> pb::ForwardMessageToDeadLetterQueueResponse;
    8 update_offset(pb::UpdateOffsetRequest) -> pb::UpdateOffsetResponse;
    9 get_offset(pb::GetOffsetRequest) -> pb::GetOffsetResponse;
    10 query_offset(pb::QueryOffsetRequest) -> pb::QueryOffsetResponse;
    11 end_transaction(pb::EndTransactionRequest) -> pb::EndTransactionResponse;
    13 notify_client_termination(pb::NotifyClientTerminationRequest) -> pb::NotifyClientTerminationResponse;
    14 change_invisible_duration(pb::ChangeInvisibleDurationRequest) -> pb::ChangeInvisibleDurationResponse;
    15 recall_message(pb::RecallMessageRequest) -> pb::RecallMessageResponse;
    16 sync_lite_subscription(pb::SyncLiteSubscriptionRequest) -> pb::SyncLiteSubscriptionResponse;
}
