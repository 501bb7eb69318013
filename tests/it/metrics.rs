//! The Prometheus endpoint (issue 15, acceptance 3): scraped over HTTP, parsed strictly as
//! the text exposition format, its values checked against traffic the test made.

use crate::harness::{free_port, BrokerProc};
use bytes::Bytes;
use kafka_protocol::messages::offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic};
use kafka_protocol::messages::{GroupId, OffsetCommitRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use slipstream::client::Client;
use slipstream::log::batch::build_batch;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head and body");
    (head.to_string(), body.to_string())
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The text format, strictly: `# HELP`/`# TYPE` lines, then samples of declared families.
fn parse(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
    let mut types = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "family {name} declared twice");
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment: {line}");
        let name_end = line.find(['{', ' ']).expect("sample name");
        let name = &line[..name_end];
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(char::is_numeric),
            "bad metric name {name:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end = loop {
                let Some((i, c)) = chars.next() else { panic!("unterminated labels: {line}") };
                if c == '}' {
                    break i;
                }
                if c == ',' {
                    continue;
                }
                let key_start = i;
                let mut key_end = i;
                for (j, c) in chars.by_ref() {
                    if c == '=' {
                        key_end = j;
                        break;
                    }
                }
                let key = &r[key_start..key_end];
                assert_eq!(chars.next().map(|x| x.1), Some('"'), "label value not quoted: {line}");
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next().map(|x| x.1) {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            other => panic!("bad escape {other:?}: {line}"),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value: {line}"),
                    }
                }
                assert!(labels.insert(key.to_string(), value).is_none(), "label {key} twice: {line}");
            };
            rest = &r[end + 1..];
        }
        let value: f64 = rest.trim().parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).map(String::as_str) == Some("histogram")))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    (samples, types)
}

fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

