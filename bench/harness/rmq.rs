//! The RocketMQ remoting client mode (`--protocol rocketmq`): the same workloads, spoken
//! as RocketMQ clients speak to a broker, with minimal client overhead — one blocking
//! connection per producer with one request in flight (SEND_MESSAGE_V2, or
//! SEND_BATCH_MESSAGE for batches), and per (consumer group, queue) a connection
//! long-polling PULL_MESSAGE. Any RocketMQ broker: the target address is its name server.
//!
//! Message bodies start with the send time on the run's clock, as in the native mode, so
//! consumers in this process measure end-to-end latency.

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use indicatif::ProgressBar;
use slipstream::protocol::rocketmq::frame::{Command, Framer};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::native::{drained, measure_window, merge_joined, pace, Clock, RunOutput};
use super::stats::{Recorder, Schedule};
use super::workload::Workload;

const SEND_MESSAGE_V2: i32 = 310;
const SEND_BATCH_MESSAGE: i32 = 320;
const PULL_MESSAGE: i32 = 11;
const UPDATE_AND_CREATE_TOPIC: i32 = 17;
const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
const GET_BROKER_CLUSTER_INFO: i32 = 106;
const SUCCESS: i32 = 0;
const PULL_NOT_FOUND: i32 = 19;
const PULL_RETRY_IMMEDIATELY: i32 = 20;
const PULL_OFFSET_MOVED: i32 = 21;

/// One remoting connection, one request in flight.
struct Conn {
    s: TcpStream,
    buf: BytesMut,
    opaque: i32,
}

