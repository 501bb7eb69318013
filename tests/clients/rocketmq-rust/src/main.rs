//! rocketmq-client-rust 1.0.0 (RocketMQ remoting) against slipstream's name server and
//! RocketMQ listener.
//!
//!   rocketmq-rust-suite --namesrv HOST:PORT --phase 1|2
//!
//! phase 1: 10,000 sync sends with tags and keys over 4 queues (100 in flight), async
//!   (callback), one-way and batch sends; a push consumer of everything and one of a tag;
//!   a lite pull consumer; ordered sends and an orderly consumer (queue locks);
//!   transactions committed, rolled back and left unknown (resolved by check-back).
//! phase 2 (after a broker restart): 1,000 more sync sends; the all-tags group resumes
//!   exactly after its committed offsets.
//! cross-send / cross-receive: the RocketMQ halves of the round trip with confluent-kafka
//!   (cross_protocol.py).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cheetah_string::CheetahString;
use parking_lot::Mutex;
use rocketmq_client_rust::*;
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

const TOPIC: &str = "rs-topic";
const N1: usize = 10_000;
const N2: usize = 1_000;
const ASYNC: usize = 1_000;
const ONEWAY: usize = 500;
const BATCHES: usize = 10;
const BATCH: usize = 100;

type Seen = Arc<Mutex<HashMap<String, (Option<String>, Option<String>, i32)>>>;

fn fail(msg: String) -> ! {
    eprintln!("FAIL: {msg}");
    std::process::exit(1);
}

macro_rules! check {
    ($cond:expr, $($arg:tt)*) => { if !$cond { fail(format!($($arg)*)); } };
}

struct Collect(Seen);

