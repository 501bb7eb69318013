//! The Kafka wire protocol: framing, version negotiation, and the request handlers.
//!
//! Codecs come from the `kafka-protocol` crate (generated from Kafka's JSON schemas);
//! nothing here hand-encodes a message. This module owns what the crate does not:
//! which APIs and versions we advertise, the frame-level checks that run before any
//! decoder sees untrusted bytes, and turning broker state into responses.
//!
//! # Invariants
//! - We advertise only APIs that are implemented for real; an API we do not serve is
//!   never answered with a fake success (the connection is closed, as Kafka does).
//! - Response fields are set only at versions that carry them (the crate rejects a
//!   non-default value for a field the version lacks, and we treat that as a bug).

pub mod acls;
pub mod admin;
pub mod data;
pub mod error;
pub mod frame;
pub mod group;
pub mod sasl;
pub mod session;

use bytes::{Buf, Bytes};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

use crate::broker::Broker;
use crate::buffer::{Chunk, IoChunks, ScatterBuf};
use crate::log::Pending;
pub use error::ErrorCode;

/// Versions we serve: (api, min, max). Each range is intersected with what the codec
/// crate supports. The floors exclude pre-RecordBatch-v2 message formats.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::DescribeUserScramCredentials, 0, 0),
    (ApiKey::AlterUserScramCredentials, 0, 0),
    (ApiKey::DescribeAcls, 1, 3),
    (ApiKey::CreateAcls, 1, 3),
    (ApiKey::DeleteAcls, 1, 3),
];

/// The advertised range of `key`, if we serve it.
pub fn version_range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED.iter().find(|(k, _, _)| *k == key).and_then(|(k, lo, hi)| {
        let v = k.valid_versions();
        let (lo, hi) = ((*lo).max(v.min), (*hi).min(v.max));
        (lo <= hi).then_some((lo, hi))
    })
}

/// Why a connection must be closed (logged with the peer address).
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes is too short for a request header")]
    ShortFrame(usize),
    #[error("unknown API key {0}")]
    UnknownApi(i16),
    #[error("API {api:?} version {version} is not supported")]
    UnsupportedVersion { api: ApiKey, version: i16 },
    #[error("malformed {api:?} v{version} request: {reason}")]
    Malformed { api: ApiKey, version: i16, reason: String },
    #[error("cannot encode {api:?} v{version} response: {reason}")]
    Encode { api: ApiKey, version: i16, reason: String },
}

/// The address a listener gives clients in Metadata, FindCoordinator and
/// DescribeCluster answers (Kafka's advertised listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: i32,
}

/// Who sent a request, for handlers that need it.
pub struct Ctx<'a> {
    pub broker: &'a Arc<Broker>,
    /// The listener the request came in on, as clients must reach it.
    pub endpoint: &'a Endpoint,
    pub version: i16,
    pub client_id: String,
    pub client_host: String,
    /// `User:<name>` (see `session`): whom ACLs are checked for.
    pub principal: &'a str,
    pub now: Instant,
}

/// A request waiting for something (data to arrive, a rebalance to complete, the file
/// worker to run it).
pub enum Parked {
    Fetch(data::ParkedFetch),
    Join(group::ParkedJoin),
    Sync(group::ParkedSync),
    /// Handled on the file worker (it writes files); its outcome comes back here.
    Blocking(Pending<Outcome>),
}

/// What a handler decided.
pub enum Outcome {
    Respond(ResponseKind, Vec<Chunk>),
    /// acks=0 produce: the client expects nothing back.
    NoResponse,
    Park(Parked),
    /// Partition operations for their owner cores; [`data::finish`] completes it.
    Gather(data::Gather),
}

impl Outcome {
    fn respond(r: impl Into<ResponseKind>) -> Outcome {
        Outcome::Respond(r.into(), Vec::new())
    }
}

/// A decoded request that is being served.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    pub api: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
}

