//! The data path: Produce, Fetch (with long-poll) and ListOffsets.

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, ProduceRequest,
    ProduceResponse, TopicName,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{sb, Ctx, ErrorCode, Outcome, Parked};
use crate::broker::{Broker, Topic};
use crate::log::LogError;

pub fn produce(ctx: &Ctx<'_>, req: ProduceRequest) -> Outcome {
    let v = ctx.version;
    let mut resp = ProduceResponse::default();
    let mut appended = false;
    for td in req.topic_data {
        let topic = ctx.broker.topic(&td.name);
        let mut tr = TopicProduceResponse::default();
        tr.name = td.name.clone();
        for pd in td.partition_data {
            let mut pr = PartitionProduceResponse::default();
            pr.index = pd.index;
            pr.base_offset = -1;
            pr.log_append_time_ms = -1;
            let part = topic.as_ref().and_then(|t| t.partition(pd.index));
            let result = match (part, pd.records) {
                (None, _) => Err(ErrorCode::UnknownTopicOrPartition),
                (Some(_), None) => Err(ErrorCode::CorruptMessage),
                (Some(_), Some(_)) if req.transactional_id.is_some() => {
                    // Transactions are not implemented (and not advertised).
                    Err(ErrorCode::TransactionalIdAuthorizationFailed)
                }
                (Some(p), Some(records)) => {
                    let mut log = p.log.lock();
                    let r = log
                        .append(&records)
                        .map(|info| (info, log.log_start_offset()));
                    drop(log);
                    r.map_err(|e| {
                        if !matches!(
                            e,
                            LogError::OutOfOrderSequence { .. } | LogError::ProducerFenced { .. }
                        ) {
                            log::warn!(
                                "produce to {}-{} from {} rejected: {e}",
                                p.topic,
                                p.index,
                                ctx.client_host
                            );
                        }
                        ErrorCode::from(&e)
                    })
                }
            };
            match result {
                Ok((info, start)) => {
                    appended |= !info.duplicate;
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
        resp.responses.push(tr);
    }
    if appended {
        ctx.broker.notifier.notify();
    }
    if req.acks == 0 {
        Outcome::NoResponse
    } else {
        Outcome::respond(resp)
    }
}

/// A fetch waiting for `min_bytes` or its deadline.
pub struct ParkedFetch {
    pub version: i16,
    pub req: FetchRequest,
    pub deadline: Instant,
}

/// Resolved fetch targets: (topic name, topic, partition, offset, max bytes).
fn targets<'a>(
    broker: &Broker,
    req: &'a FetchRequest,
) -> Vec<(
    TopicName,
    Option<Arc<Topic>>,
    &'a kafka_protocol::messages::fetch_request::FetchPartition,
)> {
    let mut out = Vec::new();
    for t in &req.topics {
        let topic = if t.topic.is_empty() {
            broker.topic_by_id(t.topic_id)
        } else {
            broker.topic(&t.topic)
        };
        let name = topic
            .as_ref()
            .map_or(t.topic.clone(), |tp| TopicName(sb(&tp.name)));
        for p in &t.partitions {
            out.push((name.clone(), topic.clone(), p));
        }
    }
    out
}

pub fn fetch(ctx: &Ctx<'_>, req: FetchRequest) -> Outcome {
    let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64);
    let parked = ParkedFetch {
        version: ctx.version,
        deadline: ctx.now + wait,
        req,
    };
    match poll_fetch(ctx.broker, &parked, ctx.now, wait.is_zero()) {
        Some(outcome) => outcome,
        None => Outcome::Park(Parked::Fetch(parked)),
    }
}

/// Answers the fetch if enough bytes are there (or `force`), else `None`.
pub fn poll_fetch(
    broker: &Arc<Broker>,
    p: &ParkedFetch,
    now: Instant,
    force: bool,
) -> Option<Outcome> {
    let req = &p.req;
    let targets = targets(broker, req);
    if !force && now < p.deadline {
        let min = req.min_bytes.max(1) as usize;
        let mut available = 0usize;
        for (_, topic, fp) in &targets {
            let Some(part) = topic.as_ref().and_then(|t| t.partition(fp.partition)) else {
                return Some(build_fetch(p, &targets)); // errors are answered at once
            };
            let log = part.log.lock();
            if fp.fetch_offset < log.log_start_offset() || fp.fetch_offset > log.next_offset() {
                drop(log);
                return Some(build_fetch(p, &targets));
            }
            available += log.bytes_after(fp.fetch_offset, min);
            if available >= min {
                break;
            }
        }
        if available < min {
            return None;
        }
    }
    Some(build_fetch(p, &targets))
}

fn build_fetch(
    p: &ParkedFetch,
    targets: &[(
        TopicName,
        Option<Arc<Topic>>,
        &kafka_protocol::messages::fetch_request::FetchPartition,
    )],
) -> Outcome {
    let v = p.version;
    let req = &p.req;
    let mut resp = FetchResponse::default();
    let mut by_ref: Vec<Bytes> = Vec::new();
    let mut budget = if req.max_bytes > 0 {
        req.max_bytes as usize
    } else {
        usize::MAX
    };
    for (name, topic, fp) in targets {
        if resp
            .responses
            .last()
            .is_none_or(|t: &FetchableTopicResponse| &t.topic != name)
        {
            let mut tr = FetchableTopicResponse::default();
            tr.topic = name.clone();
            if v >= 13 {
                tr.topic_id = topic.as_ref().map(|t| t.meta.id).unwrap_or_default();
            }
            resp.responses.push(tr);
        }
        let mut pd = PartitionData::default();
        pd.partition_index = fp.partition;
        pd.high_watermark = -1;
        pd.last_stable_offset = -1;
        pd.log_start_offset = -1;
        match topic.as_ref().and_then(|t| t.partition(fp.partition)) {
            None => pd.error_code = ErrorCode::UnknownTopicOrPartition.code(),
            Some(part) => {
                let max = (fp.partition_max_bytes.max(0) as usize).min(budget);
                let read = part.log.lock().read(fp.fetch_offset, max);
                match read {
                    Ok(r) => {
                        pd.high_watermark = r.high_watermark;
                        pd.last_stable_offset = r.high_watermark;
                        pd.log_start_offset = r.log_start_offset;
                        budget = budget.saturating_sub(r.records.len());
                        if !r.records.is_empty() {
                            by_ref.push(r.records.clone());
                        }
                        pd.records = Some(r.records);
                    }
                    Err(e) => {
                        let log = part.log.lock();
                        pd.high_watermark = log.next_offset();
                        pd.last_stable_offset = log.next_offset();
                        pd.log_start_offset = log.log_start_offset();
                        pd.error_code = ErrorCode::from(&e).code();
                    }
                }
            }
        }
        if pd.records.is_none() {
            pd.records = Some(Bytes::new());
        }
        if let Some(tr) = resp.responses.last_mut() {
            tr.partitions.push(pd);
        }
    }
    Outcome::Respond(resp.into(), by_ref)
}

pub fn list_offsets(ctx: &Ctx<'_>, req: ListOffsetsRequest) -> Outcome {
    let v = ctx.version;
    let mut resp = ListOffsetsResponse::default();
    for t in req.topics {
        let topic = ctx.broker.topic(&t.name);
        let mut tr = ListOffsetsTopicResponse::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let mut pr = ListOffsetsPartitionResponse::default();
            pr.partition_index = p.partition_index;
            pr.timestamp = -1;
            pr.offset = -1;
            if v >= 4 {
                pr.leader_epoch = 0;
            }
            match topic
                .as_ref()
                .and_then(|tp| tp.partition(p.partition_index))
            {
                None => pr.error_code = ErrorCode::UnknownTopicOrPartition.code(),
                Some(part) => {
                    let log = part.log.lock();
                    pr.offset = match p.timestamp {
                        -2 => log.log_start_offset(),
                        -1 => log.next_offset(),
                        // -3 (max timestamp) needs v7, which we do not advertise.
                        ts if ts < 0 => {
                            pr.error_code = ErrorCode::InvalidRequest.code();
                            -1
                        }
                        ts => match log.offset_for_time(ts) {
                            Some(o) => {
                                pr.timestamp = ts;
                                o
                            }
                            None => -1,
                        },
                    };
                }
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    Outcome::respond(resp)
}
