//! Delayed delivery: delay levels (`DELAY`), timer messages (`TIMER_DELIVER_MS`,
//! `TIMER_DELAY_SEC`, `TIMER_DELAY_MS`, ONS's `__STARTDELIVERTIME`), the back-off of
//! retried messages, and the check-backs of transactional half messages, on the log.
//!
//! A transactional *half* message waits in the same queue, due at its first check. When
//! it falls due unresolved, the scheduler puts it back with its check count raised, due
//! one check interval later, marks the old copy, and sends CHECK_TRANSACTION_STATE (naming
//! the new copy) to a connected producer of its group; after the most checks allowed it is
//! discarded (rolled back). END_TRANSACTION *claims* a half from the shared [`Index`]
//! before it commits or rolls back, so a half is acted on once: by a claim, or by the
//! scheduler, which takes what it works on out of the index first.
//!
//! A message due later is stored in the system topic [`TIMER_TOPIC`] (one queue) with
//! its destination in `REAL_TOPIC` / `REAL_QID` and its due time in `__rmq.due`. The
//! [`Scheduler`] (a dispatch service on core 0) scans that queue into an index of what is
//! pending, and when a message falls due appends it to its destination, then appends a
//! *marker* record (`__rmq.delivered`: the offsets delivered) to the timer queue itself.
//! A restart scans from the committed cursor (the oldest offset still pending), and the
//! markers it meets strike out what was already delivered: nothing is lost across a
//! restart, and a message is delivered twice only if the broker dies between its delivery
//! and its marker.
//!
//! # Invariants
//! - A marker is appended only after the delivery it records is acknowledged by the log.
//! - The cursor never passes an offset still pending.

use bytes::Bytes;
use indexmap::IndexMap;
use kafka_protocol::records::{Record, RecordBatchDecoder};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::frame::Command;
use super::message::{self, Message, Stored};
use super::namesrv::ensure_topic;
use super::{commit, gather_then as gather, record_at, RocketMqState};
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{Broker, PartKey};
use crate::dispatch::session::{Cx, Fault, Parked, Step};
use crate::log::batch::BatchHeader;
use crate::log::{now_ms, Pending};

/// Where messages wait until they are due.
pub const TIMER_TOPIC: &str = "rmq_sys_wheel_timer";
/// The offset-store group holding the scheduler's cursor.
const CURSOR_GROUP: &str = "%TIMER%scheduler";
/// RocketMQ's default `messageDelayLevel`.
pub const DEFAULT_DELAY_LEVELS: &str = "1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h";
/// The longest a timer message may wait (RocketMQ's `timerMaxDelaySec`), well inside the
/// default retention, which would otherwise delete it before it is due.
pub const MAX_TIMER_DELAY_MS: i64 = 3 * 24 * 3600 * 1000;

pub const P_REAL_TOPIC: &str = "REAL_TOPIC";
pub const P_REAL_QID: &str = "REAL_QID";
pub const P_DELAY: &str = "DELAY";
/// When a delivered delay or timer message fell due.
pub const P_TIMER_OUT_MS: &str = "TIMER_OUT_MS";
/// Set on transactional half messages by producers.
pub const P_TRAN_MSG: &str = "TRAN_MSG";
const P_PGROUP: &str = "PGROUP";
const P_CHECK_TIMES: &str = "TRANSACTION_CHECK_TIMES";
const P_UNIQ_KEY: &str = "UNIQ_KEY";
const P_DUE: &str = "__rmq.due";
const H_DELIVERED: &str = "__rmq.delivered";
const TIMER_PROPS: [&str; 4] = ["TIMER_DELIVER_MS", "TIMER_DELAY_SEC", "TIMER_DELAY_MS", "__STARTDELIVERTIME"];

/// Due messages delivered per round.
const ROUND: usize = 64;
/// How often a starting scheduler looks whether its timer topic is made.
const STARTING_POLL: Duration = Duration::from_millis(50);
/// How long to wait after a failed round (a full disk, a missing topic being made).
const BACKOFF: Duration = Duration::from_secs(1);