impl Conn {
    fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Conn { s, buf: BytesMut::with_capacity(1 << 16), opaque: 0 })
    }

    fn call(&mut self, code: i32, ext: &[(&str, String)], body: Bytes) -> anyhow::Result<Command> {
        self.opaque += 1;
        let mut cmd =
            Command::request(code, ext.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), false, self.opaque);
        cmd.body = body;
        self.s.write_all(&cmd.encode())?;
        loop {
            if let Some(frame) = Framer::default().cut(&mut self.buf)? {
                let resp = Command::decode(frame)?;
                if resp.is_response() && resp.opaque == self.opaque {
                    return Ok(resp);
                }
                continue;
            }
            let mut chunk = [0u8; 64 << 10];
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                bail!("the broker closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The broker address and queue count a name server routes `topic` to.
fn route(namesrv: SocketAddr, topic: &str) -> anyhow::Result<Option<(SocketAddr, i32, String)>> {
    let resp = Conn::connect(namesrv)?.call(GET_ROUTEINFO_BY_TOPIC, &[("topic", topic.to_string())], Bytes::new())?;
    if resp.code != SUCCESS {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.body).context("route JSON")?;
    let broker = &v["brokerDatas"][0];
    let addr = broker["brokerAddrs"]["0"].as_str().context("route without a master address")?;
    let name = broker["brokerName"].as_str().unwrap_or_default().to_string();
    let queues = v["queueDatas"][0]["writeQueueNums"].as_i64().unwrap_or(0) as i32;
    let addr = addr.to_socket_addrs()?.next().context("broker address resolves to nothing")?;
    Ok(Some((addr, queues, name)))
}

/// Makes the workload's topic with `queues` queues on the (first) broker the name server
/// knows, and waits until it is routed (admin, not measured).
pub fn create_topic(namesrv: SocketAddr, topic: &str, queues: i32) -> anyhow::Result<(SocketAddr, String)> {
    // A broker registers with its name server some time after it listens: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let v = loop {
        let info = Conn::connect(namesrv)?.call(GET_BROKER_CLUSTER_INFO, &[], Bytes::new())?;
        let v: serde_json::Value = serde_json::from_slice(&info.body).context("cluster info JSON")?;
        if v["brokerAddrTable"].as_object().is_some_and(|t| !t.is_empty()) {
            break v;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("no broker registered with the name server at {namesrv} within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    let broker = v["brokerAddrTable"].as_object().and_then(|t| t.values().next()).context("no broker registered")?;
    let addr = broker["brokerAddrs"]["0"].as_str().context("no master address")?;
    let addr: SocketAddr = addr.to_socket_addrs()?.next().context("broker address resolves to nothing")?;
    let ext = [
        ("topic", topic.to_string()),
        ("defaultTopic", "TBW102".to_string()),
        ("readQueueNums", queues.to_string()),
        ("writeQueueNums", queues.to_string()),
        ("perm", "6".to_string()),
        ("topicFilterType", "SINGLE_TAG".to_string()),
        ("topicSysFlag", "0".to_string()),
        ("order", "false".to_string()),
    ];
    let made = Conn::connect(addr)?.call(UPDATE_AND_CREATE_TOPIC, &ext, Bytes::new())?;
    if made.code != SUCCESS {
        bail!("creating {topic}: code {} {:?}", made.code, made.remark);
    }
    let started = Instant::now();
    loop {
        if let Some((a, q, name)) = route(namesrv, topic)? {
            if q == queues {
                return Ok((a, name));
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{topic} was not routed within 60 s");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(
    namesrv: SocketAddr,
    w: &Workload,
    topic: &str,
    broker_pid: Option<u32>,
    bar: &ProgressBar,
) -> anyhow::Result<RunOutput> {
    if w.backlog_messages > 0 || w.acks == 0 {
        bail!("the RocketMQ mode runs closed-loop acknowledged workloads only (no backlog, no acks=0)");
    }
    let (broker, broker_name) = create_topic(namesrv, topic, w.partitions)?;
    let clock = Clock::default();
    let warmup_ns = (w.warmup_s * 1e9) as u64;
    let end_ns = warmup_ns + (w.duration_s * 1e9) as u64;
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let produced = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for group in 0..w.consumer_groups {
        for queue in 0..w.partitions {
            let (stop, produced, topic) = (stop_consuming.clone(), produced.clone(), topic.to_string());
            let c = Conn::connect(broker)?;
            let queues = w.partitions as u64;
            consumers.push(thread::spawn(move || {
                consume(c, &topic, &format!("bench-cg-{group}"), queue, clock, warmup_ns, &stop, &produced, queues)
            }));
        }
    }
    let mut producers = Vec::new();
    let rate = (w.rate > 0.0).then(|| w.rate / w.producers as f64);
    for k in 0..w.producers {
        let (stop, acked, produced) = (stop_producing.clone(), acked.clone(), produced.clone());
        let (topic, w, name) = (topic.to_string(), w.clone(), broker_name.clone());
        let c = Conn::connect(broker)?;
        producers.push(thread::spawn(move || {
            produce(c, &topic, &name, k, &w, rate, clock, warmup_ns, &stop, &acked, &produced)
        }));
    }
    let (per_second, measured_s, broker_cpu_s) = measure_window(clock, warmup_ns, end_ns, &acked, broker_pid, bar);
    stop_producing.store(true, Ordering::Relaxed);
    let mut recorder = Recorder::default();
    merge_joined(&mut recorder, producers, "producer")?;
    stop_consuming.store(true, Ordering::Relaxed);
    merge_joined(&mut recorder, consumers, "consumer")?;
    Ok(RunOutput { recorder, per_second, measured_s, broker_cpu_s })
}

/// A SEND_BATCH_MESSAGE body (`MessageDecoder.encodeMessages`).
fn batch_body(values: &[Vec<u8>]) -> Bytes {
    let mut b = BytesMut::new();
    for v in values {
        b.put_i32((4 + 4 + 4 + 4 + 4 + v.len() + 2) as i32);
        b.put_i32(0);
        b.put_i32(0);
        b.put_i32(0);
        b.put_i32(v.len() as i32);
        b.extend_from_slice(v);
        b.put_i16(0);
    }
    b.freeze()
}

#[allow(clippy::too_many_arguments)]
fn produce(
    mut c: Conn,
    topic: &str,
    broker_name: &str,
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
    let mut schedule = Schedule::new(clock.ns(), rate.map(|r| r / per_request as f64));
    let mut values = vec![vec![0u8; w.message_size]; w.batch_messages];
    let mut i = k as i64;
    while !stop.load(Ordering::Relaxed) {
        pace(&schedule, clock);
        let queue = (i % w.partitions as i64) as i32;
        i += 1;
        let sent = clock.ns();
        for v in values.iter_mut() {
            v[..8].copy_from_slice(&sent.to_be_bytes());
        }
        let born = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let batch = per_request > 1;
        let ext = [
            ("a", "bench-producer".to_string()),
            ("b", topic.to_string()),
            ("c", "TBW102".to_string()),
            ("d", "4".to_string()),
            ("e", queue.to_string()),
            ("f", "0".to_string()),
            ("g", born.to_string()),
            ("h", "0".to_string()),
            ("i", if batch { String::new() } else { "WAIT\u{1}true\u{2}".to_string() }),
            ("j", "0".to_string()),
            ("k", "false".to_string()),
            ("m", batch.to_string()),
            ("n", broker_name.to_string()),
        ];
        let (code, body) = if batch {
            (SEND_BATCH_MESSAGE, batch_body(&values))
        } else {
            (SEND_MESSAGE_V2, Bytes::copy_from_slice(&values[0]))
        };
        let delay = schedule.sent(per_request, sent);
        let resp = c.call(code, &ext, body)?;
        if resp.code != SUCCESS {
            r.errors += 1;
            continue;
        }
        let done = clock.ns();
        produced.fetch_add(per_request, Ordering::Relaxed);
        if sent >= warmup_ns {
            r.acknowledged(Some(done - sent), delay, per_request, w.message_size);
            acked.fetch_add(per_request, Ordering::Relaxed);
        }
    }
    Ok(r)
}

/// The bodies' leading send times in a PULL answer (the commit-log message layout).
fn each_sent_time(body: &[u8], mut f: impl FnMut(u64)) {
    let mut pos = 0;
    while body.len() - pos >= 4 {
        let total = i32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]) as usize;
        if total < 4 || pos + total > body.len() {
            return;
        }
        let m = &body[pos..pos + total];
        let sys_flag = m.get(36..40).map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let born = if sys_flag & (1 << 4) != 0 { 20 } else { 8 };
        let store = if sys_flag & (1 << 5) != 0 { 20 } else { 8 };
        let body_len_at = 4 + 4 + 4 + 4 + 4 + 8 + 8 + 4 + 8 + born + 8 + store + 4 + 8;
        if let Some(v) = m.get(body_len_at + 4..body_len_at + 12) {
            f(u64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]));
        }
        pos += total;
    }
}

#[allow(clippy::too_many_arguments)]
fn consume(
    mut c: Conn,
    topic: &str,
    group: &str,
    queue: i32,
    clock: Clock,
    warmup_ns: u64,
    stop: &AtomicBool,
    produced: &AtomicU64,
    queues: u64,
) -> anyhow::Result<Recorder> {
    let mut r = Recorder::default();
    let (mut offset, mut seen) = (0i64, 0u64);
    let mut stop_seen_at: Option<Instant> = None;
    loop {
        if drained(stop, &mut stop_seen_at, produced, queues, seen) {
            break;
        }
        let ext = [
            ("consumerGroup", group.to_string()),
            ("topic", topic.to_string()),
            ("queueId", queue.to_string()),
            ("queueOffset", offset.to_string()),
            ("maxMsgNums", "256".to_string()),
            ("sysFlag", "6".to_string()),
            ("commitOffset", "0".to_string()),
            ("suspendTimeoutMillis", "1000".to_string()),
            ("subscription", "*".to_string()),
            ("subVersion", "0".to_string()),
            ("expressionType", "TAG".to_string()),
        ];
        let resp = c.call(PULL_MESSAGE, &ext, Bytes::new())?;
        let next = resp.field("nextBeginOffset").and_then(|v| v.parse::<i64>().ok());
        match resp.code {
            SUCCESS => {
                let now = clock.ns();
                each_sent_time(&resp.body, |sent| {
                    seen += 1;
                    if sent >= warmup_ns {
                        r.end_to_end.record_ns(now.saturating_sub(sent));
                        r.messages_received += 1;
                    }
                });
            }
            PULL_NOT_FOUND | PULL_RETRY_IMMEDIATELY | PULL_OFFSET_MOVED => {}
            _ => {
                r.errors += 1;
                thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(n) = next {
            offset = n;
        }
    }
    Ok(r)
}
