//! Rewrites the broker addresses in responses, so clients that only know a sidecar's
//! address keep connecting through it (kafka-proxy's trick): Metadata, FindCoordinator and
//! DescribeCluster answers name `advertise` instead of the broker behind the sidecar.
//!
//! The rewriter follows the request stream to learn each response's API and version
//! (Kafka answers in request order on a connection), so it never guesses a format.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, DescribeClusterResponse, FindCoordinatorResponse, MetadataResponse, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use std::collections::VecDeque;

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("request frame of {0} bytes is too short or too large")]
    BadLength(i64),
    #[error("malformed {0} request header")]
    BadRequest(&'static str),
    #[error("response without a request")]
    Unrequested,
    #[error("response with correlation id {got}, expected {want}")]
    Correlation { got: i32, want: i32 },
    #[error("cannot {what} a {api:?} v{version} response: {reason}")]
    Codec { what: &'static str, api: ApiKey, version: i16, reason: String },
}

/// A request that will be answered: what the bridge needs to read its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub api: i16,
    pub version: i16,
    pub correlation_id: i32,
}

impl Pending {
    /// Whether a response with `correlation_id` answers this request: responses come in
    /// request order, so anything else means the stream was misread.
    pub fn check(&self, correlation_id: i32) -> Result<(), RewriteError> {
        if self.correlation_id == correlation_id {
            Ok(())
        } else {
            Err(RewriteError::Correlation { got: correlation_id, want: self.correlation_id })
        }
    }
}

/// The requests seen that are still to be answered, oldest first.
///
/// # Invariants
/// - A request enters `pending` only if the broker answers it: a Produce with `acks = 0`
///   gets no response in Kafka, so it is read up to its `acks` field and left out (were it
///   queued, every later response would be matched to the request before it).
#[derive(Default)]
pub struct RequestLog {
    pending: VecDeque<Pending>,
    /// Bytes of the current request frame still to pass over, once its header is read.
    skip: usize,
    /// The current frame's first bytes (length prefix onward) while its header is read.
    head: Vec<u8>,
}

/// Largest frame the sidecar tracks (the broker enforces its own limit).
const MAX_FRAME: usize = 1 << 30;

/// How far into a Produce request its `acks` may lie: a client id (at most 32 KiB) and
/// header tagged fields; a request that needs more is refused rather than buffered.
const MAX_PRODUCE_HEAD: usize = 64 * 1024;

/// What the header bytes read so far of a frame say.
enum Head {
    /// At least this many bytes of the frame (prefix included) are needed.
    Need(usize),
    /// The header is read; `answered` is false for a request that gets no response.
    Done { pending: Pending, answered: bool },
}

/// A bounds-checked reader over a request's leading bytes: running out is `Short` with
/// how many bytes would be needed, never a panic.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

struct Short(usize);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Short> {
        let end = self.at.checked_add(n).ok_or(Short(usize::MAX))?;
        let s = self.b.get(self.at..end).ok_or(Short(end))?;
        self.at = end;
        Ok(s)
    }

    fn i16(&mut self) -> Result<i16, Short> {
        let s = self.take(2)?;
        Ok(i16::from_be_bytes([s[0], s[1]]))
    }

    fn uvarint(&mut self) -> Result<u32, Short> {
        let mut v: u32 = 0;
        for i in 0..5 {
            let byte = self.take(1)?[0];
            v |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        // Over five bytes: no u32. Ask for more than any frame may hold, so it is refused.
        Err(Short(usize::MAX))
    }
}

/// The `acks` of a Produce request whose frame starts `b` (length prefix included), after
/// its request header (v1, or v2 with tagged fields for flexible versions) and its
/// transactional id (v3 on; compact from v9).
fn produce_acks(b: &[u8], version: i16) -> Result<i16, Short> {
    let mut c = Cursor { b, at: 12 }; // prefix, api key, version, correlation id
    let client_id = c.i16()?;
    if client_id > 0 {
        c.take(client_id as usize)?;
    }
    let flexible = ApiKey::Produce.request_header_version(version) >= 2;
    if flexible {
        for _ in 0..c.uvarint()? {
            c.uvarint()?; // tag
            let size = c.uvarint()?;
            c.take(size as usize)?;
        }
    }
    if version >= 3 {
        let len = if flexible { c.uvarint()? as usize } else { c.i16()?.max(0) as usize + 1 };
        // Compact strings store length + 1 (0 = null); `len` is on that scale for both.
        c.take(len.saturating_sub(1))?;
    }
    c.i16()
}

