//! `slipstream serve` settings: defaults, overridden by a TOML file (`--config`),
//! overridden by flags.

use clap::Args;
use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use thiserror::Error;

use crate::broker::BrokerSettings;
use crate::log::{FlushPolicy, LogConfig};
use crate::transport::uring::{UringOptions, UringRecv, DEFAULT_ZC_THRESHOLD};
use crate::transport::{TransportKind, TransportOptions};

/// Kafka's connections.max.idle.ms default (10 minutes).
const IDLE_MS: u64 = 600_000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid {what} '{value}': {why}")]
    Invalid { what: &'static str, value: String, why: String },
}

/// Flags of `slipstream serve`; every one may also be set in the `--config` file under
/// the same name with dashes turned into underscores.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags win over the file).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A listener, repeatable: `[PROTOCOL://]HOST:PORT[,advertise=HOST:PORT][,security=S]`.
    /// S is Kafka's security protocol: `PLAINTEXT` (the default), `SSL`, `SASL_PLAINTEXT`
    /// or `SASL_SSL` (SASL on Kafka listeners only); Kafka's own `SASL_SSL://HOST:PORT`
    /// form names a Kafka listener with it. PROTOCOL is
    /// `kafka` (the default), `rocketmq` (RocketMQ remoting, the broker role),
    /// `rocketmq-namesrv` (its name server; on HOST:9876 of the first `rocketmq` listener
    /// unless given) or `rocketmq-grpc` (RocketMQ 5's gRPC `MessagingService`; port 8081
    /// unless given). Each listener gives clients its own advertised address
    /// [default: its own address]; the same cores serve them all
    /// [default: kafka://127.0.0.1:9092]. In the file: a string or a list of them.
    #[arg(long)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub listen: Vec<String>,
    /// HOST:PORT given to clients in metadata by the first listener, unless it names its
    /// own `advertise=` [default: the listen address].
    #[arg(long)]
    pub advertised_listener: Option<String>,
    /// Where topics, offsets and producer ids live [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// I/O backend [default: tcp].
    #[arg(long, value_enum)]
    pub transport: Option<TransportKind>,
    /// Dispatch cores (threads), each with its own listener and connections [default: 1].
    #[arg(long)]
    pub cores: Option<usize>,
    /// This broker's node id in metadata [default: 0].
    #[arg(long)]
    pub node_id: Option<i32>,
    /// RocketMQ's delay-level table (`messageDelayLevel`): the delay of `DELAY=1`, `2`, …
    /// and of the retries of a failed message [default: 1s 5s 10s 30s 1m 2m 3m 4m 5m 6m
    /// 7m 8m 9m 10m 20m 30m 1h 2h].
    #[arg(long)]
    pub rocketmq_delay_levels: Option<String>,
    /// When an unresolved RocketMQ transactional message is first checked back with its
    /// producer (`transactionTimeOut`) [default: 6000].
    #[arg(long)]
    pub rocketmq_transaction_timeout_ms: Option<u64>,
    /// Between later check-backs (`transactionCheckInterval`) [default: 60000].
    #[arg(long)]
    pub rocketmq_transaction_check_interval_ms: Option<u64>,
    /// Check-backs before an unresolved transaction is rolled back
    /// (`transactionCheckMax`) [default: 15].
    #[arg(long)]
    pub rocketmq_transaction_check_max: Option<u32>,
    /// Deliveries of a message to a RocketMQ 5 (gRPC) consumer group before it goes to the
    /// group's dead-letter queue `%DLQ%group` [default: 17: the first and 16 retries].
    #[arg(long)]
    pub rocketmq_max_delivery_attempts: Option<i32>,
    /// Partitions of auto-created topics and of CreateTopics without a count [default: 1].
    #[arg(long)]
    pub default_partitions: Option<i32>,
    /// Create a topic when a client asks for its metadata [default: true].
    #[arg(long)]
    pub auto_create_topics: Option<bool>,
    /// Segment file size in bytes (preallocated, mapped) [default: 134217728].
    #[arg(long)]
    pub segment_bytes: Option<usize>,
    /// Bytes of each partition's newest data kept in the page cache; older data is
    /// written back and dropped as the partition grows, so appends reuse pages rather
    /// than take fresh ones (0: leave it to the kernel) [default: 268435456].
    #[arg(long)]
    pub page_cache_keep_bytes: Option<usize>,
    /// Delete old segments when a partition is larger than this (-1: no limit) [default: -1].
    #[arg(long, allow_hyphen_values = true)]
    pub retention_bytes: Option<i64>,
    /// Delete segments whose newest record is older than this (-1: keep) [default: 604800000].
    #[arg(long, allow_hyphen_values = true)]
    pub retention_ms: Option<i64>,
    /// When to msync: `always` (before each ack; survives power loss), `interval:MS`
    /// (background; loses at most MS on power loss), `bytes:N` (after N unflushed bytes).
    /// Every policy survives a process crash [default: interval:1000].
    #[arg(long)]
    pub flush: Option<String>,
    /// Largest request frame accepted; larger ones close the connection [default: 104857600].
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Stamp LogAppendTime on every batch instead of keeping the producer's CreateTime.
    #[arg(long)]
    pub log_append_time: Option<bool>,
    /// io_uring: sends of at least this many bytes use zero-copy SENDMSG_ZC [default: off;
    /// measured to lose over loopback, see docs/architecture.md].
    #[arg(long)]
    pub uring_zc_threshold: Option<usize>,
    /// Latency mode: cores never sleep in their poll, they spin on it (the completion queue
    /// for io_uring, epoll with a zero timeout for tcp), trading a core each for microseconds.
    #[arg(long)]
    pub busy_poll: Option<bool>,
    /// io_uring: register connection sockets in the ring's fixed-file table [default: true].
    #[arg(long)]
    pub uring_fixed_files: Option<bool>,
    /// io_uring: kernel-side submission polling (SQPOLL), trading a core for fewer syscalls.
    #[arg(long)]
    pub uring_sqpoll: Option<bool>,
    /// io_uring receive mode: `single` (one RECV per read, straight into the frame buffer)
    /// or `multishot` (one RECV per connection, provided-buffer ring, one staging copy)
    /// [default: single; measured in docs/architecture.md].
    #[arg(long)]
    pub uring_recv: Option<UringRecv>,
    /// Close a connection that has nothing in flight and sent or received nothing for this
    /// long, e.g. one holding half a request (Kafka's connections.max.idle.ms)
    /// [default: 600000].
    #[arg(long)]
    pub connections_max_idle_ms: Option<u64>,
    /// rdma: messages each connection may have in flight (2..=255) [default: 16].
    #[arg(long)]
    pub rdma_credits: Option<u32>,
    /// rdma: close a connection whose peer has not freed landing-ring space for this long
    /// while responses wait [default: connections-max-idle-ms]. A bridge stalls only while
    /// its own client is not reading, which a Kafka broker tolerates up to its idle limit.
    #[arg(long)]
    pub rdma_stall_timeout_ms: Option<u64>,
    /// TLS listeners' certificate chain (PEM); reloaded with the key and client CA on SIGHUP.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// TLS listeners require client certificates signed by these CAs (PEM): mutual TLS,
    /// the principal being the certificate's subject (on `SSL` listeners).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// SASL mechanisms offered on `SASL_*` listeners, comma-separated
    /// [default: SCRAM-SHA-512,SCRAM-SHA-256,PLAIN]. Users: `slipstream users`.
    #[arg(long)]
    pub sasl_mechanisms: Option<String>,
    /// `acl`: enforce ACLs (CreateAcls/DescribeAcls/DeleteAcls manage them, kept in
    /// DATA_DIR/acls.json); `none`: everything is allowed, as in Kafka without an
    /// authorizer [default: none].
    #[arg(long)]
    pub authorizer: Option<String>,
    /// Principals allowed everything, `;`-separated (`User:admin;User:ops`).
    #[arg(long)]
    pub super_users: Option<String>,
    /// A resource no ACL names is open to everyone instead of closed (Kafka's
    /// `allow.everyone.if.no.acl.found`) [default: false].
    #[arg(long)]
    pub allow_everyone_if_no_acl_found: Option<bool>,
    /// How long a failed SASL authentication waits before its answer and the close
    /// (Kafka's `connection.failed.authentication.delay.ms`): slows password guessing on
    /// one connection [default: 100].
    #[arg(long)]
    pub failed_authentication_delay_ms: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9644) [default: off].
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// ustack: the interface whose receive queues the cores serve, one each; its kernel
    /// IPv4 address is the broker's (listeners must be on it).
    #[arg(long)]
    pub ustack_if: Option<String>,
    /// ustack: where the XDP program runs: `drv` (native), `skb` (generic) or `auto`
    /// [default: auto, native if the driver has it].
    #[arg(long)]
    pub ustack_xdp_mode: Option<crate::transport::ustack::XdpMode>,
    /// ustack: serve receive queues N.. (one per core) instead of all of them, the broker's
    /// traffic being steered there (`ethtool -N IF flow-type tcp4 dst-port 9092 action N`).
    #[arg(long)]
    pub ustack_first_queue: Option<u32>,
    /// ustack: UMEM frames (4 KiB) per queue, half receiving, half sending [default: 4096].
    #[arg(long)]
    pub ustack_frames: Option<u32>,
    /// ustack: each connection's receive and send buffer; the window scale follows
    /// [default: 262144].
    #[arg(long)]
    pub ustack_buffer_bytes: Option<usize>,
    /// ustack: TCP handshakes in progress per core before further SYNs are dropped
    /// [default: 1024].
    #[arg(long)]
    pub ustack_backlog: Option<usize>,
    /// ustack: floor of the retransmission timeout [default: 200, as Linux].
    #[arg(long)]
    pub ustack_min_rto_ms: Option<u64>,
    /// ustack: delayed ACK, in microseconds; 0 acknowledges every segment at once
    /// [default: 1000].
    #[arg(long)]
    pub ustack_ack_delay_us: Option<u64>,
    /// Wait this long after the first member joins an empty group before completing the
    /// rebalance, so members starting together land in one generation [default: 0].
    #[arg(long)]
    pub group_initial_rebalance_delay_ms: Option<u64>,
}

