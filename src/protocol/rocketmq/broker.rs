//! The broker role: sends, pulls (with long polling), consumer offsets, the consumer
//! registry, queue offsets and topic creation.

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::RecordBatchDecoder;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::codes::{Request, Response, PULL_COMMIT_OFFSET, PULL_SUBSCRIPTION, PULL_SUSPEND};
use super::frame::Command;
use super::message::{self, Message, TagFilter};
use super::namesrv::ensure_topic;
use super::schedule;
use super::{commit, error, gather_then, ok, record_at, step, AfterFiles, Conn, Reply, RocketMqState};
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{Broker, PartKey, PartitionShared, Topic};
use crate::dispatch::session::{self, Cx, Fault, Step};
use crate::log::{now_ms, LogError};
use crate::metrics::{self, Path};

/// The most a pull reads from a queue in one go (it answers at most `maxMsgNums`).
const PULL_READ_BYTES: usize = 1 << 20;
/// A suspended pull's longest wait, whatever the client asks.
const MAX_SUSPEND: Duration = Duration::from_secs(30);

pub fn handle(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    match Request::from_code(req.code) {
        Some(Request::SendMessage | Request::SendMessageV2) => send(cx, conn, req, false),
        Some(Request::SendBatchMessage) => send(cx, conn, req, true),
        Some(Request::PullMessage) => pull(cx, conn, req),
        Some(Request::QueryConsumerOffset) => query_offset(cx, req),
        Some(Request::UpdateConsumerOffset) => update_offset(cx, req),
        Some(Request::HeartBeat) => heartbeat(cx, conn, req),
        Some(Request::UnregisterClient) => {
            if let Some(client) = req.field("clientID") {
                conn.state.clients.unregister(req.field("consumerGroup"), req.field("producerGroup"), client);
            }
            Reply::Done(ok(req))
        }
        Some(Request::LockBatchMq) => lock_batch(cx, conn, req, true),
        Some(Request::EndTransaction) => end_transaction(cx, conn, req),
        Some(Request::UnlockBatchMq) => lock_batch(cx, conn, req, false),
        Some(Request::GetConsumerListByGroup) => {
            let group = req.field("consumerGroup").unwrap_or_default();
            let ids = conn.state.clients.members(group, cx.now);
            if ids.is_empty() {
                return error(req, Response::SystemError, format!("no consumer for this group, {group}"));
            }
            let mut resp = ok(req);
            resp.body = serde_json::to_vec(&serde_json::json!({ "consumerIdList": ids })).unwrap_or_default().into();
            Reply::Done(resp)
        }
        Some(Request::GetMaxOffset) => queue_offset(cx, req, |s| s.next_offset()),
        Some(Request::GetMinOffset) => queue_offset(cx, req, |s| s.log_start()),
        Some(Request::SearchOffsetByTimestamp) => search_offset(cx, req),
        Some(Request::GetEarliestMsgStoreTime) => earliest_time(cx, req),
        Some(Request::UpdateAndCreateTopic) => create_topic(cx, req),
        Some(Request::ConsumerSendMsgBack) => send_back(cx, conn, req),
        Some(Request::ViewMessageById) => super::lookup::view_by_id(cx, conn, req),
        Some(Request::QueryMessage) => super::lookup::query(cx, conn, req),
        Some(Request::CheckClientConfig) => Reply::Done(ok(req)),
        _ => error(
            req,
            Response::RequestCodeNotSupported,
            format!("request code {} is not supported by slipstream's RocketMQ broker", req.code),
        ),
    }
}

fn int<T: std::str::FromStr>(req: &Command, names: &[&str]) -> Option<T> {
    names.iter().find_map(|n| req.field(n)).and_then(|v| v.trim().parse().ok())
}

/// The queue a request names: its topic, partition key and shared counters.
fn queue(
    cx: &Cx<'_>,
    req: &Command,
    topic_field: &[&str],
    queue_field: &[&str],
) -> Result<(Arc<Topic>, i32, PartKey, Arc<PartitionShared>), Reply> {
    let name = topic_field.iter().find_map(|n| req.field(n)).unwrap_or_default();
    let Some(topic) = cx.broker.topic(name) else {
        return Err(error(req, Response::TopicNotExist, format!("topic[{name}] not exist, apply first please!")));
    };
    let queue_id: i32 = int(req, queue_field).unwrap_or(-1);
    match (topic.key(queue_id), topic.shared(queue_id).cloned()) {
        (Some(key), Some(shared)) => Ok((topic, queue_id, key, shared)),
        _ => Err(error(
            req,
            Response::SystemError,
            format!("queueId[{queue_id}] is illegal, topic: {name} has {} queues", topic.meta.partitions),
        )),
    }
}

