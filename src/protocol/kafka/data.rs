//! The data path: Produce, Fetch (with long-poll) and ListOffsets.
//!
//! These handlers do not touch logs. They turn a request into a [`Gather`]: the
//! partition operations it needs (run by each partition's owner core, see
//! [`crate::broker::shard`]) and a plan that [`finish`] turns into the response once every
//! result is in. With one core, or partitions owned by the receiving core, the dispatch
//! loop runs the operations inline and finishes at once.

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, ProduceRequest, ProduceResponse, TopicName,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use super::acls::allowed;
use super::{sb, Ctx, ErrorCode, Outcome, Parked};
use crate::broker::acl::{Operation, ResourceType};
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{PartKey, PartitionShared};
use crate::buffer::Chunk;
use crate::log::LogError;

/// Partition operations to run on their owners, and what to do with the results.
pub struct Gather {
    pub ops: Vec<(PartKey, PartOp)>,
    pub then: Then,
}

pub enum Then {
    Produce(ProducePlan),
    Fetch(Box<FetchPlan>),
    ListOffsets(ListOffsetsPlan),
}

/// Where a partition's answer comes from: an operation's result, or an error found
/// before any operation was needed.
#[derive(Clone, Copy)]
enum Slot {
    Op(usize),
    Error(ErrorCode),
}

pub struct ProducePlan {
    version: i16,
    acks: i16,
    topics: Vec<(TopicName, Vec<(i32, Slot)>)>,
}

pub fn produce(ctx: &Ctx<'_>, req: ProduceRequest) -> Outcome {
    let mut ops = Vec::new();
    let mut topics = Vec::new();
    for td in req.topic_data {
        let topic = ctx.broker.topic(&td.name);
        let may_write = allowed(ctx, Operation::Write, ResourceType::Topic, &td.name);
        let mut parts = Vec::new();
        for pd in td.partition_data {
            let slot = match (topic.as_ref().and_then(|t| t.key(pd.index)), pd.records) {
                _ if !may_write => Slot::Error(ErrorCode::TopicAuthorizationFailed),
                (None, _) => Slot::Error(ErrorCode::UnknownTopicOrPartition),
                (Some(_), None) => Slot::Error(ErrorCode::CorruptMessage),
                // Transactions are not implemented (and not advertised).
                (Some(_), Some(_)) if req.transactional_id.is_some() => {
                    Slot::Error(ErrorCode::TransactionalIdAuthorizationFailed)
                }
                (Some(key), Some(records)) => {
                    ops.push((key, PartOp::Append { records }));
                    Slot::Op(ops.len() - 1)
                }
            };
            parts.push((pd.index, slot));
        }
        topics.push((td.name, parts));
    }
    Outcome::Gather(Gather { ops, then: Then::Produce(ProducePlan { version: ctx.version, acks: req.acks, topics }) })
}

fn finish_produce(plan: ProducePlan, results: &[PartResult], client: &str) -> Outcome {
    let v = plan.version;
    let mut resp = ProduceResponse::default();
    for (name, parts) in plan.topics {
        let mut tr = TopicProduceResponse::default();
        for (index, slot) in parts {
            let mut pr = PartitionProduceResponse::default();
            pr.index = index;
            pr.base_offset = -1;
            pr.log_append_time_ms = -1;
            let outcome = match slot {
                Slot::Error(code) => Err(code),
                Slot::Op(i) => match &results[i] {
                    PartResult::Appended(info, start) => Ok((*info, *start)),
                    PartResult::Failed { error, .. } => {
                        if !matches!(error, LogError::OutOfOrderSequence { .. } | LogError::ProducerFenced { .. }) {
                            log::warn!("produce to {}-{index} from {client} rejected: {error}", name.as_str());
                        }
                        Err(ErrorCode::from(error))
                    }
                    _ => Err(ErrorCode::UnknownTopicOrPartition),
                },
            };
            match outcome {
                Ok((info, start)) => {
                    pr.base_offset = info.base_offset;
                    pr.log_append_time_ms = info.log_append_time;
                    if v >= 5 {
                        pr.log_start_offset = start;
                    }
                }
                Err(code) => {
                    pr.error_code = code.code();
                    if v >= 5 {
                        pr.log_start_offset = -1;
                    }
                }
            }
            tr.partition_responses.push(pr);
        }
        tr.name = name;
        resp.responses.push(tr);
    }
    if plan.acks == 0 {
        Outcome::NoResponse
    } else {
        Outcome::respond(resp)
    }
}

