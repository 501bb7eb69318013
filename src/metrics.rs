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
    /// Mapped (log) bytes read into TLS records on a TLS listener: user-space TLS
    /// encrypts a copy, so zero-copy fetch ends there.
    TlsRecords,
}

static PRODUCE_COPIED: AtomicU64 = AtomicU64::new(0);
static FETCH_COPIED: AtomicU64 = AtomicU64::new(0);
static RECEIVE_STAGED: AtomicU64 = AtomicU64::new(0);
static ROCKETMQ_SEND: AtomicU64 = AtomicU64::new(0);
static ROCKETMQ_PULL: AtomicU64 = AtomicU64::new(0);
static ROCKETMQ_GRPC: AtomicU64 = AtomicU64::new(0);
static USTACK_SEND: AtomicU64 = AtomicU64::new(0);
static USTACK_UMEM: AtomicU64 = AtomicU64::new(0);
static TLS_RECORDS: AtomicU64 = AtomicU64::new(0);
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
        Path::TlsRecords => &TLS_RECORDS,
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

static CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// A connection closed because its peer was refused (failed authentication).
pub fn count_refused_close() {
    CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
}

pub fn count_bad_input_close() {
    CONNECTIONS_CLOSED_BAD_INPUT.fetch_add(1, Ordering::Relaxed);
}

static CONNECTIONS_ACCEPTED: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS_CLOSED: AtomicU64 = AtomicU64::new(0);
static LOG_FLUSHES: AtomicU64 = AtomicU64::new(0);
static SEGMENT_ROLLS: AtomicU64 = AtomicU64::new(0);
static RETENTION_DELETED: AtomicU64 = AtomicU64::new(0);
static PAGE_CACHE_DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn count_connection_accepted() {
    CONNECTIONS_ACCEPTED.fetch_add(1, Ordering::Relaxed);
}
pub fn count_connection_closed() {
    CONNECTIONS_CLOSED.fetch_add(1, Ordering::Relaxed);
}
/// A partition log made its appended bytes durable (fdatasync / msync of a range).
pub fn count_log_flush() {
    LOG_FLUSHES.fetch_add(1, Ordering::Relaxed);
}
pub fn count_segment_roll() {
    SEGMENT_ROLLS.fetch_add(1, Ordering::Relaxed);
}
/// Log bytes dropped from the page cache (`LogConfig::page_cache_keep`): written back
/// behind the newest bytes kept, or passed by a consumer catching up.
pub fn count_page_cache_dropped(bytes: usize) {
    PAGE_CACHE_DROPPED.fetch_add(bytes as u64, Ordering::Relaxed);
}
/// Segments removed by retention.
pub fn count_retention_deleted(segments: usize) {
    RETENTION_DELETED.fetch_add(segments as u64, Ordering::Relaxed);
}

/// Upper bounds (seconds) of the request-latency histogram's buckets (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Request kinds a listener's statistics can tell apart (Kafka API keys are below this;
/// other protocols number their request kinds into it, see [`Names`]).
pub const API_SLOTS: usize = 128;

/// How a protocol names what its listeners count: request kinds by slot (below
/// [`API_SLOTS`]) and the error codes its answers carry.
pub struct Names {
    pub api: fn(usize) -> String,
    pub error: fn(i32) -> String,
}

/// One listener's requests by API (a slot below [`API_SLOTS`], e.g. a Kafka API key):
/// counts, failures, error codes answered and a latency histogram. The per-API counters
/// are relaxed atomics (updated on the cores, read by the metrics endpoint); error codes
/// are kept in a map under a lock, taken only for an answer that carries one.
pub struct ApiStats {
    /// `PROTOCOL://HOST:PORT`, the listener's label.
    pub listener: String,
    names: &'static Names,
    requests: [AtomicU64; API_SLOTS],
    failures: [AtomicU64; API_SLOTS],
    /// Per API: one counter per bucket of [`LATENCY_BUCKETS`] and one past the last.
    latency: [[AtomicU64; LATENCY_BUCKETS.len() + 1]; API_SLOTS],
    latency_sum_ns: [AtomicU64; API_SLOTS],
    /// Answers carrying an error code, by (slot, code).
    errors: parking_lot::Mutex<std::collections::BTreeMap<(usize, i32), u64>>,
}

/// One API's row of a listener's statistics (names resolved).
pub struct ApiRow {
    pub api: String,
    pub requests: u64,
    pub failures: u64,
    /// Per bucket of [`LATENCY_BUCKETS`] and one past the last (not cumulative).
    pub buckets: Vec<u64>,
    pub latency_sum_secs: f64,
}

