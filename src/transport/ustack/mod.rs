//! The user-space TCP/IP backend: smoltcp over AF_XDP, one stack per core.
//!
//! ```text
//!   NIC queue q ──XDP program (xdp.rs): broker addr+port? ──► AF_XDP socket q (xsk.rs)
//!                 everything else (ARP, ICMP, SSH) ──► kernel         │ frames in UMEM
//!                                                                     ▼
//!   core q: Ethernet (here) ─► smoltcp Interface (Medium::Ip) ─► one SocketSet per connection
//!           MAC learnt from the frame          ▲                      │ copy into / out of
//!                                              └─ segments written ◄──┘ the socket buffers
//!                                                 into UMEM frames
//! ```
//!
//! - **Steering**: the XDP program redirects only the broker's IPv4 address and ports, by
//!   receive queue, into the XSK map; every core binds one socket to one queue. The kernel
//!   keeps the interface address for everything else.
//! - **Demultiplexing without scans**: smoltcp hands each packet to every socket of the set
//!   it is polled with. Each connection therefore has a set of its own, found by its 4-tuple
//!   in a hash map: per-packet cost does not grow with the number of connections. A SYN for
//!   a listener port with no connection makes a new socket in `Listen` (the listen backlog:
//!   up to `backlog` handshakes at once; beyond it SYNs are dropped and the client retries,
//!   as Linux does with a full queue). A packet for no connection goes through an empty set,
//!   so smoltcp answers it with a reset.
//! - **Neighbours**: the interface is `Medium::Ip`; Ethernet is framed here. A reply always
//!   goes to a peer that sent to us, so its next hop is the source MAC of the peer's latest
//!   frame (learnt per source address). The broker never opens connections, so it never
//!   needs ARP; the kernel answers ARP for the address.
//! - **TCP**: Nagle off, delayed ACK and the RTO floor configurable (a patch of the vendored
//!   smoltcp, default 200 ms as Linux), window scaling from the buffer sizes, checksums in
//!   software (veth and copy-mode AF_XDP carry no offload results).
//! - **Copies**: a received byte is copied from the socket buffer into the connection's
//!   frame buffer (`receive_bytes_staged`); a sent byte from its chunk into the socket
//!   buffer (`ustack_send_bytes_copied`: fetched records included, the price of a stack that
//!   must keep bytes for retransmission), and from there into a UMEM frame
//!   (`ustack_umem_bytes_written`). In copy mode the kernel copies the frame once more into
//!   its socket buffer on the way to the driver; zero-copy drivers do not.
//!
//! # Invariants
//! - A connection's smoltcp socket lives until it is closed or in TIME-WAIT *and* the
//!   dispatch loop was told `Closed`; after `Closed`, no completion names the connection.
//! - `flows` and `conns` hold the same connections; `pending` counts those not yet
//!   `Accepted`.
//! - A connection whose socket may have work (bytes queued, a receive outstanding, a timer
//!   due, frames lacking) is on `dirty`, or has a timer in `timers`.

mod netdev;
mod xdp;
mod xsk;

pub use xdp::XdpMode;

use bytes::BytesMut;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{shrink_after_remove, CloseReason, Completion, ConnId, Transport, TransportError, TransportKind};
use crate::buffer::{chunks_len, Chunk};
use crate::metrics;
use crate::wake::{EventFd, Wake};
use netdev::NetDev;
use xdp::XdpAttachment;
use xsk::{RxFrame, Xsk, XskConfig};

/// The backend's settings (`--ustack-*`).
#[derive(Debug, Clone)]
pub struct UstackOptions {
    /// The interface whose queues the cores serve (its kernel IPv4 address is the broker's).
    pub interface: Option<String>,
    pub xdp_mode: XdpMode,
    /// Serve queues `first_queue..first_queue + cores` only, the broker's traffic being
    /// steered to them (`ethtool -N … action Q` or an RSS context); `None`: every queue of
    /// the interface, one core each.
    pub first_queue: Option<u32>,
    /// UMEM frames per queue, half for receiving, half for sending.
    pub frames: u32,
    /// Per-connection socket buffers (window scaling follows their size).
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    /// Handshakes in progress per core before SYNs are dropped.
    pub backlog: usize,
    /// Floor of the retransmission timeout.
    pub min_rto: Duration,
    /// Delayed ACK (`None`: every segment acknowledged at once).
    pub ack_delay: Option<Duration>,
}

