//! `slipstream sidecar`: a transparent Kafka proxy in front of a cluster the user
//! already runs. Clients change nothing but their bootstrap address; brokers change
//! nothing at all.
//!
//! Each client connection gets a connection of its own to the broker its listener stands
//! for (the bootstrap listener: the first `--upstream` that answers), so everything that
//! is per connection in Kafka — SASL, request order, throttling — passes through as it
//! is. Requests go upstream byte for byte, followed by a [`RequestLog`] so each answer is
//! matched to its request; answers pass back byte for byte except those that name
//! brokers or bound versions ([`super::rewrite`]), which are rewritten to name the
//! sidecar's listeners ([`super::cluster`]).
//!
//! A tokio runtime with one worker per core carries every connection: two halves per
//! connection, each reading only after it wrote what it read before, so a slow client or
//! broker stops its own half and nothing piles up (a connection holds two read buffers
//! and, while one is being rewritten, one broker-naming answer).
//!
//! # Invariants
//! - A response a client receives has either passed byte for byte or been rewritten
//!   whole; an answer the rewriter cannot read closes that client's connection with a
//!   log line, never passes half-read.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, DeleteTopicsResponse, FetchResponse, MetadataRequest, MetadataResponse};
use kafka_protocol::protocol::{Message, StrBytes};
use kafka_protocol::ResponseError;
use std::collections::VecDeque;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::cache::{Answer, CacheLimits, TailCache};
use super::cluster::{Cluster, Learn, Opened, PortPlan};
use super::front::{FrontRead, FrontWrite};
use super::local_fetch::{plan_fetch, within, FetchAsk, Plan};
use super::rewrite::{names_brokers, Advertise, RequestLog, Responses, RewriteError};
use super::tls::{self, TlsArgs};
use crate::buffer::IoChunks;
use crate::framing::PREFIX;
use crate::protocol::kafka::frame::{Framer, RequestHead, Side, REQUEST_HEAD};
use crate::transport::TransportKind;

#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// The brokers to bootstrap from (HOST:PORT, comma-separated; names are resolved at
    /// each connect, so a broker that changes address is followed).
    #[arg(long, value_delimiter = ',', required = true)]
    pub upstream: Vec<String>,
    /// Where clients bootstrap (the address they were given for the cluster).
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub listen: String,
    /// The host put in answers naming brokers [default: the listen address's host].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Broker N is served on port BASE + N [default: the listen port + 1].
    #[arg(long)]
    pub broker_port_base: Option<u16>,
    /// A broker's port given explicitly (NODE_ID=PORT; repeatable), e.g. for node ids
    /// that do not fit the base.
    #[arg(long = "broker-port", value_parser = parse_node_port)]
    pub broker_ports: Vec<(i32, u16)>,
    /// Worker threads [default: the number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// The largest answer rewritten whole (Metadata of a large cluster, a Fetch v16+ answer):
    /// a longer one closes its connection.
    #[arg(long, default_value_t = 128 << 20)]
    pub max_rewrite_bytes: usize,
    /// How long a connection to a broker may take.
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Memory for the tail cache (recent batches served without going upstream); 0 turns
    /// it off and fetch answers stream through untouched.
    #[arg(long, default_value_t = 256 << 20)]
    pub tail_cache_bytes: usize,
    /// At most this much of the tail cache per partition.
    #[arg(long, default_value_t = 32 << 20)]
    pub tail_cache_partition_bytes: usize,
    /// Counters written here (JSON) every second and at exit.
    #[arg(long)]
    pub stats_file: Option<std::path::PathBuf>,
    /// Take clients through the transport seam instead: `rdma` (a `slipstream bridge`
    /// reaches the sidecar over RDMA; `--listen` is then an RDMA address), `uring` or
    /// `tcp`. One listener, so one broker behind it: every broker answer names `--listen`.
    #[arg(long)]
    pub transport: Option<TransportKind>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

fn parse_node_port(s: &str) -> Result<(i32, u16), String> {
    let (id, port) = s.split_once('=').ok_or("expected NODE_ID=PORT")?;
    Ok((id.trim().parse().map_err(|_| "bad node id")?, port.trim().parse().map_err(|_| "bad port")?))
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("bad address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("{0}")]
    Settings(String),
}

/// Counters, logged at exit and written to `--stats-file`.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub requests: AtomicU64,
    pub rewritten: AtomicU64,
    pub refused: AtomicU64,
    /// Fetch requests forwarded upstream, and the record bytes their answers carried.
    pub fetch_upstream: AtomicU64,
    pub fetch_upstream_bytes: AtomicU64,
    /// Fetch requests answered from the tail cache, and the record bytes they carried.
    pub fetch_local: AtomicU64,
    pub fetch_local_bytes: AtomicU64,
    /// Whole Fetch answer frames: from upstream, and given here.
    pub fetch_upstream_answer_bytes: AtomicU64,
    pub fetch_local_answer_bytes: AtomicU64,
}

