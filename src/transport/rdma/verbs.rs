//! RAII wrappers over the verbs and connection-manager objects the RDMA transport and the
//! bridge use, on the `rdma-mummy-sys` bindings (which load rdma-core at run time, so the
//! binary builds and starts on machines without it; every call then fails `EOPNOTSUPP`).
//!
//! Each object owns its handle (`NonNull`) and releases it in `Drop`; children keep their
//! parent alive with an `Arc` (memory regions, queues and the shared receive queue hold
//! their protection domain; a connection id holds its event channel).
//!
//! # Invariants
//! - Memory named by a posted work request (an SGE's address and lkey) stays mapped and
//!   registered until that request's completion has been polled: the callers own the
//!   buffers and `post_*` are `unsafe fn` saying so.
//! - A queue pair is destroyed before its connection id, and both before the completion
//!   queues, shared receive queue and protection domain they use (the owners declare their
//!   fields in that order).
//! - The verbs device context belongs to librdmacm, which keeps it open while any id on
//!   the device exists; a protection domain is allocated from an id that outlives it
//!   (the broker's listening id, the bridge connection's own id).
#![allow(unsafe_code)]

use rdma_mummy_sys as sys;
use std::ffi::c_void;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::ptr::{null_mut, NonNull};
use std::sync::Arc;

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(rc: i32, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else if rc > 0 {
        // Verbs calls return a positive errno; rdma_cm calls return -1 and set errno.
        let e = io::Error::from_raw_os_error(rc);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Err(last_err(what))
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with valid commands.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_err("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// An `rdma_event_channel`: where connection-manager events of its ids arrive.
pub struct EventChannel(NonNull<sys::rdma_event_channel>);

// SAFETY: librdmacm's event channel is a file descriptor plus immutable state; its calls
// are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    /// A non-blocking channel (poll its [`fd`](Self::fd) for readiness).
    pub fn new() -> io::Result<Arc<Self>> {
        // SAFETY: no arguments; the result is checked.
        let p = unsafe { sys::rdma_create_event_channel() };
        let ch = EventChannel(NonNull::new(p).ok_or_else(|| last_err("rdma_create_event_channel"))?);
        set_nonblocking(ch.fd())?;
        Ok(Arc::new(ch))
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live; `fd` is a plain field.
        unsafe { self.0.as_ref().fd }
    }

    /// The next event, or `None` if none is pending.
    pub fn next_event(&self) -> io::Result<Option<CmEvent>> {
        let mut ev: *mut sys::rdma_cm_event = null_mut();
        // SAFETY: a live channel and a valid out-pointer.
        let rc = unsafe { sys::rdma_get_cm_event(self.0.as_ptr(), &mut ev) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(io::Error::new(e.kind(), format!("rdma_get_cm_event: {e}")));
        }
        Ok(NonNull::new(ev).map(CmEvent))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id using the channel holds an `Arc` to it, so none is left.
        unsafe { sys::rdma_destroy_event_channel(self.0.as_ptr()) };
    }
}

/// What a connection-manager event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    AddrResolved,
    RouteResolved,
    ConnectRequest,
    Established,
    Disconnected,
    Rejected,
    /// Address/route/connection errors, device removal, timewait exit and the rest.
    Other(u32),
}

/// A received event; acknowledged (and freed) on drop.
pub struct CmEvent(NonNull<sys::rdma_cm_event>);

impl CmEvent {
    fn raw(&self) -> &sys::rdma_cm_event {
        // SAFETY: the event is live until acknowledged in `drop`.
        unsafe { self.0.as_ref() }
    }

    pub fn kind(&self) -> CmEventKind {
        use sys::rdma_cm_event_type::*;
        match self.raw().event {
            RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddrResolved,
            RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
            RDMA_CM_EVENT_CONNECT_REQUEST => CmEventKind::ConnectRequest,
            RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established,
            RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
            RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected,
            other => CmEventKind::Other(other),
        }
    }

    pub fn status(&self) -> i32 {
        self.raw().status
    }

    /// The token set with [`CmId::set_token`] on the id this event is about.
    pub fn token(&self) -> u64 {
        // SAFETY: the id named by a live event is live.
        unsafe { (*self.raw().id).context as u64 }
    }

    /// The peer's private data of a connect request or acceptance.
    pub fn private_data(&self) -> &[u8] {
        // SAFETY: for connection events `param.conn` is the active member; librdmacm
        // gives a pointer and length valid until the event is acknowledged.
        unsafe {
            let c = &self.raw().param.conn;
            if c.private_data.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(c.private_data.cast(), c.private_data_len as usize)
            }
        }
    }

    /// Takes the new id a `ConnectRequest` carries. It reports to `channel` (migrated
    /// there), and is ours to accept or reject.
    pub fn take_request_id(self, channel: &Arc<EventChannel>) -> io::Result<CmId> {
        if self.kind() != CmEventKind::ConnectRequest {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a connect request"));
        }
        let id = self.raw().id;
        // The event must be acknowledged before its id can migrate.
        drop(self);
        let id = CmId {
            ptr: NonNull::new(id).ok_or_else(|| io::Error::other("null id"))?,
            _channel: channel.clone(),
            qp: false,
        };
        // SAFETY: a live id and a live channel; the id has no unacknowledged events.
        check(unsafe { sys::rdma_migrate_id(id.ptr.as_ptr(), channel.0.as_ptr()) }, "rdma_migrate_id")?;
        Ok(id)
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: each event is acknowledged exactly once.
        unsafe { sys::rdma_ack_cm_event(self.0.as_ptr()) };
    }
}