#[test]
fn metrics_endpoint_counts_what_happened() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let m = metrics.to_string();
    let broker = BrokerProc::start(&["--metrics-listen", &m, "--flush", "always", "--segment-bytes", "65536"]);
    let listener = format!("kafka://{}", broker.addr);
    let mut c = Client::connect(broker.addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(c.create_topic("m", 2).expect("create"), 0);
    // Answered with an error code: counted by code, as Kafka's ErrorsPerSec.
    assert_eq!(c.create_topic("m", 2).expect("create again"), 36, "TOPIC_ALREADY_EXISTS");
    // 50 batches of 3 records into partition 0, 20 into partition 1.
    let value = vec![b'v'; 1000];
    let mut bytes_in = 0;
    let mut bytes_p0 = 0;
    for i in 0..70i64 {
        let (partition, base) = if i < 50 { (0, i * 3) } else { (1, (i - 50) * 3) };
        let batch = build_batch(0, base, &[&value[..], &value[..], &value[..]]);
        bytes_in += batch.len();
        if partition == 0 {
            bytes_p0 += batch.len();
        }
        let p = c.produce("m", partition, Bytes::from(batch), -1).expect("produce");
        assert_eq!((p.error_code, p.base_offset), (0, base));
    }
    let f = c.fetch("m", 0, 0, 1 << 20, 0).expect("fetch");
    assert_eq!(f.high_watermark, 150);
    // A standalone commit (no group membership), as admin tools do.
    let mut req = OffsetCommitRequest::default();
    req.group_id = GroupId(StrBytes::from_static_str("mg"));
    req.generation_id_or_member_epoch = -1;
    let mut t = OffsetCommitRequestTopic::default();
    t.name = TopicName(StrBytes::from_static_str("m"));
    let mut p = OffsetCommitRequestPartition::default();
    p.partition_index = 0;
    p.committed_offset = 30;
    t.partitions.push(p);
    req.topics.push(t);
    let r = c.call(&req, 2).expect("offset commit");
    assert_eq!(r.topics[0].partitions[0].error_code, 0, "standalone commit refused");
    // One Produce frame of a version nobody speaks: refused, that connection closed.
    let mut bad = TcpStream::connect(broker.addr).expect("connect");
    bad.write_all(&[0, 0, 0, 12, 0, 0, 0, 99, 0, 0, 0, 7, 0, 0, 0, 0]).expect("write");
    let mut sink = [0u8; 16];
    let _ = bad.read(&mut sink);

    let (head, body) = http_get(metrics, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let (samples, types) = parse(&body);
    println!("{} samples in {} families", samples.len(), types.len());
    let l = listener.as_str();
    assert_eq!(get(&samples, "slipstream_requests_total", &[("listener", l), ("api", "Produce")]), 70.0);
    assert_eq!(get(&samples, "slipstream_requests_total", &[("listener", l), ("api", "CreateTopics")]), 2.0);
    assert_eq!(get(&samples, "slipstream_requests_total", &[("listener", l), ("api", "Fetch")]), 1.0);
    assert_eq!(get(&samples, "slipstream_requests_total", &[("listener", l), ("api", "OffsetCommit")]), 1.0);
    assert!(get(&samples, "slipstream_requests_total", &[("listener", l), ("api", "ApiVersions")]) >= 1.0);
    assert_eq!(get(&samples, "slipstream_request_failures_total", &[("listener", l), ("api", "Produce")]), 1.0);
    assert_eq!(get(&samples, "slipstream_request_failures_total", &[("listener", l), ("api", "CreateTopics")]), 0.0);
    let created_twice = [("listener", l), ("api", "CreateTopics"), ("error", "TOPIC_ALREADY_EXISTS")];
    assert_eq!(get(&samples, "slipstream_request_errors_total", &created_twice), 1.0);
    // Only error codes are counted: none for the 70 produces that succeeded.
    assert!(!samples.iter().any(|s| s.name == "slipstream_request_errors_total" && s.labels["api"] == "Produce"));
    // The histogram: cumulative buckets, +Inf equal to the count, a positive sum.
    assert_eq!(types["slipstream_request_duration_seconds"], "histogram");
    let produce_buckets: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == "slipstream_request_duration_seconds_bucket"
                && s.labels.get("api").map(String::as_str) == Some("Produce")
        })
        .collect();
    assert!(produce_buckets.windows(2).all(|w| w[0].value <= w[1].value), "buckets not cumulative");
    assert_eq!(produce_buckets.last().map(|s| s.labels["le"].as_str()), Some("+Inf"));
    assert_eq!(produce_buckets.last().map(|s| s.value), Some(70.0));
    assert_eq!(get(&samples, "slipstream_request_duration_seconds_count", &[("api", "Produce")]), 70.0);
    assert!(get(&samples, "slipstream_request_duration_seconds_sum", &[("api", "Produce")]) > 0.0);
    // Partitions, topic bytes, group lag.
    assert_eq!(get(&samples, "slipstream_partition_high_watermark", &[("topic", "m"), ("partition", "0")]), 150.0);
    assert_eq!(get(&samples, "slipstream_partition_high_watermark", &[("topic", "m"), ("partition", "1")]), 60.0);
    assert_eq!(get(&samples, "slipstream_partition_log_start_offset", &[("topic", "m"), ("partition", "0")]), 0.0);
    assert_eq!(get(&samples, "slipstream_topic_bytes_in_total", &[("topic", "m")]), bytes_in as f64);
    // What the one fetch read (up to the end of partition 0's first 64 KiB segment).
    assert!(!f.records.is_empty() && f.records.len() <= bytes_p0);
    assert_eq!(get(&samples, "slipstream_topic_bytes_out_total", &[("topic", "m")]), f.records.len() as f64);
    assert!(get(&samples, "slipstream_partition_log_size_bytes", &[("topic", "m"), ("partition", "0")]) >= 150_000.0);
    assert_eq!(get(&samples, "slipstream_group_lag", &[("group", "mg"), ("topic", "m"), ("partition", "0")]), 120.0);
    // The log: a flush per acknowledged produce (`--flush always`), rolls past 64 KiB.
    assert!(get(&samples, "slipstream_log_flushes_total", &[]) >= 70.0);
    assert!(get(&samples, "slipstream_log_segment_rolls_total", &[]) >= 2.0, "150 KiB into 64 KiB segments");
    assert_eq!(get(&samples, "slipstream_log_retention_deleted_segments_total", &[]), 0.0);
    assert!(get(&samples, "slipstream_data_dir_free_bytes", &[]) > 0.0);
    // Connections: this client's is open; copies: produced bytes copied once, into the log.
    assert!(get(&samples, "slipstream_connections_open", &[]) >= 1.0);
    assert!(get(&samples, "slipstream_connections_accepted_total", &[]) >= 2.0);
    assert_eq!(get(&samples, "slipstream_connections_closed_bad_input_total", &[]), 1.0);
    assert!(get(&samples, "slipstream_copied_bytes_total", &[("path", "produce_into_log")]) > 0.0);
    assert!(get(&samples, "slipstream_zero_copy_bytes_total", &[("path", "fetch_by_reference")]) > 0.0);
    assert_eq!(get(&samples, "slipstream_copied_bytes_total", &[("path", "fetch_out")]), 0.0);
    assert_eq!(get(&samples, "slipstream_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);

    let (head, _) = http_get(metrics, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // The Grafana dashboard asks only for what the endpoint serves.
    let dashboard =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/slipstream.json"))
            .expect("docs/grafana/slipstream.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut asked = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("slipstream_") {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
                assert!(
                    types.contains_key(&name) || types.contains_key(family),
                    "the dashboard asks for {name}, not served"
                );
                asked += 1;
                rest = &rest[i + name.len()..];
            }
        }
    }
    assert!(asked >= 15, "{asked} metric references in the dashboard");
}

