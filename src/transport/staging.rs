//! The receive side shared by backends whose bytes land in buffers of their own (io_uring's
//! provided-buffer ring, RDMA's shared receive queue) rather than in the buffer the
//! dispatch loop hands to [`Transport::recv`](super::Transport::recv): the bytes are copied
//! into that buffer if one is waiting, else kept until the next receive. Every copy is
//! counted as `receive_bytes_staged`.

use bytes::{Buf, BytesMut};

use crate::metrics;

/// One connection's staging state.
#[derive(Default)]
pub(crate) struct RecvStaging {
    /// The dispatch loop's buffer waiting for bytes, and its `max`.
    parked: Option<(BytesMut, usize)>,
    /// Bytes that arrived while no buffer was parked.
    staged: BytesMut,
    /// The peer closed its side (told once `staged` is drained).
    eof: bool,
}

/// Room left in `buf` for a receive of at most `max` bytes in all (at least one, as the
/// seam promises progress).
fn room(buf: &BytesMut, max: usize) -> usize {
    max.saturating_sub(buf.len()).max(1)
}

impl RecvStaging {
    /// Bytes arrived in a backend buffer (which the caller may reuse afterwards). Returns
    /// the parked buffer and how many bytes it got, if one was waiting.
    pub(crate) fn arrived(&mut self, bytes: &[u8]) -> Option<(BytesMut, usize)> {
        metrics::count_copy(metrics::Path::ReceiveStaging, bytes.len());
        let Some((mut buf, max)) = self.parked.take() else {
            self.staged.extend_from_slice(bytes);
            return None;
        };
        let k = bytes.len().min(room(&buf, max));
        buf.extend_from_slice(&bytes[..k]);
        self.staged.extend_from_slice(&bytes[k..]);
        Some((buf, k))
    }

    /// The dispatch loop's receive. Staged bytes (or the end of the stream, as `n == 0`)
    /// complete it at once; otherwise the buffer is parked until bytes arrive.
    pub(crate) fn recv(&mut self, mut buf: BytesMut, max: usize) -> Option<(BytesMut, usize)> {
        if buf.is_empty() {
            // A parked buffer would be held for as long as the connection is idle.
            buf = BytesMut::new();
        }
        if self.staged.is_empty() {
            if self.eof {
                return Some((buf, 0));
            }
            self.parked = Some((buf, max));
            return None;
        }
        let room = room(&buf, max);
        if buf.is_empty() && self.staged.len() <= room {
            // Hand the staged allocation over instead of copying.
            std::mem::swap(&mut self.staged, &mut buf);
            let n = buf.len();
            return Some((buf, n));
        }
        let k = self.staged.len().min(room);
        buf.extend_from_slice(&self.staged[..k]);
        self.staged.advance(k);
        metrics::count_copy(metrics::Path::ReceiveStaging, k);
        Some((buf, k))
    }

    /// The peer closed its side. Returns the parked buffer (to complete with `n == 0`) if
    /// nothing staged is left to deliver first.
    pub(crate) fn set_eof(&mut self) -> Option<BytesMut> {
        self.eof = true;
        if self.staged.is_empty() {
            return self.parked.take().map(|(buf, _)| buf);
        }
        None
    }

    pub(crate) fn is_eof(&self) -> bool {
        self.eof
    }

    /// Bytes waiting for the dispatch loop (for backpressure).
    pub(crate) fn staged_len(&self) -> usize {
        self.staged.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_go_to_the_parked_buffer_then_stay_staged_in_order() {
        let mut s = RecvStaging::default();
        assert!(s.recv(BytesMut::new(), 4).is_none(), "nothing yet: parked");
        let (buf, n) = s.arrived(b"abcdef").expect("the parked buffer completes");
        assert_eq!((&buf[..], n), (&b"abcd"[..], 4));
        assert!(s.arrived(b"gh").is_none(), "no buffer parked: staged");
        let (buf, n) = s.recv(BytesMut::from(&b"x"[..]), 3).expect("staged bytes complete at once");
        assert_eq!((&buf[..], n), (&b"xef"[..], 2));
        let (buf, n) = s.recv(BytesMut::new(), 100).expect("the rest");
        assert_eq!((&buf[..], n), (&b"gh"[..], 2));
        assert_eq!(s.staged_len(), 0);
    }

    #[test]
    fn end_of_stream_comes_after_the_staged_bytes() {
        let mut s = RecvStaging::default();
        assert!(s.arrived(b"last").is_none());
        assert!(s.set_eof().is_none(), "staged bytes first");
        assert_eq!(s.recv(BytesMut::new(), 100).map(|(b, n)| (b.to_vec(), n)), Some((b"last".to_vec(), 4)));
        assert_eq!(s.recv(BytesMut::new(), 100).map(|(_, n)| n), Some(0));
        let mut s = RecvStaging::default();
        assert!(s.recv(BytesMut::new(), 100).is_none());
        assert!(s.set_eof().is_some(), "a parked buffer completes with the end of the stream");
        assert!(s.is_eof());
    }
}
