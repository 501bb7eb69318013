//! The lean native client mode: the broker measured with minimal client overhead.
//!
//! Producers are blocking connections with one request in flight; each message value
//! starts with the monotonic send time (ns since the run's epoch) so consumers in the same
//! process measure end-to-end latency. Consumers long-poll every partition from offset 0
//! of a fresh topic, one connection per (group, partition).

use anyhow::{bail, Context};
use bytes::Bytes;
use indicatif::ProgressBar;
use slipstream::client::Client;
use slipstream::log::batch::{build_batch, for_each_value, BatchHeader};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::stats::{Recorder, Schedule};
use super::workload::Workload;

/// What a run produced.
pub struct RunOutput {
    pub recorder: Recorder,
    /// Messages acknowledged in each second of the measured window.
    pub per_second: Vec<u64>,
    pub measured_s: f64,
    /// Broker CPU seconds (user + system) in the measured window, if its pid is known.
    pub broker_cpu_s: Option<f64>,
}

/// The run's clock: nanoseconds since a shared epoch, the same in every thread.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Self {
        Clock(Instant::now())
    }
}

impl Clock {
    pub fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// CPU seconds (user + system) a process has used so far, from /proc.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// Sleeps through the warm-up, then samples `acked` once a second until `end_ns`.
/// Returns the per-second counts, the measured seconds and the broker's CPU seconds over
/// that window (if its pid is known).
pub fn measure_window(
    clock: Clock,
    warmup_ns: u64,
    end_ns: u64,
    acked: &AtomicU64,
    broker_pid: Option<u32>,
    bar: &ProgressBar,
) -> (Vec<u64>, f64, Option<f64>) {
    let sleep_until = |t_ns: u64| {
        let now = clock.ns();
        if t_ns > now {
            thread::sleep(Duration::from_nanos(t_ns - now));
        }
    };
    sleep_until(warmup_ns);
    let cpu_start = broker_pid.and_then(process_cpu_s);
    let measure_start = clock.ns();
    let mut per_second = Vec::new();
    let mut last = acked.load(Ordering::Relaxed);
    let mut next = measure_start + 1_000_000_000;
    while next <= end_ns {
        sleep_until(next);
        let now = acked.load(Ordering::Relaxed);
        per_second.push(now - last);
        bar.set_message(format!("{} msg/s", now - last));
        bar.inc(1);
        last = now;
        next += 1_000_000_000;
    }
    sleep_until(end_ns);
    let measured_s = (clock.ns() - measure_start) as f64 / 1e9;
    let cpu = cpu_start.zip(broker_pid.and_then(process_cpu_s)).map(|(a, b)| b - a);
    (per_second, measured_s, cpu)
}

/// Whether a consumer should stop: the producers have stopped and this partition got
/// about its share of what they produced (every partition gets about the same), or 5 s
/// have passed since they stopped.
pub fn drained(
    stop: &AtomicBool,
    stop_seen_at: &mut Option<Instant>,
    produced: &AtomicU64,
    partitions: u64,
    seen: u64,
) -> bool {
    if !stop.load(Ordering::Relaxed) {
        return false;
    }
    let since = *stop_seen_at.get_or_insert_with(Instant::now);
    let share = produced.load(Ordering::Relaxed) / partitions.max(1);
    seen >= share.saturating_sub(1) || since.elapsed() > Duration::from_secs(5)
}

/// Joins a run's producer or consumer threads (`what` names them), merging what each
/// recorded.
pub fn merge_joined(
    recorder: &mut Recorder,
    threads: Vec<thread::JoinHandle<anyhow::Result<Recorder>>>,
    what: &str,
) -> anyhow::Result<()> {
    for t in threads {
        recorder.merge(&t.join().map_err(|_| anyhow::anyhow!("a {what} thread panicked"))??);
    }
    Ok(())
}

/// Waits until the schedule's next send is due (sleeping, then spinning the last 100 µs);
/// returns at once in a closed loop.
pub fn pace(schedule: &Schedule, clock: Clock) {
    if let Some(t) = schedule.next_intended() {
        let now = clock.ns();
        if t > now + 200_000 {
            thread::sleep(Duration::from_nanos(t - now - 100_000));
        }
        while clock.ns() < t {
            std::hint::spin_loop();
        }
    }
}

/// Where the native client connects, and whether over TLS (trusting the CAs in `tls_ca`).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls_ca: Option<std::path::PathBuf>,
}

