//! RocketMQ remoting: unmodified RocketMQ clients against the built-in name server and
//! broker listener, on the same log Kafka clients read and write.

use crate::harness::{flags, free_addrs, phases_across_restart, run_client, serves_api_versions, BrokerProc};
use bytes::{BufMut, Bytes, BytesMut};
use slipstream::protocol::rocketmq::frame::{Command, Framer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

/// A broker with a Kafka listener (the harness's), a RocketMQ broker listener and its name
/// server; returns the broker and the two RocketMQ addresses.
fn start(transport: &[&str], extra: &[&str]) -> (BrokerProc, String, String) {
    let addrs = free_addrs(3);
    let (rmq, ns) = (addrs[1].to_string(), addrs[2].to_string());
    let (l1, l2) = (format!("rocketmq://{rmq}"), format!("rocketmq-namesrv://{ns}"));
    let mut args = vec!["--listen", l1.as_str(), "--listen", l2.as_str(), "--default-partitions", "4"];
    args.extend_from_slice(extra);
    let broker = BrokerProc::start_at(addrs[0], &flags(&args, transport), serves_api_versions);
    (broker, rmq, ns)
}

// ali-ons (pure JavaScript, RocketMQ 4.x remoting): 10k tagged messages over 4 queues,
// tag-filtered and whole consumption, a restart, the group resuming exactly after its
// committed offsets, broadcast consumption.
per_transport!(ali_ons_remoting, |t| {
    let (mut broker, _, ns) = start(t, &[]);
    phases_across_restart(&mut broker, "node", &["ons_suite.js", "--namesrv", &ns], SUITE_TIMEOUT);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    let s = broker.stats();
    println!("copy counters after phase 2: {s:?}");
    // A send copies the body into the record batch, the log copies the batch once; a pull
    // lays records out as RocketMQ messages (the one copy on the way out).
    assert!(s.rocketmq_send_bytes_copied > 0 && s.rocketmq_pull_bytes_copied > 0, "{s:?}");
    assert_eq!(s.produce_bytes_copied, s.produce_payload_bytes, "stored more than once: {s:?}");
});

// One log, both protocols: ali-ons sends, confluent-kafka reads (body = value, KEYS = key,
// properties = headers); confluent-kafka produces, ali-ons consumes with a tag filter.
per_transport!(cross_protocol_ali_ons_and_confluent_kafka, |t| {
    let (broker, _, ns) = start(t, &[]);
    let bootstrap = broker.addr.to_string();
    run_client("node", &["ons_suite.js", "--namesrv", &ns, "--phase", "cross-send"], SUITE_TIMEOUT);
    run_client("python3", &["cross_protocol.py", "--bootstrap", &bootstrap, "--phase", "read"], SUITE_TIMEOUT);
    run_client("python3", &["cross_protocol.py", "--bootstrap", &bootstrap, "--phase", "write"], SUITE_TIMEOUT);
    run_client("node", &["ons_suite.js", "--namesrv", &ns, "--phase", "cross-receive"], SUITE_TIMEOUT);
});

/// Every delay level 1 s but level 2 (2 s): retries come back within seconds.
const FAST_LEVELS: &str = "1s 2s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s";

// Retries with back-off, dead letters after maxReconsumeTimes, delay levels and timer
// messages (none early), and delayed messages surviving a restart before they are due.
per_transport!(ali_ons_retry_dead_letters_and_delays, |t| {
    let (mut broker, _, ns) = start(t, &["--rocketmq-delay-levels", FAST_LEVELS]);
    run_client("node", &["ons_suite.js", "--namesrv", &ns, "--phase", "retry"], SUITE_TIMEOUT);
    run_client("node", &["ons_suite.js", "--namesrv", &ns, "--phase", "delay"], SUITE_TIMEOUT);
    run_client("node", &["ons_suite.js", "--namesrv", &ns, "--phase", "delay-send"], SUITE_TIMEOUT);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    broker.spawn();
    run_client("node", &["ons_suite.js", "--namesrv", &ns, "--phase", "delay-receive"], SUITE_TIMEOUT);
});

/// The rocketmq-client-rust suite, built by scripts/setup-test-deps.sh.
fn rust_suite() -> String {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients/debug/rocketmq-rust-suite");
    assert!(bin.exists(), "{} is missing: run scripts/setup-test-deps.sh", bin.display());
    bin.to_string_lossy().into_owned()
}

// rocketmq-client-rust 1.0.0: sync (10k over 4 queues), async, one-way and batch sends;
// push consumers (all tags and one tag), a lite pull consumer, ordered consumption under
// queue locks, transactions committed, rolled back and resolved by check-back; a restart,
// and the group resuming exactly after its committed offsets.
per_transport!(rocketmq_client_rust_remoting, |t| {
    let fast_checks = ["--rocketmq-transaction-timeout-ms", "1000", "--rocketmq-transaction-check-interval-ms", "1000"];
    let (mut broker, _, ns) = start(t, &fast_checks);
    let suite = rust_suite();
    phases_across_restart(&mut broker, &suite, &["--namesrv", &ns], SUITE_TIMEOUT);
});

// The same round trip with rocketmq-client-rust: its messages read by confluent-kafka,
// confluent-kafka's records read by it through a tag subscription.
per_transport!(cross_protocol_rocketmq_client_rust_and_confluent_kafka, |t| {
    let (broker, _, ns) = start(t, &[]);
    let (bootstrap, suite) = (broker.addr.to_string(), rust_suite());
    run_client(&suite, &["--namesrv", &ns, "--phase", "cross-send"], SUITE_TIMEOUT);
    run_client("python3", &["cross_protocol.py", "--bootstrap", &bootstrap, "--phase", "read"], SUITE_TIMEOUT);
    run_client("python3", &["cross_protocol.py", "--bootstrap", &bootstrap, "--phase", "write"], SUITE_TIMEOUT);
    run_client(&suite, &["--namesrv", &ns, "--phase", "cross-receive"], SUITE_TIMEOUT);
});

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

pub fn request(code: i32, opaque: i32, ext: &[(&str, &str)]) -> Command {
    let ext = ext.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Command::request(code, ext, false, opaque)
}

/// Sends `req` and reads the answer with the same opaque.
pub fn call(s: &mut (impl Read + Write), req: &Command) -> Command {
    s.write_all(&req.encode()).expect("write");
    let mut buf = BytesMut::new();
    loop {
        if let Some(frame) = Framer::default().cut(&mut buf).expect("frame length") {
            let resp = Command::decode(frame).expect("response decodes");
            assert!(resp.is_response());
            assert_eq!(resp.opaque, req.opaque);
            return resp;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed while waiting for opaque {}", req.opaque);
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the broker closed `s` (within the read timeout).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// Garbage, truncated and oversized frames and malformed headers cost only their own
// connection; an unknown request code is answered REQUEST_CODE_NOT_SUPPORTED.
per_transport!(rocketmq_bad_input_costs_only_that_connection, |t| {
    let (mut broker, rmq, ns) = start(t, &[]);
    let mut good = connect(&rmq);
    let resp = call(&mut good, &request(46, 1, &[]));
    assert_eq!(resp.code, 0, "CHECK_CLIENT_CONFIG");
    let resp = call(&mut good, &request(9999, 2, &[]));
    assert_eq!(resp.code, 3, "unknown code: {resp:?}");
    assert!(resp.remark.as_deref().is_some_and(|r| r.contains("9999")), "{resp:?}");
    // Both JSON and the binary ROCKETMQ header, answered in kind.
    let mut binary = request(105, 3, &[("topic", "TBW102")]);
    binary.serialize = slipstream::protocol::rocketmq::frame::Serialize::RocketMq;
    let mut ns_conn = connect(&ns);
    let route = call(&mut ns_conn, &binary);
    assert_eq!((route.code, route.serialize), (0, binary.serialize), "{route:?}");
    let body: serde_json::Value = serde_json::from_slice(&route.body).expect("route JSON");
    assert_eq!(body["brokerDatas"][0]["brokerAddrs"]["0"], serde_json::Value::String(rmq.clone()));

    let json_header = |header: &[u8]| {
        let mut f = BytesMut::new();
        f.put_u32(4 + header.len() as u32);
        f.put_u32(header.len() as u32);
        f.extend_from_slice(header);
        f.freeze()
    };
    let bad: Vec<(&str, Bytes)> = vec![
        ("garbage", Bytes::from_static(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
        ("oversized", Bytes::from(((17u32 << 20).to_be_bytes()).to_vec())),
        ("negative length", Bytes::from_static(&[0xff, 0xff, 0xff, 0xf0])),
        ("malformed JSON header", json_header(br#"{"code":10,"opaque":"#)),
        ("header longer than the frame", Bytes::from_static(&[0, 0, 0, 8, 0, 0, 0, 99, b'{', b'}', 0, 0])),
        ("binary header with a bad remark length", {
            let mut f = BytesMut::new();
            f.put_u32(4 + 17);
            f.put_u32(1 << 24 | 17);
            f.extend_from_slice(&[0, 10, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
            f.freeze()
        }),
    ];
    for (what, bytes) in &bad {
        let mut s = connect(&rmq);
        s.write_all(bytes).expect("write");
        assert!(closed(&mut s), "{what}: connection not closed");
    }
    // Half a frame, then the peer goes away: nothing for anyone else.
    let mut s = connect(&rmq);
    s.write_all(&[0, 0, 0, 100, 0, 0, 0]).expect("write");
    drop(s);
    let resp = call(&mut good, &request(46, 4, &[]));
    assert_eq!(resp.code, 0, "the good connection stopped answering");
    assert!(broker.is_running(), "broker died:\n{}", broker.log_tail());
    assert!(broker.terminate().success());
    assert!(broker.stats().connections_closed_bad_input >= bad.len() as u64, "{:?}", broker.stats());
});

pub fn heartbeat(client: &str, group: &str, model: &str, opaque: i32) -> Command {
    let mut hb = request(34, opaque, &[]);
    hb.body = Bytes::from(
        serde_json::json!({
            "clientID": client,
            "producerDataSet": [],
            "consumerDataSet": [{
                "groupName": group,
                "consumeType": "CONSUME_PASSIVELY",
                "messageModel": model,
                "consumeFromWhere": "CONSUME_FROM_LAST_OFFSET",
                "subscriptionDataSet": [{"topic": "t", "subString": "*"}],
            }],
        })
        .to_string(),
    );
    hb
}

/// Reads frames until one the broker initiated (not a response) arrives.
fn next_request(s: &mut TcpStream, buf: &mut BytesMut) -> Command {
    loop {
        if let Some(frame) = Framer::default().cut(buf).expect("frame length") {
            let cmd = Command::decode(frame).expect("decodes");
            if !cmd.is_response() {
                return cmd;
            }
            continue;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read (no notification in time?)");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

// The broker tells a consumer group's clients when the group's membership changes
// (NOTIFY_CONSUMER_IDS_CHANGED), on the connection they heartbeat on: a new member, and a
// member whose connection closes. The first heartbeat of a clustering consumer waits for
// its retry topic to be made, and its connection is watched all the same.
per_transport!(rocketmq_group_members_are_told_when_the_group_changes, |t| {
    let (_broker, rmq, _) = start(t, &[]);
    let mut a = connect(&rmq);
    assert_eq!(call(&mut a, &heartbeat("client-a", "g", "CLUSTERING", 1)).code, 0);
    let mut b = connect(&rmq);
    assert_eq!(call(&mut b, &heartbeat("client-b", "g", "CLUSTERING", 1)).code, 0);
    let mut buf = BytesMut::new();
    let notice = next_request(&mut a, &mut buf);
    assert_eq!((notice.code, notice.field("consumerGroup"), notice.is_oneway()), (40, Some("g"), true));
    let list = call(&mut a, &request(38, 2, &[("consumerGroup", "g")]));
    let ids: serde_json::Value = serde_json::from_slice(&list.body).expect("JSON");
    assert_eq!(ids["consumerIdList"], serde_json::json!(["client-a", "client-b"]));
    drop(b);
    let notice = next_request(&mut a, &mut buf);
    assert_eq!((notice.code, notice.field("consumerGroup")), (40, Some("g")));
    let list = call(&mut a, &request(38, 3, &[("consumerGroup", "g")]));
    let ids: serde_json::Value = serde_json::from_slice(&list.body).expect("JSON");
    assert_eq!(ids["consumerIdList"], serde_json::json!(["client-a"]));
});

fn holds(body: &[u8], text: &str) -> bool {
    body.windows(text.len()).any(|w| w == text.as_bytes())
}

// VIEW_MESSAGE_BY_ID with the offset message id a send answered, and QUERY_MESSAGE by key
// and by unique key; a key that is not there is QUERY_NOT_FOUND.
per_transport!(rocketmq_messages_are_found_by_id_and_by_key, |t| {
    let (_broker, rmq, ns) = start(t, &[]);
    let mut ns_conn = connect(&ns);
    assert_eq!(call(&mut ns_conn, &request(105, 1, &[("topic", "lookup")])).code, 0, "route (auto-create)");
    let mut c = connect(&rmq);
    let mut ids = Vec::new();
    for i in 0..20 {
        let props = format!("KEYS\u{1}k{i} shared\u{2}UNIQ_KEY\u{1}U{i}\u{2}TAGS\u{1}t\u{2}");
        let q = (i % 4).to_string();
        let born = "1700000000000".to_string();
        let ext = [("a", "p"), ("b", "lookup"), ("e", q.as_str()), ("g", born.as_str()), ("i", props.as_str())];
        let mut send = request(310, 10 + i, &ext);
        send.body = Bytes::from(format!("body-{i}"));
        let resp = call(&mut c, &send);
        assert_eq!(resp.code, 0, "{resp:?}");
        ids.push(resp.field("msgId").expect("msgId").to_string());
    }
    for (i, id) in ids.iter().enumerate() {
        let physical = i64::from_str_radix(&id[16..], 16).expect("hex");
        let resp = call(&mut c, &request(33, 100 + i as i32, &[("offset", &physical.to_string())]));
        assert_eq!(resp.code, 0, "view {id}: {resp:?}");
        // The body, then the one-byte topic length and the topic: exactly this message.
        assert!(holds(&resp.body, &format!("body-{i}\u{6}lookup")), "view {id} found another message");
    }
    let query = |c: &mut TcpStream, key: &str, unique: bool, opaque: i32| {
        let mut ext = vec![("topic", "lookup"), ("key", key), ("maxNum", "32"), ("beginTimestamp", "0")];
        ext.push(("endTimestamp", "9999999999999"));
        if unique {
            ext.push(("_UNIQUE_KEY_QUERY", "true"));
        }
        call(c, &request(12, opaque, &ext))
    };
    let by_key = query(&mut c, "k7", false, 200);
    assert_eq!(by_key.code, 0, "{by_key:?}");
    assert!(holds(&by_key.body, "body-7") && !holds(&by_key.body, "body-1"), "query k7");
    let shared = query(&mut c, "shared", false, 201);
    let n = (10..20).filter(|i| holds(&shared.body, &format!("body-{i}"))).count();
    assert!(shared.code == 0 && n == 10, "a key every message carries: {n} of body-10..19 found");
    let unique = query(&mut c, "U3", true, 202);
    assert!(unique.code == 0 && holds(&unique.body, "body-3") && !holds(&unique.body, "body-13"), "{unique:?}");
    assert_eq!(query(&mut c, "nope", false, 203).code, 22);
});

// With auto-creation off, an unknown topic has no route (TOPIC_NOT_EXIST) and a send to it
// is refused with TOPIC_NOT_EXIST; TBW102 and a topic made with UPDATE_AND_CREATE_TOPIC
// are routed, with the queue count asked for.
per_transport!(rocketmq_routes_without_auto_creation, |t| {
    let (_broker, rmq, ns) = start(t, &["--auto-create-topics", "false"]);
    let mut n = connect(&ns);
    assert_eq!(call(&mut n, &request(105, 1, &[("topic", "unknown")])).code, 17);
    assert_eq!(call(&mut n, &request(105, 2, &[("topic", "TBW102")])).code, 0);
    let mut c = connect(&rmq);
    let mut send = request(310, 3, &[("a", "p"), ("b", "unknown"), ("e", "0")]);
    send.body = Bytes::from_static(b"x");
    assert_eq!(call(&mut c, &send).code, 17);
    let made = call(&mut c, &request(17, 4, &[("topic", "made"), ("readQueueNums", "3"), ("writeQueueNums", "3")]));
    assert_eq!(made.code, 0, "{made:?}");
    let route = call(&mut n, &request(105, 5, &[("topic", "made")]));
    assert_eq!(route.code, 0);
    let body: serde_json::Value = serde_json::from_slice(&route.body).expect("route JSON");
    assert_eq!(
        (body["queueDatas"][0]["writeQueueNums"].as_i64(), body["queueDatas"][0]["perm"].as_i64()),
        (Some(3), Some(6))
    );
});
