//! Verbs objects: protection domains, memory regions, completion channels and queues,
//! shared receive queues, and the work requests posted to queue pairs.

use super::*;

/// Queue pair sizes.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
    pub send_sge: u32,
}

/// A scatter/gather element: registered memory.
#[derive(Debug, Clone, Copy)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// A protection domain.
pub struct Pd {
    pub(super) ptr: NonNull<sys::ibv_pd>,
    pub(super) ctx: *mut sys::ibv_context,
}

// SAFETY: verbs objects are thread-safe to use from any thread (libibverbs locks
// internally where needed); we only pass the handle around.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every child (MR, SRQ, QP) holds an `Arc<Pd>` or is dropped first.
        unsafe { sys::ibv_dealloc_pd(self.ptr.as_ptr()) };
    }
}

/// Access rights of a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Local reads only (the NIC sends from it): what the log's segments get. Pinning
    /// without write access is also what lets file-backed pages be registered.
    LocalRead,
    /// The NIC writes into it: receive buffers.
    LocalWrite,
    /// A peer writes into it by RDMA WRITE (the bridge's landing ring).
    RemoteWrite,
}

/// A registered memory region.
pub struct Mr {
    ptr: NonNull<sys::ibv_mr>,
    _pd: Arc<Pd>,
}

// SAFETY: as for `Pd`.
unsafe impl Send for Mr {}
// SAFETY: as for `Pd`.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `[addr, addr + len)`.
    ///
    /// # Safety
    /// The range must stay mapped for the region's lifetime. With `LocalWrite` or
    /// `RemoteWrite`, the NIC (or the peer) may write it whenever a receive or the peer
    /// allows: the caller must not hold Rust references into it across such writes.
    pub unsafe fn register(pd: &Arc<Pd>, addr: *const u8, len: usize, access: Access) -> io::Result<Mr> {
        use sys::ibv_access_flags as f;
        let flags = match access {
            Access::LocalRead => f(0),
            Access::LocalWrite => f::IBV_ACCESS_LOCAL_WRITE,
            Access::RemoteWrite => f::IBV_ACCESS_LOCAL_WRITE | f::IBV_ACCESS_REMOTE_WRITE,
        };
        // SAFETY: a live PD; the caller vouches for the range.
        let p = unsafe { sys::ibv_reg_mr(pd.ptr.as_ptr(), addr as *mut c_void, len, flags.0 as i32) };
        Ok(Mr { ptr: NonNull::new(p).ok_or_else(|| last_err("ibv_reg_mr"))?, _pd: pd.clone() })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: a live region.
        unsafe { self.ptr.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: a live region.
        unsafe { self.ptr.as_ref().rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: a live region deregistered once; no posted request names it any more
        // (module invariant).
        unsafe { sys::ibv_dereg_mr(self.ptr.as_ptr()) };
    }
}

/// A completion channel: a descriptor that becomes readable when an armed CQ has news.
pub struct CompChannel(NonNull<sys::ibv_comp_channel>);

// SAFETY: as for `Pd`.
unsafe impl Send for CompChannel {}
// SAFETY: as for `Pd`.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    pub fn new(pd: &Pd) -> io::Result<Arc<Self>> {
        // SAFETY: a live device context.
        let p = unsafe { sys::ibv_create_comp_channel(pd.ctx) };
        let ch = CompChannel(NonNull::new(p).ok_or_else(|| last_err("ibv_create_comp_channel"))?);
        set_nonblocking(ch.fd())?;
        Ok(Arc::new(ch))
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: a live channel; `fd` is a plain field.
        unsafe { self.0.as_ref().fd }
    }

    /// Consumes pending notifications (acknowledging them on their CQ). Returns how many.
    pub fn drain(&self) -> usize {
        let mut n = 0;
        loop {
            let mut cq: *mut sys::ibv_cq = null_mut();
            let mut ctx: *mut c_void = null_mut();
            // SAFETY: a live, non-blocking channel and valid out-pointers.
            if unsafe { sys::ibv_get_cq_event(self.0.as_ptr(), &mut cq, &mut ctx) } != 0 {
                return n;
            }
            // SAFETY: `cq` was just named by the event, so it is live (it holds an `Arc`
            // to this channel and is destroyed only after its events are acknowledged).
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            n += 1;
        }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: every CQ using the channel holds an `Arc` to it.
        unsafe { sys::ibv_destroy_comp_channel(self.0.as_ptr()) };
    }
}

/// A completion queue.
pub struct Cq {
    pub(super) ptr: NonNull<sys::ibv_cq>,
    _channel: Option<Arc<CompChannel>>,
    _pd: Arc<Pd>,
}

// SAFETY: as for `Pd`.
unsafe impl Send for Cq {}

/// One work completion, copied out of the queue.
pub type WorkCompletion = sys::ibv_wc;

impl Cq {
    pub fn new(pd: &Arc<Pd>, entries: i32, channel: Option<&Arc<CompChannel>>) -> io::Result<Cq> {
        let ch = channel.map_or(null_mut(), |c| c.0.as_ptr());
        // SAFETY: a live device context and channel (or none).
        let p = unsafe { sys::ibv_create_cq(pd.ctx, entries, null_mut(), ch, 0) };
        Ok(Cq {
            ptr: NonNull::new(p).ok_or_else(|| last_err("ibv_create_cq"))?,
            _channel: channel.cloned(),
            _pd: pd.clone(),
        })
    }