/// A request frame, decoded (or answered already, for ApiVersions from the future).
// One per request, moved once into the handler: boxing the large variant would only add
// an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    Request {
        req: InFlight,
        header: RequestHeader,
        body: RequestKind,
    },
    /// KIP-511: a too-new ApiVersions is answered with v0 and UNSUPPORTED_VERSION.
    Answer {
        req: InFlight,
        body: ApiVersionsResponse,
    },
}

/// Decodes one frame (without its length prefix). Never panics and never allocates from
/// an unchecked length: this is the function the request-decoder fuzzer drives.
pub fn decode_frame(mut frame: Bytes) -> Result<Decoded, ProtocolError> {
    if frame.len() < 8 {
        return Err(ProtocolError::ShortFrame(frame.len()));
    }
    let raw_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = ApiKey::try_from(raw_key).map_err(|_| ProtocolError::UnknownApi(raw_key))?;
    let Some((lo, hi)) = version_range(api) else {
        return Err(ProtocolError::UnknownApi(raw_key));
    };
    if version < lo || version > hi {
        if api == ApiKey::ApiVersions {
            let req = InFlight { api, version: 0, correlation_id };
            return Ok(Decoded::Answer { req, body: api_versions(ErrorCode::UnsupportedVersion) });
        }
        return Err(ProtocolError::UnsupportedVersion { api, version });
    }
    let malformed = |reason: String| ProtocolError::Malformed { api, version, reason };
    let header =
        RequestHeader::decode(&mut frame, api.request_header_version(version)).map_err(|e| malformed(e.to_string()))?;
    let body = RequestKind::decode(api, &mut frame, version).map_err(|e| malformed(e.to_string()))?;
    if frame.has_remaining() {
        log::debug!("{api:?} v{version}: {} trailing bytes ignored", frame.remaining());
    }
    Ok(Decoded::Request { req: InFlight { api, version, correlation_id }, header, body })
}

/// Runs a decoded request (SASL's own requests are the session's: [`sasl`]).
pub fn handle_request(
    broker: &Arc<Broker>,
    endpoint: &Endpoint,
    (req, header, request): (InFlight, RequestHeader, RequestKind),
    client_host: &str,
    principal: &str,
    now: Instant,
) -> Result<(InFlight, Outcome), ProtocolError> {
    let version = req.version;
    crate::metrics::count_request();
    let ctx = Ctx {
        broker,
        endpoint,
        version,
        client_id: header.client_id.map(|s| s.to_string()).unwrap_or_default(),
        client_host: client_host.to_string(),
        principal,
        now,
    };
    if writes_files(&ctx, &request) {
        return Ok((req, on_file_worker(ctx, req.api, request)));
    }
    Ok((req, run(&ctx, req.api, request)?))
}

/// Whether `request`'s handler writes files (topics, partitions, producer-id blocks,
/// committed offsets): those must not run on a dispatch core, but on the file worker.
fn writes_files(ctx: &Ctx<'_>, request: &RequestKind) -> bool {
    match request {
        RequestKind::CreateTopics(_)
        | RequestKind::DeleteTopics(_)
        | RequestKind::CreatePartitions(_)
        | RequestKind::InitProducerId(_)
        | RequestKind::AlterUserScramCredentials(_)
        | RequestKind::CreateAcls(_)
        | RequestKind::DeleteAcls(_)
        | RequestKind::OffsetCommit(_) => true,
        RequestKind::Metadata(r) => admin::may_create_topics(ctx, r),
        _ => false,
    }
}

/// Runs `request` on the file worker; the request parks until its outcome is back.
fn on_file_worker(ctx: Ctx<'_>, api: ApiKey, request: RequestKind) -> Outcome {
    let broker = ctx.broker.clone();
    let endpoint = ctx.endpoint.clone();
    let Ctx { version, client_id, client_host, now, .. } = ctx;
    let principal = ctx.principal.to_string();
    let pending = broker.files.clone().run(move || {
        let ctx =
            Ctx { broker: &broker, endpoint: &endpoint, version, client_id, client_host, principal: &principal, now };
        // Only requests `run` serves are sent here.
        run(&ctx, api, request).unwrap_or_else(|e| {
            log::error!("{e}");
            Outcome::NoResponse
        })
    });
    Outcome::Park(Parked::Blocking(pending))
}

