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
use crate::config::ServeConfig;
use crate::dispatch::{Core, CoreMsg, CoreParts, IoJob, Peer};
use crate::log::mmap::SegmentFile;
use crate::metrics;
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
    let listener = transport::Listener::bind(cfg.transport, cfg.listen)?;
    let mut transports = Vec::new();
    let mut peers = Vec::new();
    let mut inboxes = Vec::new();
    let mut sleeping_flags = Vec::new();
    for _ in 0..cfg.cores {
        let t = transport::build(cfg.transport, &listener, &cfg.transport_options)?;
        let (tx, rx) = crossbeam_channel::unbounded::<CoreMsg>();
        let sleeping = Arc::new(AtomicBool::new(false));
        peers.push(Peer::new(tx, t.waker(), sleeping.clone()));
        inboxes.push(rx);
        sleeping_flags.push(sleeping);
        transports.push(t);
    }
    // Each core holds its own clone; ours closes now.
    drop(listener);
    let mut cores = Vec::new();
    for (id, ((t, shard), (inbox, sleeping))) in
        transports.into_iter().zip(shards).zip(inboxes.into_iter().zip(sleeping_flags)).enumerate()
    {
        let parts = CoreParts {
            shard,
            inbox,
            peers: peers.clone(),
            sleeping,
            io: io_tx.clone(),
            shutdown: shutdown.clone(),
            busy_poll: cfg.busy_poll,
        };
        cores.push(Core::new(id, broker.clone(), t, parts));
    }
    broker.notifier.install(cores.iter().map(Core::notify_handle).collect());
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
    log::info!(
        "slipstream serving Kafka on {} ({:?} transport, {} core(s)), advertising {}:{}",
        cfg.listen,
        cfg.transport,
        cfg.cores,
        cfg.broker.advertised_host,
        cfg.broker.advertised_port
    );
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
