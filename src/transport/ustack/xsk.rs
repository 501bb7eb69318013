//! One AF_XDP socket on one NIC queue, with its own UMEM (rings by xdpilone; the memory,
//! the frame ownership and the RAII are ours).
//!
//! The UMEM is split in two fixed halves: receive frames, which cycle between the fill
//! ring, the kernel and [`RxFrame`]s; and transmit frames, which cycle between a free list,
//! the TX ring and the completion ring.
//!
//! # Invariants
//! - A frame is reachable from safe code only while it is ours: a receive frame from the
//!   moment the RX ring hands it over until its [`RxFrame`] is given back (by value) to
//!   [`Xsk::recycle`], which puts it on the fill ring; a transmit frame only inside the
//!   closure of [`Xsk::transmit`], while it is off the free list and not yet on the TX ring.
//! - The UMEM mapping outlives the socket: every [`RxFrame`] holds it, and the kernel
//!   holds the pages it pinned until the socket is closed.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

/// The UMEM's memory: an anonymous mapping, unmapped when the last holder drops it.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory; which parts may be touched, and by whom, is decided
// by frame ownership (the module's invariants), not by the thread holding the pointer.
unsafe impl Send for Region {}
// SAFETY: as above; shared references only read frames their holder owns.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is involved.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Region { ptr, len })
    }

    /// The bytes of `[offset, offset + len)`.
    ///
    /// # Safety
    /// The range must lie in the region and belong to the caller (no one else, kernel
    /// included, writes it while the slice lives).
    unsafe fn slice(&self, offset: u64, len: usize) -> &[u8] {
        debug_assert!(offset as usize + len <= self.len);
        // SAFETY: in bounds and owned, as the caller promises.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset as usize), len) }
    }

    /// # Safety
    /// As [`Region::slice`], and no other reference to the range exists.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, offset: u64, len: usize) -> &mut [u8] {
        debug_assert!(offset as usize + len <= self.len);
        // SAFETY: in bounds, owned and unaliased, as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset as usize), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`
        // (slices borrow a holder of the Arc).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A received packet, ours until it is given back to [`Xsk::recycle`].
pub struct RxFrame {
    region: Arc<Region>,
    addr: u64,
    len: u32,
}

impl RxFrame {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the RX ring handed this frame to us and it goes back to the fill ring
        // only when this token is consumed by `recycle`; the range was checked against
        // the frame size when the token was made.
        unsafe { self.region.slice(self.addr, self.len as usize) }
    }
}

/// Sizing of one socket's UMEM and rings.
#[derive(Debug, Clone, Copy)]
pub struct XskConfig {
    /// Frames in all (a power of two ≥ 64): half receive, half transmit.
    pub frames: u32,
    pub frame_size: u32,
    pub bind_flags: u16,
}

pub struct Xsk {
    // Drop order: rings and the socket, then the UMEM registration; the region last (it
    // is an Arc the frames share).
    rx: RingRx,
    tx: RingTx,
    device: DeviceQueue,
    _user: User,
    _socket: Socket,
    _umem: Umem,
    region: Arc<Region>,
    frame_size: u32,
    rx_frames: u32,
    free_tx: Vec<u64>,
    /// Descriptors put on the TX ring since the kernel was last kicked.
    tx_unkicked: u32,
    fd: RawFd,
    pub zero_copy: bool,
}

// SAFETY: the rings' raw pointers are used only through `&mut self`; the socket lives on
// one core's thread after it is built on the thread that starts the cores.
unsafe impl Send for Xsk {}

const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;
const SOL_XDP: libc::c_int = 283;