/// The wire protocols a listener can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolKind {
    Kafka,
    /// RocketMQ remoting, the broker role.
    RocketMq,
    /// RocketMQ remoting, the name server role (routes name the first `RocketMq` listener).
    RocketMqNamesrv,
    /// RocketMQ 5's gRPC `MessagingService` (its own runtime, not a transport listener).
    RocketMqGrpc,
}

/// Where the RocketMQ 5 gRPC listener listens when its port is not given (the proxy's).
pub const ROCKETMQ_GRPC_PORT: u16 = 8081;

/// Where the name server listens when RocketMQ is on and none is given.
pub const ROCKETMQ_NAMESRV_PORT: u16 = 9876;

/// Kafka's security protocols: whether a listener speaks TLS, and whether clients
/// authenticate with SASL on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Security {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl Security {
    fn parse(s: &str) -> Option<Security> {
        Some(match s.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Security::Plaintext,
            "SSL" => Security::Ssl,
            "SASL_PLAINTEXT" => Security::SaslPlaintext,
            "SASL_SSL" => Security::SaslSsl,
            _ => return None,
        })
    }

    /// Kafka's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Security::Plaintext => "PLAINTEXT",
            Security::Ssl => "SSL",
            Security::SaslPlaintext => "SASL_PLAINTEXT",
            Security::SaslSsl => "SASL_SSL",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, Security::Ssl | Security::SaslSsl)
    }

    pub fn sasl(self) -> bool {
        matches!(self, Security::SaslPlaintext | Security::SaslSsl)
    }
}