fn read_head(h: &[u8]) -> Result<Head, RewriteError> {
    if h.len() < 12 {
        return Ok(Head::Need(12));
    }
    let len = i64::from(i32::from_be_bytes([h[0], h[1], h[2], h[3]]));
    // api key, version and correlation id at least
    if !(8..=MAX_FRAME as i64).contains(&len) {
        return Err(RewriteError::BadLength(len));
    }
    let pending = Pending {
        api: i16::from_be_bytes([h[4], h[5]]),
        version: i16::from_be_bytes([h[6], h[7]]),
        correlation_id: i32::from_be_bytes([h[8], h[9], h[10], h[11]]),
    };
    if pending.api != ApiKey::Produce as i16 {
        return Ok(Head::Done { pending, answered: true });
    }
    let frame_end = len as usize + 4;
    match produce_acks(h, pending.version) {
        Ok(acks) => Ok(Head::Done { pending, answered: acks != 0 }),
        Err(Short(n)) if n <= frame_end.min(MAX_PRODUCE_HEAD) => Ok(Head::Need(n)),
        Err(Short(_)) => Err(RewriteError::BadRequest("Produce")),
    }
}

impl RequestLog {
    /// Follows the request byte stream.
    pub fn observe(&mut self, mut bytes: &[u8]) -> Result<(), RewriteError> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            match read_head(&self.head)? {
                Head::Need(n) => {
                    let take = (n - self.head.len()).min(bytes.len());
                    self.head.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                }
                Head::Done { pending, answered } => self.finish_head(pending, answered),
            }
        }
        // A header completed by the last bytes is settled now, not at the next call.
        if let Head::Done { pending, answered } = read_head(&self.head)? {
            self.finish_head(pending, answered);
        }
        Ok(())
    }

    fn finish_head(&mut self, pending: Pending, answered: bool) {
        if answered {
            self.pending.push_back(pending);
        }
        let len = i32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]) as usize;
        self.skip = len + 4 - self.head.len();
        self.head.clear();
    }

    /// Whether every request seen has been answered.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The request the next response answers.
    pub fn next_response(&mut self) -> Result<Pending, RewriteError> {
        self.pending.pop_front().ok_or(RewriteError::Unrequested)
    }
}

/// Whether responses of `api` name brokers (and must be rewritten whole).
pub fn names_brokers(api: i16) -> bool {
    matches!(ApiKey::try_from(api), Ok(ApiKey::Metadata | ApiKey::FindCoordinator | ApiKey::DescribeCluster))
}

