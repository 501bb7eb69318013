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

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kafka_protocol::messages::{ApiKey, MetadataRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::cluster::{Cluster, Learn, Opened, PortPlan};
use super::rewrite::{RequestLog, Responses, RewriteError};

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

/// Counters, logged at exit (and read by tests through the log).
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub requests: AtomicU64,
    pub rewritten: AtomicU64,
    pub refused: AtomicU64,
}

struct Sidecar {
    cluster: Arc<Cluster>,
    upstreams: Vec<String>,
    connect_timeout: Duration,
    max_rewrite: usize,
    stats: Stats,
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
    rt.block_on(async move {
        let bootstrap = std::net::TcpListener::bind(listen).map_err(|e| SidecarError::Listen(listen, e))?;
        bootstrap.set_nonblocking(true).map_err(|e| SidecarError::Listen(listen, e))?;
        let bootstrap = TcpListener::from_std(bootstrap).map_err(|e| SidecarError::Listen(listen, e))?;
        let (tx, mut opened) = tokio::sync::mpsc::unbounded_channel::<Opened>();
        let plan = PortPlan::new(&host, base, args.broker_ports.clone());
        let side = Arc::new(Sidecar {
            cluster: Arc::new(Cluster::new(plan, listen.ip(), vec![listen.port()], tx)),
            upstreams: args.upstream.clone(),
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            max_rewrite: args.max_rewrite_bytes,
            stats: Stats::default(),
        });
        log::info!(
            "sidecar: clients bootstrap at {listen} (advertised {host}:{}); brokers at {host}:{base}+node id; upstream {}",
            listen.port(),
            args.upstream.join(",")
        );
        tokio::spawn(accept_loop(side.clone(), bootstrap, Target::Bootstrap));
        tokio::spawn(discover(side.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| SidecarError::Settings(format!("signal handler: {e}")))?;
        loop {
            tokio::select! {
                Some(o) = opened.recv() => match TcpListener::from_std(o.listener) {
                    Ok(l) => { tokio::spawn(accept_loop(side.clone(), l, Target::Node(o.node_id))); }
                    Err(e) => log::error!("sidecar: broker {} listener: {e}", o.node_id),
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        let s = &side.stats;
        log::info!(
            "sidecar: stopping; connections={} upstream_failures={} requests={} rewritten={} refused={}",
            s.connections.load(Ordering::Relaxed),
            s.upstream_failures.load(Ordering::Relaxed),
            s.requests.load(Ordering::Relaxed),
            s.rewritten.load(Ordering::Relaxed),
            s.refused.load(Ordering::Relaxed),
        );
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
    async fn connect_upstream(&self, target: Target) -> Result<TcpStream, ConnError> {
        let candidates: Vec<String> = match target {
            Target::Bootstrap => self.upstreams.clone(),
            Target::Node(id) => match self.cluster.upstream_of(id) {
                Some((h, p)) => vec![format!("{h}:{p}")],
                None => Vec::new(),
            },
        };
        let mut why = String::from("its address is not known yet");
        for c in &candidates {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(c.as_str())).await {
                Ok(Ok(s)) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Ok(Err(e)) => why = format!("{c}: {e}"),
                Err(_) => why = format!("{c}: no answer in {:?}", self.connect_timeout),
            }
        }
        self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        Err(ConnError::Upstream { target, why })
    }

    async fn serve(&self, client: TcpStream, target: Target) -> Result<(), ConnError> {
        client.set_nodelay(true)?;
        // A broker that is down is a connection refused to the client, as it would be
        // without the sidecar: the client's own reconnect logic takes it from there.
        let upstream = self.connect_upstream(target).await?;
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        let log = Mutex::new(RequestLog::default());
        let lock = || log.lock().unwrap_or_else(|p| p.into_inner());
        let requests = async {
            let mut buf = vec![0u8; READ_BUF];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    // The client is done sending: the broker still owes it answers.
                    uw.shutdown().await?;
                    return Ok::<(), ConnError>(());
                }
                let added = {
                    let mut l = lock();
                    let before = l.pending();
                    l.observe(&buf[..n])?;
                    l.pending().saturating_sub(before)
                };
                self.stats.requests.fetch_add(added as u64, Ordering::Relaxed);
                uw.write_all(&buf[..n]).await?;
            }
        };
        let responses = async {
            let mut buf = vec![0u8; READ_BUF];
            let mut out = Vec::new();
            let mut resp = Responses::new(Learn(self.cluster.clone())).with_max_collect(self.max_rewrite);
            loop {
                let n = ur.read(&mut buf).await?;
                if n == 0 {
                    // The broker closed: so does the client's connection.
                    let _ = cw.shutdown().await;
                    return Ok::<(), ConnError>(());
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    match resp.passing() {
                        Some(left) => {
                            if !out.is_empty() {
                                cw.write_all(&out).await?;
                                out.clear();
                            }
                            let k = left.min(rest.len());
                            cw.write_all(&rest[..k]).await?;
                            resp.passed(k);
                            rest = &rest[k..];
                        }
                        None => {
                            let rewritten = resp.rewritten();
                            let k = match resp.take(rest, &mut lock(), &mut out) {
                                Ok(k) => k,
                                Err(e) => {
                                    if matches!(e, RewriteError::Refused { .. }) {
                                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                                    }
                                    return Err(e.into());
                                }
                            };
                            rest = &rest[k..];
                            self.stats.rewritten.fetch_add(resp.rewritten() - rewritten, Ordering::Relaxed);
                        }
                    }
                }
                if !out.is_empty() {
                    cw.write_all(&out).await?;
                    out.clear();
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
