//! Receiving, in the two modes: `single` (a `RECV` into the spare capacity of the
//! connection's own buffer, owned by the op table until its CQE) and `multishot` (one
//! `RECV` per connection for its whole life, from the provided-buffer ring, staged into
//! the connection's frame buffer; cancelled at the staging limit for backpressure).

use super::*;

impl UringTransport {
    pub(super) fn arm_recv(&mut self, conn: ConnId, mut buf: BytesMut, max: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.shut || c.closing {
            return;
        }
        // A connection between requests waits with a small buffer (the kernel holds it
        // until bytes come, and idle connections must stay cheap); one in the middle of a
        // frame gets room for the rest of it.
        if buf.is_empty() && buf.capacity() > IDLE_READ {
            buf = BytesMut::new();
        }
        let want = if buf.is_empty() { IDLE_READ } else { (max.saturating_sub(buf.len())).clamp(1, READ_CHUNK) };
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        let room = (buf.capacity() - buf.len()).min(max.saturating_sub(buf.len()).max(1)) as u32;
        let target = c.target();
        c.inflight += 1;
        // SAFETY: the pointer is the start of `buf`'s spare capacity, `room` bytes of which
        // exist; `buf` moves into the op (its heap block does not move) until completion.
        let ptr = unsafe { buf.as_mut_ptr().add(buf.len()) };
        let entry = match target {
            Target::Fd(fd) => opcode::Recv::new(types::Fd(fd), ptr, room).build(),
            Target::Fixed(i) => opcode::Recv::new(types::Fixed(i), ptr, room).build(),
        };
        // SAFETY: see above.
        if let Err(e) = unsafe { self.push(entry, Op::Recv { conn, buf }) } {
            self.fail(conn, e);
        }
    }

    /// Multishot mode: a receive from the dispatch loop. Staged bytes (or the end of the
    /// stream) complete it at once; otherwise the buffer waits for the next completion.
    pub(super) fn recv_multi(&mut self, conn: ConnId, buf: BytesMut, max: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.shut || c.closing {
            return;
        }
        if let Some((buf, n)) = c.rx.recv(buf, max) {
            self.ready.push(Completion::Received { conn, buf, n });
        }
        self.arm_recv_multi(conn);
    }

    /// Arms the connection's multishot receive unless it is armed, finished, or
    /// backpressured by staged bytes.
    pub(super) fn arm_recv_multi(&mut self, conn: ConnId) {
        let Some(group) = self.bufring.as_ref().map(BufRing::group) else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.recv_op.is_some() || c.shut || c.closing || c.rx.is_eof() || c.rx.staged_len() >= STAGED_PAUSE_AT {
            return;
        }
        let entry = match c.target() {
            Target::Fd(fd) => opcode::RecvMulti::new(types::Fd(fd), group).build(),
            Target::Fixed(i) => opcode::RecvMulti::new(types::Fixed(i), group).build(),
        };
        c.inflight += 1;
        // SAFETY: no pointers of ours; the buffers it selects belong to the ring, which
        // outlives every op (see `bufring`'s invariants).
        match unsafe { self.push(entry, Op::RecvMulti { conn }) } {
            Ok(id) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.recv_op = Some(id);
                    c.recv_cancelling = false;
                }
            }
            Err(e) => self.fail(conn, e),
        }
    }

    pub(super) fn on_recv_multi(&mut self, id: u64, res: i32, flags: u32) {
        let Some(Op::RecvMulti { conn }) = self.ops.get(&id) else { return };
        let conn = *conn;
        let last = !cqueue::more(flags);
        if last {
            self.ops.remove(&id);
            self.op_done(conn);
            if let Some(c) = self.conns.get_mut(&conn) {
                c.recv_op = None;
                c.recv_cancelling = false;
            }
        }
        let UringTransport { bufring, conns, ready, .. } = self;
        let c = conns.get_mut(&conn).filter(|c| !c.shut);
        if res > 0 {
            let n = res as usize;
            let (Some(ring), Some(bid)) = (bufring.as_mut(), cqueue::buffer_select(flags)) else {
                self.fail(conn, io::Error::other("multishot receive completed without a buffer"));
                self.reap(conn);
                return;
            };
            match c {
                Some(c) => {
                    if let Some((buf, k)) = ring.take(bid, n, |bytes| c.rx.arrived(bytes)) {
                        ready.push(Completion::Received { conn, buf, n: k });
                    }
                    if c.rx.staged_len() >= STAGED_PAUSE_AT && !c.recv_cancelling {
                        if let Some(op) = c.recv_op {
                            c.recv_cancelling = true;
                            let entry = opcode::AsyncCancel::new(op).build();
                            // SAFETY: no pointers.
                            if let Err(e) = unsafe { self.push(entry, Op::Cancel) } {
                                self.fail(conn, e);
                            }
                        }
                    }
                }
                // Closed meanwhile: just give the buffer back.
                None => ring.take(bid, n, |_| ()),
            }
        } else if res == 0 {
            if let Some(buf) = c.and_then(|c| c.rx.set_eof()) {
                ready.push(Completion::Received { conn, buf, n: 0 });
            }
        } else if -res == libc::ENOBUFS || -res == libc::ECANCELED {
            // The ring ran dry for a moment (every buffer goes back as soon as its
            // completion is handled), or backpressure cancelled the op: re-armed below.
        } else {
            self.fail(conn, io::Error::from_raw_os_error(-res));
        }
        if last {
            self.arm_recv_multi(conn);
        }
        self.reap(conn);
    }
}