/// Parses a delay-level table such as `1s 5s 1m 2h 1d`.
pub fn parse_levels(s: &str) -> Result<Vec<Duration>, String> {
    let levels = s
        .split_whitespace()
        .map(|l| {
            let (num, unit) = l.split_at(l.find(|c: char| !c.is_ascii_digit()).unwrap_or(l.len()));
            let n: u64 = num.parse().map_err(|_| format!("bad delay level '{l}'"))?;
            Ok(match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n * 60),
                "h" => Duration::from_secs(n * 3600),
                "d" => Duration::from_secs(n * 86400),
                _ => return Err(format!("bad delay level unit in '{l}' (ms, s, m, h, d)")),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if levels.is_empty() {
        return Err("no delay levels".into());
    }
    Ok(levels)
}

/// When delay level `level` (1-based, clamped to the table as RocketMQ does) started
/// at `now` ends.
pub fn level_due(levels: &[Duration], level: i64, now: i64) -> i64 {
    let i = (level.max(1) as usize).min(levels.len()) - 1;
    now + levels[i].as_millis() as i64
}

/// When a message is due, if later than now: from its delay level (clamped to the table,
/// as RocketMQ does) or its timer properties.
pub fn due(m: &Message, levels: &[Duration], now: i64) -> Result<Option<i64>, String> {
    let prop = |name: &str| -> Result<Option<i64>, String> {
        m.property(name).map(|v| v.trim().parse::<i64>().map_err(|_| format!("{name}={v} is not a number"))).transpose()
    };
    let due = if let Some(level) = prop(P_DELAY)?.filter(|l| *l > 0) {
        Some(level_due(levels, level, now))
    } else if let Some(at) = prop("TIMER_DELIVER_MS")? {
        Some(at)
    } else if let Some(sec) = prop("TIMER_DELAY_SEC")? {
        Some(now.saturating_add(sec.saturating_mul(1000)))
    } else if let Some(ms) = prop("TIMER_DELAY_MS")? {
        Some(now.saturating_add(ms))
    } else {
        prop("__STARTDELIVERTIME")?
    };
    match due {
        Some(d) if d - now > MAX_TIMER_DELAY_MS => Err(format!(
            "the message is due in {} s, beyond the {} s limit",
            (d - now) / 1000,
            MAX_TIMER_DELAY_MS / 1000
        )),
        Some(d) if d > now => Ok(Some(d)),
        _ => Ok(None),
    }
}

/// Redirects `m` to the timer queue: its destination and due time go into properties.
pub fn to_timer(m: &mut Message, real_topic: &str, real_qid: i32, due: i64) {
    m.properties.retain(|(k, _)| k != P_REAL_TOPIC && k != P_REAL_QID && k != P_DUE);
    m.properties.push((P_REAL_TOPIC.into(), real_topic.into()));
    m.properties.push((P_REAL_QID.into(), real_qid.to_string()));
    m.properties.push((P_DUE.into(), due.to_string()));
}

/// A record header's text value (RocketMQ properties are stored as headers).
pub(crate) fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k.as_str() == name).and_then(|(_, v)| std::str::from_utf8(v.as_ref()?).ok())
}

/// The record a due timer record becomes, and where it goes.
fn delivery(r: &Record) -> Option<(String, i32, Record)> {
    let topic = header(r, P_REAL_TOPIC)?.to_string();
    let qid = header(r, P_REAL_QID)?.parse().ok()?;
    let mut out = r.clone();
    out.headers.retain(|k, _| k.as_str() != P_DELAY && k.as_str() != P_DUE && !TIMER_PROPS.contains(&k.as_str()));
    // When it fell due, as RocketMQ's timer store records it (5.x consumers read it as
    // the delivery timestamp); a half's due time is only its check.
    if let (Some(due), false) = (header(r, P_DUE), record_is_half(r)) {
        out.headers.insert(P_TIMER_OUT_MS.into(), Some(Bytes::from(due.to_string())));
    }
    Some((topic, qid, out))
}

fn marker(offsets: &[i64]) -> Record {
    let list: Vec<String> = offsets.iter().map(i64::to_string).collect();
    let mut m = Message {
        flag: 0,
        born_timestamp: now_ms(),
        born_host: None,
        reconsume_times: 0,
        properties: Vec::new(),
        body: Bytes::new(),
    };
    m.properties.push((H_DELIVERED.into(), list.join(",")));
    message::to_record(&m)
}

