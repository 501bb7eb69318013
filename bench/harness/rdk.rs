//! The real-client mode: librdkafka (through the `rdkafka` crate), so the figures are what
//! users of librdkafka-based clients see. linger.ms comes from the workload (0 for the
//! latency workloads). Same message format and measurements as the native mode.

use anyhow::Context;
use indicatif::ProgressBar;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::native::{measure_window, Clock, RunOutput};
use super::stats::{Recorder, Schedule};
use super::workload::Workload;

/// Measures each delivery (send → ack) as librdkafka reports it.
struct Deliveries {
    clock: Clock,
    warmup_ns: u64,
    size: u64,
    rec: Mutex<Recorder>,
    acked: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
    outstanding: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Self::DeliveryOpaque) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        if result.is_ok() {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        let now = self.clock.ns();
        let mut r = self.rec.lock();
        match result {
            Ok(_) if *sent >= self.warmup_ns => {
                r.publish.record_ns(now.saturating_sub(*sent));
                r.messages_sent += 1;
                r.bytes_sent += self.size;
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => r.errors += 1,
        }
    }
}

pub fn run(
    addr: SocketAddr,
    w: &Workload,
    topic: &str,
    fetch_wait_ms: i32,
    broker_pid: Option<u32>,
    bar: &ProgressBar,
) -> anyhow::Result<RunOutput> {
    if w.backlog_messages > 0 {
        anyhow::bail!("{}: backlog (fetch-throughput) workloads run with --client native", w.name);
    }
    super::native::create_topic(&super::native::Peer { addr, tls_ca: None }, topic, w.partitions)?;
    let clock = Clock::default();
    let warmup_ns = (w.warmup_s * 1e9) as u64;
    let end_ns = warmup_ns + (w.duration_s * 1e9) as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    // Every successful delivery, warm-up included: what consumers must drain.
    let delivered = Arc::new(AtomicU64::new(0));

    let mut consumers = Vec::new();
    for g in 0..w.consumer_groups {
        let mut cfg = ClientConfig::new();
        // librdkafka's own tracing, for diagnosing a target: SLIPSTREAM_RDKAFKA_DEBUG=fetch,...
        if let Ok(d) = std::env::var("SLIPSTREAM_RDKAFKA_DEBUG") {
            cfg.set("debug", d);
        }
        let c: BaseConsumer = cfg
            .set("bootstrap.servers", addr.to_string())
            .set("group.id", format!("{topic}-g{g}"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
            .set("fetch.min.bytes", "1")
            .create()
            .context("creating an rdkafka consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..w.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        c.assign(&tpl)?;
        let stop = stop.clone();
        let delivered = delivered.clone();
        consumers.push(thread::spawn(move || {
            let mut r = Recorder::default();
            let mut seen = 0u64;
            let mut stopped_at: Option<Instant> = None;
            loop {
                if stop.load(Ordering::Relaxed) {
                    // Drain: every delivered message, or give up after 10 s.
                    let since = *stopped_at.get_or_insert_with(Instant::now);
                    if seen >= delivered.load(Ordering::Relaxed) || since.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                }
                match c.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        seen += 1;
                        let now = clock.ns();
                        if let Some(v) = m.payload().filter(|v| v.len() >= 8) {
                            let mut ts = [0u8; 8];
                            ts.copy_from_slice(&v[..8]);
                            let sent = u64::from_be_bytes(ts);
                            if sent >= warmup_ns {
                                r.end_to_end.record_ns(now.saturating_sub(sent));
                                r.messages_received += 1;
                            }
                        }
                    }
                    Some(Err(_)) => r.errors += 1,
                    None => {}
                }
            }
            r
        }));
    }

    let mut producers = Vec::new();
    let rate = (w.rate > 0.0).then(|| w.rate / w.producers as f64);
    // One request in flight: a closed loop that waits for each ack (latency workloads).
    let closed_loop = rate.is_none() && w.batch_messages == 1;
    for _ in 0..w.producers {
        let ctx = Deliveries {
            clock,
            warmup_ns,
            size: w.message_size as u64,
            rec: Mutex::new(Recorder::default()),
            acked: acked.clone(),
            delivered: delivered.clone(),
            outstanding: AtomicU64::new(0),
        };
        let p: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", addr.to_string())
            .set("acks", w.acks.to_string())
            .set("linger.ms", w.linger_ms.to_string())
            .set("batch.num.messages", w.batch_messages.to_string())
            // A bounded client queue (64 batches), so publish latency shows the broker's
            // pace rather than how deep an unbounded local queue grew.
            .set("queue.buffering.max.messages", (w.batch_messages * 64).max(1000).to_string())
            .set("compression.type", "none")
            .create_with_context(ctx)
            .context("creating an rdkafka producer")?;
        let stop = stop.clone();
        let topic = topic.to_string();
        let w = w.clone();
        producers.push(thread::spawn(move || -> anyhow::Result<Recorder> {
            let mut schedule = Schedule::new(clock.ns(), rate);
            let mut delays = Recorder::default();
            let mut value = vec![0u8; w.message_size];
            let mut i = 0i32;
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = schedule.next_intended() {
                    while clock.ns() < t {
                        p.poll(Duration::ZERO);
                        std::hint::spin_loop();
                    }
                }
                let sent = clock.ns();
                value[..8].copy_from_slice(&sent.to_be_bytes());
                let delay = schedule.sent(1, sent);
                if sent >= warmup_ns {
                    delays.publish_delay.record_ns(delay);
                }
                let partition = i % w.partitions;
                i = i.wrapping_add(1);
                let mut record: BaseRecord<'_, (), Vec<u8>, Box<u64>> =
                    BaseRecord::with_opaque_to(&topic, Box::new(sent)).payload(&value).partition(partition);
                loop {
                    match p.send(record) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            // Queue full: let deliveries drain (a zero-timeout poll: a timed
                            // one always waits its whole timeout), then retry.
                            record = back;
                            p.poll(Duration::ZERO);
                            thread::yield_now();
                        }
                    }
                }
                p.context().outstanding.fetch_add(1, Ordering::Relaxed);
                if closed_loop {
                    // rdkafka's BaseProducer::poll(t) keeps polling until `t` has passed even
                    // after it served the delivery report, so wait with zero-timeout polls.
                    while p.context().outstanding.load(Ordering::Relaxed) > 0 {
                        p.poll(Duration::ZERO);
                        std::hint::spin_loop();
                    }
                } else {
                    p.poll(Duration::ZERO);
                }
            }
            p.flush(Duration::from_secs(10))?;
            let mut r = std::mem::take(&mut *p.context().rec.lock());
            r.merge(&delays);
            Ok(r)
        }));
    }

    let (per_second, measured_s, broker_cpu_s) = measure_window(clock, warmup_ns, end_ns, &acked, broker_pid, bar);
    stop.store(true, Ordering::Relaxed);
    let mut recorder = Recorder::default();
    for p in producers {
        recorder.merge(&p.join().map_err(|_| anyhow::anyhow!("a producer thread panicked"))??);
    }
    for c in consumers {
        recorder.merge(&c.join().map_err(|_| anyhow::anyhow!("a consumer thread panicked"))?);
    }
    Ok(RunOutput { recorder, per_second, measured_s, broker_cpu_s })
}
