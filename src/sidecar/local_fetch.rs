//! Answering a consumer's Fetch from the tail cache (sans-IO): decoding the request,
//! deciding between answering now, waiting for an upstream fetch in flight, and going
//! upstream ([`plan_fetch`]), and encoding the answer with the cached records kept by
//! reference ([`crate::buffer::ScatterBuf`]).
//!
//! # Invariants
//! - An answer is only given for a request the cache may answer ([`FetchAsk::cacheable`]:
//!   sessionless, read_uncommitted or read_committed) and, unless the request already
//!   waits here, only when no partition needs the broker (a miss, or a leader epoch the
//!   cache cannot vouch for): a request that can still go upstream never gets a partial
//!   answer standing in for the broker's.

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, Message};
use std::time::{Duration, Instant};

use super::cache::{Marks, Position, Serve, TailCache};
use crate::buffer::{Chunk, IoChunks, ScatterBuf};
use crate::framing::PREFIX;
use crate::protocol::kafka::frame::RequestHead;

pub fn within(r: kafka_protocol::protocol::VersionRange, v: i16) -> bool {
    r.min <= v && v <= r.max
}

/// A consumer's Fetch request, decoded, as the tail cache looks at it.
pub struct FetchAsk {
    pub version: i16,
    pub correlation_id: i32,
    pub req: FetchRequest,
    /// Each topic's name (Fetch v13+ names topics by id).
    pub names: Vec<String>,
    /// When the client wants an answer at the latest (its max wait).
    pub deadline: Instant,
    /// Sessionless and from a consumer: its answer lists every partition asked for.
    pub sessionless: bool,
}

impl FetchAsk {
    pub fn decode(frame: &Bytes, head: &RequestHead, topic_of: impl Fn(&[u8; 16]) -> Option<String>) -> Option<Self> {
        let version = head.version;
        if !within(FetchRequest::VERSIONS, version) {
            return None;
        }
        let mut body = frame.slice(PREFIX..);
        RequestHeader::decode(&mut body, ApiKey::Fetch.request_header_version(version)).ok()?;
        let req = FetchRequest::decode(&mut body, version).ok()?;
        let names = req
            .topics
            .iter()
            .map(|t| if version >= 13 { topic_of(t.topic_id.as_bytes()) } else { Some(t.topic.0.to_string()) })
            .collect::<Option<Vec<_>>>()?;
        let from_replica = req.replica_id.0 >= 0 || req.replica_state.replica_id.0 >= 0;
        let wait = Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
        Some(FetchAsk {
            version,
            correlation_id: head.correlation_id,
            sessionless: !from_replica && req.session_id == 0 && req.session_epoch == -1,
            deadline: Instant::now() + wait,
            names,
            req,
        })
    }

    /// Whether the tail cache may answer it at all: sessionless (read_committed ones are
    /// bounded by the last stable offset and kept off transactions by the cache).
    pub fn cacheable(&self) -> bool {
        self.sessionless && (0..=1).contains(&self.req.isolation_level) && !self.req.topics.is_empty()
    }

    pub fn partitions(&self) -> impl Iterator<Item = (&str, &kafka_protocol::messages::fetch_request::FetchPartition)> {
        self.req.topics.iter().zip(&self.names).flat_map(|(t, n)| t.partitions.iter().map(move |p| (n.as_str(), p)))
    }
}

/// What to do with a Fetch request, as the tail cache stands.
pub enum Plan {
    /// Answer it now, from the cache.
    Answer(IoChunks),
    /// Every partition is at the tail and an upstream fetch of each is in flight: wait
    /// for their answers (they fill the cache) rather than go upstream too.
    Wait,
    /// Upstream.
    Forward,
}

/// Plans a Fetch answer from the cache. `parked`: the request already waits here (it can
/// no longer go upstream; when it cannot wait any more it gets what there is, maybe
/// nothing); `force`: its max wait is over.
pub fn plan_fetch(ask: &FetchAsk, c: &mut TailCache, now: Instant, parked: bool, force: bool) -> Plan {
    let mut budget = usize::try_from(ask.req.max_bytes).unwrap_or(0);
    let (mut any, mut all_watched, mut missing) = (false, true, false);
    let mut parts = Vec::new();
    for (name, p) in ask.partitions() {
        let max = usize::try_from(p.partition_max_bytes).unwrap_or(0);
        let at = Position {
            offset: p.fetch_offset,
            last_fetched_epoch: p.last_fetched_epoch,
            committed: ask.req.isolation_level == 1,
        };
        let served = c.serve(name, p.partition, at, max.min(budget.max(1)));
        let marks = match &served {
            Serve::Hit { marks, .. } | Serve::Tail { marks } => Some(*marks),
            Serve::Miss => None,
        };
        // A client that knows another leader epoch is the broker's to answer.
        let epoch_ok =
            p.current_leader_epoch < 0 || marks.is_some_and(|m| m.leader_epoch == Some(p.current_leader_epoch));
        let entry = match served {
            _ if !epoch_ok => {
                missing = true;
                (None, None)
            }
            Serve::Miss => {
                missing = true;
                (None, None)
            }
            Serve::Tail { marks } => {
                all_watched &= c.watched(name, p.partition, now);
                (None, Some(marks))
            }
            // The answer's budget is spent (its first partition with data is always whole).
            Serve::Hit { marks, .. } if any && budget == 0 => (None, Some(marks)),
            Serve::Hit { records, marks } => {
                any = true;
                budget = budget.saturating_sub(records.len());
                (Some(records), Some(marks))
            }
        };
        parts.push(entry);
    }
    let answer_now = any || (parked && (force || missing || !all_watched));
    log::trace!(
        "sidecar: fetch {} parked={parked} force={force}: any={any} missing={missing} all_watched={all_watched}",
        ask.correlation_id
    );
    if !answer_now {
        return if !parked && (missing || !all_watched) { Plan::Forward } else { Plan::Wait };
    }
    if !parked && missing {
        return Plan::Forward;
    }
    match encode_fetch_answer(ask, parts) {
        Some(chunks) => Plan::Answer(chunks),
        None => Plan::Forward,
    }
}

