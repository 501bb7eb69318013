//! `slipstream serve`: opens the broker (recovering every log into its owner core's
//! shard), starts one dispatch core per `--cores`, an I/O thread (msyncs, index files,
//! retention unlinks, spare segments, the stats file), and stops cleanly on
//! SIGTERM/SIGINT: stop accepting, answer in-flight requests, flush, exit.

use crossbeam_channel::Receiver;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::broker::{Broker, BrokerError};
use crate::config::{ListenerConfig, ProtocolKind, ServeConfig};
use crate::dispatch::session::Protocol;
use crate::dispatch::{self, CoreMsg, IoJob, Peer, Shared};
use crate::log::mmap::SegmentFile;
use crate::metrics;
use crate::protocol::kafka::session::Kafka;
use crate::protocol::kafka::Endpoint;
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
}

/// Writes the counters to `<data-dir>/stats.json` (atomically, via rename).
pub fn write_stats(data_dir: &Path) {
    let tmp = data_dir.join("stats.json.tmp");
    let Ok(text) = serde_json::to_string_pretty(&metrics::snapshot()) else { return };
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, data_dir.join("stats.json"));
    }
}

/// The protocol a listener speaks, with that listener's settings.
fn protocol_for(l: &ListenerConfig, cfg: &ServeConfig) -> Arc<dyn Protocol> {
    match l.protocol {
        ProtocolKind::Kafka => {
            let endpoint = Endpoint { host: l.advertised.0.clone(), port: l.advertised.1 };
            Arc::new(Kafka::new(endpoint, cfg.broker.max_request_bytes))
        }
    }
}

pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let started = Instant::now();
    let (broker, shards) = Broker::open(cfg.broker.clone(), cfg.cores)?;
    let broker = Arc::new(broker);
    log::info!(
        "data directory {} ready in {:.1} ms",
        cfg.broker.data_dir.display(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    let (io_tx, io_rx) = crossbeam_channel::unbounded::<IoJob>();

    // Transports first: every core needs every other core's waker.
    let addrs: Vec<_> = cfg.listeners.iter().map(|l| l.addr).collect();
    let listeners = transport::Listeners::bind(cfg.transport, &addrs)?;
    let protocols: Vec<Arc<dyn Protocol>> = cfg.listeners.iter().map(|l| protocol_for(l, &cfg)).collect();
    let transports = (0..cfg.cores)
        .map(|_| transport::build(cfg.transport, &listeners, &cfg.transport_options))
        .collect::<Result<Vec<_>, _>>()?;
    // Each core holds its own clones; ours close now.
    drop(listeners);
    let shared = Shared {
        protocols: protocols.clone(),
        io: io_tx.clone(),
        shutdown: shutdown.clone(),
        busy_poll: cfg.busy_poll,
    };
    let (cores, peers) = dispatch::build_cores(&broker, shards, transports, shared);
    let wakers: Vec<_> = cores.iter().map(|c| c.notify_handle().0).collect();
    {
        let shutdown = shutdown.clone();
        let mut signals =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
                .map_err(ServeError::Signals)?;
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    log::info!("signal {sig}: shutting down");
                    shutdown.store(true, Ordering::Release);
                    for w in &wakers {
                        w.wake();
                    }
                }
            })
            .map_err(ServeError::Thread)?;
    }
    drop(io_tx);
    let io_thread = {
        let data_dir = cfg.broker.data_dir.clone();
        let peers = peers.clone();
        thread::Builder::new()
            .name("io".into())
            .spawn(move || io_loop(&io_rx, &peers, &data_dir))
            .map_err(ServeError::Thread)?
    };
    drop(peers);
    for (l, p) in cfg.listeners.iter().zip(&protocols) {
        log::info!(
            "slipstream serving {} on {} ({:?} transport, {} core(s)), advertising {}:{}",
            p.name(),
            l.addr,
            cfg.transport,
            cfg.cores,
            l.advertised.0,
            l.advertised.1
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
    // The cores held the last job senders: the I/O thread finishes its queue and ends.
    if io_thread.join().is_err() {
        log::error!("the I/O thread panicked");
    }
    broker.close();
    write_stats(&cfg.broker.data_dir);
    log::info!("stopped");
    Ok(())
}

/// Runs file-system work for the cores until every core is gone, and writes the stats
/// file once a second.
fn io_loop(jobs: &Receiver<IoJob>, peers: &[Peer], data_dir: &Path) {
    let mut next_stats = Instant::now();
    loop {
        match jobs.recv_timeout(Duration::from_millis(500)) {
            Ok(IoJob::Work(w)) => {
                if let Err(e) = w.run() {
                    log::error!("log file work failed: {e}");
                }
            }
            Ok(IoJob::Spare { req, core }) => match SegmentFile::create(&req.path, req.size) {
                Ok(file) => {
                    if let Some(p) = peers.get(core) {
                        p.send(CoreMsg::Spare { key: req.key, file });
                    }
                }
                Err(e) => log::warn!("preparing segment {}: {e} (the roll will create it)", req.path.display()),
            },
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_stats {
            write_stats(data_dir);
            next_stats = Instant::now() + Duration::from_secs(1);
        }
    }
}
