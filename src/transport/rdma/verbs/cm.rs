//! The connection manager: event channels, events, and ids with their queue pairs.

use super::*;

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