/// The tail cache and what wakes those waiting on it.
struct Cache {
    cache: Mutex<TailCache>,
    /// Told whenever an upstream answer changed the cache (or ended a watch).
    changed: tokio::sync::Notify,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, TailCache> {
        // Every cache operation leaves it consistent, so a panic elsewhere leaves it usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Sidecar {
    cluster: Arc<Cluster>,
    upstreams: Vec<String>,
    connect_timeout: Duration,
    max_rewrite: usize,
    stats: Stats,
    cache: Option<Cache>,
    /// TLS from clients (swapped whole on SIGHUP: new connections get the files as they
    /// are then, open ones keep the session they have), and to the brokers.
    tls_in: Option<crate::tls::ServerTls>,
    tls_up: Option<tls::Upstream>,
    /// With `--transport`: the one address every broker is advertised at, and the one
    /// broker it may stand for.
    single: Option<Single>,
}

struct Single {
    host: StrBytes,
    port: i32,
    node: Mutex<Option<i32>>,
}

/// Which broker a listener stands for.
#[derive(Debug, Clone, Copy)]
enum Target {
    Bootstrap,
    Node(i32),
}

/// Serves until SIGTERM or SIGINT.
pub fn run(args: &SidecarArgs) -> Result<(), SidecarError> {
    let listen: SocketAddr = args
        .listen
        .to_socket_addrs()
        .map_err(|e| SidecarError::Address(args.listen.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| SidecarError::Address(args.listen.clone(), "resolves to nothing".into()))?;
    let host = match &args.advertise {
        Some(h) => h.clone(),
        None if listen.ip().is_unspecified() => {
            return Err(SidecarError::Settings(format!("listening on {listen}: give --advertise HOST for clients")))
        }
        None => listen.ip().to_string(),
    };
    let base = match args.broker_port_base {
        Some(b) => b,
        None => listen.port().checked_add(1).ok_or_else(|| SidecarError::Settings("give --broker-port-base".into()))?,
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("sidecar")
        .enable_all()
        .build()
        .map_err(SidecarError::Runtime)?;
    let tls_in = tls::server(&args.tls).map_err(|e| SidecarError::Settings(e.to_string()))?;
    let tls_up = tls::upstream(&args.tls).map_err(|e| SidecarError::Settings(e.to_string()))?;
    if tls_in.is_some() && args.transport.is_some() {
        return Err(SidecarError::Settings(
            "TLS from clients is served on the sidecar's own listeners, not with --transport".into(),
        ));
    }
    let mut stats_path = None;
    rt.block_on(async move {
        let (tx, mut opened) = tokio::sync::mpsc::unbounded_channel::<Opened>();
        let plan = PortPlan::new(&host, base, args.broker_ports.clone());
        let side = Arc::new(Sidecar {
            cluster: Arc::new(Cluster::new(plan, listen.ip(), vec![listen.port()], tx)),
            upstreams: args.upstream.clone(),
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            max_rewrite: args.max_rewrite_bytes,
            stats: Stats::default(),
            cache: (args.tail_cache_bytes > 0).then(|| Cache {
                cache: Mutex::new(TailCache::new(CacheLimits {
                    total_bytes: args.tail_cache_bytes,
                    partition_bytes: args.tail_cache_partition_bytes.min(args.tail_cache_bytes),
                    block_bytes: CACHE_BLOCK.min(args.tail_cache_partition_bytes),
                })),
                changed: tokio::sync::Notify::new(),
            }),
            tls_in,
            tls_up,
            single: args.transport.map(|_| Single {
                host: StrBytes::from_string(host.clone()),
                port: i32::from(listen.port()),
                node: Mutex::new(None),
            }),
        });
        log::info!(
            "sidecar: clients bootstrap at {listen} (advertised {host}:{}); brokers at {host}:{base}+node id; upstream {}",
            listen.port(),
            args.upstream.join(",")
        );
        // Before the first listener: a SIGHUP from whoever saw the port open must not
        // find the default action (terminate) in place.
        let handler = |kind| {
            tokio::signal::unix::signal(kind).map_err(|e| SidecarError::Settings(format!("signal handler: {e}")))
        };
        let mut term = handler(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = handler(tokio::signal::unix::SignalKind::hangup())?;
        let stop = Arc::new(AtomicBool::new(false));
        let front = match args.transport {
            None => {
                let bootstrap = std::net::TcpListener::bind(listen).map_err(|e| SidecarError::Listen(listen, e))?;
                bootstrap.set_nonblocking(true).map_err(|e| SidecarError::Listen(listen, e))?;
                let bootstrap = TcpListener::from_std(bootstrap).map_err(|e| SidecarError::Listen(listen, e))?;
                tokio::spawn(accept_loop(side.clone(), bootstrap, Target::Bootstrap));
                tokio::spawn(discover(side.clone()));
                None
            }
            Some(kind) => Some(start_front(side.clone(), kind, listen, stop.clone())?),
        };
        if let Some(path) = args.stats_file.clone() {
            let (side, path2) = (side.clone(), path.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    side.write_stats(&path2);
                }
            });
            stats_path = Some(path);
        }
        loop {
            tokio::select! {
                Some(o) = opened.recv() => match TcpListener::from_std(o.listener) {
                    Ok(l) => { tokio::spawn(accept_loop(side.clone(), l, Target::Node(o.node_id))); }
                    Err(e) => log::error!("sidecar: broker {} listener: {e}", o.node_id),
                },
                _ = hup.recv() => side.reload_tls(),
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(f) = front {
            let _ = tokio::task::spawn_blocking(move || f.join()).await;
        }
        log::info!("sidecar: stopping; {}", side.stats_json());
        if let Some(p) = &stats_path {
            side.write_stats(p);
        }
        Ok(())
    })
}

/// Learns the cluster's brokers from the upstream at start, so their listeners are open
/// before any client asks: clients that knew them from before a restart reconnect at once.
async fn discover(side: Arc<Sidecar>) {
    loop {
        let s = side.clone();
        let found = tokio::task::spawn_blocking(move || metadata_brokers(&s.upstreams, s.connect_timeout)).await;
        match found {
            Ok(Ok(brokers)) => {
                for (id, host, port) in brokers {
                    if let Err(e) = side.cluster.learn(id, &host, port) {
                        log::warn!("sidecar: {e}");
                    }
                }
                return;
            }
            Ok(Err(e)) => log::info!("sidecar: upstream metadata not read yet ({e}); retrying"),
            Err(e) => log::warn!("sidecar: metadata task: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The brokers a Metadata answer names, from the first upstream that gives one.
fn metadata_brokers(upstreams: &[String], timeout: Duration) -> Result<Vec<(i32, String, i32)>, String> {
    let mut why = String::from("no upstream");
    for u in upstreams {
        let Some(addr) = u.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
            why = format!("{u}: does not resolve");
            continue;
        };
        let got = crate::client::Client::connect(addr, timeout).and_then(|mut c| {
            let versions = c.api_versions()?;
            let max = versions
                .api_keys
                .iter()
                .find(|k| k.api_key == ApiKey::Metadata as i16)
                .map_or(1, |k| k.max_version.min(12));
            // No topics asked for (v1+: an empty list): only the brokers.
            let mut req = MetadataRequest::default();
            req.topics = Some(Vec::new());
            c.call(&req, max.max(1))
        });
        match got {
            Ok(m) => return Ok(m.brokers.into_iter().map(|b| (b.node_id.0, b.host.to_string(), b.port)).collect()),
            Err(e) => why = format!("{u}: {e}"),
        }
    }
    Err(why)
}

/// Blocks of the tail cache: large enough that most answers' batches sit in one (a local
/// answer covers one block), small enough to evict in steps.
const CACHE_BLOCK: usize = 1 << 20;

/// The largest Fetch request looked at for a local answer (one is a few hundred bytes per
/// partition); a larger one goes upstream as it streams.
const MAX_LOCAL_FETCH: usize = 1 << 20;

impl Sidecar {
    fn stats_json(&self) -> String {
        let s = &self.stats;
        let c = self.cache.as_ref().map(|c| c.lock().stats()).unwrap_or_default();
        let m = crate::metrics::snapshot();
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "connections": v(&s.connections),
            "upstream_failures": v(&s.upstream_failures),
            "requests": v(&s.requests),
            "rewritten": v(&s.rewritten),
            "refused": v(&s.refused),
            "fetch_upstream": v(&s.fetch_upstream),
            "fetch_upstream_bytes": v(&s.fetch_upstream_bytes),
            "fetch_local": v(&s.fetch_local),
            "fetch_local_bytes": v(&s.fetch_local_bytes),
            "fetch_upstream_answer_bytes": v(&s.fetch_upstream_answer_bytes),
            "fetch_local_answer_bytes": v(&s.fetch_local_answer_bytes),
            "cache_held_bytes": c.held_bytes,
            "cache_filled_bytes": c.filled_bytes,
            "cache_dropped_partitions": c.dropped_partitions,
            "cache_evicted_bytes": c.evicted_bytes,
            "fetch_bytes_zero_copy": m.fetch_bytes_zero_copy,
            "fetch_bytes_copied": m.fetch_bytes_copied,
            "rdma_log_bytes_written": m.rdma_log_bytes_written,
            "rdma_tx_staged_bytes": m.rdma_tx_staged_bytes,
            "kernel_zero_copy_send_bytes": m.kernel_zero_copy_send_bytes,
        })
        .to_string()
    }

    /// Writes the counters to `path` (whole: a temporary file renamed over it).
    fn write_stats(&self, path: &std::path::Path) {
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, self.stats_json()).and_then(|()| std::fs::rename(&tmp, path)) {
            log::warn!("sidecar: stats file {}: {e}", path.display());
        }
    }
}

/// A connection's view of the answers going by: broker endpoints through the cluster,
/// fetch answers and topic changes into the tail cache.
struct View {
    side: Arc<Sidecar>,
}

impl Advertise for View {
    fn endpoint(&mut self, node_id: i32, host: &str, port: i32) -> Result<(StrBytes, i32), RewriteError> {
        let Some(single) = &self.side.single else {
            return Learn(self.side.cluster.clone()).endpoint(node_id, host, port);
        };
        // One listener stands for one broker: a second would be misrouted, so refuse.
        let mut node = single.node.lock().unwrap_or_else(|p| p.into_inner());
        match *node {
            Some(n) if n != node_id => Err(RewriteError::Refused {
                node_id,
                reason: format!("with --transport the sidecar fronts one broker (node {n}), not a cluster"),
            }),
            _ => {
                *node = Some(node_id);
                Ok((single.host.clone(), single.port))
            }
        }
    }

    fn collects(&self, api: i16, version: i16) -> bool {
        if names_brokers(api, version) {
            return true;
        }
        self.side.cache.is_some()
            && match ApiKey::try_from(api) {
                Ok(ApiKey::Fetch) => within(FetchResponse::VERSIONS, version),
                Ok(ApiKey::DeleteTopics) => within(DeleteTopicsResponse::VERSIONS, version),
                _ => false,
            }
    }

    fn observe_metadata(&mut self, r: &MetadataResponse, version: i16) {
        let Some(cache) = &self.side.cache else { return };
        let mut c = cache.lock();
        for t in &r.topics {
            let Some(name) = &t.name else { continue };
            if t.error_code == ResponseError::UnknownTopicOrPartition.code() {
                c.drop_topic(name);
                continue;
            }
            let id = (version >= 10).then(|| *t.topic_id.as_bytes());
            let epochs: Vec<(i32, i32)> = if version >= 7 {
                t.partitions.iter().map(|p| (p.partition_index, p.leader_epoch)).collect()
            } else {
                Vec::new()
            };
            c.observe_topic(name, id, &epochs);
        }
        drop(c);
        cache.changed.notify_waiters();
    }

    fn observe_fetch(&mut self, r: &FetchResponse, version: i16) {
        let Some(cache) = &self.side.cache else { return };
        let mut c = cache.lock();
        let mut bytes = 0usize;
        for t in &r.responses {
            let name = if version >= 13 {
                match c.topic_of(t.topic_id.as_bytes()) {
                    Some(n) => n.to_string(),
                    None => continue,
                }
            } else {
                t.topic.0.to_string()
            };
            for p in &t.partitions {
                bytes += p.records.as_ref().map_or(0, Bytes::len);
                let answer = Answer {
                    // An error for the whole answer is one for each of its partitions.
                    error_code: if r.error_code != 0 { r.error_code } else { p.error_code },
                    hw: p.high_watermark,
                    lso: p.last_stable_offset,
                    log_start: p.log_start_offset,
                    leader_epoch: (version >= 12 && p.current_leader.leader_epoch >= 0)
                        .then_some(p.current_leader.leader_epoch),
                    diverging: version >= 12 && p.diverging_epoch.epoch >= 0,
                    records: p.records.as_ref(),
                };
                c.fill(&name, p.partition_index, &answer);
                // A sessionless answer lists every partition its request asked for: each
                // ends one watch (sessioned requests registered none).
                if r.session_id == 0 {
                    c.release(&name, p.partition_index);
                }
            }
        }
        drop(c);
        cache.changed.notify_waiters();
        self.side.stats.fetch_upstream_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn observe_delete_topics(&mut self, r: &DeleteTopicsResponse) {
        let Some(cache) = &self.side.cache else { return };
        let mut c = cache.lock();
        for t in &r.responses {
            if let Some(name) = &t.name {
                c.drop_topic(name);
            }
        }
        drop(c);
        cache.changed.notify_waiters();
    }
}

/// Writes every piece, in order, with vectored writes (record chunks straight from the
/// cache's blocks).
async fn write_vectored_all<B: std::ops::Deref<Target = [u8]>>(
    w: &mut (impl AsyncWriteExt + Unpin),
    chunks: &[B],
) -> io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    while i < chunks.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(io::IoSlice::new(&chunks[i][off..]))
            .chain(chunks[i + 1..].iter().take(63).map(|c| io::IoSlice::new(c)))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < chunks.len() {
            let left = chunks[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Starts the transport-driven front (`--transport`): its own thread, handing each
/// accepted connection to a proxy task on this runtime.
fn start_front(
    side: Arc<Sidecar>,
    kind: TransportKind,
    listen: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, SidecarError> {
    let transport_err =
        |e: crate::transport::TransportError| SidecarError::Settings(format!("--transport {kind:?}: {e}"));
    let opts = crate::transport::TransportOptions::default();
    let listeners = crate::transport::Listeners::bind(kind, &[listen], &opts, 1).map_err(transport_err)?;
    let transport = crate::transport::build(kind, &listeners, &opts).map_err(transport_err)?;
    let rt = tokio::runtime::Handle::current();
    log::info!("sidecar: clients through {kind:?} at {listen}");
    std::thread::Builder::new()
        .name("sidecar-front".into())
        .spawn(move || {
            let _listeners = listeners; // bound for as long as the transport accepts
            let accept = |read: FrontRead, write: FrontWrite, peer: SocketAddr| {
                side.stats.connections.fetch_add(1, Ordering::Relaxed);
                let side = side.clone();
                rt.spawn(async move {
                    match side.proxy(read, write, Target::Bootstrap).await {
                        Ok(()) => log::debug!("sidecar: {peer} done"),
                        Err(e) => e.log(peer),
                    }
                });
            };
            if let Err(e) = super::front::drive(transport, stop, accept) {
                log::error!("sidecar: the {kind:?} front stopped: {e}");
            }
        })
        .map_err(|e| SidecarError::Settings(format!("cannot start the front thread: {e}")))
}

/// The halves of a socket, plain or TLS: a broker connection, or a client's on the
/// sidecar's own listeners.
type ByteRead = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type ByteWrite = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// A client connection's reading half: a socket's, or the transport front's.
trait ClientRead: Send {
    fn recv_into<'a>(&'a mut self, buf: &'a mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

/// A client connection's writing half.
trait ClientWrite: Send {
    /// Sends `slices` one after the other (one vectored write where the socket takes it).
    fn send_slices<'a>(&'a mut self, slices: &'a [&'a [u8]]) -> impl Future<Output = io::Result<()>> + Send + 'a;
    fn send_chunks(&mut self, chunks: IoChunks) -> impl Future<Output = io::Result<()>> + Send + '_;
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_;
}

impl<R: tokio::io::AsyncRead + Unpin + Send + ?Sized> ClientRead for Box<R> {
    fn recv_into<'a>(&'a mut self, buf: &'a mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        AsyncReadExt::read_buf(self, buf)
    }
}

impl<W: tokio::io::AsyncWrite + Unpin + Send + ?Sized> ClientWrite for Box<W> {
    async fn send_slices<'a>(&'a mut self, slices: &'a [&'a [u8]]) -> io::Result<()> {
        write_vectored_all(self, slices).await
    }
    async fn send_chunks(&mut self, chunks: IoChunks) -> io::Result<()> {
        write_vectored_all(self, &chunks).await
    }
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        AsyncWriteExt::shutdown(self)
    }
}

impl ClientRead for FrontRead {
    fn recv_into<'a>(&'a mut self, buf: &'a mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        FrontRead::read_buf(self, buf)
    }
}

impl ClientWrite for FrontWrite {
    fn send_slices<'a>(&'a mut self, slices: &'a [&'a [u8]]) -> impl Future<Output = io::Result<()>> + Send + 'a {
        FrontWrite::write_slices(self, slices)
    }
    fn send_chunks(&mut self, chunks: IoChunks) -> impl Future<Output = io::Result<()>> + Send + '_ {
        FrontWrite::write_chunks(self, chunks)
    }
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        FrontWrite::shutdown(self)
    }
}

