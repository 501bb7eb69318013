//! The baseline backend: epoll readiness (through mio) on non-blocking kernel sockets,
//! emulating completions. Every core watches its clone of the broker's listening socket
//! and accepts what it can; a connection then stays on the core that accepted it.
//!
//! Sends go out with `writev` over the chunk list, so record bytes that point into the
//! mmap'd log reach the socket without a user-space copy.

use bytes::BytesMut;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::sync::Arc;
use std::time::Duration;

use super::{shrink_after_remove, CloseReason, Completion, ConnId, Transport, TransportError, TransportKind};
use crate::buffer::{chunks_len, Chunk};
use crate::wake::Wake;

const WAKER: Token = Token(0);
const FIRST_CONN: u64 = 1;

/// Listener `i`'s token: counted down from the top, far from connection ids.
fn listener_token(i: usize) -> Token {
    Token(usize::MAX - i)
}
/// At most this many bytes are read for one completion, so one busy peer cannot starve
/// the others on the core.
const READ_BUDGET: usize = 1 << 20;
/// Most iovecs handed to one writev (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 512;
/// A read's buffer, when a connection has none.
const READ_CHUNK: usize = 64 * 1024;
/// Receive buffers kept for reuse.
const POOL: usize = 64;

/// A receive buffer from `pool` whose frames are all gone (so its whole allocation, its
/// pages resident already, is free again), or a new one.
fn take_pooled(pool: &mut Vec<BytesMut>) -> BytesMut {
    while let Some(mut b) = pool.pop() {
        if b.try_reclaim(READ_CHUNK) {
            return b;
        }
        // Still shared with frames in flight: let it go with them.
    }
    BytesMut::with_capacity(READ_CHUNK)
}

struct Conn {
    stream: TcpStream,
    /// The outstanding receive, if any: (buffer, max size).
    rx: Option<(BytesMut, usize)>,
    /// Readiness seen while no receive was outstanding (edge-triggered: remember it).
    readable: bool,
    writable: bool,
    /// Sends in order; the front one may be partly written (`sent_in_front`).
    tx: VecDeque<Vec<Chunk>>,
    sent_in_front: usize,
    unsent: usize,
    closing: bool,
}

struct MioWake(Waker);

impl Wake for MioWake {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            log::warn!("waking a core failed: {e}");
        }
    }
}

pub struct TcpTransport {
    poll: Poll,
    events: Events,
    /// This core's clones of the broker's listening sockets, in listener order (empty
    /// once it stops accepting).
    listeners: Vec<TcpListener>,
    waker: Arc<MioWake>,
    /// Receive buffers of connections between requests, for the next read of any.
    pool: Vec<BytesMut>,
    conns: HashMap<ConnId, Conn>,
    next_id: u64,
    /// Completions produced on submission (e.g. a send that finished at once).
    ready: Vec<Completion>,
}