fn run(ctx: &Ctx<'_>, api: ApiKey, request: RequestKind) -> Result<Outcome, ProtocolError> {
    let outcome = match request {
        RequestKind::ApiVersions(_) => Outcome::respond(api_versions(ErrorCode::None)),
        RequestKind::Produce(r) => data::produce(ctx, r),
        RequestKind::Fetch(r) => data::fetch(ctx, r),
        RequestKind::ListOffsets(r) => data::list_offsets(ctx, r),
        RequestKind::Metadata(r) => admin::metadata(ctx, r),
        RequestKind::CreateTopics(r) => admin::create_topics(ctx, r),
        RequestKind::DeleteTopics(r) => admin::delete_topics(ctx, r),
        RequestKind::CreatePartitions(r) => admin::create_partitions(ctx, r),
        RequestKind::DescribeConfigs(r) => admin::describe_configs(ctx, r),
        RequestKind::DescribeCluster(r) => admin::describe_cluster(ctx, r),
        RequestKind::InitProducerId(r) => admin::init_producer_id(ctx, r),
        RequestKind::FindCoordinator(r) => group::find_coordinator(ctx, r),
        RequestKind::JoinGroup(r) => group::join(ctx, r),
        RequestKind::SyncGroup(r) => group::sync(ctx, r),
        RequestKind::Heartbeat(r) => group::heartbeat(ctx, r),
        RequestKind::LeaveGroup(r) => group::leave(ctx, r),
        RequestKind::OffsetCommit(r) => group::offset_commit(ctx, r),
        RequestKind::OffsetFetch(r) => group::offset_fetch(ctx, r),
        RequestKind::ListGroups(r) => group::list_groups(ctx, r),
        RequestKind::DescribeGroups(r) => group::describe_groups(ctx, r),
        RequestKind::DescribeUserScramCredentials(r) => sasl::describe_credentials(ctx, r),
        RequestKind::AlterUserScramCredentials(r) => sasl::alter_credentials(ctx, r),
        RequestKind::CreateAcls(r) => acls::create(ctx, r),
        RequestKind::DescribeAcls(r) => acls::describe(ctx, r),
        RequestKind::DeleteAcls(r) => acls::delete(ctx, r),
        _ => return Err(ProtocolError::UnknownApi(api as i16)),
    };
    Ok(outcome)
}

/// Re-polls a parked request; `force` answers with whatever is there (deadline, shutdown).
pub fn poll_parked(broker: &Arc<Broker>, parked: &Parked, now: Instant, force: bool) -> Option<Outcome> {
    match parked {
        Parked::Fetch(p) => data::poll_fetch(p, now, force),
        Parked::Join(p) => group::poll_join(broker, p, force),
        Parked::Sync(p) => group::poll_sync(broker, p, force),
        // Not even a shutdown answers it early: what it writes may be half done.
        Parked::Blocking(p) => p.try_take(),
    }
}

/// When a parked request must be answered regardless.
pub fn parked_deadline(parked: &Parked) -> Option<Instant> {
    match parked {
        Parked::Fetch(p) => Some(p.deadline()),
        Parked::Join(_) | Parked::Sync(_) | Parked::Blocking(_) => None,
    }
}

fn api_versions(error: ErrorCode) -> ApiVersionsResponse {
    let mut r = ApiVersionsResponse::default();
    r.error_code = error.code();
    r.api_keys = SUPPORTED
        .iter()
        .filter_map(|(k, _, _)| {
            let (lo, hi) = version_range(*k)?;
            let mut v = ApiVersion::default();
            v.api_key = *k as i16;
            v.min_version = lo;
            v.max_version = hi;
            Some(v)
        })
        .collect();
    r
}

