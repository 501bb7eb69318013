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
    #[error("request frame of {0} bytes is negative or too large")]
    BadLength(i64),
    #[error("response without a request")]
    Unrequested,
    #[error("cannot {what} a {api:?} v{version} response: {reason}")]
    Codec { what: &'static str, api: ApiKey, version: i16, reason: String },
}

/// The API and version of each request seen, oldest first.
#[derive(Default)]
pub struct RequestLog {
    pending: VecDeque<(i16, i16)>,
    /// Bytes of the current request frame still to skip, or `None` while reading a header.
    skip: usize,
    head: Vec<u8>,
}

/// Largest frame the sidecar tracks (the broker enforces its own limit).
const MAX_FRAME: usize = 1 << 30;

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
            // Length prefix + api key + api version.
            let n = (8 - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.head.len() == 8 {
                let h = &self.head;
                let len = i32::from_be_bytes([h[0], h[1], h[2], h[3]]) as i64;
                if !(4..=MAX_FRAME as i64).contains(&len) {
                    return Err(RewriteError::BadLength(len));
                }
                let api = i16::from_be_bytes([h[4], h[5]]);
                let version = i16::from_be_bytes([h[6], h[7]]);
                self.pending.push_back((api, version));
                self.skip = len as usize - 4;
                self.head.clear();
            }
        }
        Ok(())
    }

    /// The API and version the next response answers.
    pub fn next_response(&mut self) -> Result<(i16, i16), RewriteError> {
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
    use kafka_protocol::messages::BrokerId;

    #[test]
    fn request_log_follows_split_frames() {
        let mut log = RequestLog::default();
        let mut stream = Vec::new();
        for (api, v) in [(3i16, 12i16), (0, 9), (10, 4)] {
            let body = [0u8; 10];
            stream.extend_from_slice(&((4 + body.len()) as i32).to_be_bytes());
            stream.extend_from_slice(&api.to_be_bytes());
            stream.extend_from_slice(&v.to_be_bytes());
            stream.extend_from_slice(&body);
        }
        for piece in stream.chunks(3) {
            log.observe(piece).expect("valid stream");
        }
        assert_eq!(log.next_response().ok(), Some((3, 12)));
        assert_eq!(log.next_response().ok(), Some((0, 9)));
        assert_eq!(log.next_response().ok(), Some((10, 4)));
        assert!(log.next_response().is_err());
        let mut bad = RequestLog::default();
        assert!(bad.observe(&[0xff, 0xff, 0xff, 0xfb, 0, 3, 0, 1]).is_err());
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
        let seed = seed.to_vec();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for i in 0..3000 {
            let mut v = seed.clone();
            v.truncate(seed.len() - (i % seed.len()));
            for _ in 0..2 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if !v.is_empty() {
                    let at = (x as usize) % v.len();
                    v[at] = (x >> 40) as u8;
                }
            }
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