#[derive(Default)]
enum Phase {
    /// Make sure the timer topic exists.
    #[default]
    Start,
    Creating(Pending<Result<(), String>>),
    Running,
    Backoff(Instant),
}

/// What is pending in the timer queue, by due time and by offset; shared by the
/// scheduler and END_TRANSACTION (see the module doc).
#[derive(Default)]
pub struct Index {
    by_due: BTreeSet<(i64, i64)>,
    due_of: HashMap<i64, i64>,
    /// Halves resolved before the scan reached them: skipped when it does.
    claimed: HashSet<i64>,
    /// The next offset of the timer queue to scan (`None`: read the cursor first).
    scanned_to: Option<i64>,
    committed: i64,
    last_commit: Option<Instant>,
}

impl Index {
    fn insert(&mut self, offset: i64, due: i64) {
        if self.claimed.remove(&offset) {
            return;
        }
        if self.due_of.insert(offset, due).is_none() {
            self.by_due.insert((due, offset));
        }
    }
    fn remove(&mut self, offset: i64) {
        if let Some(due) = self.due_of.remove(&offset) {
            self.by_due.remove(&(due, offset));
        }
    }
    /// Takes out up to `n` entries due by `now`.
    fn take_due(&mut self, now: i64, n: usize) -> Vec<i64> {
        let due: Vec<i64> = self.by_due.iter().take_while(|(d, _)| *d <= now).take(n).map(|(_, o)| *o).collect();
        for o in &due {
            self.remove(*o);
        }
        due
    }
    /// Claims a pending (or not yet scanned) half for END_TRANSACTION: false when the
    /// scheduler has it, or it is resolved already.
    pub fn claim(&mut self, offset: i64) -> bool {
        if self.due_of.contains_key(&offset) {
            self.remove(offset);
            return true;
        }
        if self.scanned_to.is_none_or(|s| offset >= s) {
            return self.claimed.insert(offset);
        }
        false
    }
    /// Puts a claimed half back (its resolution failed): due again at `due`.
    pub fn unclaim(&mut self, offset: i64, due: i64) {
        self.claimed.remove(&offset);
        if self.scanned_to.is_some_and(|s| offset < s) {
            self.insert(offset, due);
        }
    }
    /// Where a restart must scan from.
    fn cursor(&self) -> i64 {
        self.due_of.keys().min().copied().unwrap_or(self.scanned_to.unwrap_or(0))
    }
}

/// Transaction check-back settings (RocketMQ's `transactionTimeOut`,
/// `transactionCheckInterval`, `transactionCheckMax`).
#[derive(Debug, Clone, Copy)]
pub struct TxSettings {
    pub first_check: Duration,
    pub interval: Duration,
    pub max_checks: u32,
}

impl Default for TxSettings {
    fn default() -> Self {
        TxSettings { first_check: Duration::from_secs(6), interval: Duration::from_secs(60), max_checks: 15 }
    }
}

/// Whether a message is a transactional half.
pub fn is_half(m: &Message, sys_flag: i32) -> bool {
    sys_flag & TRANSACTION_PREPARED != 0 || m.property(P_TRAN_MSG) == Some("true")
}

/// `MessageSysFlag.TRANSACTION_PREPARED_TYPE`.
pub const TRANSACTION_PREPARED: i32 = 1 << 2;

/// A marker batch saying `offsets` of the timer queue are done with.
pub fn marker_batch(offsets: &[i64]) -> Result<Bytes, message::MessageError> {
    message::encode_batch(&[marker(offsets)])
}

/// Where a resolved half goes: its destination and the record to append there.
pub fn commit_of(r: &Record) -> Option<(String, i32, Record)> {
    let (topic, qid, mut out) = delivery(r)?;
    out.headers.retain(|k, _| k.as_str() != P_TRAN_MSG && k.as_str() != P_CHECK_TIMES);
    Some((topic, qid, out))
}

