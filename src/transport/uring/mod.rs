//! The io_uring backend: the seam's completions are the kernel's own.
//!
//! - **Accept**: one multishot `ACCEPT` on the core's clone of the broker's listening
//!   socket (single-shot and re-armed if the kernel lacks multishot).
//! - **Receive**, two modes (`--uring-recv`): `single`, a `RECV` straight into the spare
//!   capacity of the `BytesMut` the dispatch loop handed over (the buffer lives in the op
//!   table until its completion; one SQE per receive); or `multishot`, one `RECV` per
//!   connection for its whole life selecting buffers from a provided-buffer ring
//!   ([`bufring`]); the bytes are then copied once from the ring buffer into the
//!   connection's frame buffer (counted as `receive_bytes_staged`) and the ring buffer
//!   goes straight back. Frames cross ring-buffer boundaries, and the parser wants them
//!   contiguous, hence the copy; docs/architecture.md has the measurements.
//! - **Send**: queued sends of a connection are coalesced into one `SENDMSG` whose iovecs
//!   point at the chunks (fetch payloads point into the mmap'd log). At or above the
//!   zero-copy threshold the op is `SENDMSG_ZC`: the NIC/loopback reads the pages directly,
//!   and the chunks stay owned by the op until the kernel's *notification* completion says
//!   it is done with them. One send per connection is in flight at a time, so bytes leave
//!   in order without linked SQEs (a short send is resubmitted for the rest).
//! - **Registered files**: each accepted socket goes into the ring's fixed-file table
//!   (`--uring-fixed-files`, on by default), and its ops name the slot, not the fd.
//! - **Wake-ups**: an eventfd with a `READ` always armed.
//!
//! Features are probed at start; a missing one is logged once and degrades (no zero-copy
//! send, single-shot accept). No io_uring at all fails `bind` with a message.
//!
//! # Invariants
//! - Every pointer in a submitted SQE points into memory owned by an entry of `ops`
//!   (boxed, so it does not move) that is removed only when the kernel posted the op's
//!   final completion (for zero-copy sends: the notification). Safe code cannot reach a
//!   buffer while the kernel may touch it.
//! - A connection's socket is closed (dropped) only when no op referencing its fd is in
//!   flight, so a recycled fd number can never receive a stale op.
#![allow(unsafe_code)]

pub mod bufring;
mod recv;
mod send;

use send::SendOp;
#[cfg(test)]
mod tests;

use bufring::BufRing;
use bytes::{Bytes, BytesMut};
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::staging::RecvStaging;
use super::{shrink_after_remove, CloseReason, Completion, ConnId, Transport, TransportError, TransportKind};
use crate::buffer::{chunks_len, Chunk};
use crate::metrics;
use crate::wake::{EventFd, Wake};

/// Options of the io_uring backend.
#[derive(Debug, Clone, Copy)]
pub struct UringOptions {
    /// Sends of at least this many bytes use `SENDMSG_ZC`.
    pub zc_threshold: usize,
    /// Kernel-side submission polling (trades a core for fewer syscalls).
    pub sqpoll: bool,
    /// Register connection sockets in the ring's fixed-file table, so ops skip the
    /// per-op file lookup and reference counting.
    pub fixed_files: bool,
    /// Receive with one multishot `RECV` per connection into a provided-buffer ring
    /// instead of one `RECV` per read into the connection's own buffer.
    pub recv_multishot: bool,
}

/// How the io_uring backend receives (`--uring-recv`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UringRecv {
    /// One `RECV` per read, straight into the connection's frame buffer.
    #[default]
    Single,
    /// One multishot `RECV` per connection into a provided-buffer ring.
    Multishot,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions { zc_threshold: DEFAULT_ZC_THRESHOLD, sqpoll: false, fixed_files: true, recv_multishot: false }
    }
}