impl Default for UstackOptions {
    fn default() -> Self {
        UstackOptions {
            interface: None,
            xdp_mode: XdpMode::Auto,
            first_queue: None,
            frames: 4096,
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
            backlog: 1024,
            min_rto: Duration::from_millis(200),
            ack_delay: Some(Duration::from_millis(1)),
        }
    }
}

const FRAME_SIZE: u32 = 4096;
const ETH_HDR: usize = 14;
/// Packets taken from the RX ring per round.
const RX_BATCH: u32 = 64;
/// Segments one connection may emit per round before the others get their turn.
const EGRESS_BUDGET: usize = 64;
/// A connection that stops acknowledging what was sent is reset after this long.
const UNACKED_TIMEOUT: Duration = Duration::from_secs(60);

/// The interface, the XDP attachment and the ports, shared by every core's transport.
pub struct UstackListener {
    dev: NetDev,
    /// Listener index -> port.
    ports: Vec<u16>,
    xdp: XdpAttachment,
    next_queue: AtomicU32,
    opts: UstackOptions,
}

impl UstackListener {
    /// Attaches the steering program for `addrs` on the configured interface, to be served
    /// by `cores` cores (one receive queue each).
    pub fn bind(addrs: &[SocketAddr], opts: &UstackOptions, cores: usize) -> Result<Arc<Self>, TransportError> {
        let name = opts
            .interface
            .clone()
            .ok_or_else(|| TransportError::Unsupported("--transport ustack needs --ustack-if IFACE".into()))?;
        let dev = NetDev::lookup(&name)?;
        let mut ports = Vec::new();
        for a in addrs {
            match a {
                SocketAddr::V4(v4) if v4.ip().is_unspecified() || *v4.ip() == dev.addr => ports.push(v4.port()),
                _ => {
                    return Err(TransportError::Unsupported(format!(
                        "ustack serves {}'s address {}: listener {a} is not on it",
                        dev.name, dev.addr
                    )))
                }
            }
        }
        let first = opts.first_queue.unwrap_or(0);
        match opts.first_queue {
            None if dev.rx_queues as usize != cores => {
                return Err(TransportError::Unsupported(format!(
                    "{} has {} receive queues and {cores} cores would serve them: one core per queue \
                     (--cores {}, or `ethtool -L {} combined {cores}`, or steer the broker's port to \
                     some queues and give --ustack-first-queue); a queue without a core drops the \
                     broker's packets",
                    dev.name, dev.rx_queues, dev.rx_queues, dev.name
                )));
            }
            Some(q) if q as usize + cores > dev.rx_queues as usize => {
                return Err(TransportError::Unsupported(format!(
                    "{} has {} receive queues: queues {q}..{} do not exist",
                    dev.name,
                    dev.rx_queues,
                    q as usize + cores
                )));
            }
            _ => {}
        }
        let xdp = XdpAttachment::attach(dev.ifindex, dev.addr, &ports, dev.rx_queues, opts.xdp_mode)?;
        log::info!(
            "ustack: {} ({}/{}, MTU {}, {} queue(s)), XDP {:?} mode, ports {:?}",
            dev.name,
            dev.addr,
            dev.prefix,
            dev.mtu,
            dev.rx_queues,
            xdp.mode,
            ports
        );
        Ok(Arc::new(UstackListener { dev, ports, xdp, next_queue: AtomicU32::new(first), opts: opts.clone() }))
    }
}

type FlowKey = (Ipv4Addr, u16, u16);

struct Conn {
    key: FlowKey,
    listener: usize,
    set: SocketSet<'static>,
    handle: SocketHandle,
    /// Handshake not finished: the dispatch loop does not know it yet.
    pending: bool,
    /// The dispatch loop was told `Closed` (or never knew it).
    seam_closed: bool,
    close_requested: bool,
    rx: Option<(BytesMut, usize)>,
    tx: VecDeque<Vec<Chunk>>,
    /// Bytes of the front send already in the socket buffer.
    sent_in_front: usize,
    unsent: usize,
    dirty: bool,
    /// The timer entry in `timers`, if any.
    timer: Option<i64>,
}

impl Conn {
    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.set.get_mut::<tcp::Socket>(self.handle)
    }
}

/// One core's wire: its AF_XDP socket, and what Ethernet framing needs.
struct Link {
    xsk: Xsk,
    /// Next hop by peer address: the source MAC of the peer's latest frame.
    neighbours: HashMap<Ipv4Addr, [u8; 6]>,
    mac: [u8; 6],
    mtu: usize,
    /// Segment bytes written into UMEM frames since the counter was last updated.
    umem_written: u64,
}