impl MessageListenerConcurrently for Collect {
    fn consume_message(&self, msgs: &[&MessageExt], _: &ConsumeConcurrentlyContext) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut seen = self.0.lock();
        for m in msgs {
            let body = String::from_utf8_lossy(&m.body().unwrap_or_default()).to_string();
            let keys = m.get_keys().map(|k| k.to_string());
            seen.insert(body, (m.get_tags().map(|t| t.to_string()), keys, m.queue_id()));
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

fn msg(topic: &str, tag: &str, key: Option<String>, body: String) -> Message {
    let b = Message::builder().topic(topic).tags(tag).body_slice(body.as_bytes());
    match key {
        Some(k) => b.key(k).build_unchecked(),
        None => b.build_unchecked(),
    }
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > Duration::from_secs(secs) {
            fail(format!("timed out: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn push_consumer(rt: &Arc<ClientRuntime>, ns: &str, group: &str, topic: &str, expr: &str, seen: Seen) -> ClientResult<DefaultMQPushConsumer> {
    // Batches of 32 per consume task: one task per message overflows the client's own
    // task queue (runtime.capacity.exhausted) when thousands arrive at once.
    let mut c = DefaultMQPushConsumer::builder(rt.clone())
        .consumer_group(group.to_string())
        .name_server_addr(ns.to_string())
        .consume_message_batch_max_size(32)
        .build();
    c.subscribe(topic, expr).await?;
    c.set_consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset);
    c.register_message_listener_concurrently(Collect(seen));
    c.start().await?;
    Ok(c)
}

async fn sends(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<usize> {
    let mut producer = DefaultMQProducer::builder(rt.clone()).producer_group("rs-producer".to_string()).name_server_addr(ns.to_string()).build();
    producer.start().await?;
    let started = Instant::now();
    let mut queues = HashSet::new();
    for chunk in (0..N1).collect::<Vec<_>>().chunks(100) {
        let sends = chunk.iter().map(|i| {
            let tag = if i % 2 == 0 { "TagA" } else { "TagB" };
            producer.send_with_timeout(msg(TOPIC, tag, Some(format!("key-{i}")), format!("sync-{i}")), 10_000)
        });
        for r in futures::future::join_all(sends).await {
            let r = r?.unwrap_or_else(|| fail("a sync send returned no result".into()));
            check!(r.send_status == SendStatus::SendOk, "send status {:?}", r.send_status);
            if let Some(q) = &r.message_queue {
                queues.insert(q.queue_id());
            }
        }
    }
    println!("{N1} sync sends in {} ms", started.elapsed().as_millis());
    check!(queues.len() == 4, "sends went to queues {queues:?}");
    // Async sends, 100 outstanding at a time: every callback must come, and a send the
    // client reports failed (its own timeout, on a loaded machine) is sent again
    // synchronously, so the consumers' counts stay exact. The failures are printed.
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    for window in (0..ASYNC).collect::<Vec<_>>().chunks(100) {
        let before = acked.load(Ordering::Relaxed) + failed.lock().len();
        for &i in window {
            let (acked, failed) = (acked.clone(), failed.clone());
            let m = msg(TOPIC, "TagA", Some(format!("akey-{i}")), format!("async-{i}"));
            producer
                .send_with_callback_timeout(
                    m,
                    move |r, e| match (r, e) {
                        (Some(_), None) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => failed.lock().push(i),
                    },
                    10_000,
                )
                .await?;
        }
        let want = before + window.len();
        wait_for("async send callbacks", 60, || acked.load(Ordering::Relaxed) + failed.lock().len() >= want).await;
    }
    let failed = std::mem::take(&mut *failed.lock());
    if !failed.is_empty() {
        println!("{} async sends reported failed; sent again synchronously", failed.len());
    }
    for i in failed {
        producer.send_with_timeout(msg(TOPIC, "TagA", Some(format!("akey-{i}")), format!("async-{i}")), 10_000).await?;
    }
    for i in 0..ONEWAY {
        producer.send_oneway(msg(TOPIC, "TagB", None, format!("oneway-{i}"))).await?;
    }
    for b in 0..BATCHES {
        let batch: Vec<Message> = (0..BATCH).map(|i| msg(TOPIC, "TagA", None, format!("batch-{b}-{i}"))).collect();
        let r = producer.send_batch(batch).await?;
        check!(r.send_status == SendStatus::SendOk, "batch status {:?}", r.send_status);
    }
    producer.shutdown().await;
    Ok(N1 + ASYNC + ONEWAY + BATCHES * BATCH)
}

async fn phase1(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<()> {
    let total = sends(rt, ns).await?;
    let all: Seen = Arc::default();
    let tag_a: Seen = Arc::default();
    let mut c_all = push_consumer(rt, ns, "rs-all", TOPIC, "*", all.clone()).await?;
    let mut c_tag = push_consumer(rt, ns, "rs-tag-a", TOPIC, "TagA", tag_a.clone()).await?;
    let want_a = N1 / 2 + ASYNC + BATCHES * BATCH;
    wait_for("push consumers", 120, || all.lock().len() >= total && tag_a.lock().len() >= want_a).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    check!(all.lock().len() == total, "all-tags group got {} of {total}", all.lock().len());
    check!(tag_a.lock().len() == want_a, "TagA group got {} of {want_a}", tag_a.lock().len());
    for (body, (tag, keys, _)) in tag_a.lock().iter() {
        check!(tag.as_deref() == Some("TagA"), "{body} tagged {tag:?} reached the TagA group");
        if let Some(i) = body.strip_prefix("sync-") {
            check!(keys.as_deref() == Some(&format!("key-{i}")[..]), "{body} keys {keys:?}");
        }
    }
    c_all.shutdown().await;
    c_tag.shutdown().await;
    println!("push consumers ok");
    lite_pull(rt, ns, total).await?;
    println!("lite pull ok");
    ordered(rt, ns).await?;
    println!("ordered ok");
    transactions(rt, ns).await?;
    println!("transactions ok");
    Ok(())
}

async fn lite_pull(rt: &Arc<ClientRuntime>, ns: &str, total: usize) -> ClientResult<()> {
    let c = DefaultLitePullConsumer::builder(rt.clone())
        .consumer_group("rs-lite")
        .name_server_addr(ns.to_string())
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build()?;
    c.subscribe_with_expression(TOPIC, "TagB").await?;
    c.start().await?;
    let mut got = HashSet::new();
    let start = Instant::now();
    let want = N1 / 2 + ONEWAY;
    while got.len() < want && start.elapsed() < Duration::from_secs(120) {
        for m in c.poll_with_timeout(1000).await {
            check!(m.get_tags().as_deref() == Some("TagB"), "lite pull got a {:?} message", m.get_tags());
            got.insert(String::from_utf8_lossy(&m.body().unwrap_or_default()).to_string());
        }
    }
    check!(got.len() == want, "lite pull consumer got {} of {want} (of {total})", got.len());
    c.shutdown().await;
    Ok(())
}

struct Orderly(Arc<Mutex<HashMap<usize, Vec<usize>>>>);

impl MessageListenerOrderly for Orderly {
    fn consume_message(&self, msgs: &[&MessageExt], ctx: &mut ConsumeOrderlyContext) -> ClientResult<ConsumeOrderlyStatus> {
        ctx.set_auto_commit(true);
        let mut seen = self.0.lock();
        for m in msgs {
            let body = String::from_utf8_lossy(&m.body().unwrap_or_default()).to_string();
            let mut parts = body.split('-').skip(1).map(|p| p.parse::<usize>().unwrap_or(usize::MAX));
            let (order, seq) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            seen.entry(order).or_default().push(seq);
        }
        Ok(ConsumeOrderlyStatus::Success)
    }
}

/// Ordered messages: each order id's messages go to one queue (a selector), and an
/// orderly consumer (holding the queue locks) sees each order's sequence in order.
async fn ordered(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<()> {
    let mut producer = DefaultMQProducer::builder(rt.clone()).producer_group("rs-order-producer".to_string()).name_server_addr(ns.to_string()).build();
    producer.start().await?;
    const ORDERS: usize = 8;
    const PER: usize = 50;
    for seq in 0..PER {
        for order in 0..ORDERS {
            let m = msg("rs-order", "TagO", Some(format!("order-{order}")), format!("o-{order}-{seq}"));
            producer.send_with_selector(m, |mqs, _m, arg: &usize| Some(mqs[arg % mqs.len()].clone()), order).await?;
        }
    }
    producer.shutdown().await;
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut c = DefaultMQPushConsumer::builder(rt.clone()).consumer_group("rs-orderly".to_string()).name_server_addr(ns.to_string()).build();
    c.subscribe("rs-order", "*").await?;
    c.set_consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset);
    c.register_message_listener_orderly(Orderly(seen.clone()));
    c.start().await?;
    wait_for("orderly consumer", 120, || seen.lock().values().map(Vec::len).sum::<usize>() >= ORDERS * PER).await;
    c.shutdown().await;
    for (order, seqs) in seen.lock().iter() {
        check!(*seqs == (0..PER).collect::<Vec<_>>(), "order {order} consumed as {seqs:?}");
    }
    Ok(())
}

/// Decides each transaction by its body: `commit`, `rollback`, or `unknown` (then the
/// broker's check-back is answered with commit).
struct Tx {
    checks: Arc<AtomicUsize>,
}

impl TransactionListener for Tx {
    fn execute_local_transaction(&self, msg: &dyn MessageTrait, _arg: Option<&(dyn std::any::Any + Send + Sync)>) -> LocalTransactionState {
        let body = msg.get_body().map(|b| String::from_utf8_lossy(b).to_string()).unwrap_or_default();
        match body.split('-').next() {
            Some("commit") => LocalTransactionState::CommitMessage,
            Some("rollback") => LocalTransactionState::RollbackMessage,
            _ => LocalTransactionState::Unknown,
        }
    }

    fn check_local_transaction(&self, msg: &MessageExt) -> LocalTransactionState {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let body = String::from_utf8_lossy(&msg.body().unwrap_or_default()).to_string();
        if body.starts_with("unknown") {
            LocalTransactionState::CommitMessage
        } else {
            LocalTransactionState::RollbackMessage
        }
    }
}

async fn transactions(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<()> {
    let checks = Arc::new(AtomicUsize::new(0));
    let mut producer = TransactionMQProducer::builder(rt.clone())
        .producer_group("rs-tx-producer".to_string())
        .name_server_addr(ns.to_string())
        .topics(vec!["rs-tx"])
        .transaction_listener(Tx { checks: checks.clone() })
        .build();
    producer.start().await?;
    for i in 0..30 {
        let kind = ["commit", "rollback", "unknown"][i % 3];
        producer.send_message_in_transaction::<(), _>(msg("rs-tx", "TagT", None, format!("{kind}-{i}")), None).await?;
    }
    let seen: Seen = Arc::default();
    let mut c = push_consumer(rt, ns, "rs-tx-reader", "rs-tx", "*", seen.clone()).await?;
    wait_for("committed and checked-back transactions", 120, || seen.lock().len() >= 20).await;
    // Rolled-back halves never show, even after their would-be check time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.shutdown().await;
    producer.shutdown().await;
    let seen = seen.lock();
    check!(seen.len() == 20, "{} transactional messages visible, wanted 20: {:?}", seen.len(), seen.keys().collect::<Vec<_>>());
    check!(seen.keys().all(|b| !b.starts_with("rollback")), "a rolled-back message was delivered");
    check!(checks.load(Ordering::Relaxed) >= 10, "only {} check-backs", checks.load(Ordering::Relaxed));
    Ok(())
}

/// The RocketMQ half of the round trip with confluent-kafka (cross_protocol.py): 100
/// messages to `cross-r2k` with tag, keys and a user property.
async fn cross_send(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<()> {
    let mut producer = DefaultMQProducer::builder(rt.clone()).producer_group("rs-cross".to_string()).name_server_addr(ns.to_string()).build();
    producer.start().await?;
    for i in 0..100 {
        let mut m = msg("cross-r2k", "TagX", Some(format!("rk-{i}")), format!("from-rocketmq-{i}"));
        m.put_user_property(CheetahString::from("user_prop"), CheetahString::from(format!("v{i}"))).unwrap_or_else(|e| fail(format!("property: {e}")));
        let r = producer.send_with_timeout(m, 10_000).await?.unwrap_or_else(|| fail("no send result".into()));
        check!(r.send_status == SendStatus::SendOk, "send status {:?}", r.send_status);
    }
    producer.shutdown().await;
    Ok(())
}

/// Reads what cross_protocol.py produced with confluent-kafka to `cross-k2r`, through a
/// TagK subscription: key → KEYS, headers → properties.
async fn cross_receive(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<()> {
    let seen: Seen = Arc::default();
    let mut c = push_consumer(rt, ns, "rs-cross-reader", "cross-k2r", "TagK", seen.clone()).await?;
    wait_for("Kafka records", 120, || seen.lock().len() >= 50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.shutdown().await;
    let seen = seen.lock();
    check!(seen.len() == 50, "got {} of the 50 TagK records", seen.len());
    for (body, (_, keys, _)) in seen.iter() {
        let i: usize = body.rsplit('-').next().and_then(|i| i.parse().ok()).unwrap_or(1);
        check!(i % 2 == 0, "{body} does not carry TagK");
        check!(keys.as_deref() == Some(&format!("kk-{i}")[..]), "Kafka key did not become KEYS: {keys:?}");
    }
    Ok(())
}

async fn phase2(rt: &Arc<ClientRuntime>, ns: &str) -> ClientResult<()> {
    let mut producer = DefaultMQProducer::builder(rt.clone()).producer_group("rs-producer".to_string()).name_server_addr(ns.to_string()).build();
    producer.start().await?;
    for i in 0..N2 {
        producer.send_with_timeout(msg(TOPIC, "TagA", None, format!("after-{i}")), 10_000).await?;
    }
    producer.shutdown().await;
    let all: Seen = Arc::default();
    let mut c = push_consumer(rt, ns, "rs-all", TOPIC, "*", all.clone()).await?;
    wait_for("the resumed group", 120, || all.lock().len() >= N2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.shutdown().await;
    let all = all.lock();
    let old: Vec<_> = all.keys().filter(|b| !b.starts_with("after-")).take(5).collect();
    check!(old.is_empty(), "the group re-consumed messages before its committed offsets: {old:?}");
    check!(all.len() == N2, "resumed group got {} of {N2}", all.len());
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| fail(format!("{name} missing")));
    let (ns, phase) = (arg("--namesrv"), arg("--phase"));
    let plan = RuntimeOwner::plan(RuntimeConfig { thread_name: "rs-suite".into(), ..Default::default() })
        .unwrap_or_else(|e| fail(format!("runtime plan: {e}")));
    let owner = plan.build().unwrap_or_else(|e| fail(format!("runtime: {e}")));
    // Errors only: the client logs every request at INFO.
    let mut telemetry = rocketmq_observability::TelemetryBootstrapConfig::default();
    telemetry.logging.filter = "error".into();
    telemetry.logging.console.ansi = false;
    let telemetry = rocketmq_observability::install_global(&telemetry)
        .unwrap_or_else(|e| fail(format!("telemetry: {e}")));
    let rt = ClientRuntime::try_new(owner.root_context().component("client"), ClientRuntimeConfig::default(), telemetry.handle())
        .unwrap_or_else(|e| fail(format!("client runtime: {e}")));
    let result = match phase.as_str() {
        "1" => phase1(&rt, &ns).await,
        "2" => phase2(&rt, &ns).await,
        "cross-send" => cross_send(&rt, &ns).await,
        "cross-receive" => cross_receive(&rt, &ns).await,
        other => fail(format!("unknown phase {other}")),
    };
    if let Err(e) = result {
        fail(format!("{e}"));
    }
    println!("phase {phase} ok");
    println!("done");
    // The client's runtime reports lingering tasks at exit; the phase has passed.
    std::process::exit(0);
}
