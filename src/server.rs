//! `slipstream serve`: opens the broker, starts one dispatch core per `--cores`, a
//! housekeeping thread (background flush, retention, stats file), and stops cleanly on
//! SIGTERM/SIGINT: stop accepting, answer in-flight requests, flush, exit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::broker::{Broker, BrokerError};
use crate::config::ServeConfig;
use crate::dispatch::Core;
use crate::log::{flusher_interval, now_ms};
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
    let Ok(text) = serde_json::to_string_pretty(&metrics::snapshot()) else {
        return;
    };
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, data_dir.join("stats.json"));
    }
}

pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let started = Instant::now();
    let broker = Arc::new(Broker::open(cfg.broker.clone())?);
    log::info!(
        "data directory {} ready in {:.1} ms",
        cfg.broker.data_dir.display(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut cores = Vec::new();
    for id in 0..cfg.cores {
        let t = transport::build(cfg.transport, cfg.listen)?;
        cores.push(Core::new(id, broker.clone(), t, shutdown.clone()));
    }
    let wakers: Vec<_> = cores.iter().map(|c| c.waker()).collect();
    {
        let shutdown = shutdown.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
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
    let housekeeping = {
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        let flush_every = flusher_interval(cfg.broker.log.flush);
        thread::Builder::new()
            .name("housekeeping".into())
            .spawn(move || housekeeping(&broker, &shutdown, flush_every))
            .map_err(ServeError::Thread)?
    };
    log::info!(
        "slipstream serving Kafka on {} ({:?} transport, {} core(s)), advertising {}:{}",
        cfg.listen,
        cfg.transport,
        cfg.cores,
        cfg.broker.advertised_host,
        cfg.broker.advertised_port
    );
    let mut handles = Vec::new();
    for core in cores {
        let name = "core".to_string();
        handles.push(
            thread::Builder::new()
                .name(name)
                .spawn(move || core.run())
                .map_err(ServeError::Thread)?,
        );
    }
    for h in handles {
        if h.join().is_err() {
            log::error!("a dispatch core panicked");
        }
    }
    shutdown.store(true, Ordering::Release);
    let _ = housekeeping.join();
    broker.close();
    write_stats(&cfg.broker.data_dir);
    log::info!("stopped");
    Ok(())
}

fn housekeeping(broker: &Broker, shutdown: &AtomicBool, flush_every: Option<Duration>) {
    let tick = flush_every
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut last_retention = Instant::now();
    while !shutdown.load(Ordering::Acquire) {
        thread::sleep(tick);
        if flush_every.is_some() {
            for p in broker.all_partitions() {
                // Take the range under the lock, msync outside it: appends never wait.
                let work = p.log.lock().take_flush_work();
                if let Some(w) = work {
                    if let Err(e) = w.run() {
                        log::error!("flushing {}-{}: {e}", p.topic, p.index);
                    }
                }
            }
        }
        if last_retention.elapsed() >= Duration::from_secs(5) {
            last_retention = Instant::now();
            let now = now_ms();
            for p in broker.all_partitions() {
                let n = p.log.lock().enforce_retention(now);
                if n > 0 {
                    log::info!(
                        "retention removed {n} segment(s) of {}-{}",
                        p.topic,
                        p.index
                    );
                }
            }
        }
        write_stats(&broker.settings.data_dir);
    }
}