#[derive(Clone)]
struct FetchTarget {
    name: TopicName,
    topic_id: Uuid,
    partition: i32,
    offset: i64,
    max_bytes: usize,
    key: Option<PartKey>,
    shared: Option<Arc<PartitionShared>>,
    /// The principal may not read the topic (no key then: nothing is read).
    denied: bool,
}

#[derive(Clone)]
pub struct FetchPlan {
    version: i16,
    min_bytes: usize,
    max_bytes: usize,
    deadline: Instant,
    /// Answer with whatever the reads return (deadline passed, or enough data seen).
    force: bool,
    targets: Vec<FetchTarget>,
    /// Each target's `warmed` count when the reads were sent (before any of them could
    /// start bringing pages in: a wake-up after it is never missed).
    warmed_at_gather: Vec<u64>,
}

impl FetchPlan {
    fn gather(mut self: Box<Self>) -> Gather {
        self.warmed_at_gather = self.targets.iter().map(|t| t.shared.as_ref().map_or(0, |s| s.warmed())).collect();
        let ops = self
            .targets
            .iter()
            .filter_map(|t| Some((t.key?, PartOp::ReadResident { offset: t.offset, max_bytes: t.max_bytes })))
            .collect();
        Gather { ops, then: Then::Fetch(self) }
    }
}

/// A fetch waiting for `min_bytes` or its deadline. Re-polled from the partitions'
/// lock-free counters, without asking their owners.
pub struct ParkedFetch {
    plan: Box<FetchPlan>,
    /// Bytes ever appended to each target when the fetch parked.
    appended_at_park: Vec<u64>,
    available_at_park: usize,
    /// A read found its pages out of memory: the fetch is also ready once any target's
    /// pages were brought in (its `warmed` count moved past these).
    warmed_at_park: Option<Vec<u64>>,
}

impl ParkedFetch {
    pub fn deadline(&self) -> Instant {
        self.plan.deadline
    }
}

pub fn fetch(ctx: &Ctx<'_>, req: FetchRequest) -> Outcome {
    let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64);
    let mut targets = Vec::new();
    for t in &req.topics {
        let topic = if t.topic.is_empty() { ctx.broker.topic_by_id(t.topic_id) } else { ctx.broker.topic(&t.topic) };
        let name = topic.as_ref().map_or(t.topic.clone(), |tp| TopicName(sb(tp.name())));
        let denied = !allowed(ctx, Operation::Read, ResourceType::Topic, &name);
        let topic = topic.filter(|_| !denied);
        for p in &t.partitions {
            targets.push(FetchTarget {
                name: name.clone(),
                topic_id: topic.as_ref().map_or(t.topic_id, |tp| tp.meta.id),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes.max(0) as usize,
                key: topic.as_ref().and_then(|tp| tp.key(p.partition)),
                shared: topic.as_ref().and_then(|tp| tp.shared(p.partition).cloned()),
                denied,
            });
        }
    }
    let plan = FetchPlan {
        version: ctx.version,
        min_bytes: req.min_bytes.max(1) as usize,
        max_bytes: if req.max_bytes > 0 { req.max_bytes as usize } else { usize::MAX },
        deadline: ctx.now + wait,
        force: wait.is_zero(),
        targets,
        warmed_at_gather: Vec::new(),
    };
    Outcome::Gather(Box::new(plan).gather())
}