fn connect(peer: &Peer) -> anyhow::Result<Client> {
    let addr = peer.addr;
    match &peer.tls_ca {
        None => Client::connect(addr, Duration::from_secs(5)),
        Some(ca) => Client::connect_tls(addr, Duration::from_secs(5), ca),
    }
    .with_context(|| format!("connecting to {addr}"))
}

/// Makes the workload's topic (admin, not measured); one that already exists (36) is fine.
/// The rdkafka client uses it too.
pub fn create_topic(addr: &Peer, topic: &str, partitions: i32) -> anyhow::Result<()> {
    match connect(addr)?.create_topic(topic, partitions).context("CreateTopics")? {
        0 | 36 => Ok(()),
        code => bail!("creating topic {topic}: error {code}"),
    }
}

pub fn run(
    addr: &Peer,
    w: &Workload,
    topic: &str,
    fetch_wait_ms: i32,
    broker_pid: Option<u32>,
    bar: &ProgressBar,
) -> anyhow::Result<RunOutput> {
    create_topic(addr, topic, w.partitions)?;
    if w.backlog_messages > 0 {
        return drain(addr, w, topic, fetch_wait_ms, broker_pid, bar);
    }
    let clock = Clock(Instant::now());
    let warmup_ns = (w.warmup_s * 1e9) as u64;
    let end_ns = warmup_ns + (w.duration_s * 1e9) as u64;
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let produced_total = Arc::new(AtomicU64::new(0));

    let mut consumers = Vec::new();
    for _group in 0..w.consumer_groups {
        for partition in 0..w.partitions {
            let stop = stop_consuming.clone();
            let produced = produced_total.clone();
            let topic = topic.to_string();
            let c = connect(addr)?;
            let partitions = w.partitions as u64;
            consumers.push(thread::spawn(move || {
                consume(c, &topic, partition, clock, warmup_ns, fetch_wait_ms, &stop, &produced, partitions)
            }));
        }
    }
    let mut producers = Vec::new();
    let rate = (w.rate > 0.0).then(|| w.rate / w.producers as f64);
    for k in 0..w.producers {
        let stop = stop_producing.clone();
        let acked = acked.clone();
        let produced = produced_total.clone();
        let topic = topic.to_string();
        let w = w.clone();
        let c = connect(addr)?;
        producers
            .push(thread::spawn(move || produce(c, &topic, k, &w, rate, clock, warmup_ns, &stop, &acked, &produced)));
    }

    let (per_second, measured_s, broker_cpu_s) = measure_window(clock, warmup_ns, end_ns, &acked, broker_pid, bar);
    stop_producing.store(true, Ordering::Relaxed);
    let mut recorder = Recorder::default();
    merge_joined(&mut recorder, producers, "producer")?;
    // Let consumers catch up with everything produced, then stop them.
    let deadline = Instant::now() + Duration::from_secs(10);
    stop_consuming.store(true, Ordering::Relaxed);
    merge_joined(&mut recorder, consumers, "consumer")?;
    if Instant::now() > deadline {
        log::warn!("consumers took more than 10 s to drain");
    }
    Ok(RunOutput { recorder, per_second, measured_s, broker_cpu_s })
}