/// One resolved `--listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub protocol: ProtocolKind,
    pub addr: SocketAddr,
    /// What clients are told to connect to: (host, port).
    pub advertised: (String, i32),
    pub security: Security,
}

impl ListenerConfig {
    /// Parses `[PROTOCOL://]HOST:PORT[,advertise=HOST:PORT][,security=S]`.
    fn parse(spec: &str, default_advertised: Option<&str>) -> Result<ListenerConfig, ConfigError> {
        let (url, options) = match spec.split_once(',') {
            Some((url, options)) => (url, Some(options)),
            None => (spec, None),
        };
        // Kafka's own form, `SASL_SSL://HOST:PORT`, names a Kafka listener and its security.
        let kafka_form = url.split_once("://").and_then(|(scheme, _)| Security::parse(scheme));
        let mut security = kafka_form.unwrap_or_default();
        let (protocol, hostport) = match url.split_once("://") {
            None => (ProtocolKind::Kafka, url),
            Some((_, hostport)) if kafka_form.is_some() => (ProtocolKind::Kafka, hostport),
            Some(("kafka", hostport)) => (ProtocolKind::Kafka, hostport),
            Some(("rocketmq", hostport)) => (ProtocolKind::RocketMq, hostport),
            Some(("rocketmq-namesrv", hostport)) => (ProtocolKind::RocketMqNamesrv, hostport),
            Some(("rocketmq-grpc", hostport)) => (ProtocolKind::RocketMqGrpc, hostport),
            Some((other, _)) => {
                return Err(invalid(
                    "listener protocol",
                    other,
                    "this build serves: kafka, rocketmq, rocketmq-namesrv, rocketmq-grpc (and Kafka's \
                     PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)",
                ));
            }
        };
        // `rocketmq-grpc://HOST` listens on the proxy's port.
        let with_port;
        let hostport = if protocol == ProtocolKind::RocketMqGrpc && host_port(hostport).is_err() {
            with_port = format!("{hostport}:{ROCKETMQ_GRPC_PORT}");
            with_port.as_str()
        } else {
            hostport
        };
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| invalid("listen address", hostport, e))?
            .next()
            .ok_or_else(|| invalid("listen address", hostport, "resolves to nothing"))?;
        let mut advertised = default_advertised.unwrap_or(hostport).to_string();
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            match option.split_once('=') {
                Some(("advertise", a)) => advertised = a.to_string(),
                Some(("security", s)) => {
                    security = Security::parse(s).ok_or_else(|| {
                        invalid("listener security", s, "expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
                    })?
                }
                _ => {
                    return Err(invalid("listener option", option, "expected advertise=HOST:PORT or security=PROTOCOL"))
                }
            }
        }
        match protocol {
            ProtocolKind::Kafka => {}
            ProtocolKind::RocketMq | ProtocolKind::RocketMqNamesrv if !security.sasl() => {}
            ProtocolKind::RocketMqGrpc if matches!(security, Security::Plaintext | Security::Ssl) => {}
            _ => return Err(invalid("listener security", spec, "this protocol's listeners cannot serve it")),
        }
        Ok(ListenerConfig { protocol, addr, advertised: host_port(&advertised)?, security })
    }
}