/// Re-polls a parked fetch: `Some` (a gather that answers) once enough bytes arrived,
/// at the deadline, or when forced.
pub fn poll_fetch(p: &ParkedFetch, now: Instant, force: bool) -> Option<Outcome> {
    let grown: u64 = p
        .plan
        .targets
        .iter()
        .zip(&p.appended_at_park)
        .map(|(t, at)| t.shared.as_ref().map_or(0, |s| s.appended().saturating_sub(*at)))
        .sum();
    let warmed = p.warmed_at_park.as_ref().is_some_and(|at| {
        p.plan.targets.iter().zip(at).any(|(t, at)| t.shared.as_ref().is_some_and(|s| s.warmed() != *at))
    });
    let ready = warmed || p.available_at_park as u64 + grown >= p.plan.min_bytes as u64;
    if !(ready || force || now >= p.plan.deadline) {
        return None;
    }
    let mut plan = p.plan.clone();
    plan.force = true;
    Some(Outcome::Gather(plan.gather()))
}

fn finish_fetch(plan: Box<FetchPlan>, results: Vec<PartResult>, now: Instant) -> Outcome {
    let v = plan.version;
    let total: usize = results.iter().map(|r| if let PartResult::Read(r) = r { r.records.len() } else { 0 }).sum();
    let any_error =
        results.iter().any(|r| !matches!(r, PartResult::Read(_))) || plan.targets.iter().any(|t| t.key.is_none());
    if !plan.force && !any_error && total < plan.min_bytes && now < plan.deadline {
        let appended_at_park = plan.targets.iter().map(|t| t.shared.as_ref().map_or(0, |s| s.appended())).collect();
        let cold = results.iter().any(|r| matches!(r, PartResult::Read(r) if r.cold));
        let warmed_at_park = cold.then(|| plan.warmed_at_gather.clone());
        return Outcome::Park(Parked::Fetch(ParkedFetch {
            plan,
            appended_at_park,
            available_at_park: total,
            warmed_at_park,
        }));
    }
    let mut resp = FetchResponse::default();
    let mut by_ref: Vec<Chunk> = Vec::new();
    let mut budget = plan.max_bytes;
    let mut results = results.into_iter();
    for t in plan.targets {
        if resp.responses.last().is_none_or(|r: &FetchableTopicResponse| r.topic != t.name) {
            let mut tr = FetchableTopicResponse::default();
            tr.topic = t.name.clone();
            if v >= 13 {
                tr.topic_id = t.topic_id;
            }
            resp.responses.push(tr);
        }
        let mut pd = PartitionData::default();
        pd.partition_index = t.partition;
        pd.high_watermark = -1;
        pd.last_stable_offset = -1;
        pd.log_start_offset = -1;
        pd.records = Some(Bytes::new());
        let result = if t.key.is_some() { results.next() } else { None };
        match result {
            None if t.denied => pd.error_code = ErrorCode::TopicAuthorizationFailed.code(),
            None | Some(PartResult::Unknown) | Some(PartResult::Appended(..)) | Some(PartResult::Offset(_)) => {
                pd.error_code = ErrorCode::UnknownTopicOrPartition.code();
            }
            Some(PartResult::Failed { error, high_watermark, log_start }) => {
                pd.error_code = ErrorCode::from(&error).code();
                pd.high_watermark = high_watermark;
                pd.last_stable_offset = high_watermark;
                pd.log_start_offset = log_start;
            }
            Some(PartResult::Read(r)) => {
                pd.high_watermark = r.high_watermark;
                pd.last_stable_offset = r.high_watermark;
                pd.log_start_offset = r.log_start_offset;
                // The response-wide max_bytes: later partitions give way, but the first
                // non-empty one always goes out whole (as Kafka, so big batches progress).
                if !r.records.is_empty() && (by_ref.is_empty() || r.records.len() <= budget) {
                    budget = budget.saturating_sub(r.records.len());
                    pd.records = Some(r.records.bytes().clone());
                    by_ref.push(r.records);
                }
            }
        }
        if let Some(tr) = resp.responses.last_mut() {
            tr.partitions.push(pd);
        }
    }
    Outcome::Respond(resp.into(), by_ref)
}