impl Xsk {
    /// Opens a socket on `ifname`'s receive queue `queue`.
    pub fn open(ifname: &str, queue: u32, cfg: XskConfig) -> io::Result<Xsk> {
        let frames = cfg.frames.max(64).next_power_of_two();
        let half = frames / 2;
        let region = Arc::new(Region::new(frames as usize * cfg.frame_size as usize)?);
        let umem_cfg =
            UmemConfig { fill_size: half, complete_size: half, frame_size: cfg.frame_size, headroom: 0, flags: 0 };
        let area = NonNull::slice_from_raw_parts(region.ptr, region.len);
        // SAFETY: the area is a page-aligned mapping of that length, kept alive by `region`
        // for as long as the Umem (and the socket that registers it) lives.
        let umem = unsafe { Umem::new(umem_cfg, area) }.map_err(|e| errno(e, "registering the UMEM"))?;
        let name = CString::new(ifname).map_err(|_| io::Error::other("interface name has a NUL byte"))?;
        let mut info = IfInfo::invalid();
        info.from_name(&name).map_err(|e| errno(e, &format!("interface {ifname}")))?;
        info.set_queue(queue);
        let socket = Socket::with_shared(&info, &umem).map_err(|e| errno(e, "creating the AF_XDP socket"))?;
        let mut device = umem.fq_cq(&socket).map_err(|e| errno(e, "mapping the fill and completion rings"))?;
        let ring = NonZeroU32::new(half);
        let user = umem
            .rx_tx(&socket, &SocketConfig { rx_size: ring, tx_size: ring, bind_flags: cfg.bind_flags })
            .map_err(|e| errno(e, "sizing the RX and TX rings"))?;
        let rx = user.map_rx().map_err(|e| errno(e, "mapping the RX ring"))?;
        let tx = user.map_tx().map_err(|e| errno(e, "mapping the TX ring"))?;
        // The fill ring gets every receive frame before bind, so the kernel can deliver at once.
        {
            let mut w = device.fill(half);
            let n = w.insert((0..half).map(|i| u64::from(i) * u64::from(cfg.frame_size)));
            w.commit();
            debug_assert_eq!(n, half);
        }
        umem.bind(&user).map_err(|e| errno(e, &format!("binding to {ifname} queue {queue}")))?;
        let fd = user.as_raw_fd();
        let zero_copy = xdp_zero_copy(fd);
        let free_tx = (half..frames).map(|i| u64::from(i) * u64::from(cfg.frame_size)).collect();
        Ok(Xsk {
            rx,
            tx,
            device,
            _user: user,
            _socket: socket,
            _umem: umem,
            region,
            frame_size: cfg.frame_size,
            rx_frames: half,
            free_tx,
            tx_unkicked: 0,
            fd,
            zero_copy,
        })
    }

    /// The socket's descriptor: for the XSK map and for sleeping in poll(2).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Takes up to `max` received packets into `out`.
    pub fn receive(&mut self, max: u32, out: &mut Vec<RxFrame>) {
        let mut r = self.rx.receive(max);
        while let Some(d) = r.read() {
            // A descriptor outside the receive half or longer than a frame would be a
            // kernel bug; never make a slice from it.
            let frame = d.addr - d.addr % u64::from(self.frame_size);
            let in_frame = (d.addr - frame) + u64::from(d.len) <= u64::from(self.frame_size);
            if frame / u64::from(self.frame_size) < u64::from(self.rx_frames) && in_frame {
                out.push(RxFrame { region: self.region.clone(), addr: d.addr, len: d.len });
            } else {
                log::error!("AF_XDP: RX descriptor {d:?} out of bounds; dropped");
            }
        }
        r.release();
    }

    /// Gives received frames back to the kernel.
    pub fn recycle(&mut self, frames: &mut Vec<RxFrame>) {
        if frames.is_empty() {
            return;
        }
        let fs = u64::from(self.frame_size);
        // The fill ring has a slot for every receive frame, so these always fit; a
        // reservation may still come back short (it is served from a cached view of the
        // kernel's consumer, refreshed only when that view says full): go on until done.
        for _ in 0..4 {
            if frames.is_empty() {
                break;
            }
            let mut w = self.device.fill(frames.len() as u32);
            let cap = w.capacity() as usize;
            w.insert(frames.drain(..cap.min(frames.len())).map(|f| f.addr - f.addr % fs));
            w.commit();
        }
        if !frames.is_empty() {
            log::error!("AF_XDP: fill ring without room for {} frames", frames.len());
            frames.clear();
        }
        if self.device.needs_wakeup() {
            self.device.wake();
        }
    }