/// The smoltcp device for one call: at most one received packet, and the link to send on.
struct Port<'a> {
    link: &'a mut Link,
    packet: Option<&'a [u8]>,
}

struct PacketRx<'a>(&'a [u8]);

impl RxToken for PacketRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

struct FrameTx<'a>(&'a mut Link);

impl TxToken for FrameTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let Link { xsk, neighbours, mac, umem_written, .. } = self.0;
        let mac = *mac;
        let mut f = Some(f);
        let sent = xsk.transmit(ETH_HDR + len, |frame| {
            let r = (f.take().expect("called once"))(&mut frame[ETH_HDR..]);
            let ip = &frame[ETH_HDR..];
            let dst = (ip.len() >= 20).then(|| Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            match dst.and_then(|d| neighbours.get(&d)) {
                Some(next_hop) => {
                    frame[0..6].copy_from_slice(next_hop);
                    frame[6..12].copy_from_slice(&mac);
                    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                    (ETH_HDR + len, r)
                }
                None => {
                    log::debug!("ustack: no next hop known for {dst:?}; packet dropped");
                    (0, r)
                }
            }
        });
        match sent {
            Some(r) => {
                *umem_written += len as u64;
                r
            }
            // No frame free (a reply made while receiving: `transmit` checks first) or a
            // frame too large: the segment is lost, and TCP sends it again.
            None => (f.take().expect("not called"))(&mut vec![0u8; len]),
        }
    }
}

impl Device for Port<'_> {
    type RxToken<'b>
        = PacketRx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = FrameTx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SInstant) -> Option<(PacketRx<'_>, FrameTx<'_>)> {
        let p = self.packet.take()?;
        Some((PacketRx(p), FrameTx(self.link)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<FrameTx<'_>> {
        if !self.link.xsk.can_transmit() {
            return None;
        }
        Some(FrameTx(self.link))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.link.mtu;
        caps.max_burst_size = Some(RX_BATCH as usize);
        caps
    }
}

/// The fields of a received frame the demultiplexer needs, read checked.
#[derive(Debug)]
pub struct Classified<'a> {
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    /// A SYN without ACK: the only segment that may open a connection.
    pub syn_only: bool,
    /// The IP packet (what smoltcp is given).
    pub ip: &'a [u8],
}

/// Reads an Ethernet frame from the wire (untrusted: any bytes) far enough to find its
/// connection; `None` for anything but a well-formed-enough IPv4 TCP segment.
pub fn classify(frame: &[u8]) -> Option<Classified<'_>> {
    if frame.len() < ETH_HDR + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_HDR..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    let tcp = &ip[ihl..];
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    let flags = tcp[13];
    Some(Classified {
        src_mac,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        syn_only: flags & 0x02 != 0 && flags & 0x10 == 0,
        ip,
    })
}

pub struct UstackTransport {
    shared: Arc<UstackListener>,
    queue: u32,
    link: Link,
    iface: Interface,
    conns: HashMap<ConnId, Conn>,
    flows: HashMap<FlowKey, ConnId>,
    /// (deadline in µs since `epoch`, connection).
    timers: BTreeSet<(i64, ConnId)>,
    dirty: Vec<ConnId>,
    /// An empty set: packets for no connection are processed against it (smoltcp resets).
    stray: SocketSet<'static>,
    ready: Vec<Completion>,
    accepting: bool,
    pending: usize,
    next_id: u64,
    waker: Arc<EventFd>,
    rx_frames: Vec<RxFrame>,
    epoch: Instant,
}

