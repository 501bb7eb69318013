//! Admin lookups: VIEW_MESSAGE_BY_ID (by the offset message id's physical offset) and
//! QUERY_MESSAGE (by key or unique key, within a time range).
//!
//! The log keeps no key index (RocketMQ's IndexFile): QUERY_MESSAGE scans each queue of
//! the topic from the first message at or after `beginTimestamp`, reading at most
//! [`SCAN_BYTES`] per queue, until `endTimestamp` or `maxNum` matches. That bounds what
//! one query may cost the owner cores; a key older than the scanned window is not found
//! (documented in docs/rocketmq.md).

use bytes::BytesMut;
use kafka_protocol::records::{Record, RecordBatchDecoder};
use std::net::SocketAddr;
use std::sync::Arc;

use super::codes::Response;
use super::frame::Command;
use super::message;
use super::{error, gather_then, ok, record_at, step, Conn, Reply};
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{PartKey, Topic};
use crate::dispatch::session::{Cx, Step};

/// The most a QUERY_MESSAGE reads from one queue.
pub const SCAN_BYTES: usize = 64 << 20;
/// Bytes per read while scanning.
const READ: usize = 1 << 20;
/// The most matches one query returns, whatever it asks.
const MAX_MATCHES: usize = 64;

/// VIEW_MESSAGE_BY_ID: the message at a physical offset. Topics are named there by an
/// 11-bit tag; of the topics with that tag, the first holding a message at that queue
/// and offset answers.
pub fn view_by_id(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let Some(physical) = req.field("offset").and_then(|o| o.parse::<i64>().ok()) else {
        return error(req, Response::SystemError, "offset missing");
    };
    let (tag, queue_id, offset) = message::split_physical_offset(physical);
    let candidates: Vec<Arc<Topic>> = cx
        .broker
        .topics()
        .into_iter()
        .filter(|t| message::topic_tag(&t.meta.id) == tag && t.key(queue_id).is_some())
        .collect();
    let req = req.head();
    Reply::Step(try_candidates(candidates, queue_id, offset, req, conn.state.store_host))
}

fn try_candidates(mut candidates: Vec<Arc<Topic>>, queue_id: i32, offset: i64, req: Command, host: SocketAddr) -> Step {
    let Some(topic) = candidates.pop() else {
        return step(&req, error(&req, Response::SystemError, "no message at that id"));
    };
    let Some(key) = topic.key(queue_id) else { return try_candidates(candidates, queue_id, offset, req, host) };
    gather_then(vec![(key, PartOp::Read { offset, max_bytes: 1 })], move |_cx, results| {
        match record_at(results.into_iter().next(), offset) {
            Some(rec) => {
                let mut body = BytesMut::new();
                message::encode_stored(&mut body, &topic, queue_id, &rec, host);
                let mut resp = ok(&req);
                resp.body = body.freeze();
                step(&req, Reply::Done(resp))
            }
            None => try_candidates(candidates, queue_id, offset, req, host),
        }
    })
}

/// One queue's scan.
struct Cursor {
    queue_id: i32,
    key: PartKey,
    offset: i64,
    read: usize,
    done: bool,
}

struct Query {
    req: Command,
    topic: Arc<Topic>,
    key: String,
    unique: bool,
    end: i64,
    max: usize,
    host: SocketAddr,
    cursors: Vec<Cursor>,
    found: BytesMut,
    matches: usize,
}