/// Zero-copy send is off by default: `cargo bench --bench uring_zc` found no size up to
/// 1 MiB where it pays over loopback here (about half the throughput of a copying send
/// at every size, more CPU per byte: loopback copies on receive anyway and the
/// notification costs a completion). On a real NIC set `--uring-zc-threshold` (the usual
/// crossover is around 16 KiB). Figures in `docs/architecture.md`.
pub const DEFAULT_ZC_THRESHOLD: usize = usize::MAX;
const RING_ENTRIES: u32 = 1024;
/// Slots in the fixed-file table; connections past this use plain descriptors.
const FIXED_SLOTS: u32 = 4096;
const MAX_IOV: usize = 512;
const READ_CHUNK: usize = 64 * 1024;
/// Single mode: the receive buffer of a connection between requests.
const IDLE_READ: usize = 4 * 1024;
/// The provided-buffer ring of multishot mode: 256 buffers of 32 KiB per core (8 MiB of
/// address space, touched as used).
const BUF_RING_ENTRIES: u16 = 256;
const BUF_RING_BUF_SIZE: usize = 32 * 1024;
/// Multishot mode: stop receiving on a connection whose staged bytes the dispatch loop has
/// not taken reach this (backpressure), resume once they drop below.
const STAGED_PAUSE_AT: usize = 1024 * 1024;

