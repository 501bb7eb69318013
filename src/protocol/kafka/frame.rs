//! Kafka framing, sans-IO: the one framer every Kafka byte stream in slipstream is cut
//! with — the broker's dispatch sessions, the bridge and the sidecar's request and
//! response trackers, the native client.
//!
//! A Kafka frame is `i32 length, body`. A request body starts with
//! `i16 api key, i16 api version, i32 correlation id` (every header version); a response
//! body with `i32 correlation id`. Those fixed fields are all a proxy needs to follow a
//! connection, and [`RequestHead`] / [`response_correlation`] read them without decoding
//! anything else. The fuzz target `kafka_framer` drives [`Framer::cut`] and the peeks.

use bytes::{Bytes, BytesMut};

use crate::framing::{LengthError, Prefixed, PREFIX};

/// The fixed part of every request header: api key, api version, correlation id.
pub const REQUEST_HEAD: usize = 8;
/// The fixed part of every response header: the correlation id.
pub const RESPONSE_HEAD: usize = 4;

/// The request header fields every version has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    pub api: i16,
    pub version: i16,
    pub correlation_id: i32,
}

impl RequestHead {
    /// Reads the fixed fields from the start of a request body (after the prefix).
    pub fn peek(body: &[u8]) -> Option<RequestHead> {
        let h = body.get(..REQUEST_HEAD)?;
        Some(RequestHead {
            api: i16::from_be_bytes([h[0], h[1]]),
            version: i16::from_be_bytes([h[2], h[3]]),
            correlation_id: i32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        })
    }
}

/// The correlation id at the start of a response body (after the prefix).
pub fn response_correlation(body: &[u8]) -> Option<i32> {
    let h = body.get(..RESPONSE_HEAD)?;
    Some(i32::from_be_bytes([h[0], h[1], h[2], h[3]]))
}

/// Which side of a connection a framer reads: the smallest body each may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Requests,
    Responses,
}

/// Cuts Kafka frames off a byte stream, refusing lengths outside what `side` may carry
/// and above `max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framer {
    prefixed: Prefixed,
}

impl Framer {
    pub fn new(side: Side, max: usize) -> Framer {
        let min = match side {
            Side::Requests => REQUEST_HEAD,
            Side::Responses => RESPONSE_HEAD,
        };
        Framer { prefixed: Prefixed::new(min, max) }
    }

    /// Largest body accepted.
    pub fn max(&self) -> usize {
        self.prefixed.max
    }

    /// The body length a prefix announces, checked.
    pub fn body_len(&self, prefix: [u8; PREFIX]) -> Result<usize, LengthError> {
        self.prefixed.body_len(prefix)
    }

    /// Cuts the next whole frame body off `buf`; see [`Prefixed::cut`].
    pub fn cut(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, LengthError> {
        self.prefixed.cut(buf)
    }

    /// The announced body length once `buf` (a frame's first bytes, prefix included)
    /// holds the prefix.
    pub fn peek_len(&self, buf: &[u8]) -> Result<Option<usize>, LengthError> {
        self.prefixed.peek(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frames_carry_at_least_their_fixed_header() {
        let f = Framer::new(Side::Requests, 1 << 20);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 7, 0, 18, 0, 3, 0, 0, 0][..]);
        assert!(f.cut(&mut buf).is_err(), "7 bytes cannot hold api key, version, correlation id");
        let mut buf = BytesMut::from(&[0u8, 0, 0, 8, 0, 18, 0, 3, 0, 0, 0, 42][..]);
        let body = f.cut(&mut buf).expect("length").expect("whole");
        assert_eq!(RequestHead::peek(&body), Some(RequestHead { api: 18, version: 3, correlation_id: 42 }));
        assert_eq!(response_correlation(&[0, 0, 1, 0]), Some(256));
        assert_eq!(response_correlation(&[0, 0, 1]), None);
        assert!(Framer::new(Side::Responses, 16).body_len([0, 0, 0, 4]).is_ok());
    }
}