async fn accept_loop(side: Arc<Sidecar>, listener: TcpListener, target: Target) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                side.stats.connections.fetch_add(1, Ordering::Relaxed);
                let side = side.clone();
                tokio::spawn(async move {
                    match side.serve(client, target).await {
                        Ok(()) => log::debug!("sidecar: {peer} done"),
                        Err(e) => e.log(peer),
                    }
                });
            }
            // Out of descriptors and the like: wait rather than spin.
            Err(e) => {
                log::warn!("sidecar: accept ({target:?}): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a proxied connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("no upstream for {target:?}: {why}")]
    Upstream { target: Target, why: String },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Rewrite(#[from] RewriteError),
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

impl ConnError {
    fn log(&self, peer: SocketAddr) {
        match self {
            // Hang-ups are how Kafka connections end.
            ConnError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                ) =>
            {
                log::debug!("sidecar: {peer}: {e}")
            }
            ConnError::Upstream { .. } => log::info!("sidecar: {peer}: {self}; closing the client's connection"),
            _ => log::warn!("sidecar: {peer}: {self}; closing the client's connection"),
        }
    }
}

/// Read size per half: large enough for a batch per read, small enough that ten thousand
/// connections are not a gigabyte.
const READ_BUF: usize = 64 * 1024;

impl Sidecar {
    async fn connect_upstream(&self, target: Target) -> Result<(ByteRead, ByteWrite), ConnError> {
        let candidates: Vec<String> = match target {
            Target::Bootstrap => self.upstreams.clone(),
            Target::Node(id) => match self.cluster.upstream_of(id) {
                Some((h, p)) => vec![format!("{h}:{p}")],
                None => Vec::new(),
            },
        };
        let mut why = String::from("its address is not known yet");
        for c in &candidates {
            match tokio::time::timeout(self.connect_timeout, self.connect_one(c)).await {
                Ok(Ok(halves)) => return Ok(halves),
                Ok(Err(e)) => why = format!("{c}: {e}"),
                Err(_) => why = format!("{c}: no answer in {:?}", self.connect_timeout),
            }
        }
        self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        Err(ConnError::Upstream { target, why })
    }

    /// One connection to `addr` (HOST:PORT), over TLS with `--upstream-tls`.
    async fn connect_one(&self, addr: &str) -> io::Result<(ByteRead, ByteWrite)> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let Some(up) = &self.tls_up else {
            let (r, w) = s.into_split();
            return Ok((Box::new(r), Box::new(w)));
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = up.name_for(host).map_err(io::Error::other)?;
        let tls = up.connector.connect(name, s).await?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }

    /// A fetch at the tail waits here for the upstream fetches in flight to fill the
    /// cache, then is answered from it (or with nothing, at its max wait or when no
    /// upstream fetch is left to wait for).
    fn park(self: &Arc<Self>, ask: FetchAsk) -> tokio::sync::oneshot::Receiver<IoChunks> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let side = self.clone();
        tokio::spawn(async move {
            let Some(cache) = &side.cache else { return };
            loop {
                let notified = cache.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let now = Instant::now();
                let force = now >= ask.deadline;
                if let Plan::Answer(chunks) = plan_fetch(&ask, &mut cache.lock(), now, true, force) {
                    let _ = tx.send(chunks);
                    return;
                }
                if force {
                    // Nothing could be encoded: the connection closes (the receiver errs).
                    return;
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(ask.deadline.into()) => {}
                }
            }
        });
        rx
    }

    /// Sends a request frame upstream, followed by the request log.
    async fn forward(
        &self,
        log: &Mutex<RequestLog>,
        frame: &[u8],
        uw: &mut (impl AsyncWriteExt + Unpin),
    ) -> Result<(), ConnError> {
        log.lock().unwrap_or_else(|p| p.into_inner()).observe(frame)?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        uw.write_all(frame).await?;
        Ok(())
    }

    /// SIGHUP: the certificate, key and client CA files read again. A set that does not
    /// load leaves the one in use in place (and says why): a reload never takes TLS down.
    fn reload_tls(&self) {
        let Some(current) = &self.tls_in else {
            log::info!("sidecar: SIGHUP: no TLS listener to reload");
            return;
        };
        match current.reload() {
            Ok(()) => log::info!("sidecar: SIGHUP: TLS certificates reloaded; new connections get them"),
            Err(e) => log::error!("sidecar: SIGHUP: TLS reload failed, keeping the certificates in use: {e}"),
        }
    }

    async fn serve(self: &Arc<Self>, client: TcpStream, target: Target) -> Result<(), ConnError> {
        client.set_nodelay(true)?;
        let (cr, cw): (ByteRead, ByteWrite) = match &self.tls_in {
            None => {
                let (r, w) = client.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(server) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(server.current());
                let tls = acceptor.accept(client).await.map_err(ConnError::Handshake)?;
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        };
        self.proxy(cr, cw, target).await
    }

    /// Proxies one client connection (its two halves) to the broker `target` stands for.
    async fn proxy(
        self: &Arc<Self>,
        mut cr: impl ClientRead,
        mut cw: impl ClientWrite,
        target: Target,
    ) -> Result<(), ConnError> {
        // A broker that is down is a connection refused to the client, as it would be
        // without the sidecar: the client's own reconnect logic takes it from there.
        let (mut ur, mut uw) = self.connect_upstream(target).await?;
        let log = Mutex::new(RequestLog::default());
        let lock = || log.lock().unwrap_or_else(|p| p.into_inner());
        // Answers given here, in the order their places come up in `log`.
        let locals: Mutex<VecDeque<tokio::sync::oneshot::Receiver<IoChunks>>> = Mutex::new(VecDeque::new());
        let local_ready = tokio::sync::Notify::new();
        let framer = Framer::new(Side::Requests, 1 << 30);
        let requests = async {
            let mut buf = BytesMut::with_capacity(READ_BUF);
            // Bytes of the current frame still to forward as they come.
            let mut streaming = 0usize;
            loop {
                // Forward what can go; stop where more bytes are needed.
                loop {
                    if streaming > 0 && !buf.is_empty() {
                        let n = streaming.min(buf.len());
                        let piece = buf.split_to(n);
                        lock().observe(&piece)?;
                        uw.write_all(&piece).await?;
                        streaming -= n;
                        continue;
                    }
                    if streaming > 0 || buf.len() < PREFIX {
                        break;
                    }
                    // A frame starts. An impossible length streams to the request log,
                    // which refuses it (and so closes the connection).
                    let total = match framer.peek_len(&buf) {
                        Ok(Some(len)) if len >= REQUEST_HEAD => len + PREFIX,
                        _ => {
                            streaming = buf.len();
                            continue;
                        }
                    };
                    if buf.len() < PREFIX + REQUEST_HEAD {
                        break;
                    }
                    let head = buf.get(PREFIX..).and_then(RequestHead::peek);
                    let fetch = head.filter(|h| h.api == ApiKey::Fetch as i16);
                    match (&self.cache, fetch) {
                        (Some(cache), Some(head)) if total <= MAX_LOCAL_FETCH => {
                            if buf.len() < total {
                                break;
                            }
                            let frame = buf.split_to(total).freeze();
                            let ask =
                                FetchAsk::decode(&frame, &head, |id| cache.lock().topic_of(id).map(str::to_string));
                            log::trace!(
                                "sidecar: fetch v{} {}: {}",
                                head.version,
                                head.correlation_id,
                                ask.as_ref().map_or("not decoded", |a| if a.cacheable() {
                                    "cacheable"
                                } else {
                                    "a session, a replica or another isolation: upstream"
                                })
                            );
                            let plan = match &ask {
                                Some(a) if a.cacheable() => {
                                    plan_fetch(a, &mut cache.lock(), Instant::now(), false, false)
                                }
                                _ => Plan::Forward,
                            };
                            let answer = match (plan, ask) {
                                (Plan::Answer(chunks), _) => {
                                    let (tx, rx) = tokio::sync::oneshot::channel();
                                    let _ = tx.send(chunks);
                                    Some(rx)
                                }
                                (Plan::Wait, Some(ask)) => Some(self.park(ask)),
                                (_, ask) => {
                                    // Upstream. A sessionless fetch marks its partitions watched
                                    // until its answer (or its max wait and a margin) is in.
                                    if let Some(a) = ask.filter(|a| a.sessionless) {
                                        let until = a.deadline + Duration::from_secs(2);
                                        let mut c = cache.lock();
                                        for (name, p) in a.partitions() {
                                            c.watch(name, p.partition, until);
                                        }
                                    }
                                    None
                                }
                            };
                            if let Some(rx) = answer {
                                self.stats.fetch_local.fetch_add(1, Ordering::Relaxed);
                                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                                locals.lock().unwrap_or_else(|p| p.into_inner()).push_back(rx);
                                lock().push_local(head.api, head.version, head.correlation_id);
                                local_ready.notify_one();
                                continue;
                            }
                            self.stats.fetch_upstream.fetch_add(1, Ordering::Relaxed);
                            self.forward(&log, &frame, &mut uw).await?;
                        }
                        _ => {
                            if fetch.is_some() {
                                self.stats.fetch_upstream.fetch_add(1, Ordering::Relaxed);
                            }
                            self.stats.requests.fetch_add(1, Ordering::Relaxed);
                            streaming = total;
                        }
                    }
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(READ_BUF);
                }
                let n = cr.recv_into(&mut buf).await?;
                if n == 0 {
                    // The client is done sending: the broker still owes it answers.
                    uw.shutdown().await?;
                    return Ok::<(), ConnError>(());
                }
            }
        };
        let responses = async {
            let mut buf = vec![0u8; READ_BUF];
            let (mut at, mut filled) = (0usize, 0usize);
            let mut out = Vec::new();
            let mut resp = Responses::new(View { side: self.clone() }).with_max_collect(self.max_rewrite);
            loop {
                // Between answers, any given here whose turn it is go first.
                while resp.between_frames() && lock().next_is_local() {
                    let _ = lock().next_response();
                    let answer = locals.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let chunks = match answer {
                        Some(rx) => rx.await.map_err(|_| io::Error::other("a cached answer was lost"))?,
                        None => return Err(io::Error::other("a local answer's place without the answer").into()),
                    };
                    let records: usize = chunks.iter().filter(|c| c.region().is_some()).map(|c| c.len()).sum();
                    self.stats.fetch_local_bytes.fetch_add(records as u64, Ordering::Relaxed);
                    let whole: usize = chunks.iter().map(|c| c.len()).sum();
                    self.stats.fetch_local_answer_bytes.fetch_add(whole as u64, Ordering::Relaxed);
                    cw.send_chunks(chunks).await?;
                }
                if at == filled {
                    tokio::select! {
                        n = ur.read(&mut buf) => {
                            let n = n?;
                            if n == 0 {
                                // The broker closed: so does the client's connection.
                                let _ = cw.finish().await;
                                return Ok::<(), ConnError>(());
                            }
                            (at, filled) = (0, n);
                        }
                        _ = local_ready.notified() => continue,
                    }
                }
                match resp.passing() {
                    Some(left) => {
                        // A frame's prefix (read ahead in `out`) and what of it is here go
                        // out in one write.
                        let k = left.min(filled - at);
                        cw.send_slices(&[&out, &buf[at..at + k]]).await?;
                        out.clear();
                        resp.passed(k);
                        at += k;
                    }
                    None => {
                        let (rewritten, fetched) = (resp.rewritten(), resp.fetch_bytes());
                        let k = match resp.take(&buf[at..filled], &mut lock(), &mut out) {
                            Ok(k) => k,
                            Err(e) => {
                                if matches!(e, RewriteError::Refused { .. }) {
                                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                                }
                                return Err(e.into());
                            }
                        };
                        at += k;
                        self.stats.rewritten.fetch_add(resp.rewritten() - rewritten, Ordering::Relaxed);
                        self.stats
                            .fetch_upstream_answer_bytes
                            .fetch_add(resp.fetch_bytes() - fetched, Ordering::Relaxed);
                        if !out.is_empty() && (at == filled || resp.between_frames()) {
                            cw.send_slices(&[&out]).await?;
                            out.clear();
                        }
                    }
                }
            }
        };
        tokio::pin!(requests, responses);
        let mut sending = true;
        loop {
            tokio::select! {
                r = &mut requests, if sending => { r?; sending = false; }
                r = &mut responses => return r,
            }
        }
    }
}
