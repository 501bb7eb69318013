//! The sidecar's client side on the transport seam (`slipstream sidecar --transport
//! KIND`): one thread drives a [`Transport`] (tcp, io_uring, or RDMA verbs, so a `slipstream
//! bridge` can reach the sidecar over RDMA) and hands each accepted connection to the
//! proxy as a [`FrontRead`] / [`FrontWrite`] pair its tokio tasks use like socket halves.
//! Knows nothing of Kafka.
//!
//! # Invariants
//! - Memory per connection is bounded both ways: the driver stops receiving for a
//!   connection once [`IN_LIMIT`] bytes wait for the proxy to read them (and starts again
//!   when the proxy asks), and a writer waits while [`OUT_LIMIT`] bytes it gave the
//!   transport are not sent yet.
//! - A chunk handed to the transport stays the transport's until its `Sent` completion
//!   (buffer ownership as everywhere on the seam); writers only count bytes.

use bytes::BytesMut;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::buffer::{chunks_len, Chunk, IoChunks};
use crate::transport::{Completion, ConnId, Transport};
use crate::wake::Wake;

/// Received bytes a connection may have waiting for the proxy.
pub const IN_LIMIT: usize = 256 * 1024;
/// Bytes a connection may have given the transport and not seen sent.
pub const OUT_LIMIT: usize = 1 << 20;
/// Largest single receive.
const RECV_MAX: usize = 64 * 1024;

/// What the proxy's tasks ask of the driver.
enum Cmd {
    Send(ConnId, IoChunks),
    /// The reader drained below the limit: receive again.
    Resume(ConnId),
    Close(ConnId),
}

/// State a connection's driver side and task side share.
struct Shared {
    /// Received bytes not read by the proxy yet.
    queued_in: AtomicUsize,
    /// The driver stopped receiving (over [`IN_LIMIT`]).
    paused: AtomicBool,
    /// Bytes given to the transport and not completed.
    unsent: AtomicUsize,
    closed: AtomicBool,
    /// Told when bytes were sent or the connection closed.
    progress: tokio::sync::Notify,
}

#[derive(Clone)]
struct Commands {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<dyn Wake>,
}

impl Commands {
    fn send(&self, c: Cmd) {
        // The driver gone means the sidecar is stopping: nothing left to do.
        if self.tx.send(c).is_ok() {
            self.wake.wake();
        }
    }
}

/// The reading half of a connection the transport accepted.
pub struct FrontRead {
    conn: ConnId,
    rx: tokio::sync::mpsc::UnboundedReceiver<BytesMut>,
    shared: Arc<Shared>,
    cmds: Commands,
}

impl FrontRead {
    /// Appends what the client sent next to `buf`; 0 when it closed its side.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let Some(got) = self.rx.recv().await else { return Ok(0) };
        let n = got.len();
        if buf.is_empty() && buf.capacity() < got.capacity() {
            *buf = got; // the transport's buffer, as it is
        } else {
            buf.extend_from_slice(&got);
        }
        let left = self.shared.queued_in.fetch_sub(n, Ordering::AcqRel) - n;
        if left < IN_LIMIT / 2 && self.shared.paused.swap(false, Ordering::AcqRel) {
            self.cmds.send(Cmd::Resume(self.conn));
        }
        Ok(n)
    }
}

/// The writing half of a connection the transport accepted.
pub struct FrontWrite {
    conn: ConnId,
    shared: Arc<Shared>,
    cmds: Commands,
}

impl FrontWrite {
    /// Queues `chunks` for sending, after waiting while too much is unsent.
    pub async fn write_chunks(&mut self, chunks: IoChunks) -> io::Result<()> {
        let len = chunks_len(&chunks);
        loop {
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if self.shared.unsent.load(Ordering::Acquire) < OUT_LIMIT {
                break;
            }
            progress.await;
        }
        self.shared.unsent.fetch_add(len, Ordering::AcqRel);
        self.cmds.send(Cmd::Send(self.conn, chunks));
        Ok(())
    }

    /// Queues a copy of `slices`, one after the other, as one chunk.
    pub async fn write_slices(&mut self, slices: &[&[u8]]) -> io::Result<()> {
        let whole: bytes::Bytes = slices.concat().into();
        self.write_chunks(vec![Chunk::Heap(whole)]).await
    }