impl TcpTransport {
    /// Serves connections accepted from `listeners` (this core's clones of the broker's
    /// listening sockets; [`Completion::Accepted`] names the index of the one accepted from).
    pub fn new(listeners: Vec<std::net::TcpListener>) -> Result<Self, TransportError> {
        let poll = Poll::new()?;
        let mut mio_listeners = Vec::with_capacity(listeners.len());
        for (i, l) in listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry().register(&mut l, listener_token(i), Interest::READABLE)?;
            mio_listeners.push(l);
        }
        let waker = Arc::new(MioWake(Waker::new(poll.registry(), WAKER)?));
        Ok(TcpTransport {
            poll,
            events: Events::with_capacity(1024),
            listeners: mio_listeners,
            waker,
            pool: Vec::new(),
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            ready: Vec::new(),
        })
    }

    fn accept_all(&mut self, index: usize) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    if let Err(e) = stream.set_nodelay(true) {
                        log::debug!("TCP_NODELAY on {peer}: {e}");
                    }
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(id as usize),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register connection from {peer}: {e}");
                        continue;
                    }
                    self.conns.insert(
                        id,
                        Conn {
                            stream,
                            rx: None,
                            readable: true,
                            writable: true,
                            tx: VecDeque::new(),
                            sent_in_front: 0,
                            unsent: 0,
                            closing: false,
                        },
                    );
                    self.ready.push(Completion::Accepted { conn: id, peer, listener: index });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: log and try again on the next readiness event.
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads into the outstanding receive buffer of `id`, if both data and a buffer exist.
    fn try_read(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.readable || c.closing {
            return;
        }
        let Some((mut buf, max)) = c.rx.take() else {
            return;
        };
        let mut got = 0usize;
        let mut result: Option<io::Error> = None;
        let mut eof = false;
        loop {
            if buf.len() >= max || got >= READ_BUDGET {
                break; // still readable; resumes with the next submitted receive
            }
            if buf.capacity() == 0 {
                // Between requests a connection holds no buffer: take one now, a pooled
                // one whose pages are resident if its frames are all gone.
                buf = take_pooled(&mut self.pool);
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve((max - buf.len()).clamp(1, READ_CHUNK));
            }
            let room = (buf.capacity() - buf.len()).min(max - buf.len());
            match crate::buffer::recv_into(&mut buf, &c.stream, room) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = result {
            self.close_now(id, CloseReason::Error(e));
        } else if got > 0 || eof {
            self.ready.push(Completion::Received { conn: id, buf, n: got });
            if eof && got > 0 {
                // Deliver the data first; the peer's close is seen on the next receive.
                if let Some(c) = self.conns.get_mut(&id) {
                    c.readable = true;
                }
            }
        } else if let Some(c) = self.conns.get_mut(&id) {
            c.rx = Some((buf, max));
        }
    }

    fn try_write(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut error = None;
        while c.writable && !c.tx.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(16);
            let mut skip = c.sent_in_front;
            'outer: for msg in c.tx.iter() {
                for chunk in msg {
                    if skip >= chunk.len() {
                        skip -= chunk.len();
                        continue;
                    }
                    slices.push(IoSlice::new(&chunk[skip..]));
                    skip = 0;
                    if slices.len() >= MAX_IOV {
                        break 'outer;
                    }
                }
            }
            match c.stream.write_vectored(&slices) {
                Ok(0) => {
                    error = Some(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"));
                    break;
                }
                Ok(mut n) => {
                    c.unsent -= n;
                    // Retire whole messages and hand their buffers back.
                    while let Some(front) = c.tx.front() {
                        let total = chunks_len(front);
                        let left = total - c.sent_in_front;
                        if n >= left {
                            n -= left;
                            c.sent_in_front = 0;
                            if let Some(chunks) = c.tx.pop_front() {
                                self.ready.push(Completion::Sent { conn: id, chunks });
                            }
                        } else {
                            c.sent_in_front += n;
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let done_closing = c.closing && c.tx.is_empty();
        if let Some(e) = error {
            self.close_now(id, CloseReason::Error(e));
        } else if done_closing {
            self.close_now(id, CloseReason::Local);
        }
    }

    fn close_now(&mut self, id: ConnId, reason: CloseReason) {
        if let Some(mut c) = self.conns.remove(&id) {
            shrink_after_remove(&mut self.conns);
            deregister(self.poll.registry(), &mut c.stream);
            self.ready.push(Completion::Closed { conn: id, reason });
        }
    }
}

fn deregister(registry: &Registry, stream: &mut TcpStream) {
    if let Err(e) = registry.deregister(stream) {
        log::debug!("deregister: {e}");
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn recv(&mut self, conn: ConnId, buf: BytesMut, max: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            // An empty buffer goes to the pool: the connection waits holding none.
            let buf = if buf.is_empty() && buf.capacity() > 0 {
                if self.pool.len() < POOL {
                    self.pool.push(buf);
                }
                BytesMut::new()
            } else {
                buf
            };
            c.rx = Some((buf, max));
            self.try_read(conn);
        }
    }

    fn send(&mut self, conn: ConnId, chunks: Vec<Chunk>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.unsent += chunks_len(&chunks);
            c.tx.push_back(chunks);
            self.try_write(conn);
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.tx.is_empty() {
                self.close_now(conn, CloseReason::Local);
            } else {
                // Let queued responses (e.g. an error answer) go out first.
                c.closing = true;
                c.rx = None;
            }
        }
    }

    fn abort(&mut self, conn: ConnId) {
        self.close_now(conn, CloseReason::Local);
    }

    fn stop_accepting(&mut self) {
        for mut l in self.listeners.drain(..) {
            if let Err(e) = self.poll.registry().deregister(&mut l) {
                log::debug!("deregister listener: {e}");
            }
        }
    }

    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        if !self.ready.is_empty() {
            out.append(&mut self.ready);
            return Ok(());
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut touched: Vec<(ConnId, bool, bool)> = Vec::new();
        let mut accept_from: Vec<usize> = Vec::new();
        let first_listener = usize::MAX - self.listeners.len();
        for ev in self.events.iter() {
            match ev.token() {
                WAKER => {}
                Token(t) if t > first_listener => accept_from.push(usize::MAX - t),
                Token(t) => touched.push((
                    t as u64,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable() || ev.is_error(),
                )),
            }
        }
        for index in accept_from {
            self.accept_all(index);
        }
        for (id, r, w) in touched {
            if let Some(c) = self.conns.get_mut(&id) {
                c.readable |= r;
                c.writable |= w;
            }
            if w {
                self.try_write(id);
            }
            if r {
                self.try_read(id);
            }
        }
        out.append(&mut self.ready);
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn unsent_bytes(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.unsent)
    }
}