impl UstackTransport {
    /// The transport of the next queue of `shared`'s interface.
    pub fn new(shared: Arc<UstackListener>) -> Result<Self, TransportError> {
        let queue = shared.next_queue.fetch_add(1, Ordering::Relaxed);
        if queue >= shared.dev.rx_queues {
            return Err(TransportError::Unsupported(format!(
                "{} has {} receive queues: no queue left for another core",
                shared.dev.name, shared.dev.rx_queues
            )));
        }
        let cfg = XskConfig {
            frames: shared.opts.frames,
            frame_size: FRAME_SIZE,
            bind_flags: xdpilone::SocketConfig::XDP_BIND_NEED_WAKEUP,
        };
        let xsk = Xsk::open(&shared.dev.name, queue, cfg)?;
        shared.xdp.insert(queue, xsk.fd())?;
        log::info!(
            "ustack: core on {} queue {queue}, {} frames, {}",
            shared.dev.name,
            cfg.frames,
            if xsk.zero_copy { "zero-copy" } else { "copy mode" }
        );
        let epoch = Instant::now();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = u64::from_le_bytes(seed);
        let mut link =
            Link { xsk, neighbours: HashMap::new(), mac: shared.dev.mac, mtu: shared.dev.mtu, umem_written: 0 };
        let mut iface = Interface::new(config, &mut Port { link: &mut link, packet: None }, SInstant::from_micros(0));
        let addr = shared.dev.addr;
        iface.update_ip_addrs(|a| {
            // One address: the kernel's on this interface.
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), shared.dev.prefix));
        });
        // Every destination "routes" through ourselves: with Medium::Ip there is no
        // resolution, and the Ethernet next hop comes from the peer's own frames.
        if let Err(e) = iface.routes_mut().add_default_ipv4_route(addr) {
            log::warn!("ustack: default route: {e:?}");
        }
        Ok(UstackTransport {
            shared,
            queue,
            link,
            iface,
            conns: HashMap::new(),
            flows: HashMap::new(),
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            stray: SocketSet::new(Vec::new()),
            ready: Vec::new(),
            accepting: true,
            pending: 0,
            next_id: 1,
            waker: Arc::new(EventFd::new()?),
            rx_frames: Vec::with_capacity(RX_BATCH as usize),
            epoch,
        })
    }

    fn now(&self) -> SInstant {
        SInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn mark(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn new_socket(&self, port: u16) -> Option<tcp::Socket<'static>> {
        let o = &self.shared.opts;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; o.rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; o.tx_buffer]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(o.ack_delay.map(|d| SDuration::from_micros(d.as_micros() as u64)));
        s.set_min_rto(SDuration::from_millis(o.min_rto.as_millis() as u64));
        s.set_timeout(Some(SDuration::from_millis(UNACKED_TIMEOUT.as_millis() as u64)));
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::Ipv4(self.shared.dev.addr)), port };
        s.listen(endpoint).ok()?;
        Some(s)
    }

    /// One pass: completed transmissions, received packets, due timers, connections with
    /// work; then the kernel is kicked for what was queued.
    fn round(&mut self) {
        self.link.xsk.reap();
        let mut frames = std::mem::take(&mut self.rx_frames);
        self.link.xsk.receive(RX_BATCH, &mut frames);
        let now = self.now();
        for f in &frames {
            self.ingress(f.bytes(), now);
        }
        self.link.xsk.recycle(&mut frames);
        self.rx_frames = frames;
        // Timers due.
        while let Some(&(at, id)) = self.timers.first() {
            if at > now.total_micros() {
                break;
            }
            self.timers.pop_first();
            if let Some(c) = self.conns.get_mut(&id) {
                c.timer = None;
            }
            self.mark(id);
        }
        let dirty = std::mem::take(&mut self.dirty);
        for id in dirty {
            if let Some(c) = self.conns.get_mut(&id) {
                c.dirty = false;
            }
            self.service(id, now);
        }
        self.link.xsk.kick();
        if self.link.umem_written > 0 {
            metrics::count_copy(metrics::Path::UstackUmem, self.link.umem_written as usize);
            self.link.umem_written = 0;
        }
    }

    fn ingress(&mut self, frame: &[u8], now: SInstant) {
        let Some(p) = classify(frame) else {
            return;
        };
        // The next hop back to this peer is whoever sent us its frame.
        if self.link.neighbours.get(&p.src) != Some(&p.src_mac) {
            self.link.neighbours.insert(p.src, p.src_mac);
        }
        let key = (p.src, p.src_port, p.dst_port);
        let id = match self.flows.get(&key) {
            Some(id) => *id,
            None => {
                let listener = self.shared.ports.iter().position(|port| *port == p.dst_port);
                match (p.syn_only, listener) {
                    (true, Some(listener)) => {
                        if !self.accepting || self.pending >= self.shared.opts.backlog {
                            // As a full Linux accept queue: no answer, the client retries.
                            return;
                        }
                        let Some(sock) = self.new_socket(p.dst_port) else {
                            return;
                        };
                        let mut set = SocketSet::new(Vec::with_capacity(1));
                        let handle = set.add(sock);
                        let id = self.next_id;
                        self.next_id += 1;
                        self.pending += 1;
                        self.flows.insert(key, id);
                        self.conns.insert(
                            id,
                            Conn {
                                key,
                                listener,
                                set,
                                handle,
                                pending: true,
                                seam_closed: false,
                                close_requested: false,
                                rx: None,
                                tx: VecDeque::new(),
                                sent_in_front: 0,
                                unsent: 0,
                                dirty: false,
                                timer: None,
                            },
                        );
                        id
                    }
                    _ => {
                        // No connection: smoltcp resets it (unless it is a reset).
                        let mut port = Port { link: &mut self.link, packet: Some(p.ip) };
                        self.iface.poll_ingress_single(now, &mut port, &mut self.stray);
                        return;
                    }
                }
            }
        };
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut port = Port { link: &mut self.link, packet: Some(p.ip) };
        self.iface.poll_ingress_single(now, &mut port, &mut c.set);
        self.mark(id);
    }

    fn service(&mut self, id: ConnId, now: SInstant) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let peer = SocketAddr::V4(SocketAddrV4::new(c.key.0, c.key.1));
        if c.pending {
            let state = c.socket().state();
            match state {
                tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait => {
                    // A handshake that failed (reset, timed out): the dispatch loop never knew it.
                    c.seam_closed = true;
                }
                tcp::State::SynReceived => {}
                _ => {
                    c.pending = false;
                    self.pending -= 1;
                    self.ready.push(Completion::Accepted { conn: id, peer, listener: c.listener });
                }
            }
        }
        if !c.pending && !c.seam_closed {
            // Received bytes to the outstanding receive.
            if let Some((mut buf, max)) = c.rx.take() {
                let sock = c.socket();
                if sock.can_recv() {
                    let room = max.saturating_sub(buf.len()).max(1);
                    let mut n = 0;
                    // Twice: the ring buffer may hand out its bytes in two pieces.
                    for _ in 0..2 {
                        let got = sock
                            .recv(|data| {
                                let k = data.len().min(room - n);
                                buf.extend_from_slice(&data[..k]);
                                (k, k)
                            })
                            .unwrap_or(0);
                        n += got;
                        if got == 0 || n >= room {
                            break;
                        }
                    }
                    metrics::count_copy(metrics::Path::ReceiveStaging, n);
                    self.ready.push(Completion::Received { conn: id, buf, n });
                } else if !sock.may_recv() {
                    self.ready.push(Completion::Received { conn: id, buf, n: 0 });
                } else {
                    c.rx = Some((buf, max));
                }
            }
            // Queued sends into the socket buffer.
            while let Some(front) = c.tx.front() {
                let total = chunks_len(front);
                let mut skip = c.sent_in_front;
                let mut copied = 0;
                let mut mapped = 0;
                let handle = c.handle;
                let sock = c.set.get_mut::<tcp::Socket>(handle);
                for ch in front {
                    let b = ch.bytes();
                    if skip >= b.len() {
                        skip -= b.len();
                        continue;
                    }
                    let k = sock.send_slice(&b[skip..]).unwrap_or(0);
                    copied += k;
                    if ch.region().is_some() {
                        mapped += k;
                    }
                    if k < b.len() - skip {
                        break;
                    }
                    skip = 0;
                }
                metrics::count_copy(metrics::Path::UstackSendBuffer, mapped);
                c.sent_in_front += copied;
                c.unsent -= copied;
                if c.sent_in_front < total {
                    break;
                }
                c.sent_in_front = 0;
                if let Some(chunks) = c.tx.pop_front() {
                    self.ready.push(Completion::Sent { conn: id, chunks });
                }
            }
            if c.close_requested && c.tx.is_empty() {
                c.socket().close();
                c.seam_closed = true;
                self.ready.push(Completion::Closed { conn: id, reason: CloseReason::Local });
            } else if c.socket().state() == tcp::State::Closed {
                // Reset by the peer, or it stopped acknowledging.
                c.seam_closed = true;
                c.rx = None;
                self.ready.push(Completion::Closed { conn: id, reason: CloseReason::PeerClosed });
            }
        }
        // Segments out.
        let mut port = Port { link: &mut self.link, packet: None };
        let mut emitted = 0;
        while emitted < EGRESS_BUDGET {
            match self.iface.poll_egress(now, &mut port, &mut c.set) {
                PollResult::None => break,
                PollResult::SocketStateChanged => emitted += 1,
            }
        }
        let more = emitted == EGRESS_BUDGET || !port.link.xsk.can_transmit();
        let state = c.socket().state();
        if c.seam_closed && matches!(state, tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen) {
            if let Some(at) = c.timer.take() {
                self.timers.remove(&(at, id));
            }
            if c.pending {
                self.pending -= 1;
            }
            let key = c.key;
            self.conns.remove(&id);
            self.flows.remove(&key);
            shrink_after_remove(&mut self.conns);
            shrink_after_remove(&mut self.flows);
            return;
        }
        // The socket's next deadline (retransmission, delayed ACK, timeout).
        let next = self.iface.poll_at(now, &c.set).map(|t| t.total_micros());
        if next != c.timer {
            if let Some(at) = c.timer.take() {
                self.timers.remove(&(at, id));
            }
            if let Some(at) = next {
                self.timers.insert((at, id));
                c.timer = Some(at);
            }
        }
        if more || (c.rx.is_some() && c.socket().can_recv()) {
            self.mark(id);
        }
    }
}

