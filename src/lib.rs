//! # slipstream: a kernel-bypass accelerated broker data path
//!
//! Stock Kafka and RocketMQ clients connect unchanged; what is underneath is ours end
//! to end. The layers, top down, each a module; a layer imports only from those below it:
//!
//! ```text
//!   server              `serve`: listeners (each bound to a protocol), cores, I/O thread;
//!                       prometheus: the `/metrics` endpoint on a thread of its own
//!   protocol::kafka     wire protocol: framer, session, handlers, response encoding
//!   protocol::rocketmq  remoting: framer, name server, broker, scheduler service;
//!                       grpc: RocketMQ 5's gRPC front on its own runtime, reaching
//!                       partitions through dispatch::Port (not a session)
//!   ════ dispatch::session ═══ the protocol seam: Protocol, Session, Step, Parked, Finish
//!   dispatch            thread-per-core, run-to-completion loop; ordered, coalesced
//!                       replies; parking; gathers of partition operations across cores
//!   broker              topics, partition owners (shards), consumer groups, producer ids
//!   log                 commit log: segments written with pwritev and read through a
//!                       mapping, indexes, recovery, retention, the file worker
//!   ════ transport::Transport ═══ the transport seam: completion-style, owned buffers
//!   transport           tcp (epoll), uring (io_uring), rdma (verbs; feature `rdma`),
//!                       ustack (smoltcp over AF_XDP, the XDP program assembled here)
//!   buffer, framing,    I/O vectors whose chunks say where their bytes live, the one
//!   wake, metrics       length-prefix check, cross-thread wake-ups, counters
//!
//!   beside them: sidecar (`slipstream sidecar` in front of an existing Kafka cluster,
//!   the TCP -> RDMA bridge, the answer rewriting both share) and client (a lean
//!   blocking Kafka client), which use the framers and transports
//! ```
//!
//! A produce request travels transport -> dispatch -> protocol -> log and is copied once,
//! by the kernel, into the segment's page cache (`pwritev`; io_uring's multishot mode and
//! RDMA first stage received bytes from their ring or receive buffers: one more copy,
//! counted). A fetch response travels
//! log -> protocol -> dispatch -> transport as an I/O vector whose record chunks point into
//! the mmap and name the segment they lie in: no user-space copy.
//! `docs/architecture.md` has the picture, the table of what each layer owns and may
//! import, and how each transport backend and each protocol maps onto its seam.
//!
//! Unsafe code is denied here and allowed only in the modules that must touch raw memory
//! or the kernel's and NIC's queues: [`buffer`], [`log::mmap`], [`wake`] (creating an
//! eventfd), `transport::uring` (with its provided-buffer ring), `transport::rdma` (the
//! verbs RAII layer, the backend and the client end) and `transport::ustack`'s `xsk`,
//! `xdp` and `netdev` (the UMEM and its rings, `bpf(2)`, getifaddrs).
#![deny(unsafe_code)]

pub mod broker;
pub mod buffer;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod framing;
pub mod log;
pub mod metrics;
pub mod prometheus;
pub mod protocol;
pub mod server;
pub mod sidecar;
pub mod tls;
pub mod transport;
pub mod wake;
