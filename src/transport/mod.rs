//! The transport seam: completion-style I/O with owned buffers.
//!
//! The dispatch loop *submits* operations and later *collects* their completions, never
//! borrowing a buffer across the two: a receive takes a [`BytesMut`] by value and gives
//! it back (with the new bytes appended) in [`Completion::Received`]; a send takes an
//! I/O vector of [`Chunk`]s by value and gives it back in [`Completion::Sent`]. This is
//! the shape io_uring needs (the kernel owns buffers in flight), the shape RDMA verbs need
//! (posted receive buffers, work requests that complete later; a `Chunk::Mapped` names
//! the region its bytes lie in, which is registered and written from by one-sided RDMA),
//! and a polled user-space stack
//! fits it trivially. The epoll backend ([`tcp`]) emulates completions on readiness.
//! `docs/architecture.md` shows how each backend maps onto it.
//!
//! # Invariants
//! - At most one receive is outstanding per connection; sends complete in submission
//!   order per connection (Kafka answers pipelined requests in order).
//! - After [`Completion::Closed`] for a connection, no further completion names it, and
//!   every buffer it held has been dropped or returned.

pub mod rdma;
mod staging;
pub mod tcp;
pub mod uring;
pub mod ustack;

use bytes::BytesMut;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

use crate::buffer::Chunk;
use crate::wake::Wake;

/// A connection, unique within one transport instance (one core).
pub type ConnId = u64;

/// The backends, by mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// epoll readiness + non-blocking sockets: the baseline.
    Tcp,
    /// io_uring completions.
    Uring,
    /// RDMA verbs (reliable connected queue pairs).
    Rdma,
    /// User-space TCP/IP (smoltcp over AF_XDP).
    Ustack,
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("transport '{0:?}' is not built into this binary (rdma: build with `--features rdma`)")]
    NotBuilt(TransportKind),
    #[error("transport not supported here: {0}")]
    Unsupported(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("transport I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Why a connection ended.
#[derive(Debug)]
pub enum CloseReason {
    PeerClosed,
    Error(io::Error),
    Local,
}

/// One finished operation or event.
#[derive(Debug)]
pub enum Completion {
    Accepted {
        conn: ConnId,
        peer: SocketAddr,
        /// Which of the transport's listeners, by index (the broker binds a protocol to
        /// each).
        listener: usize,
    },
    /// `buf` is the buffer given to [`Transport::recv`], with `n` new bytes appended.
    /// `n == 0` means the peer closed its side.
    Received {
        conn: ConnId,
        buf: BytesMut,
        n: usize,
    },
    /// The I/O vector given to [`Transport::send`], fully sent.
    Sent {
        conn: ConnId,
        chunks: Vec<Chunk>,
    },
    Closed {
        conn: ConnId,
        reason: CloseReason,
    },
}

/// A transport backend, one instance per core.
pub trait Transport: Send {
    fn kind(&self) -> TransportKind;
    /// Submits a receive: new bytes are appended to `buf` (its spare capacity may grow up to
    /// `max` bytes in all).
    fn recv(&mut self, conn: ConnId, buf: BytesMut, max: usize);
    /// Submits a vectored send of `chunks`, in order after earlier sends on `conn`.
    fn send(&mut self, conn: ConnId, chunks: Vec<Chunk>);
    /// Closes a connection once what is queued for it has gone out; a `Closed` completion
    /// follows.
    fn close(&mut self, conn: ConnId);
    /// Closes a connection now, dropping what is queued or in flight for it (a peer that
    /// stopped reading would hold a graceful close open forever); a `Closed` completion
    /// follows.
    fn abort(&mut self, conn: ConnId);
    /// Stops accepting new connections (graceful shutdown).
    fn stop_accepting(&mut self);
    /// Waits up to `timeout` (forever if `None`) for completions and appends them to `out`.
    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()>;
    /// A handle that makes a blocked [`Transport::poll`] return.
    fn waker(&self) -> Arc<dyn Wake>;
    /// Bytes submitted for sending on `conn` and not yet completed (for backpressure).
    fn unsent_bytes(&self, conn: ConnId) -> usize;
}

/// Gives a per-connection map's spare room back once most of its connections are gone
/// (a map keeps its largest size otherwise: 10,000 connections that came and went would
/// stay allocated).
pub fn shrink_after_remove<K: std::hash::Hash + Eq, V>(map: &mut std::collections::HashMap<K, V>) {
    if map.capacity() > 1024 && map.capacity() > 4 * map.len() {
        map.shrink_to(2 * map.len());
    }
}

/// The backends built into this binary.
pub fn built() -> Vec<TransportKind> {
    let mut v = vec![TransportKind::Tcp, TransportKind::Uring];
    if cfg!(feature = "rdma") {
        v.push(TransportKind::Rdma);
    }
    v.push(TransportKind::Ustack);
    v
}

/// Whether this kernel (and build) can run a transport, as `slipstream --version` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    Yes(String),
    No(String),
    NotBuilt(String),
}

/// Probes each backend on this machine: io_uring by setting up a ring, RDMA by the devices
/// the kernel lists, AF_XDP (the user-space stack's) by opening a socket.
pub fn kernel_support() -> Vec<(TransportKind, Support)> {
    let uring = match io_uring::IoUring::new(2) {
        Ok(_) => Support::Yes("io_uring_setup works".into()),
        Err(e) => Support::No(format!("io_uring_setup: {e}")),
    };
    let devices: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    let rdma = match (cfg!(feature = "rdma"), devices.is_empty()) {
        (false, _) => Support::NotBuilt("build with --features rdma".into()),
        (true, true) => Support::No("no RDMA device in /sys/class/infiniband".into()),
        (true, false) => Support::Yes(format!("devices {}", devices.join(", "))),
    };
    let xdp = match Socket::new(Domain::from(libc::AF_XDP), Type::RAW, None) {
        Ok(_) => Support::Yes("this kernel opens AF_XDP sockets".into()),
        Err(e) => Support::No(format!("AF_XDP socket: {e}")),
    };
    vec![
        (TransportKind::Tcp, Support::Yes("epoll".into())),
        (TransportKind::Uring, uring),
        (TransportKind::Rdma, rdma),
        (TransportKind::Ustack, xdp),
    ]
}

/// Backend-specific settings.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    pub uring: uring::UringOptions,
    pub ustack: ustack::UstackOptions,
    #[cfg(feature = "rdma")]
    pub rdma: rdma::RdmaOptions,
}