/// An `rdma_cm_id` (with its queue pair, once created): one end of a connection, or a
/// listener.
pub struct CmId {
    ptr: NonNull<sys::rdma_cm_id>,
    /// The channel its events go to, kept alive as long as the id (RAII parent).
    _channel: Arc<EventChannel>,
    qp: bool,
}

// SAFETY: the id is used by one owner at a time (`&mut` for state changes); librdmacm and
// the provider serialise their own internal state.
unsafe impl Send for CmId {}

impl CmId {
    /// A reliable-connected (TCP port space) id reporting to `channel`.
    pub fn new(channel: &Arc<EventChannel>) -> io::Result<CmId> {
        let mut id: *mut sys::rdma_cm_id = null_mut();
        // SAFETY: a live channel and a valid out-pointer.
        let rc =
            unsafe { sys::rdma_create_id(channel.0.as_ptr(), &mut id, null_mut(), sys::rdma_port_space::RDMA_PS_TCP) };
        check(rc, "rdma_create_id")?;
        Ok(CmId {
            ptr: NonNull::new(id).ok_or_else(|| io::Error::other("null id"))?,
            _channel: channel.clone(),
            qp: false,
        })
    }

    /// Names this id in its events ([`CmEvent::token`]).
    pub fn set_token(&mut self, token: u64) {
        // SAFETY: `context` is the user's field of a live id.
        unsafe { (*self.ptr.as_ptr()).context = token as *mut c_void };
    }

    pub fn listen(&mut self, addr: SocketAddr, backlog: i32) -> io::Result<()> {
        let (mut ss, _) = sockaddr(addr);
        // SAFETY: a live id and a valid socket address.
        let rc = unsafe { sys::rdma_bind_addr(self.ptr.as_ptr(), (&mut ss as *mut libc::sockaddr_storage).cast()) };
        check(rc, &format!("rdma_bind_addr {addr}"))?;
        // SAFETY: a bound id.
        check(unsafe { sys::rdma_listen(self.ptr.as_ptr(), backlog) }, "rdma_listen")
    }

    /// The port actually bound (for port 0).
    pub fn local_port(&self) -> u16 {
        // SAFETY: a live id; the route's source address is plain data.
        let sa = unsafe { &(*self.ptr.as_ptr()).route.addr.src_addr_union.src_storage };
        storage_addr(sa).map_or(0, |a| a.port())
    }