enum Op {
    /// An accept on a listener (its index in `listeners`).
    Accept(usize),
    Recv {
        conn: ConnId,
        buf: BytesMut,
    },
    /// A multishot receive: owns no memory (its buffers are the ring's).
    RecvMulti {
        conn: ConnId,
    },
    Send(Box<SendOp>),
    /// The eventfd counter the kernel reads into (kept alive, never read by us).
    Wake(#[allow(dead_code)] Box<[u8; 8]>),
    Cancel,
}

/// How ops name a connection's socket: its registered slot, or its descriptor.
#[derive(Clone, Copy)]
enum Target {
    Fd(RawFd),
    Fixed(u32),
}

struct UConn {
    sock: TcpStream,
    /// Its slot in the ring's fixed-file table, if registered.
    slot: Option<u32>,
    inflight: u32,
    /// Multishot mode: the connection's receive op, if armed.
    recv_op: Option<u64>,
    /// Multishot mode: a cancel of `recv_op` was submitted (backpressure).
    recv_cancelling: bool,
    /// Multishot mode: received bytes on their way to the dispatch loop's buffer.
    rx: RecvStaging,
    sending: bool,
    tx: VecDeque<Vec<Chunk>>,
    unsent: usize,
    /// `close` was asked for: finish sending, then shut down.
    closing: bool,
    /// Shut down; waiting for in-flight ops before the fd is closed.
    shut: bool,
    reason: Option<CloseReason>,
}

impl UConn {
    fn target(&self) -> Target {
        self.slot.map_or(Target::Fd(self.sock.as_raw_fd()), Target::Fixed)
    }
}

pub struct UringTransport {
    ring: IoUring,
    /// Multishot mode's provided buffers (declared after `ring`: dropped after it).
    bufring: Option<BufRing>,
    /// This core's clones of the broker's listening sockets, in listener order.
    listeners: Vec<TcpListener>,
    /// False once `stop_accepting` ran: accepts are not re-armed.
    accepting: bool,
    accept_multishot: bool,
    send_zc: bool,
    /// Free slots of the fixed-file table (`None`: not registered).
    fixed_free: Option<Vec<u32>>,
    opts: UringOptions,
    waker: Arc<EventFd>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    conns: HashMap<ConnId, UConn>,
    next_conn: u64,
    ready: Vec<Completion>,
}

impl UringTransport {
    /// Serves connections accepted from `listeners` (this core's clones of the broker's
    /// listening sockets; [`Completion::Accepted`] names the index of the one accepted from).
    pub fn new(listeners: Vec<TcpListener>, opts: UringOptions) -> Result<Self, TransportError> {
        let mut builder = IoUring::builder();
        if opts.sqpoll {
            builder.setup_sqpoll(50);
        }
        let ring = builder.build(RING_ENTRIES).map_err(|e| {
            TransportError::Unsupported(format!("io_uring_setup failed ({e}): this kernel or sandbox has no io_uring"))
        })?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let send_zc = probe.is_supported(opcode::SendMsgZc::CODE);
        if !send_zc {
            log::warn!("io_uring: SENDMSG_ZC not supported by this kernel; sends will copy into the socket buffer");
        }
        // Multishot accept came with 5.19 as a flag of ACCEPT; SENDMSG_ZC (6.1) implies it.
        let accept_multishot = send_zc;
        if !accept_multishot {
            log::warn!("io_uring: multishot accept not available; re-arming single accepts");
        }
        let fixed_free = if opts.fixed_files {
            match ring.submitter().register_files_sparse(FIXED_SLOTS) {
                Ok(()) => Some((0..FIXED_SLOTS).rev().collect()),
                Err(e) => {
                    log::warn!("io_uring: cannot register a fixed-file table ({e}); ops will use plain descriptors");
                    None
                }
            }
        } else {
            None
        };
        let waker = Arc::new(EventFd::new()?);
        let bufring = if opts.recv_multishot {
            if probe.is_supported(opcode::SendMsgZc::CODE) {
                // Buffer rings (5.19) and multishot receive (6.0) predate SENDMSG_ZC (6.1).
                match BufRing::new(&ring.submitter(), 0, BUF_RING_ENTRIES, BUF_RING_BUF_SIZE) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        log::warn!("io_uring: cannot register a provided-buffer ring ({e}); single-shot receives");
                        None
                    }
                }
            } else {
                log::warn!("io_uring: multishot receive needs Linux 6.0; single-shot receives");
                None
            }
        } else {
            None
        };
        let mut t = UringTransport {
            ring,
            bufring,
            listeners,
            accepting: true,
            accept_multishot,
            send_zc,
            fixed_free,
            opts,
            waker,
            ops: HashMap::new(),
            next_op: 1,
            conns: HashMap::new(),
            next_conn: 1,
            ready: Vec::new(),
        };
        for i in 0..t.listeners.len() {
            t.arm_accept(i)?;
        }
        t.arm_wake()?;
        Ok(t)
    }

    /// Pushes an SQE for `op`, which keeps every buffer the SQE points at.
    ///
    /// # Safety
    /// `entry` may only point into memory owned by `op` (or into memory that outlives the
    /// ring, like a listener fd number).
    unsafe fn push(&mut self, entry: squeue::Entry, op: Op) -> io::Result<u64> {
        let id = self.next_op;
        self.next_op += 1;
        let entry = entry.user_data(id);
        self.ops.insert(id, op);
        loop {
            // SAFETY: the caller guarantees the SQE's pointers stay valid while `op` is in
            // `self.ops`, which lasts until the op's final completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(id);
            }
            // Submission queue full: hand what is there to the kernel and retry.
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self, index: usize) -> io::Result<()> {
        if !self.accepting {
            return Ok(());
        }
        let Some(l) = self.listeners.get(index) else { return Ok(()) };
        let fd = types::Fd(l.as_raw_fd());
        let entry = if self.accept_multishot {
            opcode::AcceptMulti::new(fd).flags(libc::SOCK_CLOEXEC).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut()).flags(libc::SOCK_CLOEXEC).build()
        };
        // SAFETY: no pointers; the listener outlives the op (it is dropped only after the
        // accept's cancellation completes, see `stop_accepting`).
        unsafe { self.push(entry, Op::Accept(index)) }.map(|_| ())
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let mut buf = Box::new([0u8; 8]);
        let entry = opcode::Read::new(types::Fd(self.waker.fd()), buf.as_mut_ptr(), 8).build();
        // SAFETY: the 8-byte target is the boxed buffer moved into the op.
        unsafe { self.push(entry, Op::Wake(buf)) }.map(|_| ())
    }

    fn on_cqe(&mut self, id: u64, res: i32, flags: u32) {
        match self.ops.get(&id) {
            None => {}
            Some(Op::Accept(index)) => {
                let index = *index;
                self.on_accept(id, index, res, flags)
            }
            Some(Op::Wake(_)) => {
                self.ops.remove(&id);
                if let Err(e) = self.arm_wake() {
                    log::error!("io_uring: re-arming the waker failed: {e}");
                }
            }
            Some(Op::Cancel) => {
                self.ops.remove(&id);
            }
            Some(Op::Recv { .. }) => {
                let Some(Op::Recv { conn, mut buf }) = self.ops.remove(&id) else { return };
                self.op_done(conn);
                match res {
                    n if n >= 0 => {
                        let n = n as usize;
                        // SAFETY: the kernel wrote `n` bytes into the spare capacity that
                        // the op pointed at, right after the buffer's length.
                        unsafe { buf.set_len(buf.len() + n) };
                        if self.conns.get(&conn).is_some_and(|c| !c.shut) {
                            self.ready.push(Completion::Received { conn, buf, n });
                        }
                    }
                    e if -e == libc::ECANCELED => {}
                    e => self.fail(conn, io::Error::from_raw_os_error(-e)),
                }
                self.reap(conn);
            }
            Some(Op::Send(_)) => self.on_send_cqe(id, res, flags),
            Some(Op::RecvMulti { .. }) => self.on_recv_multi(id, res, flags),
        }
    }

    fn on_accept(&mut self, id: u64, index: usize, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.ops.remove(&id);
            if self.accepting {
                if let Err(e) = self.arm_accept(index) {
                    log::error!("io_uring: re-arming accept failed: {e}");
                }
            }
        }
        if res < 0 {
            if -res != libc::ECANCELED {
                log::warn!("accept failed: {}", io::Error::from_raw_os_error(-res));
            }
            return;
        }
        // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
        let sock = unsafe { TcpStream::from_raw_fd(res) };
        let peer = match sock.peer_addr() {
            Ok(p) => p,
            Err(e) => {
                log::debug!("accepted connection vanished: {e}");
                return;
            }
        };
        if let Err(e) = sock.set_nodelay(true) {
            log::debug!("TCP_NODELAY on {peer}: {e}");
        }
        let slot = self.register(sock.as_raw_fd());
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            UConn {
                sock,
                slot,
                inflight: 0,
                recv_op: None,
                recv_cancelling: false,
                rx: RecvStaging::default(),
                sending: false,
                tx: VecDeque::new(),
                unsent: 0,
                closing: false,
                shut: false,
                reason: None,
            },
        );
        self.ready.push(Completion::Accepted { conn, peer, listener: index });
    }

    /// Puts `fd` in a free fixed-file slot, if there is a table and a free slot.
    fn register(&mut self, fd: RawFd) -> Option<u32> {
        let slot = self.fixed_free.as_mut()?.pop()?;
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => Some(slot),
            Err(e) => {
                log::debug!("io_uring: fixed-file registration failed ({e}); using the descriptor");
                self.fixed_free.as_mut()?.push(slot);
                None
            }
        }
    }

    fn op_done(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.inflight = c.inflight.saturating_sub(1);
        }
    }

    fn fail(&mut self, conn: ConnId, e: io::Error) {
        self.shutdown(conn, CloseReason::Error(e));
    }

    /// Shuts the socket down (pending ops complete promptly); the fd closes in `reap`.
    fn shutdown(&mut self, conn: ConnId, reason: CloseReason) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.shut {
            return;
        }
        c.shut = true;
        c.reason = Some(reason);
        let _ = c.sock.shutdown(std::net::Shutdown::Both);
        self.reap(conn);
    }

    /// Closes a shut connection once nothing in flight refers to its fd.
    fn reap(&mut self, conn: ConnId) {
        let done = self.conns.get(&conn).is_some_and(|c| c.shut && c.inflight == 0);
        if done {
            if let Some(mut c) = self.conns.remove(&conn) {
                shrink_after_remove(&mut self.conns);
                // Each connection had ops in flight: the op table grew with them.
                shrink_after_remove(&mut self.ops);
                if let Some(slot) = c.slot {
                    // Nothing in flight names the slot any more: empty it before the
                    // socket closes, then reuse it.
                    match self.ring.submitter().register_files_update(slot, &[-1]) {
                        Ok(_) => self.fixed_free.get_or_insert_with(Vec::new).push(slot),
                        Err(e) => log::warn!("io_uring: clearing fixed-file slot {slot}: {e}"),
                    }
                }
                let reason = c.reason.take().unwrap_or(CloseReason::Local);
                self.ready.push(Completion::Closed { conn, reason });
            }
        }
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            // No wait, but still enter the kernel: socket completions are posted by task
            // work that runs on the way back from a syscall, so a busy-polling core that
            // only peeked at the CQ would see them late.
            Some(t) if t.is_zero() => self.ring.submit().map(|_| ()),
            Some(t) => {
                let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args).map(|_| ())
            }
            None => self.ring.submit_and_wait(1).map(|_| ()),
        };
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            other => other,
        }
    }

    fn drain_cq(&mut self) {
        let cqes: Vec<(u64, i32, u32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())).collect();
        for (id, res, flags) in cqes {
            self.on_cqe(id, res, flags);
        }
    }
}

