//! # slipstream: a kernel-bypass accelerated broker data path
//!
//! Stock Kafka clients connect unchanged; what is underneath is ours end to end.
//! The layers, bottom up, each a module:
//!
//! ```text
//!   protocol::kafka     wire protocol: frames -> typed requests -> handlers -> responses
//!   broker              topics, partitions, consumer groups, producer ids (shared state)
//!   dispatch            thread-per-core, run-to-completion loop; ordered, coalesced replies
//!   log                 memory-mapped commit log: segments, indexes, recovery, retention
//!   transport           completion-style I/O with owned buffers: tcp (epoll), uring
//!                       (io_uring), rdma (verbs; feature `rdma`); ustack (AF_XDP +
//!                       smoltcp) will plug into the same seam
//!   buffer              scatter/gather output that carries log bytes by reference
//!   client              a lean blocking Kafka client (tests, bench native mode)
//!   sidecar             next to unmodified clients: the TCP -> RDMA bridge, metadata rewriting
//! ```
//!
//! A produce request travels transport -> dispatch -> protocol -> log and is copied once,
//! into the mmap'd segment (io_uring's multishot mode and RDMA first stage received bytes
//! from their ring or receive buffers: one more copy, counted). A fetch response travels log -> protocol -> dispatch ->
//! transport as an I/O vector whose record bytes point into the mmap: no user-space copy.
//! `docs/architecture.md` explains how each transport backend maps onto the seam.
//!
//! Unsafe code is denied here and allowed only in the modules that must touch raw memory
//! or the kernel's and NIC's queues: [`buffer`], [`log::mmap`], `transport::uring` (with
//! its provided-buffer ring) and `transport::rdma` (the verbs RAII layer, the backend and
//! the client end).
#![deny(unsafe_code)]

pub mod broker;
pub mod buffer;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod framing;
pub mod log;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod sidecar;
pub mod transport;
pub mod wake;
