//! TLS between a connection's transport and its session, for listeners that serve it.
//!
//! The transport carries records; the session sees only plaintext, cut into frames as on
//! any other connection. rustls is sans-IO: received ciphertext goes in by
//! [`TlsConn::receive`], which yields plaintext and any records the handshake wants sent;
//! answers go out by [`TlsConn::seal`], which encrypts them into one heap chunk.
//!
//! User-space TLS ends zero-copy fetch: the record bytes of a fetch answer are read from
//! the mapping into rustls's records (counted as [`metrics::Path::TlsRecords`]). Kernel
//! TLS would let the kernel encrypt as it copies, but needs `CONFIG_TLS` (docs/tls.md).
//!
//! # Invariants
//! - The session sees no byte before the handshake is complete and the peer's identity
//!   (its certificate, on a mutual-TLS listener) is known: [`TlsConn::receive`] reports
//!   the identity once, before the first plaintext.

use bytes::{Bytes, BytesMut};
use std::io::{BufRead, Write};
use std::sync::Arc;

use crate::buffer::{Chunk, IoChunks};
use crate::metrics;

/// A TLS connection's state.
pub struct TlsConn {
    conn: rustls::ServerConnection,
    /// Decrypted bytes not yet cut into frames.
    pub plain: BytesMut,
    identified: bool,
}

/// What a receive brought besides plaintext.
#[derive(Default)]
pub struct Received {
    /// Records to send (handshake messages, alerts).
    pub to_send: Option<Bytes>,
    /// The handshake completed with this receive: the client's certificate subject, if
    /// it presented one (`Some(None)`: complete, no certificate).
    pub identified: Option<Option<String>>,
    /// The peer sent close_notify.
    pub closed: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS: {reason}")]
pub struct TlsFault {
    pub reason: String,
    /// An alert for the peer, to send before closing.
    pub alert: Option<Bytes>,
}

impl TlsConn {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<TlsConn, rustls::Error> {
        let mut conn = rustls::ServerConnection::new(config)?;
        // The dispatch loop bounds what it queues per connection (`MAX_UNSENT`); rustls's
        // own limit would make `seal` take only part of an answer.
        conn.set_buffer_limit(None);
        Ok(TlsConn { conn, plain: BytesMut::new(), identified: false })
    }

    /// Feeds received ciphertext; decrypted bytes are appended to [`TlsConn::plain`].
    pub fn receive(&mut self, mut cipher: &[u8]) -> Result<Received, TlsFault> {
        let mut out = Received::default();
        while !cipher.is_empty() {
            // rustls takes at most one buffer-full at a time; processing empties it.
            let n = self.conn.read_tls(&mut cipher).map_err(|e| self.fault(e.to_string()))?;
            let state = self.conn.process_new_packets().map_err(|e| self.fault(e.to_string()))?;
            if !self.identified && !self.conn.is_handshaking() {
                self.identified = true;
                let subject = self.conn.peer_certificates().and_then(|c| c.first()).map(crate::tls::subject_name);
                out.identified = Some(subject.transpose().map_err(|e| self.fault(e.to_string()))?);
            }
            self.drain_plaintext().map_err(|e| self.fault(e.to_string()))?;
            if state.peer_has_closed() {
                out.closed = true;
                break;
            }
            if n == 0 {
                break;
            }
        }
        out.to_send = self.pending();
        Ok(out)
    }

    fn drain_plaintext(&mut self) -> std::io::Result<()> {
        let mut reader = self.conn.reader();
        loop {
            let got = match reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                // close_notify seen: nothing more will come.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            if got.is_empty() {
                return Ok(());
            }
            self.plain.extend_from_slice(got);
            let n = got.len();
            reader.consume(n);
        }
    }

    /// Encrypts `chunks` into records, in one heap chunk ready to send.
    pub fn seal(&mut self, chunks: IoChunks) -> Result<IoChunks, TlsFault> {
        let mut writer = self.conn.writer();
        for c in &chunks {
            if c.region().is_some() {
                metrics::count_copy(metrics::Path::TlsRecords, c.len());
            }
            writer.write_all(c).map_err(|e| TlsFault { reason: e.to_string(), alert: None })?;
        }
        Ok(self.pending().map(Chunk::Heap).into_iter().collect())
    }

    /// close_notify, for a connection we close.
    pub fn close(&mut self) -> Option<Bytes> {
        self.conn.send_close_notify();
        self.pending()
    }

    /// The records rustls has queued.
    fn pending(&mut self) -> Option<Bytes> {
        if !self.conn.wants_write() {
            return None;
        }
        let mut out = Vec::new();
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            if self.conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    fn fault(&mut self, reason: String) -> TlsFault {
        // rustls queues an alert describing the failure; the peer should see it.
        TlsFault { reason, alert: self.pending() }
    }
}