/// One partition of a ListOffsets: its index, the requested timestamp, and the answer
/// known now as (offset, timestamp), or where it will come from.
type OffsetQuery = (i32, i64, Result<(i64, i64), Slot>);

pub struct ListOffsetsPlan {
    version: i16,
    topics: Vec<(TopicName, Vec<OffsetQuery>)>,
}

pub fn list_offsets(ctx: &Ctx<'_>, req: ListOffsetsRequest) -> Outcome {
    let mut ops = Vec::new();
    let mut topics = Vec::new();
    for t in req.topics {
        let denied = !allowed(ctx, Operation::Describe, ResourceType::Topic, &t.name);
        let topic = ctx.broker.topic(&t.name);
        let mut parts = Vec::new();
        for p in t.partitions {
            let key = topic.as_ref().and_then(|tp| tp.key(p.partition_index));
            if denied {
                parts.push((p.partition_index, p.timestamp, Err(Slot::Error(ErrorCode::TopicAuthorizationFailed))));
                continue;
            }
            let shared = topic.as_ref().and_then(|tp| tp.shared(p.partition_index));
            // Earliest and latest come from the lock-free counters; only a timestamp
            // lookup needs the owner's indexes.
            let answer = match (key, shared, p.timestamp) {
                (Some(_), Some(s), -2) => Ok((s.log_start(), -1)),
                (Some(_), Some(s), -1) => Ok((s.next_offset(), -1)),
                // -3 (max timestamp) needs v7, which we do not advertise.
                (Some(_), Some(_), ts) if ts < 0 => Err(Slot::Error(ErrorCode::InvalidRequest)),
                (Some(key), Some(_), ts) => {
                    ops.push((key, PartOp::OffsetForTime { timestamp: ts }));
                    Err(Slot::Op(ops.len() - 1))
                }
                _ => Err(Slot::Error(ErrorCode::UnknownTopicOrPartition)),
            };
            parts.push((p.partition_index, p.timestamp, answer));
        }
        topics.push((t.name, parts));
    }
    Outcome::Gather(Gather { ops, then: Then::ListOffsets(ListOffsetsPlan { version: ctx.version, topics }) })
}

fn finish_list_offsets(plan: ListOffsetsPlan, results: &[PartResult]) -> Outcome {
    let mut resp = ListOffsetsResponse::default();
    for (name, parts) in plan.topics {
        let mut tr = ListOffsetsTopicResponse::default();
        tr.name = name;
        for (index, requested, answer) in parts {
            let mut pr = ListOffsetsPartitionResponse::default();
            pr.partition_index = index;
            pr.timestamp = -1;
            pr.offset = -1;
            if plan.version >= 4 {
                pr.leader_epoch = 0;
            }
            match answer {
                Ok((offset, ts)) => {
                    pr.offset = offset;
                    pr.timestamp = ts;
                }
                Err(Slot::Error(code)) => pr.error_code = code.code(),
                Err(Slot::Op(i)) => match &results[i] {
                    PartResult::Offset(Some(o)) => {
                        pr.offset = *o;
                        pr.timestamp = requested;
                    }
                    PartResult::Offset(None) => {}
                    PartResult::Failed { error, .. } => pr.error_code = ErrorCode::from(error).code(),
                    _ => pr.error_code = ErrorCode::UnknownTopicOrPartition.code(),
                },
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    Outcome::respond(resp)
}

/// Builds the outcome of a gather once every operation's result is in (in `ops` order).
pub fn finish(then: Then, results: Vec<PartResult>, client: &str, now: Instant) -> Outcome {
    match then {
        Then::Produce(plan) => finish_produce(plan, &results, client),
        Then::Fetch(plan) => finish_fetch(plan, results, now),
        Then::ListOffsets(plan) => finish_list_offsets(plan, &results),
    }
}