fn encode_body<B: ByteBufMut>(r: &ResponseKind, buf: &mut B, v: i16) -> anyhow::Result<()> {
    match r {
        ResponseKind::ApiVersions(x) => x.encode(buf, v),
        ResponseKind::Produce(x) => x.encode(buf, v),
        ResponseKind::Fetch(x) => x.encode(buf, v),
        ResponseKind::ListOffsets(x) => x.encode(buf, v),
        ResponseKind::Metadata(x) => x.encode(buf, v),
        ResponseKind::CreateTopics(x) => x.encode(buf, v),
        ResponseKind::DeleteTopics(x) => x.encode(buf, v),
        ResponseKind::CreatePartitions(x) => x.encode(buf, v),
        ResponseKind::DescribeConfigs(x) => x.encode(buf, v),
        ResponseKind::DescribeCluster(x) => x.encode(buf, v),
        ResponseKind::InitProducerId(x) => x.encode(buf, v),
        ResponseKind::FindCoordinator(x) => x.encode(buf, v),
        ResponseKind::JoinGroup(x) => x.encode(buf, v),
        ResponseKind::SyncGroup(x) => x.encode(buf, v),
        ResponseKind::Heartbeat(x) => x.encode(buf, v),
        ResponseKind::LeaveGroup(x) => x.encode(buf, v),
        ResponseKind::OffsetCommit(x) => x.encode(buf, v),
        ResponseKind::OffsetFetch(x) => x.encode(buf, v),
        ResponseKind::ListGroups(x) => x.encode(buf, v),
        ResponseKind::DescribeGroups(x) => x.encode(buf, v),
        ResponseKind::SaslHandshake(x) => x.encode(buf, v),
        ResponseKind::SaslAuthenticate(x) => x.encode(buf, v),
        ResponseKind::DescribeUserScramCredentials(x) => x.encode(buf, v),
        ResponseKind::AlterUserScramCredentials(x) => x.encode(buf, v),
        ResponseKind::CreateAcls(x) => x.encode(buf, v),
        ResponseKind::DescribeAcls(x) => x.encode(buf, v),
        ResponseKind::DeleteAcls(x) => x.encode(buf, v),
        other => anyhow::bail!("no encoder wired for {other:?}"),
    }
}

/// Encodes a response frame (length prefix, header, body); `by_ref` are payloads that
/// must go out by reference (fetch records straight from the log).
pub fn encode_response(req: &InFlight, body: &ResponseKind, by_ref: Vec<Chunk>) -> Result<IoChunks, ProtocolError> {
    let fail = |e: anyhow::Error| ProtocolError::Encode { api: req.api, version: req.version, reason: e.to_string() };
    let mut buf = ScatterBuf::framed(by_ref);
    let mut header = ResponseHeader::default();
    header.correlation_id = req.correlation_id;
    header.encode(&mut buf, req.api.response_header_version(req.version)).map_err(fail)?;
    encode_body(body, &mut buf, req.version).map_err(fail)?;
    Ok(buf.finish_framed())
}