/// What resolving the half `r` appends: on commit, the message at its destination;
/// on rollback, nothing. (The marker that records the resolution is appended after.)
pub fn resolution(broker: &Broker, r: &Record, commit: bool) -> Result<Vec<(PartKey, PartOp)>, String> {
    match commit_of(r) {
        Some((topic, qid, out)) if commit => {
            let t = broker.topic(&topic).ok_or_else(|| format!("topic {topic} of the transaction is gone"))?;
            let batch = message::encode_batch(&[out]).map_err(|e| e.to_string())?;
            Ok(vec![(destination(&t, qid), PartOp::Append { records: batch })])
        }
        _ => Ok(Vec::new()),
    }
}

/// The partition a delivery to `qid` of `t` goes to (a queue the topic no longer has
/// wraps onto the ones it has).
pub fn destination(t: &crate::broker::Topic, qid: i32) -> PartKey {
    t.key(qid.rem_euclid(t.meta.partitions)).unwrap_or(PartKey { topic_id: t.meta.id, partition: 0 })
}

/// Whether a timer-queue record is a half message.
fn record_is_half(r: &Record) -> bool {
    header(r, P_TRAN_MSG) == Some("true")
}

/// The delayed-delivery service.
pub struct Scheduler {
    phase: Phase,
    state: Arc<RocketMqState>,
    /// When to look again while starting: nothing else wakes the core for that (a broker
    /// whose only RocketMQ listener is the gRPC front has no connection on the loop).
    wake: Option<Instant>,
    /// An instant and the wall-clock milliseconds it was: due times (wall clock) become
    /// fixed deadlines, so the loop sees one pass (a deadline recomputed from `now` at
    /// every look would never be behind the loop's `now`).
    anchor: (Instant, i64),
}

impl Scheduler {
    pub fn new(state: Arc<RocketMqState>) -> Scheduler {
        let now = Instant::now();
        Scheduler { phase: Phase::Start, state, wake: Some(now), anchor: (now, now_ms()) }
    }