    /// Closes the connection once what is queued went out.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.cmds.send(Cmd::Close(self.conn));
        Ok(())
    }
}

/// A connection the driver keeps: where its received bytes go (None once the client
/// closed its side) and the shared state.
struct Conn {
    to_proxy: Option<tokio::sync::mpsc::UnboundedSender<BytesMut>>,
    shared: Arc<Shared>,
}

/// Drives `transport` on the calling thread until `stop` is set, handing each accepted
/// connection to `accept`.
pub fn drive(
    mut transport: Box<dyn Transport>,
    stop: Arc<AtomicBool>,
    accept: impl Fn(FrontRead, FrontWrite, SocketAddr),
) -> io::Result<()> {
    let (tx, cmd_rx) = mpsc::channel();
    let cmds = Commands { tx, wake: transport.waker() };
    let mut conns: HashMap<ConnId, Conn> = HashMap::new();
    let mut done = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        transport.poll(Some(Duration::from_millis(100)), &mut done)?;
        for c in done.drain(..) {
            match c {
                Completion::Accepted { conn, peer, .. } => {
                    let shared = Arc::new(Shared {
                        queued_in: AtomicUsize::new(0),
                        paused: AtomicBool::new(false),
                        unsent: AtomicUsize::new(0),
                        closed: AtomicBool::new(false),
                        progress: tokio::sync::Notify::new(),
                    });
                    let (to_proxy, rx) = tokio::sync::mpsc::unbounded_channel();
                    conns.insert(conn, Conn { to_proxy: Some(to_proxy), shared: shared.clone() });
                    transport.recv(conn, BytesMut::new(), RECV_MAX);
                    let read = FrontRead { conn, rx, shared: shared.clone(), cmds: cmds.clone() };
                    accept(read, FrontWrite { conn, shared, cmds: cmds.clone() }, peer);
                }
                Completion::Received { conn, buf, n } => {
                    let Some(c) = conns.get_mut(&conn) else { continue };
                    if n == 0 {
                        c.to_proxy = None; // the proxy reads end-of-stream
                        continue;
                    }
                    let queued = c.shared.queued_in.fetch_add(buf.len(), Ordering::AcqRel) + buf.len();
                    let delivered = c.to_proxy.as_ref().is_some_and(|t| t.send(buf).is_ok());
                    if !delivered {
                        transport.abort(conn); // the proxy's task is gone
                    } else if queued < IN_LIMIT {
                        transport.recv(conn, BytesMut::new(), RECV_MAX);
                    } else {
                        c.shared.paused.store(true, Ordering::Release);
                        // The reader may have drained meanwhile and seen no pause.
                        if c.shared.queued_in.load(Ordering::Acquire) < IN_LIMIT / 2
                            && c.shared.paused.swap(false, Ordering::AcqRel)
                        {
                            transport.recv(conn, BytesMut::new(), RECV_MAX);
                        }
                    }
                }
                Completion::Sent { conn, chunks } => {
                    if let Some(c) = conns.get(&conn) {
                        c.shared.unsent.fetch_sub(chunks_len(&chunks), Ordering::AcqRel);
                        c.shared.progress.notify_waiters();
                    }
                }
                Completion::Closed { conn, reason } => {
                    log::debug!("sidecar: transport connection {conn} closed: {reason:?}");
                    if let Some(c) = conns.remove(&conn) {
                        c.shared.closed.store(true, Ordering::Release);
                        c.shared.progress.notify_waiters();
                    }
                    crate::transport::shrink_after_remove(&mut conns);
                }
            }
        }
        while let Ok(cmd) = cmd_rx.try_recv() {
            match cmd {
                Cmd::Send(conn, chunks) if conns.contains_key(&conn) => transport.send(conn, chunks),
                Cmd::Send(..) => {}
                Cmd::Resume(conn) if conns.contains_key(&conn) => transport.recv(conn, BytesMut::new(), RECV_MAX),
                Cmd::Resume(_) => {}
                Cmd::Close(conn) if conns.contains_key(&conn) => transport.close(conn),
                Cmd::Close(_) => {}
            }
        }
    }
    transport.stop_accepting();
    for conn in conns.keys() {
        transport.close(*conn);
    }
    Ok(())
}
