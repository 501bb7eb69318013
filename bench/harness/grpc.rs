//! The RocketMQ 5 gRPC client mode (`--protocol rocketmq-grpc`): the same workloads,
//! spoken as the 5.x SDKs speak to a proxy — one HTTP/2 connection per producer with one
//! SendMessage in flight (a batch is one request carrying `batch_messages` messages), and
//! per consumer group a simple consumer: ReceiveMessage (long polling, every queue) and
//! one AckMessage per received batch. Any `apache.rocketmq.v2.MessagingService` endpoint.
//!
//! Bodies start with the send time on the run's clock, as in the other modes.

use anyhow::{bail, Context};
use indicatif::ProgressBar;
use slipstream::protocol::rocketmq::grpc::pb;
use slipstream::protocol::rocketmq::grpc::pb::messaging_service_client::MessagingServiceClient;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

use super::native::{drained, measure_window, merge_joined, pace, Clock, RunOutput};
use super::stats::{Recorder, Schedule};
use super::workload::Workload;

type Client = MessagingServiceClient<Channel>;
/// Makes a topic with a queue count (the target's admin path).
pub type MakeTopic<'a> = &'a dyn Fn(&str, i32) -> anyhow::Result<()>;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(MessagingServiceClient::new(channel))
}

/// A request with the headers every 5.x client sends.
fn request<T>(msg: T, client_id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let md = r.metadata_mut();
    md.insert("x-mq-protocol", tonic::metadata::MetadataValue::from_static("v2"));
    if let Ok(v) = client_id.parse() {
        md.insert("x-mq-client-id", v);
    }
    r
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource { resource_namespace: String::new(), name: name.to_string() })
}

fn ok(s: &Option<pb::Status>) -> bool {
    s.as_ref().is_some_and(|s| s.code == pb::Code::Ok as i32)
}

/// The topic's route (made by the target if it auto-creates topics).
async fn queues(c: &mut Client, topic: &str) -> anyhow::Result<i32> {
    let r = c
        .query_route(request(pb::QueryRouteRequest { topic: resource(topic), endpoints: None }, "bench-admin"))
        .await?
        .into_inner();
    if !ok(&r.status) {
        bail!("routing {topic}: {:?}", r.status);
    }
    Ok(r.message_queues.len() as i32)
}