    fn index(&self) -> parking_lot::MutexGuard<'_, Index> {
        self.state.timers.lock()
    }

    fn timer_key(broker: &Broker) -> Option<(PartKey, Arc<crate::broker::PartitionShared>)> {
        let t = broker.topic(TIMER_TOPIC)?;
        Some((t.key(0)?, t.shared(0)?.clone()))
    }

    /// The next thing to do: scan what is new, deliver what is due, or wait.
    fn work(mut self, cx: &Cx<'_>) -> Step {
        let Some((key, shared)) = Self::timer_key(cx.broker) else {
            // Deleted under us: make it again.
            self.phase = Phase::Start;
            return Step::Park(Box::new(self));
        };
        let start = shared.log_start();
        let scanned = {
            let mut index = self.index();
            let scanned = *index.scanned_to.get_or_insert_with(|| {
                let c = cx.broker.groups.lock().committed(CURSOR_GROUP, TIMER_TOPIC, 0).map(|c| c.offset);
                c.unwrap_or(start)
            });
            // Retention may have removed the oldest: nothing below can be read any more.
            let scanned = scanned.max(start);
            index.scanned_to = Some(scanned);
            scanned
        };
        if scanned < shared.next_offset() {
            let op = PartOp::Read { offset: scanned, max_bytes: 1 << 20 };
            return gather(vec![(key, op)], move |cx, results| self.scanned(cx, results));
        }
        let due = self.index().take_due(now_ms(), ROUND);
        if due.is_empty() {
            self.maybe_commit(cx);
            return Step::Park(Box::new(self));
        }
        let ops = due.iter().map(|o| (key, PartOp::Read { offset: *o, max_bytes: 1 })).collect();
        gather(ops, move |cx, results| self.deliver(cx, due, results))
    }

    fn scanned(self, cx: &Cx<'_>, results: Vec<PartResult>) -> Step {
        let Some(PartResult::Read(read)) = results.into_iter().next() else {
            return self.backoff("reading the timer queue failed", Vec::new());
        };
        let mut buf = read.records.bytes().clone();
        let mut index = self.state.timers.lock();
        let mut next = index.scanned_to.unwrap_or(0);
        while !buf.is_empty() {
            let last = BatchHeader::parse(&buf).map(|h| h.last_offset()).ok();
            let Ok(set) = RecordBatchDecoder::decode(&mut buf) else {
                log::error!("timer queue: unreadable batch at offset {next}; skipped");
                match last {
                    Some(l) => {
                        next = next.max(l + 1);
                        continue;
                    }
                    None => {
                        next = read.high_watermark;
                        break;
                    }
                }
            };
            let from = next;
            for r in set.records.iter().filter(|r| r.offset >= from) {
                if let Some(list) = header(r, H_DELIVERED) {
                    for o in list.split(',').filter_map(|o| o.parse().ok()) {
                        index.remove(o);
                    }
                } else if let Some(due) = header(r, P_DUE).and_then(|d| d.parse().ok()) {
                    index.insert(r.offset, due);
                }
                next = r.offset + 1;
            }
        }
        if next == index.scanned_to.unwrap_or(0) {
            next = read.high_watermark;
        }
        index.scanned_to = Some(next);
        drop(index);
        self.work(cx)
    }

    fn deliver(self, cx: &Cx<'_>, offsets: Vec<i64>, results: Vec<PartResult>) -> Step {
        let mut by_key: IndexMap<PartKey, Vec<Record>> = IndexMap::new();
        let mut done = Vec::new();
        let mut halves = Vec::new();
        for (offset, result) in offsets.iter().zip(results) {
            if !matches!(result, PartResult::Read(_)) {
                return self.backoff("reading a due message failed", offsets);
            }
            let found = record_at(Some(result), *offset);
            if let Some(r) = found.as_ref().filter(|r| record_is_half(r)) {
                halves.push(r.clone());
                done.push(*offset);
                continue;
            }
            let Some((topic, qid, record)) = found.as_ref().and_then(delivery) else {
                log::warn!("timer queue: offset {offset} is not a due message any more; dropped");
                done.push(*offset);
                continue;
            };
            match cx.broker.topic(&topic) {
                Some(t) => {
                    let key = destination(&t, qid);
                    by_key.entry(key).or_default().push(record);
                    done.push(*offset);
                }
                None => {
                    log::warn!("delayed message for topic {topic}, which no longer exists; dropped");
                    done.push(*offset);
                }
            }
        }
        let mut ops = Vec::new();
        let delivered = by_key.len();
        for (key, records) in by_key {
            match message::encode_batch(&records) {
                Ok(b) => ops.push((key, PartOp::Append { records: b })),
                Err(e) => log::error!("delayed messages cannot be encoded ({e}); dropped"),
            }
        }
        // Unresolved halves go back into the queue, due at their next check; the checks
        // go out once the copies they name are stored.
        let mut checks = Vec::new();
        if let Some((timer, _)) = Self::timer_key(cx.broker) {
            for r in halves {
                match self.recheck(&r) {
                    Some(again) => match message::encode_batch(&[again]) {
                        Ok(b) => {
                            ops.push((timer, PartOp::Append { records: b }));
                            checks.push(r);
                        }
                        Err(e) => log::error!("a half message cannot be encoded ({e}); dropped"),
                    },
                    None => log::warn!(
                        "transaction of message {} unresolved after {} checks: rolled back",
                        header(&r, P_UNIQ_KEY).unwrap_or("?"),
                        self.state.tx.max_checks
                    ),
                }
            }
        }
        gather(ops, move |cx, results| {
            if results[..delivered].iter().any(|r| !matches!(r, PartResult::Appended(..))) {
                // Some destinations refused: everything of this round stays pending and is
                // tried again (the appended ones may be delivered twice, never lost).
                return self.backoff("delivering due messages failed", offsets);
            }
            for (r, put) in checks.iter().zip(&results[delivered..]) {
                match put {
                    PartResult::Appended(info, _) => self.send_check(cx, r, info.base_offset),
                    _ => log::warn!("a half message could not be put back for its next check"),
                }
            }
            self.mark(cx, done)
        })
    }

    /// The copy of a half that waits for its next check, or `None` when it has had all
    /// its checks.
    fn recheck(&self, r: &Record) -> Option<Record> {
        let checks: u32 = header(r, P_CHECK_TIMES).and_then(|c| c.parse().ok()).unwrap_or(0);
        if checks >= self.state.tx.max_checks {
            return None;
        }
        let mut again = r.clone();
        let due = now_ms() + self.state.tx.interval.as_millis() as i64;
        again.headers.insert(P_CHECK_TIMES.into(), Some(Bytes::from((checks + 1).to_string())));
        again.headers.insert(P_DUE.into(), Some(Bytes::from(due.to_string())));
        Some(again)
    }

    /// Asks a connected producer of the half's group how its transaction ended
    /// (CHECK_TRANSACTION_STATE, naming the copy at `offset`); it answers with
    /// END_TRANSACTION.
    fn send_check(&self, cx: &Cx<'_>, r: &Record, offset: i64) {
        let group = header(r, P_PGROUP).unwrap_or_default();
        let Some(conn) = self.state.clients.producer_conn(group, cx.now) else {
            // No remoting producer of its group: a gRPC producer of its topic, if any.
            if !self.state.grpc_check(r, offset) {
                log::debug!("no producer of group '{group}' connected to check a transaction");
            }
            return;
        };
        let Some(timer) = cx.broker.topic(TIMER_TOPIC) else { return };
        let physical = message::physical_offset(message::topic_tag(&timer.meta.id), 0, offset);
        let (Some(topic), Some(qid)) = (header(r, P_REAL_TOPIC), header(r, P_REAL_QID).and_then(|q| q.parse().ok()))
        else {
            return;
        };
        let mut copy = r.clone();
        copy.offset = offset;
        let mut body = bytes::BytesMut::new();
        let at = Stored { topic, queue_id: qid, store_host: self.state.store_host, physical_offset: physical };
        message::encode_for_pull(&mut body, &copy, &at, r.timestamp);
        let msg_id = message::offset_msg_id(self.state.store_host, physical);
        let mut cmd = Command::request(super::codes::CHECK_TRANSACTION_STATE, Vec::new(), true, 0)
            .with("tranStateTableOffset", offset)
            .with("commitLogOffset", physical)
            .with("msgId", header(r, P_UNIQ_KEY).unwrap_or(&msg_id))
            .with("offsetMsgId", &msg_id);
        if let Some(id) = header(r, P_UNIQ_KEY) {
            cmd = cmd.with("transactionId", id);
        }
        cmd.body = body.freeze();
        self.state.clients.push(conn, cmd);
    }

    /// Records on the timer queue that `offsets` are delivered.
    fn mark(self, cx: &Cx<'_>, offsets: Vec<i64>) -> Step {
        if offsets.is_empty() {
            return self.work(cx);
        }
        let Some((key, _)) = Self::timer_key(cx.broker) else { return self.work(cx) };
        let Ok(batch) = message::encode_batch(&[marker(&offsets)]) else { return self.work(cx) };
        gather(vec![(key, PartOp::Append { records: batch })], move |cx, results| {
            if !matches!(results.first(), Some(PartResult::Appended(..))) {
                log::warn!("timer queue: the delivery marker was not stored; a restart may deliver again");
            }
            self.work(cx)
        })
    }

    /// Stores the cursor at most once a second (a restart scans from it; the markers
    /// after it keep it exact).
    fn maybe_commit(&mut self, cx: &Cx<'_>) {
        let mut index = self.index();
        let cursor = index.cursor();
        if cursor <= index.committed || index.last_commit.is_some_and(|t| t.elapsed() < BACKOFF) {
            return;
        }
        index.committed = cursor;
        index.last_commit = Some(cx.now);
        drop(index);
        let (broker, now) = (cx.broker.clone(), cx.now);
        drop(cx.broker.files.run(move || {
            if let Err(e) = commit(&broker, CURSOR_GROUP, TIMER_TOPIC, 0, cursor, now) {
                log::warn!("storing the scheduler's cursor: {e}");
            }
        }));
    }

    /// Waits a moment after a failure; `taken` go back into the index, due now.
    fn backoff(mut self, why: &str, taken: Vec<i64>) -> Step {
        log::warn!("scheduler: {why}; trying again in {} ms", BACKOFF.as_millis());
        let now = now_ms();
        let mut index = self.index();
        for o in taken {
            index.insert(o, now);
        }
        drop(index);
        self.phase = Phase::Backoff(Instant::now() + BACKOFF);
        Step::Park(Box::new(self))
    }
}