/// A Fetch answer from the cache's views: per partition in request order, its records
/// (if any) and marks (`None`: nothing known; the fetch offset stands in).
fn encode_fetch_answer(ask: &FetchAsk, mut parts: Vec<(Option<Chunk>, Option<Marks>)>) -> Option<IoChunks> {
    let mut by_ref = Vec::new();
    let mut topics = Vec::with_capacity(ask.req.topics.len());
    let mut next = parts.drain(..);
    for t in &ask.req.topics {
        let mut out = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let (records, marks) = next.next()?;
            let mut d = PartitionData::default();
            d.partition_index = p.partition;
            let m =
                marks.unwrap_or(Marks { hw: p.fetch_offset, lso: p.fetch_offset, log_start: -1, leader_epoch: None });
            d.high_watermark = m.hw;
            d.last_stable_offset = m.lso;
            d.log_start_offset = m.log_start;
            // read_committed answers list aborted transactions (none: the cache serves no
            // transactional batch); read_uncommitted ones leave the list null.
            d.aborted_transactions = (ask.req.isolation_level == 1).then(Vec::new);
            d.records = Some(records.as_ref().map(|r| r.bytes().clone()).unwrap_or_default());
            by_ref.extend(records);
            out.push(d);
        }
        let mut r = FetchableTopicResponse::default();
        r.topic = t.topic.clone();
        r.topic_id = t.topic_id;
        r.partitions = out;
        topics.push(r);
    }
    let mut resp = FetchResponse::default();
    resp.responses = topics;
    let mut h = ResponseHeader::default();
    h.correlation_id = ask.correlation_id;
    let mut out = ScatterBuf::framed(by_ref);
    h.encode(&mut out, ApiKey::Fetch.response_header_version(ask.version)).ok()?;
    resp.encode(&mut out, ask.version).ok()?;
    Some(out.finish_framed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::cache::{Answer, CacheLimits};
    use bytes::BytesMut;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::protocol::StrBytes;

    /// One v2 batch header for offsets base..=last (epoch 0) and some body.
    fn batch(base: i64, last: i64) -> Vec<u8> {
        let mut b = vec![0u8; 61 + 40];
        b[..8].copy_from_slice(&base.to_be_bytes());
        b[8..12].copy_from_slice(&(61i32 - 12 + 40).to_be_bytes());
        b[16] = 2;
        b[23..27].copy_from_slice(&((last - base) as i32).to_be_bytes());
        b
    }

    fn cache_with(hw: i64) -> TailCache {
        let mut c =
            TailCache::new(CacheLimits { total_bytes: 1 << 20, partition_bytes: 1 << 18, block_bytes: 1 << 16 });
        let records = Bytes::from([batch(0, 9), batch(10, 19)].concat());
        let a = Answer {
            error_code: 0,
            hw,
            lso: hw,
            log_start: 0,
            leader_epoch: Some(4),
            diverging: false,
            records: Some(&records),
        };
        c.fill("t", 0, &a);
        c
    }

    /// A consumer's Fetch of `t` partitions (partition, offset), as a frame, decoded.
    fn ask(version: i16, isolation: i8, parts: &[(i32, i64, i32)]) -> FetchAsk {
        let mut req = FetchRequest::default();
        req.max_bytes = 1 << 20;
        req.isolation_level = isolation;
        let mut t = FetchTopic::default();
        t.topic = TopicName(StrBytes::from_static_str("t"));
        for &(partition, offset, epoch) in parts {
            let mut p = FetchPartition::default();
            p.partition = partition;
            p.fetch_offset = offset;
            p.current_leader_epoch = epoch;
            p.partition_max_bytes = 1 << 20;
            t.partitions.push(p);
        }
        req.topics.push(t);
        let mut h = RequestHeader::default();
        h.request_api_key = ApiKey::Fetch as i16;
        h.request_api_version = version;
        h.correlation_id = 77;
        let mut b = BytesMut::from(&[0u8; 4][..]);
        h.encode(&mut b, ApiKey::Fetch.request_header_version(version)).expect("header");
        req.encode(&mut b, version).expect("body");
        let frame = b.freeze();
        let head = RequestHead::peek(&frame[PREFIX..]).expect("head");
        FetchAsk::decode(&frame, &head, |_| None).expect("decodes")
    }

    fn answer(plan: Plan, version: i16) -> FetchResponse {
        let Plan::Answer(chunks) = plan else { panic!("not an answer") };
        let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let mut b = Bytes::from(bytes).slice(PREFIX..);
        let h = ResponseHeader::decode(&mut b, ApiKey::Fetch.response_header_version(version)).expect("header");
        assert_eq!(h.correlation_id, 77);
        FetchResponse::decode(&mut b, version).expect("a Fetch answer")
    }

    #[test]
    fn cached_partitions_are_answered_with_the_cached_batches_by_reference() {
        let mut c = cache_with(20);
        for version in [4i16, 11, 12] {
            let a = ask(version, 0, &[(0, 12, -1)]);
            let plan = plan_fetch(&a, &mut c, Instant::now(), false, false);
            let Plan::Answer(chunks) = &plan else { panic!("v{version}: not answered") };
            assert!(chunks.iter().any(|c| c.region().is_some()), "records by reference");
            let r = answer(plan, version);
            let p = &r.responses[0].partitions[0];
            assert_eq!((p.high_watermark, p.error_code), (20, 0));
            assert_eq!(p.records.as_ref().map(Bytes::len), Some(101), "v{version}: the batch holding 12 (10..=19)");
            assert!(p.aborted_transactions.is_none(), "read_uncommitted: no list");
        }
        // read_committed: the list is there, and empty.
        let r = answer(plan_fetch(&ask(11, 1, &[(0, 0, -1)]), &mut c, Instant::now(), false, false), 11);
        let p = &r.responses[0].partitions[0];
        assert_eq!(p.records.as_ref().map(Bytes::len), Some(2 * 101), "both batches from offset 0");
        assert_eq!(p.aborted_transactions.as_ref().map(Vec::len), Some(0));
    }

    #[test]
    fn a_miss_or_an_unknown_leader_epoch_goes_upstream_unless_the_fetch_already_waits() {
        let mut c = cache_with(20);
        let now = Instant::now();
        // Partition 1 is not cached: the whole request goes upstream.
        assert!(matches!(plan_fetch(&ask(11, 0, &[(0, 0, -1), (1, 0, -1)]), &mut c, now, false, false), Plan::Forward));
        // A leader epoch other than the cache's.
        assert!(matches!(plan_fetch(&ask(11, 0, &[(0, 0, 3)]), &mut c, now, false, false), Plan::Forward));
        assert!(matches!(plan_fetch(&ask(11, 0, &[(0, 0, 4)]), &mut c, now, false, false), Plan::Answer(_)));
        // Already waiting here: it gets what there is (the cached partition's data).
        let r = answer(plan_fetch(&ask(11, 0, &[(0, 0, -1), (1, 0, -1)]), &mut c, now, true, false), 11);
        assert!(r.responses[0].partitions[0].records.as_ref().is_some_and(|b| !b.is_empty()));
        assert!(r.responses[0].partitions[1].records.as_ref().is_some_and(Bytes::is_empty));
    }

    #[test]
    fn tail_fetches_wait_only_for_an_upstream_fetch_in_flight() {
        let mut c = cache_with(20);
        let now = Instant::now();
        let tail = ask(11, 0, &[(0, 20, -1)]);
        assert!(matches!(plan_fetch(&tail, &mut c, now, false, false), Plan::Forward), "nobody fetches upstream");
        c.watch("t", 0, now + Duration::from_secs(1));
        assert!(matches!(plan_fetch(&tail, &mut c, now, false, false), Plan::Wait));
        assert!(matches!(plan_fetch(&tail, &mut c, now, true, false), Plan::Wait), "parked: still waiting");
        let r = answer(plan_fetch(&tail, &mut c, now, true, true), 11);
        assert!(r.responses[0].partitions[0].records.as_ref().is_some_and(Bytes::is_empty), "its max wait: empty");
        // The upstream fetch answered without new data: the parked fetch answers (empty) now.
        c.release("t", 0);
        assert!(matches!(plan_fetch(&tail, &mut c, now, true, false), Plan::Answer(_)));
    }

    #[test]
    fn sessions_and_replicas_are_not_the_caches() {
        let mut a = ask(11, 0, &[(0, 0, -1)]);
        assert!(a.cacheable());
        a.sessionless = false;
        assert!(!a.cacheable());
        assert!(!ask(11, 2, &[(0, 0, -1)]).cacheable(), "an unknown isolation level");
    }
}