/// What the cores accept connections from: the broker's TCP listening sockets, or its
/// rdma_cm listening id. Index `i` is the `i`-th address bound; every core's transport
/// accepts from all of them and names the index in [`Completion::Accepted`].
pub enum Listeners {
    Tcp(Vec<std::net::TcpListener>),
    #[cfg(feature = "rdma")]
    Rdma(Arc<rdma::RdmaListener>),
    /// The XDP steering of the interface the cores' AF_XDP sockets serve.
    Ustack(Arc<ustack::UstackListener>),
}

impl Listeners {
    /// Binds what `kind` accepts from on each of `addrs`, for `cores` cores.
    pub fn bind(
        kind: TransportKind,
        addrs: &[SocketAddr],
        opts: &TransportOptions,
        cores: usize,
    ) -> Result<Listeners, TransportError> {
        match kind {
            TransportKind::Ustack => Ok(Listeners::Ustack(ustack::UstackListener::bind(addrs, &opts.ustack, cores)?)),
            TransportKind::Tcp | TransportKind::Uring => {
                Ok(Listeners::Tcp(addrs.iter().map(|a| bind_listener(*a)).collect::<Result<_, _>>()?))
            }
            #[cfg(feature = "rdma")]
            TransportKind::Rdma => match addrs {
                [addr] => Ok(Listeners::Rdma(rdma::RdmaListener::bind(*addr)?)),
                _ => Err(TransportError::Unsupported(format!(
                    "the rdma transport serves one listener ({} given)",
                    addrs.len()
                ))),
            },
            #[cfg(not(feature = "rdma"))]
            TransportKind::Rdma => Err(TransportError::NotBuilt(kind)),
        }
    }
}

/// Binds the broker's one listening socket. Deliberately *not* `SO_REUSEPORT`: a port must
/// never be shared with another process — a killed broker's io_uring is torn down
/// asynchronously, and its lingering listener would be handed (and then reset) some of a
/// restarted broker's connections. If such a listener still holds the port, retry a
/// little while it goes away.
pub fn bind_listener(addr: SocketAddr) -> Result<std::net::TcpListener, TransportError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut logged = false;
    loop {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        match sock.bind(&addr.into()).and_then(|()| sock.listen(1024)) {
            Ok(()) => return Ok(sock.into()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                if !logged {
                    log::warn!("{addr} is still in use (a previous process's listener?); retrying");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(TransportError::Listen { addr, source }),
        }
    }
}

/// Builds the transport for one core, accepting from its clones of the broker's listeners.
pub fn build(
    kind: TransportKind,
    listeners: &Listeners,
    opts: &TransportOptions,
) -> Result<Box<dyn Transport>, TransportError> {
    let clones = |ls: &[std::net::TcpListener]| ls.iter().map(|l| l.try_clone()).collect::<io::Result<Vec<_>>>();
    match (kind, listeners) {
        (TransportKind::Tcp, Listeners::Tcp(ls)) => Ok(Box::new(tcp::TcpTransport::new(clones(ls)?)?)),
        (TransportKind::Uring, Listeners::Tcp(ls)) => {
            Ok(Box::new(uring::UringTransport::new(clones(ls)?, opts.uring)?))
        }
        #[cfg(feature = "rdma")]
        (TransportKind::Rdma, Listeners::Rdma(l)) => Ok(Box::new(rdma::RdmaTransport::new(l.clone(), opts.rdma)?)),
        (TransportKind::Ustack, Listeners::Ustack(l)) => Ok(Box::new(ustack::UstackTransport::new(l.clone())?)),
        (other, _) => Err(TransportError::NotBuilt(other)),
    }
}