impl Parked for Scheduler {
    fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Backoff(t) => Some(*t),
            Phase::Start | Phase::Creating(_) => self.wake,
            Phase::Running => {
                let (due, _) = *self.index().by_due.first()?;
                let (at, ms) = self.anchor;
                Some(at + Duration::from_millis((due - ms).max(0) as u64))
            }
        }
    }

    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        // Forced with our own deadline passed: that is our wake-up. Forced otherwise: the
        // shutdown, and what is pending stays in the timer queue for the next start.
        if force && self.deadline().is_none_or(|d| d > cx.now) {
            return Some(Ok(Step::Silent));
        }
        match &self.phase {
            Phase::Start => {
                if cx.broker.topic(TIMER_TOPIC).is_some() {
                    self.phase = Phase::Running;
                } else {
                    let broker = cx.broker.clone();
                    self.phase = Phase::Creating(
                        cx.broker
                            .files
                            .run(move || ensure_topic(&broker, TIMER_TOPIC).map(|_| ()).map_err(|e| e.to_string())),
                    );
                    self.wake = Some(cx.now + STARTING_POLL);
                    return None;
                }
            }
            Phase::Creating(p) => {
                let Some(done) = p.try_take() else {
                    self.wake = Some(cx.now + STARTING_POLL);
                    return None;
                };
                match done {
                    Ok(()) => self.phase = Phase::Running,
                    Err(e) => {
                        log::error!("cannot create the timer topic {TIMER_TOPIC}: {e}");
                        self.phase = Phase::Backoff(cx.now + BACKOFF * 5);
                        return None;
                    }
                }
            }
            Phase::Backoff(t) if cx.now >= *t => self.phase = Phase::Running,
            Phase::Backoff(_) => return None,
            Phase::Running => {}
        }
        // The state moves into the next step (a gather's finisher, or a new parked slot).
        let me = Scheduler {
            phase: std::mem::take(&mut self.phase),
            state: self.state.clone(),
            wake: None,
            anchor: self.anchor,
        };
        Some(Ok(me.work(cx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(props: &[(&str, &str)]) -> Message {
        Message {
            flag: 0,
            born_timestamp: 0,
            born_host: None,
            reconsume_times: 0,
            properties: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: Bytes::new(),
        }
    }

    #[test]
    fn due_times_from_levels_and_timers() {
        let levels = parse_levels(DEFAULT_DELAY_LEVELS).expect("levels");
        assert_eq!(levels.len(), 18);
        assert_eq!(levels[17], Duration::from_secs(7200));
        assert_eq!(due(&msg(&[("DELAY", "3")]), &levels, 1000), Ok(Some(11_000)));
        assert_eq!(due(&msg(&[("DELAY", "99")]), &levels, 0), Ok(Some(7_200_000)), "clamped to the last level");
        assert_eq!(due(&msg(&[("DELAY", "0")]), &levels, 0), Ok(None));
        assert_eq!(due(&msg(&[("TIMER_DELAY_SEC", "2")]), &levels, 5), Ok(Some(2005)));
        assert_eq!(due(&msg(&[("__STARTDELIVERTIME", "4")]), &levels, 5), Ok(None), "already due");
        assert!(due(&msg(&[("TIMER_DELAY_SEC", "x")]), &levels, 0).is_err());
        assert!(due(&msg(&[("TIMER_DELAY_SEC", "999999999")]), &levels, 0).is_err());
        assert!(parse_levels("1s 2x").is_err() && parse_levels("").is_err());
    }

    #[test]
    fn a_delivery_goes_to_its_real_queue_without_the_timer_properties() {
        let mut m = msg(&[("DELAY", "2"), ("TAGS", "a")]);
        to_timer(&mut m, "orders", 3, 99);
        let r = message::to_record(&m);
        let (topic, qid, out) = delivery(&r).expect("a delivery");
        assert_eq!((topic.as_str(), qid), ("orders", 3));
        assert_eq!(header(&out, "TAGS"), Some("a"));
        assert!(header(&out, P_DELAY).is_none() && header(&out, P_DUE).is_none());
        assert_eq!(header(&out, P_TIMER_OUT_MS), Some("99"));
        let mk = marker(&[4, 7]);
        assert_eq!(header(&mk, H_DELIVERED), Some("4,7"));
        assert_eq!(mk.headers.len(), 1);
    }
}