fn topic_tag(topic: &Topic) -> u16 {
    message::topic_tag(&topic.meta.id)
}

fn gather<F>(ops: Vec<(PartKey, PartOp)>, then: F) -> Reply
where
    F: FnOnce(&Cx<'_>, Vec<PartResult>) -> Step + Send + 'static,
{
    Reply::Step(gather_then(ops, then))
}

fn log_error_reply(req: &Command, e: &LogError) -> Reply {
    match e {
        LogError::Io { .. } => error(
            req,
            Response::ServiceNotAvailable,
            format!("service not available now: the message cannot be stored ({e})"),
        ),
        LogError::TooLarge { .. } | LogError::Corrupt(_) | LogError::Empty => {
            error(req, Response::MessageIllegal, e.to_string())
        }
        _ => error(req, Response::SystemError, e.to_string()),
    }
}

fn send(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command, batch: bool) -> Reply {
    let (topic, queue_id, key, _) = match queue(cx, req, &["topic", "b"], &["queueId", "e"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let sys_flag: i32 = int(req, &["sysFlag", "f"]).unwrap_or(0);
    let born_timestamp: i64 = int(req, &["bornTimestamp", "g"]).unwrap_or_else(now_ms);
    let reconsume_times: i32 = int(req, &["reconsumeTimes", "j"]).unwrap_or(0);
    let properties = message::parse_properties(req.field("properties").or(req.field("i")).unwrap_or_default());
    let mut messages = Vec::new();
    if batch {
        match message::decode_batch(&req.body) {
            Ok(list) => {
                for (flag, body, mut props) in list {
                    // The batch's own properties (e.g. WAIT) apply to each message.
                    for (k, v) in &properties {
                        if !props.iter().any(|(pk, _)| pk == k) {
                            props.push((k.clone(), v.clone()));
                        }
                    }
                    messages.push(Message {
                        flag,
                        born_timestamp,
                        born_host: Some(conn.peer),
                        reconsume_times,
                        properties: props,
                        body,
                    });
                }
            }
            Err(e) => return error(req, Response::MessageIllegal, format!("batch body: {e}")),
        }
    } else {
        let (body, _) = match message::plain_body(req.body.clone(), sys_flag) {
            Ok(b) => b,
            Err(e) => return error(req, Response::MessageIllegal, e.to_string()),
        };
        messages.push(Message {
            flag: int(req, &["flag", "h"]).unwrap_or(0),
            born_timestamp,
            born_host: Some(conn.peer),
            reconsume_times,
            properties,
            body,
        });
    }
    if messages.is_empty() {
        return error(req, Response::MessageIllegal, "no message in the request");
    }
    let group = req.field("producerGroup").or(req.field("a")).unwrap_or_default();
    let plan = match plan_send(cx.broker, conn.state, &topic, queue_id, key, &mut messages, sys_flag, group, batch) {
        Ok(p) => p,
        Err((code, why)) => return error(req, code, why),
    };
    let SendPlan { key, tag, batch: batch_bytes, transaction_id } = plan;
    let count = messages.len() as i64;
    let (req, store_host) = (req.head(), conn.state.store_host);
    gather(vec![(key, PartOp::Append { records: batch_bytes })], move |_cx, results| {
        let reply = match results.first() {
            Some(PartResult::Appended(info, _)) => {
                let ids: Vec<String> = (0..count)
                    .map(|i| {
                        message::offset_msg_id(
                            store_host,
                            message::physical_offset(tag, queue_id, info.base_offset + i),
                        )
                    })
                    .collect();
                let mut resp = ok(&req)
                    .with("msgId", ids.join(","))
                    .with("queueId", queue_id)
                    .with("queueOffset", info.base_offset)
                    .with("MSG_REGION", "DefaultRegion")
                    .with("TRACE_ON", "true");
                if let Some(id) = transaction_id {
                    resp = resp.with("transactionId", id);
                }
                Reply::Done(resp)
            }
            Some(PartResult::Failed { error: e, .. }) => {
                log::warn!("RocketMQ send to {}-{queue_id} refused: {e}", topic.name());
                log_error_reply(&req, e)
            }
            _ => error(&req, Response::TopicNotExist, format!("topic[{}] not exist any more", topic.name())),
        };
        step(&req, reply)
    })
}

/// What a send appends, and where: the one send path of remoting and gRPC producers.
pub(crate) struct SendPlan {
    pub key: PartKey,
    /// The topic tag of the partition appended to (for message ids).
    pub tag: u16,
    pub batch: Bytes,
    /// A transactional half's id (its `UNIQ_KEY`).
    pub transaction_id: Option<String>,
}

/// Routes `messages` for queue `queue_id` (`key`) of `topic`: a message due later, or a
/// transactional half (`sys_flag` or `TRAN_MSG`), goes to the timer queue with its
/// destination in its properties; then encodes the one record batch to append.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_send(
    broker: &Broker,
    state: &RocketMqState,
    topic: &Topic,
    queue_id: i32,
    key: PartKey,
    messages: &mut [Message],
    sys_flag: i32,
    producer_group: &str,
    batch: bool,
) -> Result<SendPlan, (Response, String)> {
    if let Some(m) = messages.iter().find(|m| message::format_properties(&m.properties).len() > i16::MAX as usize) {
        let len = message::format_properties(&m.properties).len();
        return Err((Response::MessageIllegal, message::MessageError::PropertiesTooLong(len).to_string()));
    }
    if topic.name() == schedule::TIMER_TOPIC {
        return Err((Response::NoPermission, format!("{} is a system topic", schedule::TIMER_TOPIC)));
    }
    // A message due later waits in the timer queue; the answer still names the queue the
    // producer chose (as RocketMQ's does), with the offset in the timer queue.
    let mut target = (key, topic_tag(topic));
    // Where a message that waits goes: the timer queue, made by the scheduler at start.
    let timer = || {
        let t = broker.topic(schedule::TIMER_TOPIC);
        t.and_then(|t| Some((t.key(0)?, topic_tag(&t))))
            .ok_or_else(|| (Response::ServiceNotAvailable, "the scheduler is starting; try again".to_string()))
    };
    let now = now_ms();
    for m in messages.iter_mut() {
        match schedule::due(m, &state.delay_levels, now) {
            Ok(None) => {}
            Ok(Some(_)) if batch => return Err((Response::MessageIllegal, "a batch message cannot be delayed".into())),
            Ok(Some(due)) => {
                target = timer()?;
                schedule::to_timer(m, topic.name(), queue_id, due);
            }
            Err(e) => return Err((Response::MessageIllegal, e)),
        }
    }
    // A transactional half waits in the timer queue, invisible, until END_TRANSACTION
    // (or a check-back) resolves it.
    let mut transaction_id = None;
    if let [m] = &mut messages[..] {
        if schedule::is_half(m, sys_flag) {
            target = timer()?;
            if m.property(schedule::P_TRAN_MSG).is_none() {
                m.properties.push((schedule::P_TRAN_MSG.into(), "true".into()));
            }
            if m.property("PGROUP").is_none() {
                m.properties.push(("PGROUP".into(), producer_group.into()));
            }
            transaction_id = m.property("UNIQ_KEY").map(str::to_string);
            let due = now + state.tx.first_check.as_millis() as i64;
            schedule::to_timer(m, topic.name(), queue_id, due);
        }
    }
    let records: Vec<_> = messages.iter().map(message::to_record).collect();
    let batch = message::encode_batch(&records).map_err(|e| (Response::SystemError, e.to_string()))?;
    metrics::count_copy(Path::RocketMqSend, messages.iter().map(|m| m.body.len()).sum());
    Ok(SendPlan { key: target.0, tag: target.1, batch, transaction_id })
}

/// A pull, from its first read to its answer (it may park and read again).
#[derive(Clone)]
struct PullPlan {
    req: Command,
    topic: Arc<Topic>,
    queue_id: i32,
    key: PartKey,
    shared: Arc<PartitionShared>,
    offset: i64,
    max_msgs: usize,
    /// The most bytes to read (the client's `maxMsgBytes`, within our own cap).
    max_bytes: usize,
    filter: TagFilter,
    suspend: bool,
    deadline: Instant,
    store_host: SocketAddr,
}

fn pull(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let (topic, queue_id, key, shared) = match queue(cx, req, &["topic"], &["queueId"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let group = req.field("consumerGroup").unwrap_or_default().to_string();
    let sys_flag: i32 = int(req, &["sysFlag"]).unwrap_or(0);
    if req.field("expressionType").is_some_and(|t| !t.eq_ignore_ascii_case("TAG")) {
        return error(req, Response::SubscriptionParseFailed, "only TAG subscriptions are supported by slipstream");
    }
    let filter = if sys_flag & PULL_SUBSCRIPTION != 0 {
        TagFilter::parse(req.field("subscription").unwrap_or("*"))
    } else {
        conn.state.clients.subscription(&group, topic.name()).unwrap_or(TagFilter::All)
    };
    if sys_flag & PULL_COMMIT_OFFSET != 0 {
        if let Some(offset) = int::<i64>(req, &["commitOffset"]).filter(|o| *o >= 0) {
            // The pull does not wait for its piggy-backed commit (RocketMQ's does not
            // either); the commit is stored, in order, by the file worker.
            let broker = cx.broker.clone();
            let (t, now) = (topic.name().to_string(), cx.now);
            drop(cx.broker.files.run(move || commit(&broker, &group, &t, queue_id, offset, now)));
        }
    }
    let suspend_ms: u64 = int(req, &["suspendTimeoutMillis"]).unwrap_or(0);
    let plan = PullPlan {
        req: req.head(),
        store_host: conn.state.store_host,
        topic,
        queue_id,
        key,
        shared,
        offset: int(req, &["queueOffset"]).unwrap_or(0),
        max_msgs: int::<usize>(req, &["maxMsgNums"]).unwrap_or(32).clamp(1, 1024),
        max_bytes: int::<usize>(req, &["maxMsgBytes"]).unwrap_or(PULL_READ_BYTES).clamp(1, PULL_READ_BYTES),
        filter,
        suspend: sys_flag & PULL_SUSPEND != 0,
        deadline: cx.now + Duration::from_millis(suspend_ms).min(MAX_SUSPEND),
    };
    Reply::Step(plan.next(cx.now, false))
}

impl PullPlan {
    /// Reads if there is something to read, parks if the client may wait, answers else.
    fn next(self, now: Instant, force: bool) -> Step {
        let (start, end) = (self.shared.log_start(), self.shared.next_offset());
        if self.offset < start || self.offset > end {
            let next = self.offset.clamp(start, end);
            return self.answer(Response::PullOffsetMoved, next);
        }
        if self.offset == end {
            if self.suspend && !force && now < self.deadline {
                let appended = self.shared.appended();
                return Step::Park(Box::new(ParkedPull { plan: self, appended, warmed: None }));
            }
            return self.answer(Response::PullNotFound, self.offset);
        }
        // Never waits on the disk in the owner core: pages out of memory come back cold.
        let op = PartOp::ReadResident { offset: self.offset, max_bytes: self.max_bytes };
        let warmed = self.shared.warmed();
        gather_then(vec![(self.key, op)], move |cx, r| self.read(cx, r, warmed, force))
    }

    /// `warmed`: the queue's count of pages brought in when the read was sent; `force`:
    /// answer now (deadline passed, shutdown), whatever the read found.
    fn read(self, cx: &Cx<'_>, results: Vec<PartResult>, warmed: u64, force: bool) -> Step {
        let read = match results.into_iter().next() {
            // The pages are being brought in: wait for them (or the client's deadline:
            // then it pulls again at once).
            Some(PartResult::Read(r)) if r.cold => {
                if !force && cx.now < self.deadline {
                    let appended = self.shared.appended();
                    return Step::Park(Box::new(ParkedPull { plan: self, appended, warmed: Some(warmed) }));
                }
                return self.answer(Response::PullRetryImmediately, self.offset);
            }
            Some(PartResult::Read(r)) => r,
            Some(PartResult::Failed { error: LogError::OffsetOutOfRange { .. }, .. }) => {
                // Retention moved the start since we looked: the counters say where now.
                return self.next(cx.now, true);
            }
            Some(PartResult::Failed { error: e, .. }) => return step(&self.req, log_error_reply(&self.req, &e)),
            _ => return step(&self.req, error(&self.req, Response::TopicNotExist, "topic deleted")),
        };
        let mut body = BytesMut::new();
        let (mut found, mut next) = (0usize, self.offset);
        let mut buf = read.records.bytes().clone();
        'batches: while !buf.is_empty() {
            let set = match RecordBatchDecoder::decode(&mut buf) {
                Ok(s) => s,
                Err(e) => {
                    if found > 0 {
                        break;
                    }
                    let remark = format!("a batch at offset {next} cannot be read by RocketMQ consumers: {e}");
                    return step(&self.req, error(&self.req, Response::SystemError, remark));
                }
            };
            for rec in &set.records {
                if rec.offset < next {
                    continue;
                }
                next = rec.offset + 1;
                if rec.control || !self.filter.matches(message::record_tag(rec)) {
                    continue;
                }
                message::encode_stored(&mut body, &self.topic, self.queue_id, rec, self.store_host);
                found += 1;
                if found >= self.max_msgs {
                    break 'batches;
                }
            }
        }
        if found > 0 {
            let mut resp = self.header(Response::Success, next);
            resp.body = body.freeze();
            return step(&self.req, Reply::Done(resp));
        }
        if next > self.offset {
            // Read past messages the subscription does not take.
            return self.answer(Response::PullRetryImmediately, next);
        }
        self.next(cx.now, true)
    }

    fn header(&self, code: Response, next: i64) -> Command {
        Command::response_to(&self.req, code.code(), None)
            .with("suggestWhichBrokerId", 0)
            .with("nextBeginOffset", next)
            .with("minOffset", self.shared.log_start())
            .with("maxOffset", self.shared.next_offset())
    }

    fn answer(&self, code: Response, next: i64) -> Step {
        step(&self.req, Reply::Done(self.header(code, next)))
    }
}

/// A pull waiting for a message (or its deadline): re-polled from the queue's lock-free
/// counters, without asking its owner.
struct ParkedPull {
    plan: PullPlan,
    appended: u64,
    /// Waiting for the queue's pages to be brought in: its `warmed` count when it read.
    warmed: Option<u64>,
}

impl session::Parked for ParkedPull {
    fn deadline(&self) -> Option<Instant> {
        Some(self.plan.deadline)
    }

    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        let moved =
            self.plan.shared.appended() != self.appended || self.warmed.is_some_and(|w| self.plan.shared.warmed() != w);
        if !(moved || force || cx.now >= self.plan.deadline) {
            return None;
        }
        Some(Ok(self.plan.clone().next(cx.now, force || cx.now >= self.plan.deadline)))
    }
}

fn query_offset(cx: &Cx<'_>, req: &Command) -> Reply {
    let (topic, queue_id, _, _) = match queue(cx, req, &["topic"], &["queueId"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let group = req.field("consumerGroup").unwrap_or_default();
    match cx.broker.groups.lock().committed(group, topic.name(), queue_id) {
        Some(c) => Reply::Done(ok(req).with("offset", c.offset)),
        None => error(req, Response::QueryNotFound, "Not found, maybe this group consumer boot first"),
    }
}

fn update_offset(cx: &Cx<'_>, req: &Command) -> Reply {
    let (topic, queue_id, _, _) = match queue(cx, req, &["topic"], &["queueId"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let Some(offset) = int::<i64>(req, &["commitOffset"]) else {
        return error(req, Response::SystemError, "commitOffset missing");
    };
    let group = req.field("consumerGroup").unwrap_or_default().to_string();
    let (broker, req, now) = (cx.broker.clone(), req.head(), cx.now);
    Reply::Blocking(cx.broker.files.run(move || match commit(&broker, &group, topic.name(), queue_id, offset, now) {
        Ok(()) => ok(&req),
        Err(e) => Command::response_to(&req, Response::SystemError.code(), Some(e)),
    }))
}

fn heartbeat(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let data: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return error(req, Response::SystemError, format!("heartbeat body is not JSON: {e}")),
    };
    let Some(client) = data.get("clientID").and_then(Value::as_str) else {
        return error(req, Response::SystemError, "heartbeat without clientID");
    };
    for p in data.get("producerDataSet").and_then(Value::as_array).into_iter().flatten() {
        if let Some(group) = p.get("groupName").and_then(Value::as_str) {
            conn.state.clients.producer_heartbeat(group, client, conn.id, cx.now);
        }
    }
    let mut retry_topics = Vec::new();
    for c in data.get("consumerDataSet").and_then(Value::as_array).into_iter().flatten() {
        let Some(group) = c.get("groupName").and_then(Value::as_str) else { continue };
        let mut subs = HashMap::new();
        for s in c.get("subscriptionDataSet").and_then(Value::as_array).into_iter().flatten() {
            if let Some(topic) = s.get("topic").and_then(Value::as_str) {
                let expr = s.get("subString").and_then(Value::as_str).unwrap_or("*");
                subs.insert(topic.to_string(), TagFilter::parse(expr));
            }
        }
        conn.state.clients.heartbeat(group, client, conn.id, subs, cx.now);
        if c.get("messageModel").and_then(Value::as_str) != Some("BROADCASTING") {
            let retry = format!("%RETRY%{group}");
            if cx.broker.topic(&retry).is_none() {
                retry_topics.push(retry);
            }
        }
    }
    if retry_topics.is_empty() {
        return Reply::Done(ok(req));
    }
    // Clustering consumers subscribe to their retry topic: it exists once they heartbeat,
    // as a RocketMQ broker makes it.
    let (broker, req) = (cx.broker.clone(), req.head());
    Reply::Blocking(cx.broker.files.run(move || {
        for t in retry_topics {
            if let Err(e) = ensure_topic(&broker, &t) {
                return Command::response_to(&req, Response::SystemError.code(), Some(e.to_string()));
            }
        }
        ok(&req)
    }))
}

fn queue_offset(cx: &Cx<'_>, req: &Command, f: impl Fn(&PartitionShared) -> i64) -> Reply {
    match queue(cx, req, &["topic"], &["queueId"]) {
        Ok((_, _, _, shared)) => Reply::Done(ok(req).with("offset", f(&shared))),
        Err(r) => r,
    }
}

fn search_offset(cx: &Cx<'_>, req: &Command) -> Reply {
    let (_, _, key, shared) = match queue(cx, req, &["topic"], &["queueId"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let timestamp: i64 = int(req, &["timestamp"]).unwrap_or(0);
    let req = req.head();
    gather(vec![(key, PartOp::OffsetForTime { timestamp })], move |_cx, results| {
        let offset = match results.first() {
            Some(PartResult::Offset(Some(o))) => *o,
            _ => shared.next_offset(),
        };
        step(&req, Reply::Done(ok(&req).with("offset", offset)))
    })
}

fn earliest_time(cx: &Cx<'_>, req: &Command) -> Reply {
    let (_, _, key, shared) = match queue(cx, req, &["topic"], &["queueId"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let req = req.head();
    let op = PartOp::Read { offset: shared.log_start(), max_bytes: 1 };
    gather(vec![(key, op)], move |_cx, results| {
        let ts = match results.first() {
            Some(PartResult::Read(r)) => {
                let mut b = r.records.bytes().clone();
                RecordBatchDecoder::decode(&mut b)
                    .ok()
                    .and_then(|s| s.records.first().map(|r| r.timestamp))
                    .unwrap_or(-1)
            }
            _ => -1,
        };
        step(&req, Reply::Done(ok(&req).with("timestamp", ts)))
    })
}

fn create_topic(cx: &Cx<'_>, req: &Command) -> Reply {
    let Some(name) = req.field("topic").map(str::to_string) else {
        return error(req, Response::SystemError, "topic missing");
    };
    let queues: i32 = int(req, &["writeQueueNums"]).or_else(|| int(req, &["readQueueNums"])).unwrap_or(-1);
    let (broker, req) = (cx.broker.clone(), req.head());
    Reply::Blocking(cx.broker.files.run(move || {
        let result = match broker.topic(&name) {
            Some(t) if queues > t.meta.partitions => broker.create_partitions(&name, queues, false),
            Some(_) => Ok(()),
            None => broker.create_topic(&name, queues, HashMap::new(), false).map(|_| ()),
        };
        match result {
            Ok(()) => ok(&req),
            Err(e) => Command::response_to(&req, Response::SystemError.code(), Some(e.to_string())),
        }
    }))
}

const P_RETRY_TOPIC: &str = "RETRY_TOPIC";
const P_ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
const RETRY_PREFIX: &str = "%RETRY%";
const DLQ_PREFIX: &str = "%DLQ%";
/// The first retry's delay level when the consumer leaves it to the broker (10 s by
/// default); each further retry goes one level up.
const FIRST_RETRY_LEVEL: i32 = 3;

/// CONSUMER_SEND_MSG_BACK: a message its consumer failed goes to the group's retry topic,
/// due after the back-off of its attempt, or after `maxReconsumeTimes` attempts (or when
/// the consumer asks, with a negative delay level) to the group's dead-letter topic.
fn send_back(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let Some(group) = req.field("group").map(str::to_string) else {
        return error(req, Response::SystemError, "group missing");
    };
    let Some(physical) = int::<i64>(req, &["offset"]) else {
        return error(req, Response::SystemError, "offset missing");
    };
    let delay_level: i32 = int(req, &["delayLevel"]).unwrap_or(0);
    let max_times: i32 = int(req, &["maxReconsumeTimes"]).unwrap_or(16);
    let origin_id = req.field("originMsgId").map(str::to_string);
    let (tag, queue_id, offset) = message::split_physical_offset(physical);
    // The message's topic is named by its id; the consumer's originTopic is a hint (it is
    // the original topic even for a message read from the retry topic).
    let retry_topic = format!("{RETRY_PREFIX}{group}");
    let candidates = [req.field("originTopic").map(str::to_string), Some(retry_topic)];
    let topic = candidates
        .iter()
        .flatten()
        .filter_map(|n| cx.broker.topic(n))
        .find(|t| topic_tag(t) == tag)
        .or_else(|| cx.broker.topics().into_iter().find(|t| topic_tag(t) == tag));
    let Some((topic, key)) = topic.and_then(|t| Some((t.clone(), t.key(queue_id)?))) else {
        return error(req, Response::SystemError, format!("no message at offset {physical}"));
    };
    let (req, store_host, levels) = (req.head(), conn.state.store_host, conn.state.delay_levels.clone());
    gather(vec![(key, PartOp::Read { offset, max_bytes: 1 })], move |cx, results| {
        let record = record_at(results.into_iter().next(), offset);
        let Some(record) = record else {
            return step(&req, error(&req, Response::SystemError, format!("no message at offset {physical}")));
        };
        let mut m = message::record_to_message(&record, store_host);
        let attempts = m.reconsume_times;
        let dead = delay_level < 0 || attempts >= max_times;
        let target = if dead { format!("{DLQ_PREFIX}{group}") } else { format!("{RETRY_PREFIX}{group}") };
        if !m.properties.iter().any(|(k, _)| k == P_RETRY_TOPIC) && !topic.name().starts_with(RETRY_PREFIX) {
            m.properties.push((P_RETRY_TOPIC.into(), topic.name().to_string()));
        }
        if let Some(id) = origin_id.filter(|_| !m.properties.iter().any(|(k, _)| k == P_ORIGIN_MESSAGE_ID)) {
            m.properties.push((P_ORIGIN_MESSAGE_ID.into(), id));
        }
        m.properties.retain(|(k, _)| k != schedule::P_DELAY);
        m.reconsume_times = attempts + 1;
        let due = if dead {
            None
        } else {
            let level = if delay_level == 0 { FIRST_RETRY_LEVEL + attempts } else { delay_level };
            Some(schedule::level_due(&levels, i64::from(level), now_ms()))
        };
        if dead {
            log::info!("group {group}: message {physical} failed {attempts} times; moved to {target}");
        }
        match cx.broker.topic(&target) {
            Some(_) => store_back(cx, req, m, target, due),
            None => {
                let (broker, name) = (cx.broker.clone(), target.clone());
                AfterFiles::step(
                    cx.broker.files.run(move || ensure_topic(&broker, &name).map_err(|e| e.to_string())),
                    {
                        move |cx, made| match made {
                            Ok(_) => store_back(cx, req, m, target, due),
                            Err(e) => step(&req, error(&req, Response::SystemError, e)),
                        }
                    },
                )
            }
        }
    })
}

/// Appends a sent-back message to its retry or dead-letter topic (through the timer
/// queue when it is due later) and answers.
fn store_back(cx: &Cx<'_>, req: Command, mut m: Message, target: String, due: Option<i64>) -> Step {
    let dest = match due {
        Some(due) => {
            schedule::to_timer(&mut m, &target, 0, due);
            schedule::TIMER_TOPIC
        }
        None => target.as_str(),
    };
    let Some(key) = cx.broker.topic(dest).and_then(|t| t.key(0)) else {
        return step(&req, error(&req, Response::ServiceNotAvailable, format!("{dest} is not there yet; try again")));
    };
    let records = match message::encode_batch(&[message::to_record(&m)]) {
        Ok(b) => b,
        Err(e) => return step(&req, error(&req, Response::SystemError, e.to_string())),
    };
    metrics::count_copy(Path::RocketMqSend, m.body.len());
    gather_then(vec![(key, PartOp::Append { records })], move |_cx, results| {
        let reply = match results.first() {
            Some(PartResult::Appended(..)) => Reply::Done(ok(&req)),
            Some(PartResult::Failed { error: e, .. }) => log_error_reply(&req, e),
            _ => error(&req, Response::SystemError, format!("{target} disappeared")),
        };
        step(&req, reply)
    })
}

/// LOCK_BATCH_MQ / UNLOCK_BATCH_MQ: the queue locks under which ordered consumers read
/// a queue one client at a time.
fn lock_batch(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command, lock: bool) -> Reply {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return error(req, Response::SystemError, format!("lock body is not JSON: {e}")),
    };
    let (Some(group), Some(client)) =
        (body.get("consumerGroup").and_then(Value::as_str), body.get("clientId").and_then(Value::as_str))
    else {
        return error(req, Response::SystemError, "consumerGroup and clientId are required");
    };
    let mut queues = Vec::new();
    let mut by_key = HashMap::new();
    for mq in body.get("mqSet").and_then(Value::as_array).into_iter().flatten() {
        let (Some(topic), Some(q)) =
            (mq.get("topic").and_then(Value::as_str), mq.get("queueId").and_then(Value::as_i64))
        else {
            continue;
        };
        by_key.insert((topic.to_string(), q as i32), mq.clone());
        queues.push((topic.to_string(), q as i32));
    }
    if !lock {
        conn.state.clients.unlock(group, client, &queues);
        return Reply::Done(ok(req));
    }
    let held = conn.state.clients.lock(group, client, &queues, cx.now);
    let set: Vec<Value> = held.iter().filter_map(|k| by_key.get(k).cloned()).collect();
    let mut resp = ok(req);
    resp.body = serde_json::to_vec(&serde_json::json!({ "lockOKMQSet": set })).unwrap_or_default().into();
    Reply::Done(resp)
}

/// `MessageSysFlag`'s commit and rollback types, as END_TRANSACTION carries them.
const TRANSACTION_COMMIT: i32 = 8;
const TRANSACTION_ROLLBACK: i32 = 12;

/// END_TRANSACTION: commits (appends the half to its destination) or rolls back a half
/// message, then marks it resolved in the timer queue. A half the scheduler is checking
/// right now, or already resolved, is left alone: its next check asks again.
fn end_transaction(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let kind: i32 = int(req, &["commitOrRollback"]).unwrap_or(0);
    if kind != TRANSACTION_COMMIT && kind != TRANSACTION_ROLLBACK {
        // Unknown: the check-backs will ask.
        return Reply::Done(ok(req));
    }
    let Some(offset) = int::<i64>(req, &["tranStateTableOffset"]) else {
        return error(req, Response::SystemError, "tranStateTableOffset missing");
    };
    let Some(timer) = cx.broker.topic(schedule::TIMER_TOPIC).and_then(|t| t.key(0)) else {
        return error(req, Response::SystemError, "no transaction is pending");
    };
    if !conn.state.timers.lock().claim(offset) {
        log::debug!("END_TRANSACTION for {offset}: resolved already or being checked");
        return Reply::Done(ok(req));
    }
    let (req, state) = (req.head(), conn.state.clone());
    let fail = move |req: &Command, why: String| {
        state.timers.lock().unclaim(offset, now_ms() + state.tx.interval.as_millis() as i64);
        step(req, error(req, Response::SystemError, why))
    };
    gather(vec![(timer, PartOp::Read { offset, max_bytes: 1 })], move |cx, results| {
        let record = record_at(results.into_iter().next(), offset);
        let Some(record) = record else { return fail(&req, format!("no half message at {offset}")) };
        let commit = match schedule::resolution(cx.broker, &record, kind == TRANSACTION_COMMIT) {
            Ok(ops) => ops,
            Err(why) => return fail(&req, why),
        };
        let Ok(mark) = schedule::marker_batch(&[offset]) else { return fail(&req, "marker".into()) };
        gather_then(commit, move |_cx, results| {
            if let Some(PartResult::Failed { error: e, .. }) = results.first() {
                return fail(&req, format!("committing the transaction: {e}"));
            }
            gather_then(vec![(timer, PartOp::Append { records: mark })], move |_cx, results| {
                if !matches!(results.first(), Some(PartResult::Appended(..))) {
                    log::warn!("the resolution of half {offset} was not marked; a restart checks it again");
                }
                step(&req, Reply::Done(ok(&req)))
            })
        })
    })
}