    /// Moves up to `out.len()` completions into `out`; returns how many.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> io::Result<usize> {
        // SAFETY: a live CQ and `out.len()` writable entries.
        let n = unsafe { sys::ibv_poll_cq(self.ptr.as_ptr(), out.len() as i32, out.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::other(format!("ibv_poll_cq failed ({n})")));
        }
        Ok(n as usize)
    }

    /// Asks for a completion-channel notification at the next completion.
    pub fn arm(&self) -> io::Result<()> {
        // SAFETY: a live CQ created with a channel (without one the call just fails).
        check(unsafe { sys::ibv_req_notify_cq(self.ptr.as_ptr(), 0) }, "ibv_req_notify_cq")
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: queue pairs using this CQ were destroyed first (module invariant).
        unsafe { sys::ibv_destroy_cq(self.ptr.as_ptr()) };
    }
}

/// A shared receive queue: one pool of posted receive buffers for many queue pairs.
pub struct Srq {
    pub(super) ptr: NonNull<sys::ibv_srq>,
    _pd: Arc<Pd>,
}

// SAFETY: as for `Pd`.
unsafe impl Send for Srq {}

impl Srq {
    pub fn new(pd: &Arc<Pd>, max_wr: u32) -> io::Result<Srq> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: null_mut(),
            attr: sys::ibv_srq_attr { max_wr, max_sge: 1, srq_limit: 0 },
        };
        // SAFETY: a live PD and valid attributes.
        let p = unsafe { sys::ibv_create_srq(pd.ptr.as_ptr(), &mut attr) };
        Ok(Srq { ptr: NonNull::new(p).ok_or_else(|| last_err("ibv_create_srq"))?, _pd: pd.clone() })
    }

    /// Posts one receive buffer.
    ///
    /// # Safety
    /// The buffer must stay registered and mapped, and unread by us, until a completion
    /// with `wr_id` hands it back.
    pub unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> io::Result<()> {
        let mut list = sys::ibv_sge { addr: sge.addr, length: sge.len, lkey: sge.lkey };
        let mut wr = sys::ibv_recv_wr { wr_id, next: null_mut(), sg_list: &mut list, num_sge: 1 };
        let mut bad: *mut sys::ibv_recv_wr = null_mut();
        // SAFETY: a live SRQ; the caller vouches for the memory.
        check(unsafe { sys::ibv_post_srq_recv(self.ptr.as_ptr(), &mut wr, &mut bad) }, "ibv_post_srq_recv")
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        // SAFETY: queue pairs using this SRQ were destroyed first (module invariant).
        unsafe { sys::ibv_destroy_srq(self.ptr.as_ptr()) };
    }
}

/// A send-side work request under construction: an opcode, up to `MAX_SGE` SGEs.
pub struct SendWr {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: Vec<Sge>,
    pub signaled: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum SendOp {
    Send,
    /// RDMA WRITE to the peer's `(addr, rkey)`.
    Write {
        remote_addr: u64,
        rkey: u32,
    },
    /// RDMA WRITE with immediate data (consumes a receive at the peer, which completes
    /// with `imm`).
    WriteImm {
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    },
}

impl CmId {
    /// Posts `wrs` as one chain (one doorbell).
    ///
    /// # Safety
    /// As for [`post_send`](Self::post_send).
    pub unsafe fn post_chain(&self, wrs: &[SendWr]) -> io::Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<Vec<sys::ibv_sge>> = wrs
            .iter()
            .map(|w| w.sges.iter().map(|s| sys::ibv_sge { addr: s.addr, length: s.len, lkey: s.lkey }).collect())
            .collect();
        // SAFETY: all-zero is a valid send WR; we fill what we use.
        let mut raw: Vec<sys::ibv_send_wr> = (0..wrs.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, w) in wrs.iter().enumerate() {
            let r = &mut raw[i];
            r.wr_id = w.wr_id;
            r.sg_list = sges[i].as_mut_ptr();
            r.num_sge = sges[i].len() as i32;
            r.send_flags = if w.signaled { sys::ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
            match w.op {
                SendOp::Send => r.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
                SendOp::Write { remote_addr, rkey } => {
                    r.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                    r.wr.rdma = sys::rdma_t { remote_addr, rkey };
                }
                SendOp::WriteImm { remote_addr, rkey, imm } => {
                    r.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                    r.wr.rdma = sys::rdma_t { remote_addr, rkey };
                    r.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
            }
        }
        for i in 0..raw.len().saturating_sub(1) {
            let next: *mut sys::ibv_send_wr = &mut raw[i + 1];
            raw[i].next = next;
        }
        // SAFETY: the chain and its SGE arrays live until the call returns (the provider
        // copies them into the send queue); the caller vouches for the memory named.
        unsafe { self.post_send(&mut raw[0]) }
    }
}

/// Work-completion fields the transport reads.
pub trait WcExt {
    fn ok(&self) -> bool;
    fn status_str(&self) -> String;
    fn imm(&self) -> u32;
    fn is_recv(&self) -> bool;
}

impl WcExt for WorkCompletion {
    fn ok(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    fn status_str(&self) -> String {
        // SAFETY: returns a pointer to a static string for any status value.
        let s = unsafe { std::ffi::CStr::from_ptr(sys::ibv_wc_status_str(self.status)) };
        s.to_string_lossy().into_owned()
    }

    fn imm(&self) -> u32 {
        // SAFETY: `imm_data` is the active member for completions with immediate data
        // (and a plain integer otherwise).
        u32::from_be(unsafe { self.imm_data_invalidated_rkey_union.imm_data })
    }

    fn is_recv(&self) -> bool {
        self.opcode & sys::ibv_wc_opcode::IBV_WC_RECV != 0
    }
}

/// An empty work completion, for polling buffers.
pub fn empty_wc() -> WorkCompletion {
    // SAFETY: all-zero is a valid value of this plain C struct.
    unsafe { std::mem::zeroed() }
}
