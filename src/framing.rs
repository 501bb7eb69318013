//! Length-prefixed frames, sans-IO: the one place a 4-byte big-endian length prefix is
//! read and checked.
//!
//! Kafka frames are `i32 length, body`; RocketMQ remoting frames are `i32 total length,
//! …`. Both are cut here, by code that sees only bytes: no socket, no transport. Every
//! protocol's framer (`protocol::kafka::frame`, RocketMQ's next) builds on [`Prefixed`],
//! and so does anything below the protocols that must find frame boundaries (the RDMA
//! stream's blocking helper).
//!
//! # Invariants
//! - A length is checked against `min..=max` before anything is reserved or allocated
//!   for it: an untrusted prefix never sizes an allocation beyond `max`.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("frame length {len} outside {min}..={max}")]
pub struct LengthError {
    pub len: i64,
    pub min: usize,
    pub max: usize,
}

/// A 4-byte big-endian length prefix, then that many bytes of body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixed {
    /// Smallest body accepted (e.g. a Kafka request header's fixed part).
    pub min: usize,
    /// Largest body accepted.
    pub max: usize,
}

impl Prefixed {
    pub fn new(min: usize, max: usize) -> Prefixed {
        Prefixed { min, max }
    }

    /// The body length a prefix announces, checked.
    pub fn body_len(&self, prefix: [u8; PREFIX]) -> Result<usize, LengthError> {
        let len = i64::from(i32::from_be_bytes(prefix));
        if len < self.min as i64 || len > self.max as i64 {
            return Err(LengthError { len, min: self.min, max: self.max });
        }
        Ok(len as usize)
    }

    /// The body length announced by the first bytes of `buf`, if the prefix is there.
    pub fn peek(&self, buf: &[u8]) -> Result<Option<usize>, LengthError> {
        match buf.get(..PREFIX) {
            Some(p) => self.body_len([p[0], p[1], p[2], p[3]]).map(Some),
            None => Ok(None),
        }
    }

    /// Cuts the next whole frame's body off the front of `buf` (no copy: a split of the
    /// same allocation). `Ok(None)`: not all there yet, and `buf` has been given room
    /// for the whole frame, so it arrives contiguous and its partial bytes move at most
    /// once.
    pub fn cut(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, LengthError> {
        let Some(len) = self.peek(buf)? else { return Ok(None) };
        if buf.len() < PREFIX + len {
            buf.reserve(PREFIX + len - buf.len());
            return Ok(None);
        }
        buf.advance(PREFIX);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Bytes still needed before `buf` holds a whole frame (0: it does).
    pub fn missing(&self, buf: &[u8]) -> Result<usize, LengthError> {
        Ok(match self.peek(buf)? {
            None => PREFIX - buf.len(),
            Some(len) => (PREFIX + len).saturating_sub(buf.len()),
        })
    }
}

/// Writes `body`'s length as a 4-byte big-endian prefix.
pub fn prefix_for(body_len: usize) -> [u8; PREFIX] {
    (body_len as u32).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_whole_frames_and_waits_for_partial_ones() {
        let f = Prefixed::new(1, 16);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 2, b'x']);
        assert_eq!(f.cut(&mut buf), Ok(Some(Bytes::from_static(b"abc"))));
        assert_eq!(f.missing(&buf), Ok(1));
        assert_eq!(f.cut(&mut buf), Ok(None));
        assert!(buf.capacity() >= 6, "room reserved for the whole frame");
        buf.extend_from_slice(b"y");
        assert_eq!(f.cut(&mut buf), Ok(Some(Bytes::from_static(b"xy"))));
        assert!(buf.is_empty());
        assert_eq!(f.missing(&buf), Ok(4));
    }

    #[test]
    fn refuses_lengths_outside_the_bounds_before_reserving() {
        let f = Prefixed::new(8, 1024);
        for bad in [-1i32, 0, 7, 1025, i32::MAX, i32::MIN] {
            let mut buf = BytesMut::from(&bad.to_be_bytes()[..]);
            let cap = buf.capacity();
            assert_eq!(f.cut(&mut buf), Err(LengthError { len: i64::from(bad), min: 8, max: 1024 }));
            assert_eq!(buf.capacity(), cap);
        }
    }
}