/// RocketMQ remoting (broker and name server) and RocketMQ 5 gRPC listeners: requests by
/// request code and rpc, failures, response and status codes other than success.
#[test]
fn rocketmq_requests_are_counted_per_listener() {
    use crate::rocketmq::{call, heartbeat, request};
    use slipstream::protocol::rocketmq::grpc::pb;
    use slipstream::protocol::rocketmq::grpc::pb::messaging_service_client::MessagingServiceClient;

    let a = crate::harness::free_addrs(5);
    let (rmq, ns, grpc, metrics) = (a[1], a[2], a[3], a[4]);
    let (l1, l2, l3) =
        (format!("rocketmq://{rmq}"), format!("rocketmq-namesrv://{ns}"), format!("rocketmq-grpc://{grpc}"));
    let m = metrics.to_string();
    let args = ["--listen", &l1, "--listen", &l2, "--listen", &l3, "--metrics-listen", &m];
    let broker = BrokerProc::start_at(a[0], &args, crate::harness::serves_api_versions);
    let mut c = Client::connect(broker.addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(c.create_topic("r", 2).expect("create"), 0);

    // Remoting, on the broker listener: two successes, a missing topic, a code nobody
    // serves, a heartbeat (answered before its connection's watch begins), a bad frame.
    let mut s = TcpStream::connect(rmq).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    for (opaque, topic) in [(1, "r"), (2, "r"), (3, "nope")] {
        let r = call(&mut s, &request(30, opaque, &[("topic", topic), ("queueId", "0")]));
        assert_eq!(r.code, if topic == "r" { 0 } else { 17 }, "GET_MAX_OFFSET {topic}: {:?}", r.remark);
    }
    assert_eq!(call(&mut s, &request(9999, 4, &[])).code, 3, "REQUEST_CODE_NOT_SUPPORTED");
    assert_eq!(call(&mut s, &heartbeat("metrics-client", "mg", "CLUSTERING", 5)).code, 0);
    let mut bad = TcpStream::connect(rmq).expect("connect");
    // A binary header (GET_MAX_OFFSET first) claiming more bytes than the frame has.
    bad.write_all(&[0, 0, 0, 8, 1, 0, 0, 50, 0, 30, 0, 0]).expect("write");
    let _ = bad.read(&mut [0u8; 16]);
    // The name server: a route.
    let mut n = TcpStream::connect(ns).expect("connect");
    n.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    assert_eq!(call(&mut n, &request(105, 1, &[("topic", "r")])).code, 0, "GET_ROUTEINFO_BY_TOPIC");

    // gRPC: a route, an illegal topic name, and a call without a client id (refused by a
    // gRPC status before any handler answers).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect");
        let mut g = MessagingServiceClient::new(channel);
        let route = |name: &str| {
            let topic = Some(pb::Resource { resource_namespace: String::new(), name: name.to_string() });
            tonic::Request::new(pb::QueryRouteRequest { topic, endpoints: None })
        };
        let ok = g.query_route(route("r")).await.expect("route").into_inner();
        assert_eq!(ok.status.map(|s| s.code), Some(pb::Code::Ok as i32));
        let bad = g.query_route(route("no such/name")).await.expect("route").into_inner();
        assert_eq!(bad.status.map(|s| s.code), Some(pb::Code::IllegalTopic as i32));
        let refused = g.heartbeat(tonic::Request::new(pb::HeartbeatRequest::default())).await;
        assert_eq!(refused.expect_err("no client id").code(), tonic::Code::InvalidArgument);
    });

    let (_, body) = http_get(metrics, "/metrics");
    let (samples, _) = parse(&body);
    let (lr, ln, lg) = (l1.as_str(), l2.as_str(), l3.as_str());
    let count = |name: &str, labels: &[(&str, &str)]| get(&samples, name, labels);
    assert_eq!(count("slipstream_requests_total", &[("listener", lr), ("api", "GET_MAX_OFFSET")]), 3.0);
    assert_eq!(count("slipstream_requests_total", &[("listener", lr), ("api", "HEART_BEAT")]), 1.0);
    assert_eq!(count("slipstream_requests_total", &[("listener", lr), ("api", "unknown")]), 1.0);
    let missing = [("listener", lr), ("api", "GET_MAX_OFFSET"), ("error", "TOPIC_NOT_EXIST")];
    assert_eq!(count("slipstream_request_errors_total", &missing), 1.0);
    let unserved = [("listener", lr), ("api", "unknown"), ("error", "REQUEST_CODE_NOT_SUPPORTED")];
    assert_eq!(count("slipstream_request_errors_total", &unserved), 1.0);
    assert_eq!(count("slipstream_request_failures_total", &[("listener", lr), ("api", "GET_MAX_OFFSET")]), 1.0);
    assert_eq!(count("slipstream_request_duration_seconds_count", &[("listener", lr), ("api", "GET_MAX_OFFSET")]), 3.0);
    assert_eq!(count("slipstream_requests_total", &[("listener", ln), ("api", "GET_ROUTEINFO_BY_TOPIC")]), 1.0);
    assert_eq!(count("slipstream_requests_total", &[("listener", lg), ("api", "QueryRoute")]), 2.0);
    let illegal = [("listener", lg), ("api", "QueryRoute"), ("error", "ILLEGAL_TOPIC")];
    assert_eq!(count("slipstream_request_errors_total", &illegal), 1.0);
    assert_eq!(count("slipstream_request_failures_total", &[("listener", lg), ("api", "Heartbeat")]), 1.0);
    assert_eq!(count("slipstream_request_duration_seconds_count", &[("listener", lg), ("api", "QueryRoute")]), 2.0);
}
