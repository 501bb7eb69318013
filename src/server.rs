//! `slipstream serve`: starts the file worker (`log::files`: msyncs, index files,
//! retention unlinks, spare segments, the broker's blocking admin work), opens the broker
//! (recovering every log into its owner core's shard), binds the listeners, starts one
//! dispatch core per `--cores` and a thread writing the stats file, and stops cleanly on
//! SIGTERM/SIGINT: stop accepting, answer in-flight requests, flush, exit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::broker::{Broker, BrokerError};
use crate::config::{ListenerConfig, ProtocolKind, Security, ServeConfig};
use crate::dispatch::session::Protocol;
use crate::dispatch::{self, Shared};
use crate::log::FileWorker;
use crate::metrics;
use crate::protocol::kafka::session::{Kafka, Sasl};
use crate::protocol::kafka::Endpoint;
use crate::protocol::rocketmq::{grpc, RocketMq, RocketMqState, Role};
use crate::tls::ServerTls;
use crate::transport::{self, TransportError};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Writes the counters to `<data-dir>/stats.json` (atomically, via rename).
pub fn write_stats(data_dir: &Path) {
    let tmp = data_dir.join("stats.json.tmp");
    let Ok(text) = serde_json::to_string_pretty(&metrics::snapshot()) else { return };
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, data_dir.join("stats.json"));
    }
}

/// The protocol a listener speaks, with that listener's settings; RocketMQ listeners
/// share `rocketmq` (made from the first `rocketmq://` listener).
fn protocol_for(l: &ListenerConfig, cfg: &ServeConfig, rocketmq: &Option<Arc<RocketMqState>>) -> Arc<dyn Protocol> {
    match (l.protocol, rocketmq) {
        (ProtocolKind::RocketMq, Some(state)) => Arc::new(RocketMq::new(Role::Broker, state.clone(), &l.advertised)),
        (ProtocolKind::RocketMqNamesrv, Some(state)) => {
            Arc::new(RocketMq::new(Role::NameServer, state.clone(), &l.advertised))
        }
        // Config resolution gives every name server a broker listener; a Kafka listener
        // is all that is left.
        _ => {
            let endpoint = Endpoint { host: l.advertised.0.clone(), port: l.advertised.1 };
            let sasl = l.security.sasl().then(|| cfg.sasl_mechanisms.clone());
            let sasl = sasl.map(|mechanisms| Sasl { mechanisms, failure_delay: cfg.failed_authentication_delay });
            Arc::new(Kafka::new(endpoint, cfg.broker.max_request_bytes, sasl))
        }
    }
}

pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let started = Instant::now();
    // A connection is a descriptor: take every one the hard limit allows (as Kafka's
    // packaging does with LimitNOFILE), not the shell's default soft limit of 1024.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => log::debug!("open file limit {n}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
    let (files_worker, files) = FileWorker::spawn().map_err(ServeError::Thread)?;
    let (broker, shards) = Broker::open(cfg.broker.clone(), cfg.cores, files)?;
    let broker = Arc::new(broker);
    log::info!(
        "data directory {} ready in {:.1} ms",
        cfg.broker.data_dir.display(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let shutdown = Arc::new(AtomicBool::new(false));

    // Transports first: every core needs every other core's waker. The gRPC listeners are
    // not the loop's: the gRPC front accepts on them itself.
    let (grpc, looped): (Vec<&ListenerConfig>, Vec<&ListenerConfig>) =
        cfg.listeners.iter().partition(|l| l.protocol == ProtocolKind::RocketMqGrpc);
    let addrs: Vec<_> = looped.iter().map(|l| l.addr).collect();
    let listeners = transport::Listeners::bind(cfg.transport, &addrs, &cfg.transport_options, cfg.cores)?;
    let grpc_sockets = grpc
        .iter()
        .map(|l| std::net::TcpListener::bind(l.addr).map_err(|e| ServeError::Bind(l.addr, e)))
        .collect::<Result<Vec<_>, _>>()?;
    // RocketMQ's identity comes from the remoting broker listener, else the gRPC one.
    let rocketmq_listener =
        looped.iter().copied().find(|l| l.protocol == ProtocolKind::RocketMq).or(grpc.first().copied());
    let rocketmq = rocketmq_listener.map(|l| {
        let advertised = (l.advertised.0.as_str(), l.advertised.1);
        RocketMqState::new(
            &cfg.broker.cluster_id,
            cfg.broker.node_id,
            advertised,
            l.addr,
            cfg.rocketmq_delay_levels.clone(),
            cfg.rocketmq_transactions,
            broker.notifier.clone(),
        )
    });
    let protocols: Vec<Arc<dyn Protocol>> = looped.iter().map(|l| protocol_for(l, &cfg, &rocketmq)).collect();
    // gRPC alone still needs the RocketMQ services (delayed delivery, check-backs).
    let services: Vec<Arc<dyn Protocol>> =
        match (&rocketmq, looped.iter().any(|l| l.protocol == ProtocolKind::RocketMq)) {
            (Some(state), false) => vec![Arc::new(RocketMq::services(state.clone()))],
            _ => Vec::new(),
        };
    let transports = (0..cfg.cores)
        .map(|_| transport::build(cfg.transport, &listeners, &cfg.transport_options))
        .collect::<Result<Vec<_>, _>>()?;
    // Each core holds its own clones; ours close now.
    drop(listeners);
    // One TLS server per kind of TLS listener, made from one set of files and reloaded
    // together: `SSL` listeners require client certificates when a client CA is given
    // (the certificate is the principal); `SASL_SSL` ones never do (SASL names the
    // principal), as Kafka's `ssl.client.auth` defaults for them.
    let tls_server = |security: Security| -> Result<Option<Arc<ServerTls>>, ServeError> {
        let Some(files) = cfg.tls.clone().filter(|_| cfg.listeners.iter().any(|l| l.security == security)) else {
            return Ok(None);
        };
        let files =
            if security == Security::Ssl { files } else { crate::tls::ServerFiles { client_ca: None, ..files } };
        Ok(Some(Arc::new(ServerTls::new(files)?)))
    };
    let (ssl, sasl_ssl) = (tls_server(Security::Ssl)?, tls_server(Security::SaslSsl)?);
    let listener_tls = looped
        .iter()
        .map(|l| match l.security {
            Security::Ssl => ssl.clone(),
            Security::SaslSsl => sasl_ssl.clone(),
            _ => None,
        })
        .collect();
    let tls: Vec<Arc<ServerTls>> = ssl.iter().chain(&sasl_ssl).cloned().collect();
    let shared = Shared {
        protocols: protocols.clone(),
        tls: listener_tls,
        shutdown: shutdown.clone(),
        busy_poll: cfg.busy_poll,
        services,
    };
    let cores = dispatch::build_cores(&broker, shards, transports, shared);
    let mut grpc_threads = Vec::new();
    if let (Some(state), Some(core)) = (&rocketmq, cores.first()) {
        for (l, socket) in grpc.iter().zip(grpc_sockets) {
            let t = grpc::spawn(
                socket,
                l.advertised.clone(),
                core.port(),
                state.clone(),
                cfg.rocketmq_grpc,
                shutdown.clone(),
                ssl.clone().filter(|_| l.security == Security::Ssl),
            )
            .map_err(ServeError::Thread)?;
            log::info!(
                "slipstream serving rocketmq-grpc on {}, advertising {}:{}",
                l.addr,
                l.advertised.0,
                l.advertised.1
            );
            grpc_threads.push(t);
        }
    }
    let wakers: Vec<_> = cores.iter().map(|c| c.notify_handle().0).collect();
    {
        let shutdown = shutdown.clone();
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(ServeError::Signals)?;
        let tls = tls.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGHUP {
                        // New connections get the files as they are now; open ones keep
                        // their session. A set that does not load leaves TLS as it was.
                        if tls.is_empty() {
                            log::info!("SIGHUP: no TLS listener to reload");
                        }
                        match tls.iter().try_for_each(|t| t.reload()) {
                            _ if tls.is_empty() => {}
                            Ok(()) => log::info!("SIGHUP: TLS certificates reloaded; new connections get them"),
                            Err(e) => log::error!("SIGHUP: TLS reload failed, keeping the certificates in use: {e}"),
                        }
                        continue;
                    }
                    log::info!("signal {sig}: shutting down");
                    shutdown.store(true, Ordering::Release);
                    for w in &wakers {
                        w.wake();
                    }
                    break;
                }
            })
            .map_err(ServeError::Thread)?;
    }
    let stats_thread = {
        let data_dir = cfg.broker.data_dir.clone();
        let shutdown = shutdown.clone();
        let broker = broker.clone();
        thread::Builder::new()
            .name("stats".into())
            .spawn(move || stats_loop(&data_dir, &broker, &shutdown))
            .map_err(ServeError::Thread)?
    };
    let metrics_thread = match cfg.metrics_listen {
        Some(addr) => Some(
            crate::prometheus::spawn(addr, broker.clone(), shutdown.clone()).map_err(|e| ServeError::Bind(addr, e))?,
        ),
        None => None,
    };
    for (l, p) in looped.iter().zip(&protocols) {
        log::info!(
            protocol = p.name(),
            security = l.security.name(),
            listen:% = l.addr,
            transport:? = cfg.transport,
            cores = cfg.cores,
            advertised:% = format_args!("{}:{}", l.advertised.0, l.advertised.1);
            "slipstream serving"
        );
    }
    let mut handles = Vec::new();
    for (id, core) in cores.into_iter().enumerate() {
        let h =
            thread::Builder::new().name(format!("core-{id}")).spawn(move || core.run()).map_err(ServeError::Thread)?;
        handles.push(h);
    }
    for h in handles {
        if h.join().is_err() {
            log::error!("a dispatch core panicked");
        }
    }
    for t in grpc_threads {
        if t.join().is_err() {
            log::error!("the gRPC front panicked");
        }
    }
    // The cores have closed their shards: the file worker finishes what they queued.
    files_worker.finish();
    if stats_thread.join().is_err() {
        log::error!("the stats thread panicked");
    }
    if metrics_thread.is_some_and(|t| t.join().is_err()) {
        log::error!("the metrics thread panicked");
    }
    broker.close();
    write_stats(&cfg.broker.data_dir);
    log::info!("stopped");
    Ok(())
}

/// Writes the stats file once a second until shutdown.
/// Writes the counters every second, and reads the users file again when `slipstream
/// users` changed it.
fn stats_loop(data_dir: &Path, broker: &Broker, shutdown: &AtomicBool) {
    // Short naps, so shutdown is seen within a quarter of a second.
    for turn in 0u64.. {
        if shutdown.load(Ordering::Acquire) {
            return;
        }
        if turn % 4 == 0 {
            write_stats(data_dir);
            broker.users.reload_if_changed();
        }
        thread::sleep(Duration::from_millis(250));
    }
}
