//! Rewrites the broker addresses in responses, so clients that only know a sidecar's
//! address keep connecting through it (kafka-proxy's trick): Metadata, FindCoordinator and
//! DescribeCluster answers name `advertise` instead of the broker behind the sidecar.
//!
//! The rewriter follows the request stream ([`RequestLog`]) to learn each response's API
//! and version (Kafka answers in request order on a connection), so it never guesses a
//! format, and cuts the response stream ([`Responses`]) into frames that pass through
//! untouched and frames it rewrites. Both are sans-IO and cut frames with the one Kafka
//! framer ([`crate::protocol::kafka::frame`]).

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, DeleteTopicsResponse, DescribeClusterResponse, FetchResponse, FindCoordinatorResponse,
    MetadataResponse, ProduceResponse, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, Message, StrBytes};
use std::collections::VecDeque;

use crate::framing::PREFIX;
use crate::protocol::kafka::frame::{response_correlation, Framer, RequestHead, Side, REQUEST_HEAD};

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("request {0}")]
    BadLength(crate::framing::LengthError),
    #[error("response {0}")]
    BadResponseLength(crate::framing::LengthError),
    #[error("malformed {0} request header")]
    BadRequest(&'static str),
    #[error("response without a request")]
    Unrequested,
    #[error("response with correlation id {got}, expected {want}")]
    Correlation { got: i32, want: i32 },
    #[error("cannot {what} a {api:?} v{version} response: {reason}")]
    Codec { what: &'static str, api: ApiKey, version: i16, reason: String },
    #[error("a {api:?} response of {len} bytes is over the {max}-byte bound for answers that are rewritten")]
    TooLarge { api: ApiKey, len: usize, max: usize },
    #[error("cannot advertise broker {node_id}: {reason}")]
    Refused { node_id: i32, reason: String },
}

/// A request that will be answered: what the bridge needs to read its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub api: i16,
    pub version: i16,
    pub correlation_id: i32,
    /// Answered by the sidecar itself, not forwarded (the caller keeps the answer).
    pub local: bool,
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

fn request_framer() -> Framer {
    Framer::new(Side::Requests, MAX_FRAME)
}

fn response_framer() -> Framer {
    Framer::new(Side::Responses, MAX_FRAME)
}

/// How far into a Produce request its `acks` may lie: a client id (at most 32 KiB) and
/// header tagged fields; a request that needs more is refused rather than buffered.
const MAX_PRODUCE_HEAD: usize = 64 * 1024;

/// What the header bytes read so far of a frame say.
enum Head {
    /// At least this many bytes of the frame (prefix included) are needed.
    Need(usize),
    /// The header is read; `answered` is false for a request that gets no response.
    Done { pending: Pending, answered: bool, frame_end: usize },
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
    let Some(len) = request_framer().peek_len(h).map_err(RewriteError::BadLength)? else {
        return Ok(Head::Need(PREFIX + REQUEST_HEAD));
    };
    let Some(head) = RequestHead::peek(&h[PREFIX..]) else { return Ok(Head::Need(PREFIX + REQUEST_HEAD)) };
    let pending = Pending { api: head.api, version: head.version, correlation_id: head.correlation_id, local: false };
    let frame_end = len + PREFIX;
    if pending.api != ApiKey::Produce as i16 {
        return Ok(Head::Done { pending, answered: true, frame_end });
    }
    match produce_acks(h, pending.version) {
        Ok(acks) => Ok(Head::Done { pending, answered: acks != 0, frame_end }),
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
                Head::Done { pending, answered, frame_end } => self.finish_head(pending, answered, frame_end),
            }
        }
        // A header completed by the last bytes is settled now, not at the next call.
        if let Head::Done { pending, answered, frame_end } = read_head(&self.head)? {
            self.finish_head(pending, answered, frame_end);
        }
        Ok(())
    }

    /// The current frame's header is read: `frame_end` is its length, prefix included.
    fn finish_head(&mut self, pending: Pending, answered: bool, frame_end: usize) {
        if answered {
            self.pending.push_back(pending);
        }
        self.skip = frame_end.saturating_sub(self.head.len());
        self.head.clear();
    }

    /// A request the caller answers itself (it was not forwarded): its place in the
    /// order of answers. Only between frames of the forwarded stream.
    pub fn push_local(&mut self, api: i16, version: i16, correlation_id: i32) {
        debug_assert!(self.skip == 0 && self.head.is_empty(), "a local answer inside a forwarded frame");
        self.pending.push_back(Pending { api, version, correlation_id, local: true });
    }

    /// Whether the next answer due is one the caller gives itself.
    pub fn next_is_local(&self) -> bool {
        self.pending.front().is_some_and(|p| p.local)
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

/// Where the response stream is inside the current frame.
enum RespState {
    /// Reading a length prefix and correlation id (bytes so far).
    Prefix(Vec<u8>),
    /// Passing `left` bytes of a frame straight through.
    Pass { left: usize },
    /// Collecting a frame that names brokers, to rewrite.
    Collect { api: i16, version: i16, body: Vec<u8>, len: usize },
}

/// Cuts a connection's response stream into frames that pass through untouched (their
/// bytes are copied by the caller straight from where they arrived to where they go) and
/// frames that name brokers, which are collected and rewritten to advertise
/// `host:port`. Sans-IO: the bridge's pump loop only moves bytes.
///
/// # Invariants
/// - Every response is matched to the request it answers ([`RequestLog`]) and its
///   correlation id checked: a stream misread is an error, never a silent corruption.
pub struct Responses<A> {
    state: RespState,
    advertise: A,
    /// The largest frame collected to be rewritten.
    max_collect: usize,
    /// Answers that went out changed.
    rewritten: u64,
    /// Bytes of Fetch answers seen (frames, prefix included).
    fetch_bytes: u64,
}

impl<A: Advertise> Responses<A> {
    pub fn new(advertise: A) -> Responses<A> {
        Responses {
            state: RespState::Prefix(Vec::new()),
            advertise,
            max_collect: MAX_FRAME,
            rewritten: 0,
            fetch_bytes: 0,
        }
    }

    /// Bounds the frames collected whole (a longer one is an error): the memory a
    /// connection may hold.
    pub fn with_max_collect(mut self, max: usize) -> Self {
        self.max_collect = max;
        self
    }

    /// How many answers went out changed.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Bytes of Fetch answers that went by (whole frames, counted as each starts).
    pub fn fetch_bytes(&self) -> u64 {
        self.fetch_bytes
    }

    /// Bytes of the current frame to copy straight through, if it is passing.
    pub fn passing(&self) -> Option<usize> {
        match self.state {
            RespState::Pass { left } => Some(left),
            _ => None,
        }
    }

    /// `n` bytes of a passing frame went through.
    pub fn passed(&mut self, n: usize) {
        if let RespState::Pass { left } = &mut self.state {
            *left -= n.min(*left);
            if *left == 0 {
                self.state = RespState::Prefix(Vec::new());
            }
        }
    }

    /// Whether the stream is between frames (nothing of a response is held or owed).
    pub fn between_frames(&self) -> bool {
        matches!(&self.state, RespState::Prefix(p) if p.is_empty())
    }

    /// Takes bytes from `avail` while not passing: a prefix and correlation id (which
    /// go out in `out` as read when the frame passes) or a frame to rewrite (which goes
    /// out in `out` rewritten once whole). Returns how many bytes of `avail` it took.
    pub fn take(&mut self, avail: &[u8], requests: &mut RequestLog, out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        const HEAD: usize = PREFIX + 4;
        match &mut self.state {
            RespState::Pass { .. } => Ok(0),
            RespState::Prefix(p) => {
                let n = (HEAD - p.len()).min(avail.len());
                p.extend_from_slice(&avail[..n]);
                if p.len() < HEAD {
                    return Ok(n);
                }
                let len =
                    response_framer().body_len([p[0], p[1], p[2], p[3]]).map_err(RewriteError::BadResponseLength)?;
                let correlation_id = response_correlation(&p[PREFIX..]).unwrap_or_default();
                let req = requests.next_response()?;
                if req.local {
                    // Its answer was the caller's to send first: the stream is misread.
                    return Err(RewriteError::Unrequested);
                }
                req.check(correlation_id)?;
                if req.api == ApiKey::Fetch as i16 {
                    self.fetch_bytes += (len + PREFIX) as u64;
                }
                if self.advertise.collects(req.api, req.version) {
                    if len > self.max_collect {
                        let api = ApiKey::try_from(req.api).unwrap_or(ApiKey::Metadata);
                        return Err(RewriteError::TooLarge { api, len, max: self.max_collect });
                    }
                    let mut body = Vec::with_capacity(len.min(1 << 20));
                    body.extend_from_slice(&p[PREFIX..]);
                    self.state = RespState::Collect { api: req.api, version: req.version, body, len };
                } else {
                    // Prefix and correlation id go out as read; the rest streams.
                    out.extend_from_slice(p);
                    self.state =
                        if len == 4 { RespState::Prefix(Vec::new()) } else { RespState::Pass { left: len - 4 } };
                }
                Ok(n)
            }
            RespState::Collect { api, version, body, len } => {
                let n = (*len - body.len()).min(avail.len());
                body.extend_from_slice(&avail[..n]);
                if body.len() == *len {
                    let whole = Bytes::from(std::mem::take(body));
                    match rewrite(*api, *version, whole.clone(), &mut self.advertise)? {
                        Some(new) => {
                            self.rewritten += 1;
                            out.extend_from_slice(&crate::framing::prefix_for(new.len()));
                            out.extend_from_slice(&new);
                        }
                        None => {
                            out.extend_from_slice(&crate::framing::prefix_for(*len));
                            out.extend_from_slice(&whole);
                        }
                    }
                    self.state = RespState::Prefix(Vec::new());
                }
                Ok(n)
            }
        }
    }
}

/// Where clients are told a broker is: every broker address a rewritten answer names
/// goes through here. It may also watch answers go by (the sidecar's tail cache does):
/// the answers it [`collects`](Advertise::collects) are decoded and shown to it.
pub trait Advertise {
    /// The endpoint to name for broker `node_id`, which the upstream names `host:port`.
    /// An error refuses the whole answer (its connection closes): a client must never
    /// learn an address that does not lead back through the sidecar.
    fn endpoint(&mut self, node_id: i32, host: &str, port: i32) -> Result<(StrBytes, i32), RewriteError>;

    /// Whether answers of `api` at `version` are collected whole (and decoded): at least
    /// those that name brokers.
    fn collects(&self, api: i16, version: i16) -> bool {
        names_brokers(api, version)
    }

    /// A Metadata answer, before it is rewritten.
    fn observe_metadata(&mut self, _answer: &MetadataResponse, _version: i16) {}

    /// A Fetch answer (when Fetch answers are collected).
    fn observe_fetch(&mut self, _answer: &FetchResponse, _version: i16) {}

    /// A DeleteTopics answer (when collected).
    fn observe_delete_topics(&mut self, _answer: &DeleteTopicsResponse) {}
}

/// Every broker is one address: the bridge, in front of one broker.
pub struct Fixed {
    host: StrBytes,
    port: i32,
}

impl Fixed {
    pub fn new(host: &str, port: u16) -> Fixed {
        Fixed { host: StrBytes::from_string(host.to_string()), port: i32::from(port) }
    }
}

impl Advertise for Fixed {
    fn endpoint(&mut self, _: i32, _: &str, _: i32) -> Result<(StrBytes, i32), RewriteError> {
        Ok((self.host.clone(), self.port))
    }
}

/// Whether responses of `api` at `version` may name brokers or carry versions the
/// rewriter must bound, and so are collected whole: Metadata, FindCoordinator,
/// DescribeCluster, ApiVersions, and the KIP-951 leader endpoints of Produce v10+ and
/// Fetch v16+.
pub fn names_brokers(api: i16, version: i16) -> bool {
    match ApiKey::try_from(api) {
        Ok(ApiKey::Metadata | ApiKey::FindCoordinator | ApiKey::DescribeCluster | ApiKey::ApiVersions) => true,
        Ok(ApiKey::Produce) => version >= 10,
        Ok(ApiKey::Fetch) => version >= 16,
        _ => false,
    }
}

/// The highest version of `key` the rewriter can parse, for the APIs it parses.
fn parsed_max(key: ApiKey) -> Option<i16> {
    Some(match key {
        ApiKey::Metadata => MetadataResponse::VERSIONS.max,
        ApiKey::FindCoordinator => FindCoordinatorResponse::VERSIONS.max,
        ApiKey::DescribeCluster => DescribeClusterResponse::VERSIONS.max,
        ApiKey::ApiVersions => ApiVersionsResponse::VERSIONS.max,
        ApiKey::Produce => ProduceResponse::VERSIONS.max,
        ApiKey::Fetch => FetchResponse::VERSIONS.max,
        _ => return None,
    })
}

/// Rewrites one response frame body (without its length prefix) of `api`/`version`:
/// broker endpoints as `advertise` says, ApiVersions bounded to what the rewriter
/// parses. Returns `None` when the body passes unchanged.
pub fn rewrite(
    api: i16,
    version: i16,
    body: Bytes,
    advertise: &mut dyn Advertise,
) -> Result<Option<Vec<u8>>, RewriteError> {
    let Ok(key) = ApiKey::try_from(api) else { return Ok(None) };
    let hv = key.response_header_version(version);
    let mut buf = body;
    let codec = |what: &'static str| {
        move |e: anyhow::Error| RewriteError::Codec { what, api: key, version, reason: e.to_string() }
    };
    let header = ResponseHeader::decode(&mut buf, hv).map_err(codec("decode"))?;
    let mut out = BytesMut::new();
    header.encode(&mut out, hv).map_err(codec("encode"))?;
    match key {
        ApiKey::Metadata => {
            let mut r = MetadataResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            advertise.observe_metadata(&r, version);
            for b in &mut r.brokers {
                (b.host, b.port) = advertise.endpoint(b.node_id.0, &b.host, b.port)?;
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::FindCoordinator => {
            let mut r = FindCoordinatorResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            if version < 4 {
                if r.error_code == 0 {
                    (r.host, r.port) = advertise.endpoint(r.node_id.0, &r.host, r.port)?;
                }
            } else {
                for c in &mut r.coordinators {
                    if c.error_code == 0 {
                        (c.host, c.port) = advertise.endpoint(c.node_id.0, &c.host, c.port)?;
                    }
                }
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::DescribeCluster => {
            let mut r = DescribeClusterResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            for b in &mut r.brokers {
                (b.host, b.port) = advertise.endpoint(b.broker_id.0, &b.host, b.port)?;
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::ApiVersions => {
            // A broker refusing the request's version answers in v0 whatever was asked
            // (so the client can retry lower): such an answer passes as it is.
            if buf.len() < 2 || i16::from_be_bytes([buf[0], buf[1]]) != 0 {
                return Ok(None);
            }
            let mut r = ApiVersionsResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            let before = r.api_keys.len();
            let mut changed = false;
            r.api_keys.retain_mut(|k| {
                let Some(max) = ApiKey::try_from(k.api_key).ok().and_then(parsed_max) else { return true };
                if k.max_version > max {
                    k.max_version = max;
                    changed = true;
                }
                // A broker that only speaks versions the rewriter cannot parse: the API is
                // not offered at all rather than misread.
                k.min_version <= k.max_version
            });
            if !changed && r.api_keys.len() == before {
                return Ok(None);
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::Produce => {
            let mut r = ProduceResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            if r.node_endpoints.is_empty() {
                return Ok(None);
            }
            for e in &mut r.node_endpoints {
                (e.host, e.port) = advertise.endpoint(e.node_id.0, &e.host, e.port)?;
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::Fetch => {
            // Decoding keeps the records as slices of `buf`; only an answer that names
            // leaders (after a leadership move, rare) is encoded again.
            let mut r = FetchResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            advertise.observe_fetch(&r, version);
            if r.node_endpoints.is_empty() {
                return Ok(None);
            }
            for e in &mut r.node_endpoints {
                (e.host, e.port) = advertise.endpoint(e.node_id.0, &e.host, e.port)?;
            }
            r.encode(&mut out, version).map_err(codec("encode"))?;
        }
        ApiKey::DeleteTopics => {
            let r = DeleteTopicsResponse::decode(&mut buf, version).map_err(codec("decode"))?;
            advertise.observe_delete_topics(&r);
            return Ok(None);
        }
        _ => return Ok(None),
    }
    Ok(Some(out.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::{
        BrokerId, FindCoordinatorRequest, MetadataRequest, ProduceRequest, RequestHeader, TransactionalId,
    };
    use kafka_protocol::protocol::Message;

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

    /// One response frame.
    fn response<R: Encodable>(api: ApiKey, version: i16, corr: i32, body: &R) -> Vec<u8> {
        let mut h = ResponseHeader::default();
        h.correlation_id = corr;
        let mut b = BytesMut::new();
        h.encode(&mut b, api.response_header_version(version)).expect("header");
        body.encode(&mut b, version).expect("body");
        let mut f = (b.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&b);
        f
    }

    #[test]
    fn responses_pass_through_or_are_rewritten_however_the_stream_is_cut() {
        let produce_request = request(ApiKey::Produce, 9, 1, Some("c"), &produce(1, None));
        let mut requests = produce_request.clone();
        requests.extend(request(ApiKey::Metadata, 12, 2, Some("c"), &MetadataRequest::default()));
        let mut meta = MetadataResponse::default();
        let mut b = kafka_protocol::messages::metadata_response::MetadataResponseBroker::default();
        b.host = StrBytes::from_static_str("real-broker");
        b.port = 19092;
        meta.brokers.push(b);
        let produced = response(ApiKey::Produce, 9, 1, &kafka_protocol::messages::ProduceResponse::default());
        let mut stream = produced.clone();
        stream.extend(response(ApiKey::Metadata, 12, 2, &meta));
        for piece in 1..=stream.len() {
            let mut log = RequestLog::default();
            log.observe(&requests).expect("requests");
            let mut r = Responses::new(Fixed::new("sidecar", 9092));
            let mut out = Vec::new();
            for mut chunk in stream.chunks(piece) {
                while !chunk.is_empty() {
                    let n = match r.passing() {
                        Some(left) => {
                            // The caller copies passing bytes itself, after `out`.
                            let n = left.min(chunk.len());
                            out.extend_from_slice(&chunk[..n]);
                            r.passed(n);
                            n
                        }
                        None => r.take(chunk, &mut log, &mut out).expect("valid responses"),
                    };
                    chunk = &chunk[n..];
                }
            }
            assert!(r.between_frames() && log.is_empty(), "pieces of {piece}");
            assert_eq!(&out[..produced.len()], &produced[..], "the produce answer passes untouched");
            let mut rest = Bytes::copy_from_slice(&out[produced.len() + 4..]);
            let h = ResponseHeader::decode(&mut rest, ApiKey::Metadata.response_header_version(12)).expect("header");
            assert_eq!(h.correlation_id, 2);
            let m = MetadataResponse::decode(&mut rest, 12).expect("metadata");
            assert_eq!((m.brokers[0].host.as_str(), m.brokers[0].port), ("sidecar", 9092), "pieces of {piece}");
        }
        // A response nobody asked for, and one answering another request, are refused.
        let mut r = Responses::new(Fixed::new("sidecar", 9092));
        assert!(r.take(&produced, &mut RequestLog::default(), &mut Vec::new()).is_err());
        let mut log = RequestLog::default();
        log.observe(&produce_request).expect("one request");
        let wrong = response(ApiKey::Produce, 9, 7, &kafka_protocol::messages::ProduceResponse::default());
        assert!(matches!(
            Responses::new(Fixed::new("s", 1)).take(&wrong, &mut log, &mut Vec::new()),
            Err(RewriteError::Correlation { .. })
        ));
        // A frame too short for a correlation id.
        assert!(Responses::new(Fixed::new("s", 1)).take(&[0, 0, 0, 2, 0, 0, 0, 0], &mut log, &mut Vec::new()).is_err());
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
            let out = rewrite(3, version, body.freeze(), &mut Fixed::new("127.0.0.1", 19092))
                .expect("rewrite")
                .expect("changed");
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
            for (api, version) in [(3, 12), (3, 1), (10, 3), (10, 4), (60, 0), (18, 3), (0, 10), (1, 16)] {
                let _ = rewrite(api, version, Bytes::from(v.clone()), &mut Fixed::new("h", 1));
            }
            let _ = RequestLog::default().observe(&v);
        }
    }

    /// A response body (header included) of `api`/`version`.
    fn body<R: Encodable>(api: ApiKey, version: i16, r: &R) -> Vec<u8> {
        let mut b = BytesMut::new();
        let mut h = ResponseHeader::default();
        h.correlation_id = 9;
        h.encode(&mut b, api.response_header_version(version)).expect("header");
        r.encode(&mut b, version).expect("body");
        b.to_vec()
    }

    fn endpoint(id: i32) -> kafka_protocol::messages::fetch_response::NodeEndpoint {
        let mut e = kafka_protocol::messages::fetch_response::NodeEndpoint::default();
        e.node_id = BrokerId(id);
        e.host = StrBytes::from_static_str("10.0.0.7");
        e.port = 9092;
        e
    }

    #[test]
    fn kip_951_leader_endpoints_are_rewritten_and_answers_without_them_pass() {
        use crate::sidecar::cluster::PortPlan;
        use kafka_protocol::messages::produce_response::NodeEndpoint as ProduceEndpoint;
        let plan = || PortPlan::new("side", 30000, Vec::new());
        // Fetch v16+: endpoints rewritten per node, records untouched.
        let mut f = FetchResponse::default();
        f.node_endpoints = vec![endpoint(2), endpoint(5)];
        for version in [16i16, 17] {
            let b = body(ApiKey::Fetch, version, &f);
            let out = rewrite(1, version, b.into(), &mut plan()).expect("rewrite").expect("changed");
            let mut buf = Bytes::from(out);
            ResponseHeader::decode(&mut buf, ApiKey::Fetch.response_header_version(version)).expect("header");
            let r = FetchResponse::decode(&mut buf, version).expect("fetch");
            let got: Vec<_> = r.node_endpoints.iter().map(|e| (e.node_id.0, e.host.to_string(), e.port)).collect();
            assert_eq!(got, vec![(2, "side".to_string(), 30002), (5, "side".to_string(), 30005)], "v{version}");
        }
        let plain = body(ApiKey::Fetch, 16, &FetchResponse::default());
        assert!(rewrite(1, 16, plain.into(), &mut plan()).expect("rewrite").is_none(), "no endpoints: passes as is");
        // Produce v10+.
        let mut p = ProduceResponse::default();
        let mut e = ProduceEndpoint::default();
        e.node_id = BrokerId(3);
        e.host = StrBytes::from_static_str("10.0.0.8");
        e.port = 9093;
        p.node_endpoints = vec![e];
        let out = rewrite(0, 10, body(ApiKey::Produce, 10, &p).into(), &mut plan()).expect("rewrite").expect("changed");
        let mut buf = Bytes::from(out);
        ResponseHeader::decode(&mut buf, ApiKey::Produce.response_header_version(10)).expect("header");
        let r = ProduceResponse::decode(&mut buf, 10).expect("produce");
        assert_eq!((r.node_endpoints[0].host.as_str(), r.node_endpoints[0].port), ("side", 30003));
        // A node id no port can stand for refuses the answer.
        let mut f = FetchResponse::default();
        f.node_endpoints = vec![endpoint(40000)];
        assert!(matches!(
            rewrite(1, 16, body(ApiKey::Fetch, 16, &f).into(), &mut plan()),
            Err(RewriteError::Refused { node_id: 40000, .. })
        ));
        // Older versions are not collected at all.
        assert!(!names_brokers(0, 9) && !names_brokers(1, 15) && names_brokers(0, 10) && names_brokers(1, 16));
    }

    #[test]
    fn api_versions_are_bounded_by_what_the_rewriter_parses() {
        use kafka_protocol::messages::api_versions_response::ApiVersion;
        let mut r = ApiVersionsResponse::default();
        for (key, min, max) in [(3i16, 0i16, 40i16), (1, 4, 99), (0, 3, 9), (19, 0, 7), (10, 30, 40)] {
            let mut a = ApiVersion::default();
            a.api_key = key;
            a.min_version = min;
            a.max_version = max;
            r.api_keys.push(a);
        }
        let b = body(ApiKey::ApiVersions, 3, &r);
        let out = rewrite(18, 3, b.into(), &mut Fixed::new("h", 1)).expect("rewrite").expect("changed");
        let mut buf = Bytes::from(out);
        ResponseHeader::decode(&mut buf, 0).expect("header");
        let got = ApiVersionsResponse::decode(&mut buf, 3).expect("api versions");
        let ranges: Vec<_> = got.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        assert_eq!(
            ranges,
            vec![
                (3, 0, MetadataResponse::VERSIONS.max),
                (1, 4, FetchResponse::VERSIONS.max),
                (0, 3, 9),
                (19, 0, 7), // CreateTopics passes byte for byte: any version
            ],
            "FindCoordinator 30..40 cannot be parsed at all and is not offered"
        );
        // Within bounds: passes as is. An error answer (v0 body whatever was asked) too.
        let mut r = ApiVersionsResponse::default();
        r.api_keys.push(ApiVersion::default());
        assert!(rewrite(18, 3, body(ApiKey::ApiVersions, 3, &r).into(), &mut Fixed::new("h", 1))
            .expect("ok")
            .is_none());
        let mut e = ApiVersionsResponse::default();
        e.error_code = 35;
        let b = body(ApiKey::ApiVersions, 0, &e);
        assert!(rewrite(18, 3, b.into(), &mut Fixed::new("h", 1)).expect("ok").is_none());
    }

    #[test]
    fn garbage_responses_are_errors_not_panics() {
        assert!(rewrite(3, 12, Bytes::from_static(&[1, 2, 3]), &mut Fixed::new("h", 1)).is_err());
        assert!(rewrite(10, 4, Bytes::new(), &mut Fixed::new("h", 1)).is_err());
    }
}