pub(crate) fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::*;

    /// Valid frames of every API and version we serve (default-valued bodies).
    fn seed_frames() -> Vec<Vec<u8>> {
        fn frame<R: Encodable + kafka_protocol::protocol::HeaderVersion>(key: ApiKey, v: i16, body: &R) -> Vec<u8> {
            let mut h = RequestHeader::default();
            h.request_api_key = key as i16;
            h.request_api_version = v;
            h.correlation_id = 42;
            h.client_id = Some(sb("fuzz"));
            let mut b = BytesMut::new();
            h.encode(&mut b, R::header_version(v)).expect("header");
            body.encode(&mut b, v).expect("body");
            b.to_vec()
        }
        let mut out = Vec::new();
        for (key, _, _) in SUPPORTED {
            let Some((lo, hi)) = version_range(*key) else {
                continue;
            };
            for v in lo..=hi {
                let f = match key {
                    ApiKey::Produce => {
                        let mut r = ProduceRequest::default();
                        let mut t = produce_request::TopicProduceData::default();
                        let mut p = produce_request::PartitionProduceData::default();
                        p.records = Some(Bytes::from(crate::log::batch::build_batch(0, 1, &[b"v"])));
                        t.name = TopicName(sb("t"));
                        t.partition_data.push(p);
                        r.topic_data.push(t);
                        frame(*key, v, &r)
                    }
                    ApiKey::Fetch => frame(*key, v, &FetchRequest::default()),
                    ApiKey::ListOffsets => frame(*key, v, &ListOffsetsRequest::default()),
                    ApiKey::Metadata => frame(*key, v, &MetadataRequest::default()),
                    ApiKey::OffsetCommit => frame(*key, v, &OffsetCommitRequest::default()),
                    ApiKey::OffsetFetch => frame(*key, v, &OffsetFetchRequest::default()),
                    ApiKey::FindCoordinator => frame(*key, v, &FindCoordinatorRequest::default()),
                    ApiKey::JoinGroup => frame(*key, v, &JoinGroupRequest::default()),
                    ApiKey::Heartbeat => frame(*key, v, &HeartbeatRequest::default()),
                    ApiKey::LeaveGroup => frame(*key, v, &LeaveGroupRequest::default()),
                    ApiKey::SyncGroup => frame(*key, v, &SyncGroupRequest::default()),
                    ApiKey::DescribeGroups => frame(*key, v, &DescribeGroupsRequest::default()),
                    ApiKey::ListGroups => frame(*key, v, &ListGroupsRequest::default()),
                    ApiKey::ApiVersions => frame(*key, v, &ApiVersionsRequest::default()),
                    ApiKey::CreateTopics => frame(*key, v, &CreateTopicsRequest::default()),
                    ApiKey::DeleteTopics => frame(*key, v, &DeleteTopicsRequest::default()),
                    ApiKey::InitProducerId => frame(*key, v, &InitProducerIdRequest::default()),
                    ApiKey::DescribeConfigs => frame(*key, v, &DescribeConfigsRequest::default()),
                    ApiKey::CreatePartitions => frame(*key, v, &CreatePartitionsRequest::default()),
                    ApiKey::DescribeCluster => frame(*key, v, &DescribeClusterRequest::default()),
                    ApiKey::SaslHandshake => frame(*key, v, &SaslHandshakeRequest::default()),
                    ApiKey::SaslAuthenticate => frame(*key, v, &SaslAuthenticateRequest::default()),
                    ApiKey::DescribeUserScramCredentials => {
                        frame(*key, v, &DescribeUserScramCredentialsRequest::default())
                    }
                    ApiKey::AlterUserScramCredentials => frame(*key, v, &AlterUserScramCredentialsRequest::default()),
                    ApiKey::DescribeAcls => frame(*key, v, &DescribeAclsRequest::default()),
                    ApiKey::CreateAcls => frame(*key, v, &CreateAclsRequest::default()),
                    ApiKey::DeleteAcls => frame(*key, v, &DeleteAclsRequest::default()),
                    _ => continue,
                };
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn every_advertised_version_decodes() {
        let seeds = seed_frames();
        assert!(seeds.len() > 100);
        for f in seeds {
            assert!(matches!(decode_frame(Bytes::from(f)), Ok(Decoded::Request { .. })));
        }
    }

    /// The cheap, deterministic sibling of `fuzz/fuzz_targets/request_decoder.rs`, run by
    /// every `cargo test`: mutated frames must be refused, never panic or over-allocate.
    #[test]
    fn mutated_frames_never_panic() {
        let seeds = seed_frames();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let mut f = seeds[(rand() % seeds.len() as u64) as usize].clone();
            for _ in 0..(1 + rand() % 4) {
                let at = (rand() % f.len().max(1) as u64) as usize;
                match rand() % 5 {
                    0 => f[at] ^= 1 << (rand() % 8),
                    1 => f.truncate(at),
                    2 if at + 4 <= f.len() => f[at..at + 4].copy_from_slice(&i32::MAX.to_be_bytes()),
                    3 if at + 4 <= f.len() => f[at..at + 4].copy_from_slice(&(-2i32).to_be_bytes()),
                    _ => f.insert(at.min(f.len()), rand() as u8),
                }
                if f.is_empty() {
                    break;
                }
            }
            let _ = decode_frame(Bytes::from(f));
        }
    }
}
