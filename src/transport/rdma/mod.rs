//! The RDMA verbs backend: Kafka byte streams over reliable-connected queue pairs, with
//! fetch payloads written by one-sided RDMA straight from the registered log.
//!
//! - **Connections** come through rdma_cm: one listening id per broker
//!   ([`RdmaListener`], on `--listen`'s address and port in the RDMA port space); a core
//!   that picks up a connect request migrates the new id to its own event channel, gives it
//!   a queue pair on the core's queues and accepts it with a [`wire::Grant`].
//! - **Requests** arrive as SEND messages in the core's shared receive queue (one pool of
//!   registered buffers for all its connections). Each message is checked
//!   ([`wire::SendHeader`]), copied into the connection's frame buffer (counted as
//!   `receive_bytes_staged`, as multishot io_uring does) and its buffer reposted at once.
//!   A connection may have only as many messages outstanding as it holds credits; credits
//!   go back with the next write batch once the dispatch loop has taken the bytes, so a
//!   peer the broker cannot keep up with is throttled, and one that ignores its credits is
//!   disconnected.
//! - **Responses** are RDMA-WRITTEN into the peer's landing ring. Chunks that lie in a
//!   log segment go out by reference: the segment is registered as memory regions (4 MiB
//!   windows, on first use, read-only — which is what lets file-backed pages be pinned)
//!   and the NIC reads the page cache directly (`rdma_log_bytes_written`). Other chunks
//!   (response headers) are staged in a per-connection registered buffer
//!   (`rdma_tx_staged_bytes`). Each batch ends with a write-with-immediate saying how
//!   many bytes landed and returning credits. A peer that stops freeing its ring while
//!   responses wait is disconnected after `--rdma-stall-timeout-ms`.
//! - **Completions**: one CQ per core with a completion channel; `poll` busy-polls it with
//!   a zero timeout and otherwise arms it and sleeps in `poll(2)` on the channel, the cm
//!   event channels and the core's waker.
//!
//! # Invariants
//! - Every SGE of a posted write names either a log window region whose segment a `Bytes`
//!   kept in the connection's in-flight posts keeps mapped, or the connection's staging
//!   buffer between `staged_tail` and `staged_head`; both are released only when the post's
//!   (signalled, in-order) completion arrives or the queue pair is destroyed.
//! - A shared-receive-queue buffer is read only between its receive completion and its
//!   repost.
//! - The broker writes only ring space the peer reported free: `ring_written - ring_freed
//!   <= ring_len`.

#[cfg(feature = "rdma")]
mod backend;
pub mod plan;
#[cfg(feature = "rdma")]
pub mod stream;
#[cfg(feature = "rdma")]
pub mod verbs;
pub mod wire;

#[cfg(feature = "rdma")]
pub use backend::{RdmaListener, RdmaOptions, RdmaTransport};
