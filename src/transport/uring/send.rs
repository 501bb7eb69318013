//! Sending: one send op per connection in flight, later responses coalesced into the next
//! one (one `SENDMSG` with an iovec per chunk, `SENDMSG_ZC` at or above the threshold), a
//! short send resubmitted for exactly the rest.

use super::*;

/// A `SENDMSG`/`SENDMSG_ZC` in flight: the chunks, and the iovecs and header that point at
/// them (boxed so their addresses stay put).
pub(super) struct SendOp {
    conn: ConnId,
    /// The messages this op carries, handed back one `Sent` each when done.
    msgs: Vec<Vec<Chunk>>,
    /// The byte ranges actually submitted (a resubmission carries only what is left).
    parts: Vec<Bytes>,
    /// The iovecs `hdr` points at: owned for the kernel, not read by us.
    #[allow(dead_code)]
    iov: Box<[libc::iovec]>,
    hdr: Box<libc::msghdr>,
    len: usize,
    pub(super) zc: bool,
    /// Zero-copy: the result arrived, the notification not yet.
    pub(super) awaiting_notif: bool,
}

// SAFETY: the raw pointers in `iov`/`hdr` point into `parts`, which this op owns; moving
// the op between threads moves the owner with them.
unsafe impl Send for SendOp {}

impl UringTransport {
    /// Submits the queued sends of `conn` as one op, if none is in flight.
    pub(super) fn start_send(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.sending || c.tx.is_empty() || c.shut {
            return;
        }
        let mut msgs = Vec::new();
        let mut parts = Vec::new();
        while let Some(m) = c.tx.front() {
            if !parts.is_empty() && parts.len() + m.len() > MAX_IOV {
                break;
            }
            let Some(m) = c.tx.pop_front() else { break };
            parts.extend(m.iter().filter(|c| !c.is_empty()).map(|c| c.bytes().clone()));
            msgs.push(m);
        }
        c.sending = true;
        let target = c.target();
        self.submit_send(conn, target, msgs, parts);
    }

    pub(super) fn submit_send(&mut self, conn: ConnId, target: Target, msgs: Vec<Vec<Chunk>>, parts: Vec<Bytes>) {
        let len: usize = parts.iter().map(Bytes::len).sum();
        let zc = self.send_zc && len >= self.opts.zc_threshold;
        let iov: Box<[libc::iovec]> =
            parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }).collect();
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        hdr.msg_iov = iov.as_ptr() as *mut _;
        hdr.msg_iovlen = iov.len();
        let op = Box::new(SendOp { conn, msgs, parts, iov, hdr, len, zc, awaiting_notif: false });
        let hdr_ptr: *const libc::msghdr = &*op.hdr;
        let flags = libc::MSG_NOSIGNAL as u32 | libc::MSG_WAITALL as u32;
        let entry = match (zc, target) {
            (true, Target::Fd(fd)) => opcode::SendMsgZc::new(types::Fd(fd), hdr_ptr).flags(flags).build(),
            (true, Target::Fixed(i)) => opcode::SendMsgZc::new(types::Fixed(i), hdr_ptr).flags(flags).build(),
            (false, Target::Fd(fd)) => opcode::SendMsg::new(types::Fd(fd), hdr_ptr).flags(flags).build(),
            (false, Target::Fixed(i)) => opcode::SendMsg::new(types::Fixed(i), hdr_ptr).flags(flags).build(),
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.inflight += 1;
        }
        // SAFETY: the header, its iovecs and the bytes they point at are all owned by `op`
        // (boxed or refcounted: none moves), which the op table keeps until completion.
        if let Err(e) = unsafe { self.push(entry, Op::Send(op)) } {
            self.fail(conn, e);
        }
    }

    pub(super) fn on_send_cqe(&mut self, id: u64, res: i32, flags: u32) {
        let Some(Op::Send(op)) = self.ops.get_mut(&id) else { return };
        let conn = op.conn;
        if op.zc && cqueue::notif(flags) {
            // The kernel no longer reads the pages: the buffers may go.
            self.ops.remove(&id);
            self.op_done(conn);
            self.reap(conn);
            return;
        }
        // The send's result. A zero-copy op with F_MORE still has a notification to come.
        let keep_for_notif = op.zc && cqueue::more(flags);
        op.awaiting_notif = keep_for_notif;
        let len = op.len;
        let msgs = std::mem::take(&mut op.msgs);
        let parts = if keep_for_notif { op.parts.clone() } else { std::mem::take(&mut op.parts) };
        let zc = op.zc;
        if !keep_for_notif {
            self.ops.remove(&id);
            self.op_done(conn);
        }
        if res < 0 {
            self.fail(conn, io::Error::from_raw_os_error(-res));
            self.reap(conn);
            return;
        }
        let sent = res as usize;
        if zc {
            metrics::count_kernel_zero_copy(sent);
        }
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if sent < len {
            // Short send: resubmit exactly the rest (slices of the same buffers, no copy).
            let mut skip = sent;
            let mut rest = Vec::new();
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                } else {
                    rest.push(p.slice(skip..));
                    skip = 0;
                }
            }
            c.unsent -= sent;
            let target = c.target();
            self.submit_send(conn, target, msgs, rest);
            return;
        }
        c.unsent -= len;
        c.sending = false;
        for chunks in msgs {
            self.ready.push(Completion::Sent { conn, chunks });
        }
        let closing = c.closing && c.tx.is_empty();
        if closing {
            self.shutdown(conn, CloseReason::Local);
        } else {
            self.start_send(conn);
        }
        self.reap(conn);
    }
}