impl Transport for UstackTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Ustack
    }

    fn recv(&mut self, conn: ConnId, buf: BytesMut, max: usize) {
        match self.conns.get_mut(&conn) {
            Some(c) if !c.seam_closed => {
                c.rx = Some((buf, max));
                self.mark(conn);
            }
            _ => {}
        }
    }

    fn send(&mut self, conn: ConnId, chunks: Vec<Chunk>) {
        match self.conns.get_mut(&conn) {
            Some(c) if !c.seam_closed => {
                c.unsent += chunks_len(&chunks);
                c.tx.push_back(chunks);
                self.mark(conn);
            }
            _ => {}
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.seam_closed {
                c.close_requested = true;
                self.mark(conn);
            }
        }
    }

    fn abort(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.seam_closed {
                c.socket().abort();
                c.seam_closed = true;
                c.rx = None;
                c.tx.clear();
                c.unsent = 0;
                self.ready.push(Completion::Closed { conn, reason: CloseReason::Local });
                self.mark(conn);
            }
        }
    }

    fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.round();
            out.append(&mut self.ready);
            if !out.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            let remaining = match deadline {
                Some(d) if d <= now => return Ok(()),
                Some(d) => Some(d - now),
                None => None,
            };
            if !self.dirty.is_empty() {
                continue;
            }
            let timer = self.timers.first().map(|(at, _)| {
                let at = self.epoch + Duration::from_micros(*at as u64);
                at.saturating_duration_since(now)
            });
            let wait = match (remaining, timer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if self.link.xsk.wait(self.waker.fd(), wait)? {
                self.waker.drain();
                return Ok(());
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn unsent_bytes(&self, conn: ConnId) -> usize {
        // Bytes in the socket buffer count until acknowledged: a graceful stop waits for
        // them, since nothing else would retransmit them once the process is gone.
        self.conns.get(&conn).map_or(0, |c| c.unsent + c.set.get::<tcp::Socket>(c.handle).send_queue())
    }
}

impl Drop for UstackTransport {
    fn drop(&mut self) {
        log::info!("ustack: {} queue {}: {}", self.shared.dev.name, self.queue, self.link.xsk.statistics());
        self.shared.xdp.remove(self.queue);
        // Reset what is still open, so peers learn at once rather than by timeout.
        let now = self.now();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                if c.socket().is_open() {
                    c.socket().abort();
                }
                let mut port = Port { link: &mut self.link, packet: None };
                let _ = self.iface.poll_egress(now, &mut port, &mut c.set);
            }
        }
        self.link.xsk.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_reads_only_what_is_there() {
        let mut f = vec![0u8; ETH_HDR + 40];
        f[12] = 0x08;
        f[ETH_HDR] = 0x45;
        f[ETH_HDR + 9] = 6;
        f[ETH_HDR + 12..ETH_HDR + 16].copy_from_slice(&[10, 0, 0, 9]);
        f[ETH_HDR + 20..ETH_HDR + 22].copy_from_slice(&4000u16.to_be_bytes());
        f[ETH_HDR + 22..ETH_HDR + 24].copy_from_slice(&9092u16.to_be_bytes());
        f[ETH_HDR + 33] = 0x02;
        let c = classify(&f).expect("a TCP SYN");
        assert_eq!((c.src, c.src_port, c.dst_port, c.syn_only), (Ipv4Addr::new(10, 0, 0, 9), 4000, 9092, true));
        // Every truncation is refused, never read past.
        for len in 0..f.len() {
            assert!(classify(&f[..len]).is_none(), "len {len}");
        }
        // IHL pointing past the end.
        f[ETH_HDR] = 0x4f;
        assert!(classify(&f).is_none());
        // Not TCP.
        f[ETH_HDR] = 0x45;
        f[ETH_HDR + 9] = 17;
        assert!(classify(&f).is_none());
    }
}