/// Splits `HOST:PORT` (brackets around an IPv6 host are dropped).
fn host_port(s: &str) -> Result<(String, i32), ConfigError> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| invalid("advertised listener", s, "expected HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|e| invalid("advertised listener port", port, e))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), i32::from(port)))
}

/// A TOML value that is one string or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Fully resolved settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub busy_poll: bool,
    /// At least one; the first is the embedded default's `kafka://127.0.0.1:9092`.
    pub listeners: Vec<ListenerConfig>,
    pub transport: TransportKind,
    pub transport_options: TransportOptions,
    pub cores: usize,
    pub broker: BrokerSettings,
    /// RocketMQ's delay levels.
    pub rocketmq_delay_levels: Vec<std::time::Duration>,
    pub rocketmq_transactions: crate::protocol::rocketmq::schedule::TxSettings,
    pub rocketmq_grpc: crate::protocol::rocketmq::grpc::GrpcSettings,
    /// Where the Prometheus endpoint listens, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The TLS listeners' files (given when any listener serves TLS).
    pub tls: Option<crate::tls::ServerFiles>,
    /// SASL mechanisms offered, in order of preference.
    pub sasl_mechanisms: Vec<crate::broker::users::Mechanism>,
    /// A failed authentication's answer waits this long.
    pub failed_authentication_delay: std::time::Duration,
}

