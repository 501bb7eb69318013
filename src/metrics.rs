//! Process-wide counters, cheap enough for the hot path (relaxed atomics).
//!
//! The copy counters exist to *prove* the zero-copy claims: every user-space copy of
//! record payload bytes goes through [`count_copy`], and every payload byte that leaves by
//! reference through [`count_zero_copy`]. Tests read them from the stats file the broker
//! writes (see [`snapshot`]).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a counted byte was copied or sent from.
#[derive(Debug, Clone, Copy)]
pub enum Path {
    /// Produce payload copied from the request buffer into the log (the one allowed copy).
    ProduceIntoLog,
    /// Fetch payload copied on its way out (should stay at zero).
    FetchOut,
    /// Received bytes copied from an io_uring provided buffer (multishot receive mode) or
    /// from the user-space stack's socket buffer into a connection's frame buffer.
    ReceiveStaging,
    /// A RocketMQ message body copied into the record batch it is stored as (before the
    /// one copy into the log).
    RocketMqSend,
    /// A record's body copied into the RocketMQ message layout of a PULL answer (Kafka
    /// record batches are not what RocketMQ clients decode).
    RocketMqPull,
    /// A message body encoded into a RocketMQ 5 gRPC answer (protobuf framing: the one
    /// copy on that consume path), and a gzip body inflated on send.
    RocketMqGrpc,
    /// Bytes of mapped (log) chunks copied into the user-space stack's socket send buffers
    /// (the stack keeps them for retransmission).
    UstackSendBuffer,
    /// Segment bytes the user-space stack wrote from its send buffers into UMEM frames.
    UstackUmem,
}

static PRODUCE_COPIED: AtomicU64 = AtomicU64::new(0);
static FETCH_COPIED: AtomicU64 = AtomicU64::new(0);
static RECEIVE_STAGED: AtomicU64 = AtomicU64::new(0);
static ROCKETMQ_SEND: AtomicU64 = AtomicU64::new(0);
static ROCKETMQ_PULL: AtomicU64 = AtomicU64::new(0);
static ROCKETMQ_GRPC: AtomicU64 = AtomicU64::new(0);
static USTACK_SEND: AtomicU64 = AtomicU64::new(0);
static USTACK_UMEM: AtomicU64 = AtomicU64::new(0);
static FETCH_ZERO_COPY: AtomicU64 = AtomicU64::new(0);
static PRODUCE_BYTES: AtomicU64 = AtomicU64::new(0);
static KERNEL_ZERO_COPY: AtomicU64 = AtomicU64::new(0);
static RDMA_LOG_BYTES: AtomicU64 = AtomicU64::new(0);
static RDMA_TX_STAGED: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS_CLOSED_BAD_INPUT: AtomicU64 = AtomicU64::new(0);

pub fn count_copy(path: Path, bytes: usize) {
    let c = match path {
        Path::ProduceIntoLog => &PRODUCE_COPIED,
        Path::FetchOut => &FETCH_COPIED,
        Path::ReceiveStaging => &RECEIVE_STAGED,
        Path::RocketMqSend => &ROCKETMQ_SEND,
        Path::RocketMqPull => &ROCKETMQ_PULL,
        Path::RocketMqGrpc => &ROCKETMQ_GRPC,
        Path::UstackSendBuffer => &USTACK_SEND,
        Path::UstackUmem => &USTACK_UMEM,
    };
    c.fetch_add(bytes as u64, Ordering::Relaxed);
}

pub fn count_zero_copy(bytes: usize) {
    FETCH_ZERO_COPY.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Bytes a transport sent with kernel zero-copy (io_uring `SENDMSG_ZC`): the kernel did
/// not copy them into socket buffers either.
pub fn count_kernel_zero_copy(bytes: usize) {
    KERNEL_ZERO_COPY.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Bytes the RDMA transport wrote to a peer by one-sided RDMA straight from a registered
/// log segment (the NIC read the page cache; no CPU copy).
pub fn count_rdma_log_bytes(bytes: usize) {
    RDMA_LOG_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Non-log response bytes (headers) the RDMA transport copied into registered staging
/// memory before writing them.
pub fn count_rdma_tx_staged(bytes: usize) {
    RDMA_TX_STAGED.fetch_add(bytes as u64, Ordering::Relaxed);
}

pub fn count_produced(bytes: usize) {
    PRODUCE_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

pub fn count_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

pub fn count_bad_input_close() {
    CONNECTIONS_CLOSED_BAD_INPUT.fetch_add(1, Ordering::Relaxed);
}

/// A point-in-time copy of every counter.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Snapshot {
    pub produce_payload_bytes: u64,
    pub produce_bytes_copied: u64,
    pub fetch_bytes_copied: u64,
    pub fetch_bytes_zero_copy: u64,
    #[serde(default)]
    pub kernel_zero_copy_send_bytes: u64,
    #[serde(default)]
    pub receive_bytes_staged: u64,
    #[serde(default)]
    pub rdma_log_bytes_written: u64,
    #[serde(default)]
    pub rdma_tx_staged_bytes: u64,
    #[serde(default)]
    pub rocketmq_send_bytes_copied: u64,
    #[serde(default)]
    pub rocketmq_pull_bytes_copied: u64,
    #[serde(default)]
    pub rocketmq_grpc_bytes_copied: u64,
    #[serde(default)]
    pub ustack_send_bytes_copied: u64,
    #[serde(default)]
    pub ustack_umem_bytes_written: u64,
    pub requests: u64,
    pub connections_closed_bad_input: u64,
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        produce_payload_bytes: PRODUCE_BYTES.load(Ordering::Relaxed),
        produce_bytes_copied: PRODUCE_COPIED.load(Ordering::Relaxed),
        fetch_bytes_copied: FETCH_COPIED.load(Ordering::Relaxed),
        fetch_bytes_zero_copy: FETCH_ZERO_COPY.load(Ordering::Relaxed),
        kernel_zero_copy_send_bytes: KERNEL_ZERO_COPY.load(Ordering::Relaxed),
        receive_bytes_staged: RECEIVE_STAGED.load(Ordering::Relaxed),
        rdma_log_bytes_written: RDMA_LOG_BYTES.load(Ordering::Relaxed),
        rdma_tx_staged_bytes: RDMA_TX_STAGED.load(Ordering::Relaxed),
        rocketmq_send_bytes_copied: ROCKETMQ_SEND.load(Ordering::Relaxed),
        rocketmq_pull_bytes_copied: ROCKETMQ_PULL.load(Ordering::Relaxed),
        rocketmq_grpc_bytes_copied: ROCKETMQ_GRPC.load(Ordering::Relaxed),
        ustack_send_bytes_copied: USTACK_SEND.load(Ordering::Relaxed),
        ustack_umem_bytes_written: USTACK_UMEM.load(Ordering::Relaxed),
        requests: REQUESTS.load(Ordering::Relaxed),
        connections_closed_bad_input: CONNECTIONS_CLOSED_BAD_INPUT.load(Ordering::Relaxed),
    }
}