    pub fn resolve_addr(&mut self, dst: SocketAddr, timeout_ms: i32) -> io::Result<()> {
        let (mut ss, _) = sockaddr(dst);
        // SAFETY: a live id; a null source lets the kernel pick the device by route.
        let rc = unsafe {
            sys::rdma_resolve_addr(
                self.ptr.as_ptr(),
                null_mut(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                timeout_ms,
            )
        };
        check(rc, &format!("rdma_resolve_addr {dst}"))
    }

    pub fn resolve_route(&mut self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: a live id whose address was resolved.
        check(unsafe { sys::rdma_resolve_route(self.ptr.as_ptr(), timeout_ms) }, "rdma_resolve_route")
    }

    /// The device context the id is bound to (after bind/resolve/request).
    fn context(&self) -> io::Result<*mut sys::ibv_context> {
        // SAFETY: a live id; `verbs` is set once bound to a device.
        let ctx = unsafe { (*self.ptr.as_ptr()).verbs };
        if ctx.is_null() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the id is not bound to an RDMA device"));
        }
        Ok(ctx)
    }

    /// Creates the id's RC queue pair; receives come from `srq` if given.
    pub fn create_qp(&mut self, pd: &Pd, send_cq: &Cq, recv_cq: &Cq, srq: Option<&Srq>, cap: QpCaps) -> io::Result<()> {
        // SAFETY: all-zero is a valid init-attr value; we fill what we use.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.ptr.as_ptr();
        attr.recv_cq = recv_cq.ptr.as_ptr();
        attr.srq = srq.map_or(null_mut(), |s| s.ptr.as_ptr());
        attr.cap.max_send_wr = cap.send_wr;
        attr.cap.max_recv_wr = if srq.is_some() { 0 } else { cap.recv_wr };
        attr.cap.max_send_sge = cap.send_sge;
        attr.cap.max_recv_sge = 1;
        attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        // SAFETY: a live id bound to the device of `pd` and the queues; valid attributes.
        check(unsafe { sys::rdma_create_qp(self.ptr.as_ptr(), pd.ptr.as_ptr(), &mut attr) }, "rdma_create_qp")?;
        self.qp = true;
        Ok(())
    }