impl Transport for UringTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Uring
    }

    fn recv(&mut self, conn: ConnId, buf: BytesMut, max: usize) {
        if self.bufring.is_some() {
            self.recv_multi(conn, buf, max);
        } else {
            self.arm_recv(conn, buf, max);
        }
    }

    fn send(&mut self, conn: ConnId, chunks: Vec<Chunk>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.unsent += chunks_len(&chunks);
        c.tx.push_back(chunks);
        self.start_send(conn);
    }

    fn close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.sending || !c.tx.is_empty() {
            // Let queued responses (e.g. an error answer) go out first.
            c.closing = true;
        } else {
            self.shutdown(conn, CloseReason::Local);
        }
    }

    fn abort(&mut self, conn: ConnId) {
        // Shutting the socket down fails the ops in flight; their completions release
        // what they hold, then the connection is reaped.
        self.shutdown(conn, CloseReason::Local);
    }

    fn stop_accepting(&mut self) {
        let ids: Vec<u64> = self.ops.iter().filter(|(_, o)| matches!(o, Op::Accept(_))).map(|(id, _)| *id).collect();
        for id in ids {
            let entry = opcode::AsyncCancel::new(id).build();
            // SAFETY: no pointers.
            if let Err(e) = unsafe { self.push(entry, Op::Cancel) } {
                log::warn!("io_uring: cancelling accept failed: {e}");
            }
        }
        // The accept op holds its own reference to the listening file; closing our fd now
        // takes the socket away once the cancel lands (the ring held its own reference).
        self.accepting = false;
        self.listeners.clear();
    }

    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        let wait = if self.ready.is_empty() { timeout } else { Some(Duration::ZERO) };
        self.submit_and_wait(wait)?;
        self.drain_cq();
        // Completions handled above may have queued new SQEs (re-armed ops, sends).
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
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