/// QUERY_MESSAGE: messages whose `KEYS` holds `key` (or whose `UNIQ_KEY` is `key`, for a
/// unique-key query) stored between `beginTimestamp` and `endTimestamp`.
pub fn query(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let field = |n: &str| req.field(n).map(str::to_string);
    let (Some(name), Some(key)) = (field("topic"), field("key")) else {
        return error(req, Response::SystemError, "topic and key are required");
    };
    let Some(topic) = cx.broker.topic(&name) else {
        return error(req, Response::TopicNotExist, format!("topic[{name}] not exist"));
    };
    let num = |n: &str, d: i64| req.field(n).and_then(|v| v.parse::<i64>().ok()).unwrap_or(d);
    let begin = num("beginTimestamp", 0);
    let q = Query {
        req: req.head(),
        key,
        unique: req.field("_UNIQUE_KEY_QUERY") == Some("true"),
        end: num("endTimestamp", i64::MAX),
        max: (num("maxNum", 32).max(1) as usize).min(MAX_MATCHES),
        host: conn.state.store_host,
        cursors: (0..topic.meta.partitions)
            .filter_map(|q| Some(Cursor { queue_id: q, key: topic.key(q)?, offset: 0, read: 0, done: false }))
            .collect(),
        topic,
        found: BytesMut::new(),
        matches: 0,
    };
    // Where each queue's scan starts: its first message at or after `begin`.
    let ops = q.cursors.iter().map(|c| (c.key, PartOp::OffsetForTime { timestamp: begin })).collect();
    Reply::Step(gather_then(ops, move |_cx, results| {
        let mut q = q;
        for (c, r) in q.cursors.iter_mut().zip(results) {
            match r {
                PartResult::Offset(Some(o)) => c.offset = o,
                _ => c.done = true,
            }
        }
        q.scan()
    }))
}

impl Query {
    fn scan(self) -> Step {
        let live: Vec<usize> = (0..self.cursors.len()).filter(|i| !self.cursors[*i].done).collect();
        if live.is_empty() || self.matches >= self.max {
            return self.answer();
        }
        let ops = live
            .iter()
            .map(|i| (self.cursors[*i].key, PartOp::Read { offset: self.cursors[*i].offset, max_bytes: READ }))
            .collect();
        gather_then(ops, move |_cx, results| {
            let mut q = self;
            for (i, r) in live.into_iter().zip(results) {
                q.take(i, r);
            }
            q.scan()
        })
    }

    fn matches(&self, r: &Record) -> bool {
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k.as_str() == name)
                .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
        };
        if self.unique {
            return header("UNIQ_KEY") == Some(self.key.as_str());
        }
        let from_header = header(message::PROPERTY_KEYS).is_some_and(|k| k.split(' ').any(|k| k == self.key));
        from_header || r.key.as_deref() == Some(self.key.as_bytes())
    }

    fn take(&mut self, i: usize, result: PartResult) {
        let PartResult::Read(read) = result else {
            self.cursors[i].done = true;
            return;
        };
        let bytes = read.records.bytes().clone();
        self.cursors[i].read += bytes.len();
        let mut buf = bytes;
        let mut advanced = false;
        while !buf.is_empty() {
            let Ok(set) = RecordBatchDecoder::decode(&mut buf) else { break };
            let from = self.cursors[i].offset;
            for r in set.records.iter().filter(|r| r.offset >= from) {
                self.cursors[i].offset = r.offset + 1;
                advanced = true;
                if r.timestamp > self.end {
                    self.cursors[i].done = true;
                    return;
                }
                if !r.control && self.matches(r) && self.matches < self.max {
                    let queue_id = self.cursors[i].queue_id;
                    message::encode_stored(&mut self.found, &self.topic, queue_id, r, self.host);
                    self.matches += 1;
                }
            }
        }
        let c = &mut self.cursors[i];
        if !advanced || c.offset >= read.high_watermark || c.read >= SCAN_BYTES {
            c.done = true;
        }
    }

    fn answer(self) -> Step {
        if self.matches == 0 {
            return step(&self.req, error(&self.req, Response::QueryNotFound, "no message with that key in the range"));
        }
        let mut resp =
            ok(&self.req).with("indexLastUpdateTimestamp", crate::log::now_ms()).with("indexLastUpdatePhyoffset", 0);
        resp.body = self.found.freeze();
        step(&self.req, Reply::Done(resp))
    }
}