fn invalid(what: &'static str, value: impl ToString, why: impl ToString) -> ConfigError {
    ConfigError::Invalid { what, value: value.to_string(), why: why.to_string() }
}

macro_rules! merge {
    ($a:ident, $b:ident, $($f:ident),*) => { $( if $a.$f.is_none() { $a.$f = $b.$f.clone(); } )* };
}

impl ServeArgs {
    /// Flags, then the file, then defaults.
    pub fn resolve(mut self) -> Result<ServeConfig, ConfigError> {
        if let Some(path) = self.config.clone() {
            let text =
                std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let file: ServeArgs = toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
            if self.listen.is_empty() {
                self.listen = file.listen.clone();
            }
            merge!(
                self,
                file,
                advertised_listener,
                data_dir,
                transport,
                cores,
                node_id,
                default_partitions,
                auto_create_topics,
                segment_bytes,
                page_cache_keep_bytes,
                retention_bytes,
                retention_ms,
                flush,
                max_request_bytes,
                log_append_time,
                group_initial_rebalance_delay_ms,
                uring_zc_threshold,
                uring_sqpoll,
                uring_fixed_files,
                uring_recv,
                rdma_credits,
                rdma_stall_timeout_ms,
                ustack_if,
                metrics_listen,
                tls_cert,
                tls_key,
                tls_client_ca,
                sasl_mechanisms,
                authorizer,
                super_users,
                allow_everyone_if_no_acl_found,
                failed_authentication_delay_ms,
                ustack_xdp_mode,
                ustack_first_queue,
                ustack_frames,
                ustack_buffer_bytes,
                ustack_backlog,
                ustack_min_rto_ms,
                ustack_ack_delay_us,
                connections_max_idle_ms,
                busy_poll,
                rocketmq_delay_levels,
                rocketmq_transaction_timeout_ms,
                rocketmq_transaction_check_interval_ms,
                rocketmq_transaction_check_max,
                rocketmq_max_delivery_attempts
            );
        }
        if self.listen.is_empty() {
            self.listen.push("127.0.0.1:9092".into());
        }
        let mut listeners = self
            .listen
            .iter()
            .enumerate()
            .map(|(i, spec)| ListenerConfig::parse(spec, self.advertised_listener.as_deref().filter(|_| i == 0)))
            .collect::<Result<Vec<_>, _>>()?;
        let rocketmq = listeners.iter().find(|l| l.protocol == ProtocolKind::RocketMq).cloned();
        let namesrv = listeners.iter().any(|l| l.protocol == ProtocolKind::RocketMqNamesrv);
        match (rocketmq, namesrv) {
            (Some(broker), false) => {
                let addr = SocketAddr::new(broker.addr.ip(), ROCKETMQ_NAMESRV_PORT);
                let advertised = (broker.advertised.0.clone(), i32::from(ROCKETMQ_NAMESRV_PORT));
                listeners.push(ListenerConfig {
                    protocol: ProtocolKind::RocketMqNamesrv,
                    addr,
                    advertised,
                    security: broker.security,
                });
            }
            (None, true) => {
                return Err(invalid(
                    "listeners",
                    "rocketmq-namesrv",
                    "a name server needs a rocketmq:// listener to route to",
                ))
            }
            _ => {}
        }
        for (i, l) in listeners.iter().enumerate() {
            if listeners[..i].iter().any(|o| o.addr == l.addr) {
                return Err(invalid("listen address", l.addr, "given twice"));
            }
        }
        let flush: FlushPolicy = self
            .flush
            .as_deref()
            .unwrap_or("interval:1000")
            .parse()
            .map_err(|e: String| invalid("flush policy", self.flush.clone().unwrap_or_default(), e))?;
        let segment_bytes = self.segment_bytes.unwrap_or(128 << 20);
        if segment_bytes < 4096 || segment_bytes > u32::MAX as usize {
            return Err(invalid("segment size", segment_bytes, "must be 4096..=4294967295 bytes"));
        }
        let max_request_bytes = self.max_request_bytes.unwrap_or(100 << 20);
        let cores = self.cores.unwrap_or(1);
        if cores == 0 || cores > 256 {
            return Err(invalid("core count", cores, "must be 1..=256"));
        }
        let default_partitions = self.default_partitions.unwrap_or(1);
        if default_partitions < 1 {
            return Err(invalid("default partitions", default_partitions, "must be at least 1"));
        }
        let log = LogConfig {
            segment_bytes,
            index_interval_bytes: 4096,
            retention_bytes: self.retention_bytes.and_then(|b| u64::try_from(b).ok()),
            retention_ms: match self.retention_ms {
                Some(ms) if ms < 0 => None,
                Some(ms) => Some(ms),
                None => Some(7 * 24 * 3600 * 1000),
            },
            flush,
            log_append_time: self.log_append_time.unwrap_or(false),
            page_cache_keep: match self.page_cache_keep_bytes {
                Some(0) => None,
                Some(n) => Some(n),
                None => Some(crate::log::DEFAULT_PAGE_CACHE_KEEP),
            },
        };
        let levels =
            self.rocketmq_delay_levels.as_deref().unwrap_or(crate::protocol::rocketmq::schedule::DEFAULT_DELAY_LEVELS);
        let rocketmq_delay_levels = crate::protocol::rocketmq::schedule::parse_levels(levels)
            .map_err(|e| invalid("rocketmq delay levels", levels, e))?;
        let d = crate::protocol::rocketmq::schedule::TxSettings::default();
        let ms = |v: Option<u64>, d: std::time::Duration| v.map_or(d, std::time::Duration::from_millis);
        let rocketmq_transactions = crate::protocol::rocketmq::schedule::TxSettings {
            first_check: ms(self.rocketmq_transaction_timeout_ms, d.first_check),
            interval: ms(self.rocketmq_transaction_check_interval_ms, d.interval),
            max_checks: self.rocketmq_transaction_check_max.unwrap_or(d.max_checks),
        };
        let rocketmq_grpc = crate::protocol::rocketmq::grpc::GrpcSettings {
            max_delivery_attempts: match self.rocketmq_max_delivery_attempts {
                Some(n) if n < 1 => return Err(invalid("rocketmq max delivery attempts", n, "at least 1")),
                Some(n) => n,
                None => crate::protocol::rocketmq::grpc::GrpcSettings::default().max_delivery_attempts,
            },
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            (None, None) if self.tls_client_ca.is_none() => None,
            _ => {
                return Err(invalid(
                    "TLS files",
                    "--tls-cert/--tls-key",
                    "give both (and --tls-client-ca only with them)",
                ))
            }
        };
        if let Some(l) = listeners.iter().find(|l| l.security.tls()) {
            if tls.is_none() {
                return Err(invalid("listener security", l.addr, "a TLS listener needs --tls-cert and --tls-key"));
            }
        }
        let mechanisms = self.sasl_mechanisms.as_deref().unwrap_or("SCRAM-SHA-512,SCRAM-SHA-256,PLAIN");
        let sasl_mechanisms = mechanisms
            .split(',')
            .map(|m| {
                m.trim().parse().map_err(|_| {
                    invalid("SASL mechanism", m, "this build serves SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let authorizer = crate::broker::acl::AuthorizerSettings {
            enabled: match self.authorizer.as_deref().unwrap_or("none") {
                "none" => false,
                "acl" => true,
                other => return Err(invalid("authorizer", other, "expected none or acl")),
            },
            super_users: self
                .super_users
                .as_deref()
                .unwrap_or("")
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.contains(':') {
                        Ok(s.to_string())
                    } else {
                        Err(invalid("super user", s, "expected a principal, e.g. User:admin"))
                    }
                })
                .collect::<Result<_, _>>()?,
            allow_if_no_acl: self.allow_everyone_if_no_acl_found.unwrap_or(false),
        };
        Ok(ServeConfig {
            tls,
            sasl_mechanisms,
            failed_authentication_delay: std::time::Duration::from_millis(
                self.failed_authentication_delay_ms.unwrap_or(100),
            ),
            metrics_listen: self.metrics_listen,
            rocketmq_grpc,
            rocketmq_transactions,
            rocketmq_delay_levels,
            busy_poll: self.busy_poll.unwrap_or(false),
            listeners,
            transport: self.transport.unwrap_or(TransportKind::Tcp),
            transport_options: TransportOptions {
                uring: UringOptions {
                    zc_threshold: self.uring_zc_threshold.unwrap_or(DEFAULT_ZC_THRESHOLD),
                    sqpoll: self.uring_sqpoll.unwrap_or(false),
                    fixed_files: self.uring_fixed_files.unwrap_or(true),
                    recv_multishot: self.uring_recv.unwrap_or_default() == UringRecv::Multishot,
                },
                ustack: {
                    let d = crate::transport::ustack::UstackOptions::default();
                    let buffer = self.ustack_buffer_bytes.unwrap_or(d.rx_buffer);
                    if !(4096..=1 << 30).contains(&buffer) {
                        return Err(invalid("ustack buffer bytes", buffer, "must be 4096..=1073741824"));
                    }
                    crate::transport::ustack::UstackOptions {
                        interface: self.ustack_if.clone(),
                        xdp_mode: self.ustack_xdp_mode.unwrap_or(d.xdp_mode),
                        first_queue: self.ustack_first_queue,
                        frames: match self.ustack_frames {
                            None => d.frames,
                            Some(f @ 64..=1_048_576) => f,
                            Some(f) => return Err(invalid("ustack frames", f, "must be 64..=1048576")),
                        },
                        rx_buffer: buffer,
                        tx_buffer: buffer,
                        backlog: self.ustack_backlog.unwrap_or(d.backlog).max(1),
                        min_rto: self.ustack_min_rto_ms.map_or(d.min_rto, std::time::Duration::from_millis),
                        ack_delay: match self.ustack_ack_delay_us {
                            None => d.ack_delay,
                            Some(0) => None,
                            Some(us) => Some(std::time::Duration::from_micros(us)),
                        },
                    }
                },
                #[cfg(feature = "rdma")]
                rdma: {
                    let d = crate::transport::rdma::RdmaOptions::default();
                    crate::transport::rdma::RdmaOptions {
                        credits: match self.rdma_credits {
                            None => d.credits,
                            Some(c @ 2..=255) => c,
                            Some(c) => return Err(invalid("rdma credits", c, "must be 2..=255")),
                        },
                        stall_timeout: std::time::Duration::from_millis(
                            self.rdma_stall_timeout_ms.unwrap_or(self.connections_max_idle_ms.unwrap_or(IDLE_MS)),
                        ),
                        ..d
                    }
                },
            },
            cores,
            broker: BrokerSettings {
                node_id: self.node_id.unwrap_or(0),
                cluster_id: "slipstream-cluster".into(),
                data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("data")),
                default_partitions,
                auto_create_topics: self.auto_create_topics.unwrap_or(true),
                log,
                max_request_bytes,
                group_initial_rebalance_delay_ms: self.group_initial_rebalance_delay_ms.unwrap_or(0),
                connections_max_idle: std::time::Duration::from_millis(self.connections_max_idle_ms.unwrap_or(IDLE_MS)),
                authorizer,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_embedded_broker() {
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].addr.to_string(), "127.0.0.1:9092");
        assert_eq!(c.listeners[0].protocol, ProtocolKind::Kafka);
        assert_eq!(c.transport, TransportKind::Tcp);
        assert_eq!(c.broker.data_dir, PathBuf::from("data"));
        assert_eq!(c.listeners[0].advertised, ("127.0.0.1".to_string(), 9092));
    }

    #[test]
    fn file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9999\"\ncores = 2\nflush = \"always\"\n").unwrap();
        let args = ServeArgs { config: Some(f), cores: Some(1), ..Default::default() };
        let c = args.resolve().unwrap();
        assert_eq!(c.listeners[0].addr.port(), 9999);
        assert_eq!(c.cores, 1);
        assert_eq!(c.broker.log.flush, FlushPolicy::Always);
    }

    #[cfg(feature = "rdma")]
    #[test]
    fn rdma_stall_timeout_follows_the_idle_limit_unless_given() {
        let stall = |args: ServeArgs| args.resolve().unwrap().transport_options.rdma.stall_timeout.as_millis();
        assert_eq!(stall(ServeArgs::default()), 600_000);
        assert_eq!(stall(ServeArgs { connections_max_idle_ms: Some(30_000), ..Default::default() }), 30_000);
        let both = ServeArgs {
            connections_max_idle_ms: Some(30_000),
            rdma_stall_timeout_ms: Some(1000),
            ..Default::default()
        };
        assert_eq!(stall(both), 1000);
    }

    #[test]
    fn several_listeners_each_with_its_advertised_address() {
        let args = ServeArgs {
            listen: vec!["kafka://127.0.0.1:9092".into(), "127.0.0.2:9093,advertise=broker.example:19093".into()],
            advertised_listener: Some("front.example:9092".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listeners[0].advertised, ("front.example".to_string(), 9092));
        assert_eq!(c.listeners[1].addr.to_string(), "127.0.0.2:9093");
        assert_eq!(c.listeners[1].advertised, ("broker.example".to_string(), 19093));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(&f, "listen = [\"kafka://127.0.0.1:9092\", \"kafka://[::1]:9093,advertise=[::1]:9093\"]\n")
            .unwrap();
        let c = ServeArgs { config: Some(f), ..Default::default() }.resolve().unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[1].advertised, ("::1".to_string(), 9093));
        for bad in ["mqtt://127.0.0.1:1883", "127.0.0.1:9092,advertize=x:1", "127.0.0.1:9092,advertise=nohost"] {
            let e = ServeArgs { listen: vec![bad.into()], ..Default::default() }.resolve().unwrap_err();
            assert!(e.to_string().contains("listen"), "{bad}: {e}");
        }
        let twice =
            ServeArgs { listen: vec!["127.0.0.1:9092".into(), "kafka://127.0.0.1:9092".into()], ..Default::default() };
        assert!(twice.resolve().is_err());
    }

    #[test]
    fn bad_values_are_named() {
        let e = ServeArgs { flush: Some("sometimes".into()), ..Default::default() }.resolve().unwrap_err();
        assert!(e.to_string().contains("flush policy"));
    }

    #[test]
    fn listeners_name_their_security_protocol() {
        let resolve = |listen: &[&str], tls: bool| {
            ServeArgs {
                listen: listen.iter().map(|s| s.to_string()).collect(),
                tls_cert: tls.then(|| "c.pem".into()),
                tls_key: tls.then(|| "k.pem".into()),
                ..Default::default()
            }
            .resolve()
        };
        let c =
            resolve(&["SASL_SSL://127.0.0.1:9093", "127.0.0.1:9092,security=sasl_plaintext", "127.0.0.1:9094"], true)
                .expect("resolves");
        let kinds: Vec<Security> = c.listeners.iter().map(|l| l.security).collect();
        assert_eq!(kinds, [Security::SaslSsl, Security::SaslPlaintext, Security::Plaintext]);
        assert!(c.listeners.iter().all(|l| l.protocol == ProtocolKind::Kafka));
        assert!(c.tls.is_some());
        assert!(resolve(&["SSL://127.0.0.1:9093"], false).is_err(), "a TLS listener without a certificate");
        assert!(resolve(&["rocketmq://127.0.0.1:10911,security=SASL_SSL"], true).is_err(), "SASL on RocketMQ");
        assert!(resolve(&["rocketmq://127.0.0.1:10911,security=SSL"], true).is_ok(), "TLS on RocketMQ remoting");
        assert!(resolve(&["127.0.0.1:9092,security=TLS"], true).is_err(), "not a Kafka security protocol");
    }
}
