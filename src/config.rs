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
    /// Address to listen on for Kafka clients [default: 127.0.0.1:9092].
    #[arg(long)]
    pub listen: Option<String>,
    /// HOST:PORT given to clients in metadata [default: the listen address].
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
    /// Partitions of auto-created topics and of CreateTopics without a count [default: 1].
    #[arg(long)]
    pub default_partitions: Option<i32>,
    /// Create a topic when a client asks for its metadata [default: true].
    #[arg(long)]
    pub auto_create_topics: Option<bool>,
    /// Segment file size in bytes (preallocated, mapped) [default: 134217728].
    #[arg(long)]
    pub segment_bytes: Option<usize>,
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
    /// Wait this long after the first member joins an empty group before completing the
    /// rebalance, so members starting together land in one generation [default: 0].
    #[arg(long)]
    pub group_initial_rebalance_delay_ms: Option<u64>,
}

/// Fully resolved settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub busy_poll: bool,
    pub listen: SocketAddr,
    pub transport: TransportKind,
    pub transport_options: TransportOptions,
    pub cores: usize,
    pub broker: BrokerSettings,
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
            merge!(
                self,
                file,
                listen,
                advertised_listener,
                data_dir,
                transport,
                cores,
                node_id,
                default_partitions,
                auto_create_topics,
                segment_bytes,
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
                connections_max_idle_ms,
                busy_poll
            );
        }
        let listen_s = self.listen.unwrap_or_else(|| "127.0.0.1:9092".into());
        let listen = listen_s
            .to_socket_addrs()
            .map_err(|e| invalid("listen address", &listen_s, e))?
            .next()
            .ok_or_else(|| invalid("listen address", &listen_s, "resolves to nothing"))?;
        let advertised = self.advertised_listener.unwrap_or_else(|| listen_s.clone());
        let (host, port) = advertised
            .rsplit_once(':')
            .ok_or_else(|| invalid("advertised listener", &advertised, "expected HOST:PORT"))?;
        let port: i32 = port.parse().map_err(|e| invalid("advertised listener port", port, e))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
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
        };
        Ok(ServeConfig {
            busy_poll: self.busy_poll.unwrap_or(false),
            listen,
            transport: self.transport.unwrap_or(TransportKind::Tcp),
            transport_options: TransportOptions {
                uring: UringOptions {
                    zc_threshold: self.uring_zc_threshold.unwrap_or(DEFAULT_ZC_THRESHOLD),
                    sqpoll: self.uring_sqpoll.unwrap_or(false),
                    fixed_files: self.uring_fixed_files.unwrap_or(true),
                    recv_multishot: self.uring_recv.unwrap_or_default() == UringRecv::Multishot,
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
                advertised_host: host,
                advertised_port: port,
                cluster_id: "slipstream-cluster".into(),
                data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("data")),
                default_partitions,
                auto_create_topics: self.auto_create_topics.unwrap_or(true),
                log,
                max_request_bytes,
                group_initial_rebalance_delay_ms: self.group_initial_rebalance_delay_ms.unwrap_or(0),
                connections_max_idle: std::time::Duration::from_millis(self.connections_max_idle_ms.unwrap_or(IDLE_MS)),
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
        assert_eq!(c.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(c.transport, TransportKind::Tcp);
        assert_eq!(c.broker.data_dir, PathBuf::from("data"));
        assert_eq!(c.broker.advertised_port, 9092);
    }

    #[test]
    fn file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9999\"\ncores = 2\nflush = \"always\"\n").unwrap();
        let args = ServeArgs { config: Some(f), cores: Some(1), ..Default::default() };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen.port(), 9999);
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
    fn bad_values_are_named() {
        let e = ServeArgs { flush: Some("sometimes".into()), ..Default::default() }.resolve().unwrap_err();
        assert!(e.to_string().contains("flush policy"));
    }
}