static LISTENERS: parking_lot::Mutex<Vec<std::sync::Arc<ApiStats>>> = parking_lot::Mutex::new(Vec::new());

impl ApiStats {
    /// A listener's statistics, registered for the metrics endpoint.
    pub fn register(listener: String, names: &'static Names) -> std::sync::Arc<ApiStats> {
        let s = Self::unregistered(listener, names);
        LISTENERS.lock().push(s.clone());
        s
    }

    /// Statistics nobody reads (a protocol instance that serves no listener).
    pub fn unregistered(listener: String, names: &'static Names) -> std::sync::Arc<ApiStats> {
        std::sync::Arc::new(ApiStats {
            listener,
            names,
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            failures: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency_sum_ns: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: Default::default(),
        })
    }

    /// Every registered listener's statistics.
    pub fn all() -> Vec<std::sync::Arc<ApiStats>> {
        LISTENERS.lock().clone()
    }

    /// A slot out of range counts in the last one.
    fn slot(api: usize) -> usize {
        api.min(API_SLOTS - 1)
    }

    /// A request answered (or finished without an answer) `took` after it arrived.
    pub fn answered(&self, api: usize, took: std::time::Duration) {
        let i = Self::slot(api);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let b = LATENCY_BUCKETS.iter().position(|le| secs <= *le).unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i][b].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns[i].fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// An answer carried error `code` (once per place it appears, as Kafka counts).
    pub fn error_answered(&self, api: usize, code: i32) {
        *self.errors.lock().entry((Self::slot(api), code)).or_default() += 1;
    }

    /// A request that could not be decoded or served (its connection is closed).
    pub fn failed(&self, api: usize) {
        self.failures[Self::slot(api)].fetch_add(1, Ordering::Relaxed);
    }

    /// A row for every API seen.
    pub fn rows(&self) -> Vec<ApiRow> {
        (0..API_SLOTS)
            .filter_map(|i| {
                let (n, f) = (self.requests[i].load(Ordering::Relaxed), self.failures[i].load(Ordering::Relaxed));
                (n > 0 || f > 0).then(|| ApiRow {
                    api: (self.names.api)(i),
                    requests: n,
                    failures: f,
                    buckets: self.latency[i].iter().map(|b| b.load(Ordering::Relaxed)).collect(),
                    latency_sum_secs: self.latency_sum_ns[i].load(Ordering::Relaxed) as f64 / 1e9,
                })
            })
            .collect()
    }

    /// (api, error, answers) for every error code answered.
    pub fn error_rows(&self) -> Vec<(String, String, u64)> {
        let errors = self.errors.lock().clone();
        errors.into_iter().map(|((api, code), n)| ((self.names.api)(api), (self.names.error)(code), n)).collect()
    }
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
    #[serde(default)]
    pub tls_record_bytes_copied: u64,
    pub requests: u64,
    pub connections_closed_bad_input: u64,
    #[serde(default)]
    pub connections_refused: u64,
    #[serde(default)]
    pub connections_accepted: u64,
    #[serde(default)]
    pub connections_closed: u64,
    #[serde(default)]
    pub log_flushes: u64,
    #[serde(default)]
    pub segment_rolls: u64,
    #[serde(default)]
    pub retention_deleted_segments: u64,
    #[serde(default)]
    pub page_cache_dropped_bytes: u64,
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
        tls_record_bytes_copied: TLS_RECORDS.load(Ordering::Relaxed),
        requests: REQUESTS.load(Ordering::Relaxed),
        connections_closed_bad_input: CONNECTIONS_CLOSED_BAD_INPUT.load(Ordering::Relaxed),
        connections_refused: CONNECTIONS_REFUSED.load(Ordering::Relaxed),
        connections_accepted: CONNECTIONS_ACCEPTED.load(Ordering::Relaxed),
        connections_closed: CONNECTIONS_CLOSED.load(Ordering::Relaxed),
        log_flushes: LOG_FLUSHES.load(Ordering::Relaxed),
        segment_rolls: SEGMENT_ROLLS.load(Ordering::Relaxed),
        retention_deleted_segments: RETENTION_DELETED.load(Ordering::Relaxed),
        page_cache_dropped_bytes: PAGE_CACHE_DROPPED.load(Ordering::Relaxed),
    }
}