/// Rewrites one response frame body (without its length prefix) of `api`/`version` to
/// advertise `host:port`. Returns the new body.
pub fn rewrite(api: i16, version: i16, body: &[u8], host: &str, port: u16) -> Result<Vec<u8>, RewriteError> {
    let Ok(key) = ApiKey::try_from(api) else { return Ok(body.to_vec()) };
    let hv = key.response_header_version(version);
    let mut buf = Bytes::copy_from_slice(body);
    let codec = |what: &'static str| {
        move |e: anyhow::Error| RewriteError::Codec { what, api: key, version, reason: e.to_string() }
    };
    let header = ResponseHeader::decode(&mut buf, hv).map_err(codec("decode"))?;
    let mut out = BytesMut::new();
    header.encode(&mut out, hv).map_err(codec("encode"))?;
    let host = StrBytes::from_string(host.to_string());
    let port = i32::from(port);
    match key {
        ApiKey::Metadata => {
            let mut r = MetadataResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            for b in &mut r.brokers {
                b.host = host.clone();
                b.port = port;
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::FindCoordinator => {
            let mut r = FindCoordinatorResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            if version < 4 {
                if r.error_code == 0 {
                    r.host = host.clone();
                    r.port = port;
                }
            } else {
                for c in &mut r.coordinators {
                    if c.error_code == 0 {
                        c.host = host.clone();
                        c.port = port;
                    }
                }
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::DescribeCluster => {
            let mut r = DescribeClusterResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            for b in &mut r.brokers {
                b.host = host.clone();
                b.port = port;
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        _ => return Ok(body.to_vec()),
    }
    Ok(out.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::{
        BrokerId, FindCoordinatorRequest, MetadataRequest, ProduceRequest, RequestHeader, TransactionalId,
    };

    /// `count` deterministic mutants of `seed`: the i-th cut short by `i % len` bytes, then
    /// `flips` bytes overwritten (xorshift from `state`).
    fn mutants(seed: &[u8], count: usize, flips: usize, mut state: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
        (0..count).map(move |i| {
            let mut v = seed[..seed.len() - (i % seed.len())].to_vec();
            for _ in 0..flips {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if !v.is_empty() {
                    let at = (state as usize) % v.len();
                    v[at] = (state >> 40) as u8;
                }
            }
            v
        })
    }

    /// One request frame, encoded as a client would.
    fn request<R: Encodable>(api: ApiKey, version: i16, corr: i32, client: Option<&str>, body: &R) -> Vec<u8> {
        let mut h = RequestHeader::default();
        h.request_api_key = api as i16;
        h.request_api_version = version;
        h.correlation_id = corr;
        h.client_id = client.map(|c| StrBytes::from_string(c.to_string()));
        let hv = api.request_header_version(version);
        if hv >= 2 {
            // A header tagged field the log must pass over.
            h.unknown_tagged_fields.insert(7, Bytes::from_static(b"tagged"));
        }
        let mut b = BytesMut::new();
        h.encode(&mut b, hv).expect("header");
        body.encode(&mut b, version).expect("body");
        let mut f = (b.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&b);
        f
    }

    fn produce(acks: i16, txn: Option<&str>) -> ProduceRequest {
        let mut p = ProduceRequest::default();
        p.acks = acks;
        p.timeout_ms = 1000;
        p.transactional_id = txn.map(|t| TransactionalId(StrBytes::from_string(t.to_string())));
        p
    }

    #[test]
    fn request_log_follows_split_frames_and_skips_unanswered_produces() {
        let mut stream = Vec::new();
        stream.extend(request(ApiKey::Metadata, 12, 1, Some("rdkafka"), &MetadataRequest::default()));
        stream.extend(request(ApiKey::Produce, 9, 2, Some("rdkafka"), &produce(-1, None)));
        stream.extend(request(ApiKey::Produce, 9, 3, Some("a-longer-client-id"), &produce(0, Some("txn-1"))));
        stream.extend(request(ApiKey::Produce, 3, 4, None, &produce(0, Some("txn-2"))));
        stream.extend(request(ApiKey::Produce, 8, 5, Some(""), &produce(0, None)));
        stream.extend(request(ApiKey::FindCoordinator, 4, 6, Some("c"), &FindCoordinatorRequest::default()));
        stream.extend(request(ApiKey::Produce, 8, 7, Some("c"), &produce(1, None)));
        stream.extend(request(ApiKey::Produce, 13, 8, Some("c"), &produce(0, None)));
        let want = [
            (ApiKey::Metadata, 12, 1),
            (ApiKey::Produce, 9, 2),
            (ApiKey::FindCoordinator, 4, 6),
            (ApiKey::Produce, 8, 7),
        ];
        // Every way of cutting the stream, from one byte at a time up.
        for piece in 1..=stream.len() {
            let mut log = RequestLog::default();
            for chunk in stream.chunks(piece) {
                log.observe(chunk).expect("valid stream");
            }
            for (api, version, corr) in want {
                let p = log.next_response().expect("a pending request");
                assert_eq!((p.api, p.version, p.correlation_id), (api as i16, version, corr), "pieces of {piece}");
                assert!(p.check(corr).is_ok() && p.check(corr + 1).is_err());
            }
            assert!(log.next_response().is_err(), "acks=0 produces are not waited for (pieces of {piece})");
        }
    }

    #[test]
    fn request_log_refuses_impossible_frames() {
        // A negative length, and one too short for a request header.
        assert!(RequestLog::default().observe(&[0xff, 0xff, 0xff, 0xfb, 0, 3, 0, 1, 0, 0, 0, 1]).is_err());
        assert!(RequestLog::default().observe(&[0, 0, 0, 6, 0, 3, 0, 1, 0, 0, 0, 1]).is_err());
        // A Produce whose client id runs past the end of its frame.
        let mut f = request(ApiKey::Produce, 8, 1, Some("client"), &produce(1, None));
        f[12..14].copy_from_slice(&1000i16.to_be_bytes());
        assert!(matches!(RequestLog::default().observe(&f), Err(RewriteError::BadRequest(_))));
        // A flexible Produce with a header tagged field longer than the frame.
        let mut f = request(ApiKey::Produce, 9, 1, None, &produce(1, None));
        let tagged_size_at = 12 + 2 + 1 + 1; // no client id; one field; tag 7
        f[tagged_size_at] = 0x7f;
        assert!(matches!(RequestLog::default().observe(&f), Err(RewriteError::BadRequest(_))));
    }

    /// Deterministic mutations of request streams with Produce frames of every header
    /// version: the log refuses or follows them, never panics or runs past a frame.
    #[test]
    fn mutated_request_streams_never_panic() {
        let mut seed = request(ApiKey::Produce, 9, 1, Some("client"), &produce(0, Some("txn")));
        seed.extend(request(ApiKey::Produce, 3, 2, Some("c"), &produce(1, Some("t"))));
        seed.extend(request(ApiKey::Metadata, 12, 3, None, &MetadataRequest::default()));
        for (i, v) in mutants(&seed, 5000, 3, 0x9e37_79b9_7f4a_7c15).enumerate() {
            let mut log = RequestLog::default();
            for chunk in v.chunks(1 + i % 7) {
                if log.observe(chunk).is_err() {
                    break;
                }
            }
            while log.next_response().is_ok() {}
        }
    }

    #[test]
    fn metadata_brokers_are_rewritten_in_every_version() {
        for version in [1i16, 4, 9, 12] {
            let mut r = MetadataResponse::default();
            let mut b = MetadataResponseBroker::default();
            b.node_id = BrokerId(0);
            b.host = StrBytes::from_static_str("10.77.0.1");
            b.port = 9092;
            r.brokers.push(b);
            let hv = ApiKey::Metadata.response_header_version(version);
            let mut body = BytesMut::new();
            let mut h = ResponseHeader::default();
            h.correlation_id = 7;
            h.encode(&mut body, hv).expect("header");
            r.encode(&mut body, version).expect("body");
            let out = rewrite(3, version, &body, "127.0.0.1", 19092).expect("rewrite");
            let mut buf = Bytes::from(out);
            let h = ResponseHeader::decode(&mut buf, hv).expect("header");
            assert_eq!(h.correlation_id, 7);
            let r = MetadataResponse::decode(&mut buf, version).expect("body");
            assert_eq!((r.brokers[0].host.as_str(), r.brokers[0].port), ("127.0.0.1", 19092), "v{version}");
        }
    }

    /// Deterministic mutations of a valid Metadata response, under every API the rewriter
    /// handles (the fuzz target `sidecar_rewrite` does the same open-ended).
    #[test]
    fn mutated_responses_never_panic() {
        let mut r = MetadataResponse::default();
        let mut b = MetadataResponseBroker::default();
        b.host = StrBytes::from_static_str("broker");
        r.brokers.push(b);
        let mut seed = BytesMut::new();
        ResponseHeader::default().encode(&mut seed, 1).expect("header");
        r.encode(&mut seed, 12).expect("body");
        for v in mutants(&seed, 3000, 2, 0x2545_f491_4f6c_dd1d) {
            for (api, version) in [(3, 12), (3, 1), (10, 3), (10, 4), (60, 0)] {
                let _ = rewrite(api, version, &v, "h", 1);
            }
            let _ = RequestLog::default().observe(&v);
        }
    }

    #[test]
    fn garbage_responses_are_errors_not_panics() {
        assert!(rewrite(3, 12, &[1, 2, 3], "h", 1).is_err());
        assert!(rewrite(10, 4, &[], "h", 1).is_err());
    }
}