    fn qp_ptr(&self) -> io::Result<*mut sys::ibv_qp> {
        // SAFETY: a live id; `qp` is set by rdma_create_qp.
        let qp = unsafe { (*self.ptr.as_ptr()).qp };
        if !self.qp || qp.is_null() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no queue pair"));
        }
        Ok(qp)
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: a live queue pair (checked).
        self.qp_ptr().map_or(0, |qp| unsafe { (*qp).qp_num })
    }

    fn conn_param(private: &[u8]) -> sys::rdma_conn_param {
        // SAFETY: all-zero is a valid value; we fill what we use.
        let mut p: sys::rdma_conn_param = unsafe { std::mem::zeroed() };
        p.private_data = private.as_ptr().cast();
        p.private_data_len = private.len().min(u8::MAX as usize) as u8;
        p.responder_resources = 1;
        p.initiator_depth = 1;
        p.retry_count = 7;
        p.rnr_retry_count = 7; // 7 = retry forever on receiver-not-ready
        p
    }

    pub fn connect(&mut self, private: &[u8]) -> io::Result<()> {
        let mut p = Self::conn_param(private);
        // SAFETY: a live id with a queue pair; `private` outlives the call (copied).
        check(unsafe { sys::rdma_connect(self.ptr.as_ptr(), &mut p) }, "rdma_connect")
    }

    pub fn accept(&mut self, private: &[u8]) -> io::Result<()> {
        let mut p = Self::conn_param(private);
        // SAFETY: a live request id with a queue pair; `private` is copied by the call.
        check(unsafe { sys::rdma_accept(self.ptr.as_ptr(), &mut p) }, "rdma_accept")
    }

    pub fn reject(&mut self, private: &[u8]) {
        // SAFETY: a live request id; the private data is copied by the call.
        unsafe { sys::rdma_reject(self.ptr.as_ptr(), private.as_ptr().cast(), private.len() as u8) };
    }

    pub fn disconnect(&mut self) {
        // SAFETY: a live id; disconnecting twice or unconnected is a harmless error.
        unsafe { sys::rdma_disconnect(self.ptr.as_ptr()) };
    }

    /// Posts a chain of send-side work requests.
    ///
    /// # Safety
    /// Every SGE of every request must name memory registered under its lkey that stays
    /// mapped until the request's completion is polled (or the queue pair is destroyed).
    pub unsafe fn post_send(&self, wr: &mut sys::ibv_send_wr) -> io::Result<()> {
        let qp = self.qp_ptr()?;
        let mut bad: *mut sys::ibv_send_wr = null_mut();
        // SAFETY: a live queue pair; the caller vouches for the memory.
        check(unsafe { sys::ibv_post_send(qp, wr, &mut bad) }, "ibv_post_send")
    }

    /// Posts one receive on the queue pair's own receive queue.
    ///
    /// # Safety
    /// As for [`post_send`](Self::post_send): the buffer must stay registered and mapped
    /// (and unread by us) until the receive completes.
    pub unsafe fn post_recv(&self, wr_id: u64, sge: Option<Sge>) -> io::Result<()> {
        let qp = self.qp_ptr()?;
        let mut list = sge.map(|s| sys::ibv_sge { addr: s.addr, length: s.len, lkey: s.lkey });
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: null_mut(),
            sg_list: list.as_mut().map_or(null_mut(), |l| l as *mut _),
            num_sge: i32::from(list.is_some()),
        };
        let mut bad: *mut sys::ibv_recv_wr = null_mut();
        // SAFETY: a live queue pair; the caller vouches for the memory.
        check(unsafe { sys::ibv_post_recv(qp, &mut wr, &mut bad) }, "ibv_post_recv")
    }

    /// A protection domain on this id's device.
    pub fn alloc_pd(&self) -> io::Result<Arc<Pd>> {
        let ctx = self.context()?;
        // SAFETY: a live device context.
        let p = unsafe { sys::ibv_alloc_pd(ctx) };
        Ok(Arc::new(Pd { ptr: NonNull::new(p).ok_or_else(|| last_err("ibv_alloc_pd"))?, ctx }))
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        if self.qp {
            // SAFETY: the queue pair was created on this id and is destroyed once.
            unsafe { sys::rdma_destroy_qp(self.ptr.as_ptr()) };
        }
        // SAFETY: a live id, destroyed once; its events were acknowledged (they are
        // dropped before their ids by construction: the owner drains its channel).
        unsafe { sys::rdma_destroy_id(self.ptr.as_ptr()) };
    }
}

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
    ptr: NonNull<sys::ibv_pd>,
    ctx: *mut sys::ibv_context,
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
    ptr: NonNull<sys::ibv_cq>,
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
    ptr: NonNull<sys::ibv_srq>,
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

/// Waits until one of `fds` is readable or `timeout` passes (`None`: forever). Returns
/// whether any is readable.
pub fn wait_readable(fds: &[RawFd], timeout: Option<std::time::Duration>) -> io::Result<bool> {
    let mut want: Vec<(RawFd, bool)> = fds.iter().map(|&fd| (fd, false)).collect();
    Ok(wait_fds(&mut want, timeout)?.iter().any(|&r| r))
}

/// `poll(2)`: waits for readability of each `(fd, false)` and writability of each
/// `(fd, true)`; returns which are ready.
pub fn wait_fds(fds: &mut [(RawFd, bool)], timeout: Option<std::time::Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, write)| libc::pollfd { fd, events: if write { libc::POLLOUT } else { libc::POLLIN }, revents: 0 })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(vec![false; fds.len()]) } else { Err(e) };
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

impl CmId {
    /// The peer's address of a connected or requesting id.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: a live id; the route's destination address is plain data.
        storage_addr(unsafe { &(*self.ptr.as_ptr()).route.addr.dst_addr_union.dst_storage })
    }
}

fn storage_addr(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match sa.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr), u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}