    /// Transmit frames the completion ring has given back.
    pub fn reap(&mut self) {
        let mut c = self.device.complete(self.rx_frames);
        while let Some(addr) = c.read() {
            self.free_tx.push(addr);
        }
        c.release();
    }

    /// Whether a frame is free to [`Xsk::transmit`] into.
    pub fn can_transmit(&self) -> bool {
        !self.free_tx.is_empty()
    }

    /// Fills a free frame with `len` bytes written by `fill` (which returns how many of them
    /// to send) and puts it on the TX ring. `None` if no frame is free.
    pub fn transmit<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> (usize, R)) -> Option<R> {
        if len > self.frame_size as usize {
            log::error!("AF_XDP: a {len}-byte frame does not fit in {}", self.frame_size);
            return None;
        }
        let addr = self.free_tx.pop()?;
        // SAFETY: a frame off the free list is neither on a ring nor referenced elsewhere
        // (the module's invariants); `len` fits in it (checked above).
        let buf = unsafe { self.region.slice_mut(addr, len) };
        let (sent, r) = fill(buf);
        if sent == 0 {
            self.free_tx.push(addr);
            return Some(r);
        }
        let mut w = self.tx.transmit(1);
        if !w.insert_once(XdpDesc { addr, len: sent as u32, options: 0 }) {
            // The TX ring has as many slots as there are transmit frames.
            drop(w);
            self.free_tx.push(addr);
            log::error!("AF_XDP: TX ring full");
            return Some(r);
        }
        w.commit();
        self.tx_unkicked += 1;
        Some(r)
    }

    /// Sleeps until a packet arrives, `waker` is readable, or `timeout` passes; says whether
    /// the waker fired.
    pub fn wait(&self, waker: RawFd, timeout: Option<std::time::Duration>) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: waker, events: libc::POLLIN, revents: 0 },
        ];
        // Rounded up: a sub-millisecond wait must not become a zero-timeout spin.
        let ms = timeout.map_or(-1, |t| t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32);
        // SAFETY: `fds` is a live array of two pollfds for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(fds[1].revents & libc::POLLIN != 0)
    }

    /// The kernel's counters for this socket, as one line for the log.
    pub fn statistics(&self) -> String {
        match self._user.statistics_v2() {
            Ok(s) => format!(
                "rx dropped {}, rx ring full {}, fill ring empty {}, rx invalid {}, tx invalid {}, tx ring empty {}",
                s.rx_dropped,
                s.rx_ring_full,
                s.rx_fill_ring_empty_descs,
                s.rx_invalid_descs,
                s.tx_invalid_descs,
                s.tx_ring_empty_descs
            ),
            Err(e) => format!("statistics unavailable: {e}"),
        }
    }

    /// Tells the kernel about queued frames if it asked to be told (copy mode always does).
    /// A copy-mode wake-up sends at most 32 frames (the kernel's per-call budget): wake
    /// until the ring is drained, or frames would wait for the next transmission, which
    /// may be a retransmission timeout away.
    pub fn kick(&mut self) {
        if self.tx_unkicked == 0 && self.tx.pending() == 0 {
            return;
        }
        self.tx_unkicked = 0;
        for _ in 0..256 {
            if self.tx.pending() == 0 || !self.tx.needs_wakeup() {
                return;
            }
            self.tx.wake();
        }
    }
}

fn xdp_zero_copy(fd: RawFd) -> bool {
    let mut opts: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `opts`, a live u32.
    let rc = unsafe { libc::getsockopt(fd, SOL_XDP, XDP_OPTIONS, (&mut opts as *mut u32).cast(), &mut len) };
    rc == 0 && opts & XDP_OPTIONS_ZEROCOPY != 0
}

fn errno(e: xdpilone::Errno, what: &str) -> io::Error {
    let io = io::Error::from_raw_os_error(e.get_raw());
    let hint = match e.get_raw() {
        libc::EPERM => " (needs CAP_NET_RAW and CAP_NET_ADMIN, or root)",
        libc::ENOBUFS => " (UMEM pages are locked memory: raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK)",
        _ => "",
    };
    io::Error::new(io.kind(), format!("{what}: {io}{hint}"))
}