/// Runs `w` against the endpoint `addr`. `create` makes the topic with the workload's
/// queue count beforehand (slipstream: through its remoting admin request); otherwise the
/// target must auto-create it.
pub fn run(
    addr: SocketAddr,
    create: Option<MakeTopic<'_>>,
    w: &Workload,
    topic: &str,
    broker_pid: Option<u32>,
    bar: &ProgressBar,
) -> anyhow::Result<RunOutput> {
    if w.backlog_messages > 0 || w.acks == 0 {
        bail!("the gRPC mode runs closed-loop acknowledged workloads only (no backlog, no acks=0)");
    }
    if let Some(f) = create {
        f(topic, w.partitions)?;
    }
    let queue_count = runtime()?.block_on(async { queues(&mut connect(addr).await?, topic).await })?;
    let clock = Clock::default();
    let warmup_ns = (w.warmup_s * 1e9) as u64;
    let end_ns = warmup_ns + (w.duration_s * 1e9) as u64;
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let produced = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for group in 0..w.consumer_groups {
        let (stop, produced, topic) = (stop_consuming.clone(), produced.clone(), topic.to_string());
        consumers.push(thread::spawn(move || {
            runtime()?.block_on(consume(addr, &topic, &format!("bench-cg-{group}"), clock, warmup_ns, &stop, &produced))
        }));
    }
    let mut producers = Vec::new();
    let rate = (w.rate > 0.0).then(|| w.rate / w.producers as f64);
    for k in 0..w.producers {
        let (stop, acked, produced) = (stop_producing.clone(), acked.clone(), produced.clone());
        let (topic, w) = (topic.to_string(), w.clone());
        producers.push(thread::spawn(move || {
            let queues = queue_count.max(1);
            runtime()?.block_on(produce(addr, &topic, queues, k, &w, rate, clock, warmup_ns, &stop, &acked, &produced))
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

#[allow(clippy::too_many_arguments)]
async fn produce(
    addr: SocketAddr,
    topic: &str,
    queues: i32,
    k: usize,
    w: &Workload,
    rate: Option<f64>,
    clock: Clock,
    warmup_ns: u64,
    stop: &AtomicBool,
    acked: &AtomicU64,
    produced: &AtomicU64,
) -> anyhow::Result<Recorder> {
    let mut c = connect(addr).await?;
    let client_id = format!("bench-producer-{k}-{}", std::process::id());
    let mut r = Recorder::default();
    let per_request = w.batch_messages as u64;
    let mut schedule = Schedule::new(clock.ns(), rate.map(|r| r / per_request as f64));
    let mut body = vec![0u8; w.message_size];
    let (mut i, mut id) = (k as i64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        pace(&schedule, clock);
        let queue = (i % i64::from(queues)) as i32;
        i += 1;
        let sent = clock.ns();
        body[..8].copy_from_slice(&sent.to_be_bytes());
        let born = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let messages = (0..w.batch_messages)
            .map(|_| {
                id += 1;
                pb::Message {
                    topic: resource(topic),
                    user_properties: Default::default(),
                    system_properties: Some(pb::SystemProperties {
                        message_id: format!("{client_id}-{id}"),
                        queue_id: queue,
                        message_type: pb::MessageType::Normal as i32,
                        body_encoding: pb::Encoding::Identity as i32,
                        born_timestamp: Some(prost_types::Timestamp {
                            seconds: born.as_secs() as i64,
                            nanos: born.subsec_nanos() as i32,
                        }),
                        ..Default::default()
                    }),
                    body: body.clone().into(),
                }
            })
            .collect();
        let delay = schedule.sent(per_request, sent);
        let resp = c.send_message(request(pb::SendMessageRequest { messages }, &client_id)).await;
        match resp.map(|r| r.into_inner()) {
            Ok(resp) if ok(&resp.status) => {
                let done = clock.ns();
                produced.fetch_add(per_request, Ordering::Relaxed);
                if sent >= warmup_ns {
                    r.acknowledged(Some(done - sent), delay, per_request, w.message_size);
                    acked.fetch_add(per_request, Ordering::Relaxed);
                }
            }
            _ => r.errors += 1,
        }
    }
    Ok(r)
}

async fn consume(
    addr: SocketAddr,
    topic: &str,
    group: &str,
    clock: Clock,
    warmup_ns: u64,
    stop: &AtomicBool,
    produced: &AtomicU64,
) -> anyhow::Result<Recorder> {
    let mut c = connect(addr).await?;
    let client_id = format!("bench-{group}-{}", std::process::id());
    let mut r = Recorder::default();
    let (mut seen, mut stop_seen_at) = (0u64, None);
    let queue = pb::MessageQueue { topic: resource(topic), id: -1, ..Default::default() };
    while !drained(stop, &mut stop_seen_at, produced, 1, seen) {
        let req = pb::ReceiveMessageRequest {
            group: resource(group),
            message_queue: Some(queue.clone()),
            filter_expression: Some(pb::FilterExpression {
                r#type: pb::FilterType::Tag as i32,
                expression: "*".into(),
            }),
            batch_size: 256,
            invisible_duration: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            attempt_id: None,
        };
        let mut stream = match c.receive_message(request(req, &client_id)).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                r.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut entries = Vec::new();
        while let Ok(Some(item)) = stream.message().await {
            let Some(pb::receive_message_response::Content::Message(m)) = item.content else { continue };
            let now = clock.ns();
            if let Some(b) = m.body.get(..8) {
                let sent = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                seen += 1;
                if sent >= warmup_ns {
                    r.end_to_end.record_ns(now.saturating_sub(sent));
                    r.messages_received += 1;
                }
            }
            let sys = m.system_properties.unwrap_or_default();
            entries.push(pb::AckMessageEntry {
                message_id: sys.message_id,
                receipt_handle: sys.receipt_handle.unwrap_or_default(),
                lite_topic: None,
            });
        }
        if !entries.is_empty() {
            let ack = pb::AckMessageRequest { group: resource(group), topic: resource(topic), entries };
            if c.ack_message(request(ack, &client_id)).await.is_err() {
                r.errors += 1;
            }
        }
    }
    Ok(r)
}