impl Drop for UringTransport {
    fn drop(&mut self) {
        // Buffers of ops still in flight must not be freed under the kernel: cancel
        // everything and wait (bounded) for the final completions.
        for c in self.conns.values() {
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
        }
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for id in ids {
            let entry = opcode::AsyncCancel::new(id).build();
            // SAFETY: no pointers.
            let _ = unsafe { self.push(entry, Op::Cancel) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.ops.values().any(|o| !matches!(o, Op::Cancel)) && Instant::now() < deadline {
            if self.submit_and_wait(Some(Duration::from_millis(50))).is_err() {
                break;
            }
            let cqes: Vec<(u64, u32)> = self.ring.completion().map(|c| (c.user_data(), c.flags())).collect();
            for (id, flags) in cqes {
                let final_cqe = match self.ops.get_mut(&id) {
                    Some(Op::Accept(_)) | Some(Op::RecvMulti { .. }) => !cqueue::more(flags),
                    // A zero-copy send's result with F_MORE: its notification is still to come.
                    Some(Op::Send(op)) if op.zc && !cqueue::notif(flags) && cqueue::more(flags) => {
                        op.awaiting_notif = true;
                        false
                    }
                    _ => true,
                };
                if final_cqe {
                    self.ops.remove(&id);
                }
            }
        }
        if self.ops.values().any(|o| !matches!(o, Op::Cancel)) {
            // Never free memory the kernel may still write: leak what is left.
            log::warn!("io_uring: {} ops still in flight at shutdown; leaking their buffers", self.ops.len());
            std::mem::forget(std::mem::take(&mut self.ops));
            std::mem::forget(self.bufring.take());
        } else if let Some(ring) = &self.bufring {
            ring.unregister(&self.ring.submitter());
        }
    }
}