/// A backlog workload: the producers write `backlog_messages` (not measured) and stop,
/// then one consumer per (group, partition) fetches from offset 0 as fast as the broker
/// answers; the figure is their fetch rate, from their start until the last one has
/// reached the high watermark (or `duration_s` is up).
fn drain(
    addr: &Peer,
    w: &Workload,
    topic: &str,
    fetch_wait_ms: i32,
    broker_pid: Option<u32>,
    bar: &ProgressBar,
) -> anyhow::Result<RunOutput> {
    let clock = Clock::default();
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let never_measured = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for k in 0..w.producers {
        let (stop, produced, never_measured) = (stop.clone(), produced.clone(), never_measured.clone());
        let (topic, w, c) = (topic.to_string(), w.clone(), connect(addr)?);
        // A warm-up that never ends: nothing of the fill is recorded.
        producers.push(thread::spawn(move || {
            produce(c, &topic, k, &w, None, clock, u64::MAX, &stop, &never_measured, &produced)
        }));
    }
    bar.set_message("writing the backlog");
    // The producers stop at the backlog's size; if one fails, the rest are stopped too.
    while !producers.iter().all(|p| p.is_finished()) {
        if producers.iter().any(|p| p.is_finished()) && !w.backlog_written(produced.load(Ordering::Relaxed)) {
            stop.store(true, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_millis(10));
    }
    for p in producers {
        let r = p.join().map_err(|_| anyhow::anyhow!("a producer thread panicked"))??;
        if r.errors > 0 {
            bail!("{} produce requests failed while writing the backlog", r.errors);
        }
    }

    let consumed = Arc::new(AtomicU64::new(0));
    let start_ns = clock.ns();
    let end_ns = start_ns + (w.duration_s * 1e9) as u64;
    let cpu_start = broker_pid.and_then(process_cpu_s);
    let mut consumers = Vec::new();
    for _group in 0..w.consumer_groups {
        for partition in 0..w.partitions {
            let (consumed, topic, c) = (consumed.clone(), topic.to_string(), connect(addr)?);
            consumers.push(thread::spawn(move || {
                drain_partition(c, &topic, partition, clock, end_ns, fetch_wait_ms, &consumed)
            }));
        }
    }
    bar.set_message("draining");
    let mut per_second = Vec::new();
    let (mut last, mut next) = (0u64, start_ns + 1_000_000_000);
    while !consumers.iter().all(|c| c.is_finished()) {
        if clock.ns() >= next {
            let now = consumed.load(Ordering::Relaxed);
            per_second.push(now - last);
            bar.set_message(format!("{} msg/s", now - last));
            bar.inc(1);
            (last, next) = (now, next + 1_000_000_000);
        }
        thread::sleep(Duration::from_micros(500));
    }
    let cpu_end = broker_pid.and_then(process_cpu_s);
    let mut recorder = Recorder::default();
    let mut finished_ns = start_ns;
    for c in consumers {
        let (r, done_ns) = c.join().map_err(|_| anyhow::anyhow!("a consumer thread panicked"))??;
        recorder.merge(&r);
        finished_ns = finished_ns.max(done_ns);
    }
    let measured_s = (finished_ns - start_ns) as f64 / 1e9;
    Ok(RunOutput { recorder, per_second, measured_s, broker_cpu_s: cpu_start.zip(cpu_end).map(|(a, b)| b - a) })
}

/// Fetches one partition from offset 0 to its high watermark (nothing is produced any
/// more), counting records without reading their values. Returns when it got there, on
/// the run's clock.
fn drain_partition(
    mut c: Client,
    topic: &str,
    partition: i32,
    clock: Clock,
    end_ns: u64,
    fetch_wait_ms: i32,
    consumed: &AtomicU64,
) -> anyhow::Result<(Recorder, u64)> {
    let mut r = Recorder::default();
    let mut offset = 0i64;
    while clock.ns() < end_ns {
        let f = c.fetch(topic, partition, offset, 4 << 20, fetch_wait_ms)?;
        if f.error_code != 0 {
            r.errors += 1;
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut pos = 0;
        let mut got = 0u64;
        while let Ok(h) = BatchHeader::parse(&f.records[pos..]) {
            if h.last_offset() >= offset {
                got += (h.last_offset() - offset.max(h.base_offset) + 1) as u64;
                offset = h.last_offset() + 1;
            }
            pos += h.total_len();
        }
        r.messages_received += got;
        consumed.fetch_add(got, Ordering::Relaxed);
        if offset >= f.high_watermark {
            break;
        }
    }
    Ok((r, clock.ns()))
}

#[allow(clippy::too_many_arguments)]
fn produce(
    mut c: Client,
    topic: &str,
    k: usize,
    w: &Workload,
    rate: Option<f64>,
    clock: Clock,
    warmup_ns: u64,
    stop: &AtomicBool,
    acked: &AtomicU64,
    produced: &AtomicU64,
) -> anyhow::Result<Recorder> {
    let mut r = Recorder::default();
    let per_request = w.batch_messages as u64;
    // Messages per request count against the rate.
    let mut schedule = Schedule::new(clock.ns(), rate.map(|r| r / per_request as f64));
    let mut values = vec![vec![0u8; w.message_size]; w.batch_messages];
    let mut i = k as i64;
    // A backlog's fill stops at its size (give or take a request per producer).
    while !stop.load(Ordering::Relaxed) && !w.backlog_written(produced.load(Ordering::Relaxed)) {
        pace(&schedule, clock);
        let partition = (i % w.partitions as i64) as i32;
        i += 1;
        let sent = clock.ns();
        for v in values.iter_mut() {
            v[..8].copy_from_slice(&sent.to_be_bytes());
        }
        let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
        // CreateTime in wall-clock milliseconds, as clients send it: the run's own clock
        // starts near zero, which a broker reads as 1970, and time-based retention then
        // deletes segments as soon as they roll.
        let create_time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let batch = Bytes::from(build_batch(0, create_time_ms, &refs));
        let delay = schedule.sent(per_request, sent);
        let measuring = sent >= warmup_ns;
        if w.acks == 0 {
            c.produce_no_ack(topic, partition, batch)?;
        } else {
            let p = c.produce(topic, partition, batch, w.acks)?;
            if p.error_code != 0 {
                r.errors += 1;
                continue;
            }
        }
        let done = clock.ns();
        produced.fetch_add(per_request, Ordering::Relaxed);
        if measuring {
            r.acknowledged((w.acks != 0).then_some(done - sent), delay, per_request, w.message_size);
            acked.fetch_add(per_request, Ordering::Relaxed);
        }
    }
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
fn consume(
    mut c: Client,
    topic: &str,
    partition: i32,
    clock: Clock,
    warmup_ns: u64,
    fetch_wait_ms: i32,
    stop: &AtomicBool,
    produced: &AtomicU64,
    partitions: u64,
) -> anyhow::Result<Recorder> {
    let mut r = Recorder::default();
    let mut offset = 0i64;
    let mut seen = 0u64;
    let mut stop_seen_at: Option<Instant> = None;
    loop {
        if drained(stop, &mut stop_seen_at, produced, partitions, seen) {
            break;
        }
        let f = c.fetch(topic, partition, offset, 4 << 20, fetch_wait_ms)?;
        if f.error_code != 0 {
            r.errors += 1;
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let now = clock.ns();
        let mut pos = 0;
        while pos < f.records.len() {
            let Ok(h) = BatchHeader::parse(&f.records[pos..]) else { break };
            let batch = &f.records[pos..pos + h.total_len()];
            if h.last_offset() >= offset {
                let skip = (offset - h.base_offset).max(0) as usize;
                let mut idx = 0usize;
                for_each_value(batch, &h, |v| {
                    if idx >= skip && v.len() >= 8 {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&v[..8]);
                        let sent = u64::from_be_bytes(ts);
                        seen += 1;
                        if sent >= warmup_ns {
                            r.end_to_end.record_ns(now.saturating_sub(sent));
                            r.messages_received += 1;
                        }
                    }
                    idx += 1;
                });
                offset = h.last_offset() + 1;
            }
            pos += h.total_len();
        }
    }
    Ok(r)
}
