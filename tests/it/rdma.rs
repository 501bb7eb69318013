//! The RDMA transport and the bridge, on a real RDMA device: soft-RoCE in the qemu VM that
//! `scripts/test.sh` starts through `scripts/softroce/run-in-vm.sh` (the host kernel has
//! no RDMA). They are `#[ignore]`d on the host and run in the VM with `--ignored`; without
//! a device (`RXE_IP` unset) they fail rather than pass vacuously.

use crate::harness::{free_port, phases_across_restart, run_client, serves_api_versions, BrokerProc};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use slipstream::transport::rdma::stream::{RdmaStream, StreamOptions};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NEEDS_RDMA: &str = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM";
const T: Duration = Duration::from_secs(30);

/// The soft-RoCE address the VM set up.
fn rdma_ip() -> String {
    std::env::var("RXE_IP").expect("RXE_IP is not set: run through scripts/softroce/run-in-vm.sh")
}

fn api_versions_frame(correlation_id: i32) -> Vec<u8> {
    let mut h = RequestHeader::default();
    h.request_api_key = ApiKey::ApiVersions as i16;
    h.request_api_version = 3;
    h.correlation_id = correlation_id;
    h.client_id = Some(StrBytes::from_static_str("rdma-test"));
    let mut body = BytesMut::new();
    h.encode(&mut body, ApiKey::ApiVersions.request_header_version(3)).expect("header");
    let mut req = ApiVersionsRequest::default();
    req.client_software_name = StrBytes::from_static_str("rdma-test");
    req.client_software_version = StrBytes::from_static_str("1");
    req.encode(&mut body, 3).expect("body");
    let mut frame = BytesMut::new();
    frame.put_u32(body.len() as u32);
    frame.extend_from_slice(&body);
    frame.to_vec()
}

/// One ApiVersions round trip over a fresh RDMA connection.
fn rdma_api_versions(addr: SocketAddr) -> bool {
    let opts = StreamOptions { connect_timeout: Duration::from_millis(500), ..StreamOptions::default() };
    let Ok(mut s) = RdmaStream::connect(addr, opts) else { return false };
    s.write_all(&api_versions_frame(1), Duration::from_secs(2)).is_ok() && s.read_frame(Duration::from_secs(5)).is_ok()
}

fn rdma_broker(extra: &[&str]) -> BrokerProc {
    let addr: SocketAddr = format!("{}:{}", rdma_ip(), free_port()).parse().expect("addr");
    let mut args = vec!["--transport", "rdma", "--segment-bytes", "16777216"];
    args.extend_from_slice(extra);
    BrokerProc::start_at(addr, &args, rdma_api_versions)
}

/// `slipstream bridge` in front of `upstream`, on a loopback TCP port.
struct Bridge {
    child: Child,
    addr: SocketAddr,
}

impl Bridge {
    fn start(upstream: SocketAddr) -> Bridge {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_slipstream"))
            .args(["bridge", "--listen", &addr.to_string(), "--upstream", &upstream.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn slipstream bridge");
        let started = Instant::now();
        while !serves_api_versions(addr) {
            assert!(started.elapsed() < T, "bridge did not serve");
            std::thread::sleep(Duration::from_millis(50));
        }
        Bridge { child, addr }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The verbs layer end to end: rdma_cm connection, the broker's grant, a SEND into its
/// shared receive queue, and a response RDMA-written into our landing ring.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn verbs_connection_carries_a_kafka_round_trip() {
    let _ = NEEDS_RDMA;
    // The latency mode: the core spins on its completion queue instead of sleeping.
    let broker = rdma_broker(&["--rdma-credits", "8", "--busy-poll", "true"]);
    let mut s = RdmaStream::connect(broker.addr, StreamOptions::default()).expect("connect over RDMA");
    assert_eq!(s.grant().credits, 8, "the broker's grant");
    // More requests than credits, pipelined: credits must come back for this to finish.
    let frames: Vec<u8> = (0..40).flat_map(api_versions_frame).collect();
    s.write_all(&frames, T).expect("send requests");
    for i in 0..40 {
        let frame = s.read_frame(T).expect("response");
        let mut b = Bytes::from(frame);
        let h = ResponseHeader::decode(&mut b, 0).expect("header");
        assert_eq!(h.correlation_id, i, "responses in order");
        let r = ApiVersionsResponse::decode(&mut b, 3).expect("body");
        assert_eq!(r.error_code, 0);
        assert!(r.api_keys.iter().any(|k| k.api_key == ApiKey::Produce as i16));
    }
}

/// Queue pairs and memory regions the kernel holds for process `pid` (`rdma resource`,
/// which names the creating thread).
fn rdma_resources(pid: u32) -> (usize, usize) {
    let tids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the broker's threads")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let count = |kind: &str| {
        let out = Command::new("rdma").args(["-j", "resource", "show", kind]).output().expect("run rdma(8)");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        v.as_array().map_or(0, |a| a.iter().filter(|r| r["pid"].as_u64().is_some_and(|p| tids.contains(&p))).count())
    };
    (count("qp"), count("mr"))
}

/// The RAII layer under churn: 30 connections opened, used and dropped, then a bridge with
/// open connections SIGKILLed, leave no queue pair or memory region behind in the broker.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn connection_churn_leaves_no_verbs_objects_behind() {
    let broker = rdma_broker(&[]);
    let pid = broker.pid().expect("running");
    let baseline = rdma_resources(pid);
    for i in 0..30 {
        let mut s = RdmaStream::connect(broker.addr, StreamOptions::default()).expect("connect");
        s.write_all(&api_versions_frame(i), T).expect("request");
        s.read_frame(T).expect("response");
        if i == 0 {
            let (qps, mrs) = rdma_resources(pid);
            assert!(
                qps > baseline.0 && mrs > baseline.1,
                "a connection shows no QP/MR: {baseline:?} -> {:?}",
                (qps, mrs)
            );
        }
    }
    let back_to_baseline = |what: &str| {
        let deadline = Instant::now() + T;
        loop {
            let now = rdma_resources(pid);
            if now == baseline {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: verbs objects left behind: {baseline:?} before, {now:?} after");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    back_to_baseline("after 30 closed connections");
    // A peer process that dies without a goodbye: the kernel tears its queue pairs down and
    // the broker must notice and release its side.
    let mut bridge = Bridge::start(broker.addr);
    let clients: Vec<std::net::TcpStream> =
        (0..3).map(|_| std::net::TcpStream::connect(bridge.addr).expect("connect to the bridge")).collect();
    let deadline = Instant::now() + T;
    while rdma_resources(pid).0 < baseline.0 + 3 {
        assert!(Instant::now() < deadline, "the bridge's connections did not reach the broker");
        std::thread::sleep(Duration::from_millis(100));
    }
    bridge.child.kill().expect("SIGKILL the bridge");
    let _ = bridge.child.wait();
    back_to_baseline("after the bridge was SIGKILLed");
    drop(clients);
    assert!(rdma_api_versions(broker.addr), "broker stopped serving");
}

/// Acceptance 1: confluent-kafka through the bridge, across a broker restart, and its
/// AdminClient, with every fetched payload byte written by one-sided RDMA from the
/// registered log.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn confluent_kafka_through_the_bridge() {
    // Two cores: connections land on either, partitions are split between them.
    let mut broker = rdma_broker(&["--default-partitions", "3", "--cores", "2"]);
    let bridge = Bridge::start(broker.addr);
    let bootstrap = bridge.addr.to_string();
    let timeout = Duration::from_secs(900);
    phases_across_restart(&mut broker, "python3", &["confluent_suite.py", "--bootstrap", &bootstrap], timeout);
    // The AdminClient too: DescribeCluster and FindCoordinator answers rewritten, acks=0.
    run_client("python3", &["admin_suite.py", "--bootstrap", &bootstrap], timeout);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    let s = broker.stats();
    println!("counters after phase 2: {s:?}");
    assert!(s.fetch_bytes_zero_copy > 0, "nothing fetched by reference: {s:?}");
    assert_eq!(s.fetch_bytes_copied, 0, "fetch payload copied by the CPU: {s:?}");
    assert!(
        s.rdma_log_bytes_written >= s.fetch_bytes_zero_copy,
        "fetch payloads did not all leave by one-sided RDMA from the log: {s:?}"
    );
    assert_eq!(s.produce_bytes_copied, s.produce_payload_bytes, "produce payload copied more than once: {s:?}");
}

/// `slipstream sidecar --transport rdma` in front of a TCP broker, with a bridge in front of
/// it: clients and broker unchanged, RDMA between the hosts' sidecars.
struct RdmaSidecar {
    child: Child,
    addr: SocketAddr,
    stats: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl RdmaSidecar {
    fn start(upstream: SocketAddr) -> RdmaSidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("{}:{}", rdma_ip(), free_port()).parse().expect("addr");
        let stats = dir.path().join("stats.json");
        let log = std::fs::File::create(dir.path().join("sidecar.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_slipstream"))
            .args(["sidecar", "--transport", "rdma", "--listen", &addr.to_string()])
            .args(["--upstream", &upstream.to_string(), "--stats-file"])
            .arg(&stats)
            .env("RUST_LOG", std::env::var("SLIPSTREAM_SIDECAR_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slipstream sidecar");
        let started = Instant::now();
        while !rdma_api_versions(addr) {
            assert!(started.elapsed() < T, "the sidecar did not serve over RDMA");
            std::thread::sleep(Duration::from_millis(50));
        }
        RdmaSidecar { child, addr, stats, _dir: dir }
    }

    fn stats(&self) -> serde_json::Value {
        std::thread::sleep(Duration::from_millis(1200)); // written every second
        serde_json::from_str(&std::fs::read_to_string(&self.stats).expect("stats")).expect("stats parse")
    }
}

impl Drop for RdmaSidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self._dir.path().join("sidecar.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("sidecar log (tail):\n{}", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
    }
}

/// The sidecar's acceptance over RDMA: confluent-kafka through bridge → RDMA → `sidecar
/// --transport rdma` → loopback TCP → `slipstream serve`, across a broker restart; the
/// AdminClient suite; later groups served from the sidecar's tail cache, whose blocks the
/// RDMA transport registers and writes from one-sided (no CPU copy of a cached byte).
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn confluent_kafka_through_the_bridge_and_the_sidecar() {
    // Small segments: the VM's disk is a tmpfs in its memory, and segments are allocated whole.
    let mut broker = BrokerProc::start(&["--default-partitions", "3", "--segment-bytes", "16777216"]);
    let side = RdmaSidecar::start(broker.addr);
    let bridge = Bridge::start(side.addr);
    let bootstrap = bridge.addr.to_string();
    let timeout = Duration::from_secs(900);
    phases_across_restart(&mut broker, "python3", &["confluent_suite.py", "--bootstrap", &bootstrap], timeout);
    run_client("python3", &["admin_suite.py", "--bootstrap", &bootstrap], timeout);
    let stats = side.stats.to_string_lossy().to_string();
    let fanout =
        ["sidecar_fanout.py", "--bootstrap", &bootstrap, "--stats", &stats, "--expect-local", "--phase", "fanout"];
    run_client("python3", &fanout, timeout);
    let s = side.stats();
    println!("sidecar counters: {s}");
    assert_eq!(s["fetch_bytes_copied"], 0, "{s}");
    let local = s["fetch_local_bytes"].as_u64().unwrap_or(0);
    assert!(local > 0, "nothing served from the cache: {s}");
    assert!(
        s["rdma_log_bytes_written"].as_u64().unwrap_or(0) >= local,
        "cached records did not all leave by one-sided RDMA from the cache's blocks: {s}"
    );
}

/// A produce with acks=0 gets no response, so the bridge must not wait for one: the
/// responses after it still reach their requests, and a Metadata answer after it is still
/// rewritten to name the bridge.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn acks_zero_produce_through_the_bridge_keeps_responses_matched() {
    use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
    use slipstream::client::Client;
    use slipstream::log::batch::build_batch;
    let broker = rdma_broker(&[]);
    let bridge = Bridge::start(broker.addr);
    let mut c = Client::connect(bridge.addr, T).expect("connect through the bridge");
    assert_eq!(c.create_topic("fire-and-forget", 1).expect("create topic"), 0);
    // More than the connection's 16 credits: with no responses to carry them, credits
    // must come back on their own.
    for i in 0..40u8 {
        c.produce_no_ack("fire-and-forget", 0, Bytes::from(build_batch(0, 0, &[&[i; 16]]))).expect("acks=0 produce");
    }
    for version in [1i16, 9, 12] {
        let m: MetadataResponse = c.call(&MetadataRequest::default(), version).expect("metadata after acks=0");
        let named: Vec<(String, i32)> = m.brokers.iter().map(|b| (b.host.to_string(), b.port)).collect();
        assert_eq!(
            named,
            vec![(bridge.addr.ip().to_string(), i32::from(bridge.addr.port()))],
            "Metadata v{version} after acks=0 produces does not name the bridge"
        );
    }
    let p = c.produce("fire-and-forget", 0, Bytes::from(build_batch(0, 0, &[b"acked"])), -1).expect("acks=all");
    assert_eq!((p.error_code, p.base_offset), (0, 40), "the 40 acks=0 batches landed first");
}

/// A client that sends its requests and closes its sending side (as `nc -q` or a script
/// piping requests does) still reads every answer before the bridge closes.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn a_client_that_half_closes_gets_its_answers() {
    use std::io::{Read, Write};
    let broker = rdma_broker(&[]);
    let bridge = Bridge::start(broker.addr);
    let mut s = std::net::TcpStream::connect(bridge.addr).expect("connect to the bridge");
    s.set_read_timeout(Some(T)).expect("timeout");
    let frames: Vec<u8> = (0..3).flat_map(api_versions_frame).collect();
    s.write_all(&frames).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read until the bridge closes");
    let mut rest = &got[..];
    for i in 0..3 {
        assert!(rest.len() >= 8, "answer {i} missing: {} bytes left", rest.len());
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert_eq!(i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]), i, "answers in order");
        rest = &rest[4 + len..];
    }
    assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
}

/// Produces and fetches through the bridge with the native client until told to stop;
/// returns how many round trips succeeded.
fn good_client(bootstrap: SocketAddr, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> usize {
    use slipstream::client::Client;
    use slipstream::log::batch::build_batch;
    let mut c = Client::connect(bootstrap, T).expect("good client connects");
    assert_eq!(c.create_topic("steady", 1).expect("create topic"), 0);
    let mut ok = 0;
    let mut offset = 0i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let values: Vec<Vec<u8>> = (0..10).map(|i| format!("v{ok}-{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let batch = Bytes::from(build_batch(0, 0, &refs));
        let p = c.produce("steady", 0, batch.clone(), -1).expect("good client's produce");
        assert_eq!((p.error_code, p.base_offset), (0, offset), "produce answered");
        let f = c.fetch("steady", 0, offset, 1 << 20, 100).expect("good client's fetch");
        assert_eq!(f.error_code, 0);
        assert!(f.records.len() >= batch.len(), "fetched {} bytes", f.records.len());
        offset += 10;
        ok += 1;
    }
    ok
}

fn wait_closed(s: &mut RdmaStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let _ = s.progress();
        if let Some(why) = s.closed() {
            return why.to_string();
        }
        assert!(Instant::now() < deadline, "the broker did not disconnect the bad peer");
        let _ = s.wait(Some(Duration::from_millis(50)));
    }
}

/// Acceptance 2: malformed messages, a malformed or oversized Kafka frame, a peer that
/// ignores its credits and one that stops freeing its landing ring are each disconnected
/// alone, while a well-behaved client
/// carries on through the bridge.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn bad_rdma_peers_are_disconnected_alone() {
    let broker = rdma_broker(&["--rdma-stall-timeout-ms", "1000", "--max-request-bytes", "1048576"]);
    let bridge = Bridge::start(broker.addr);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = {
        let (addr, stop) = (bridge.addr, stop.clone());
        std::thread::spawn(move || good_client(addr, stop))
    };
    let connect = || RdmaStream::connect(broker.addr, StreamOptions::default()).expect("bad peer connects");

    // A message whose header disagrees with its length.
    let mut s = connect();
    assert!(s.send_raw(&[0, 0, 0, 0, 0, 0, 0, 99, 1, 2, 3]).expect("post"));
    println!("malformed message: {}", wait_closed(&mut s, T));

    // A Kafka frame larger than --max-request-bytes.
    let mut s = connect();
    s.write_all(&(64u32 << 20).to_be_bytes(), T).expect("send prefix");
    println!("oversized frame: {}", wait_closed(&mut s, T));

    // Garbage where a Kafka request header should be.
    let mut s = connect();
    let mut junk = 12u32.to_be_bytes().to_vec();
    junk.extend_from_slice(&[0x7f; 12]);
    s.write_all(&junk, T).expect("send junk");
    println!("garbage request: {}", wait_closed(&mut s, T));

    // A peer that ignores its credits: bursts of messages without waiting for any back.
    // The messages carry one byte each of a large (allowed) request, so nothing but the
    // credit check can end the connection.
    let mut s = connect();
    s.write_all(&900_000u32.to_be_bytes(), T).expect("send a frame prefix");
    s.misbehave.ignore_credits = true;
    let deadline = Instant::now() + T;
    while s.closed().is_none() && Instant::now() < deadline {
        for _ in 0..64 {
            let _ = s.write(&[0]);
        }
        let _ = s.progress();
        let _ = s.wait(Some(Duration::from_millis(20)));
    }
    println!("credits ignored: {}", wait_closed(&mut s, T));

    // A peer that never reports landing-ring space free: once its small ring is full,
    // the broker waits --rdma-stall-timeout-ms, then lets it go.
    let opts = StreamOptions { ring_len: 16 * 1024, ..StreamOptions::default() };
    let mut s = RdmaStream::connect(broker.addr, opts).expect("connect");
    s.misbehave.withhold_ring_credits = true;
    let frames: Vec<u8> = (0..200).flat_map(api_versions_frame).collect();
    let started = Instant::now();
    let _ = s.write_all(&frames, Duration::from_secs(5));
    println!("withheld ring credits: {}", wait_closed(&mut s, T));
    assert!(started.elapsed() >= Duration::from_millis(900), "disconnected before the stall timeout");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = good.join().expect("the good client failed while bad peers were cut off");
    assert!(rounds > 0, "the good client made no progress");
    // The broker counted each bad peer, and is still serving.
    assert!(rdma_api_versions(broker.addr), "broker stopped serving");
    let log = broker.log_text();
    assert!(log.contains("malformed message"), "no reason logged:\n{log}");
    assert!(log.contains("beyond its"), "no credit-overrun reason logged:\n{log}");
    assert!(log.contains("stopped freeing its landing ring"), "no stall reason logged:\n{log}");
}

/// Acceptance 3: `slipstream bench` drives a workload through the bridge — one started by
/// hand, and one the harness starts itself for `slipstream:rdma` — and reports it, labelled
/// functional by the harness because the machine's RDMA device is software.
#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs these in the soft-RoCE VM"]
fn bench_runs_through_the_bridge() {
    let broker = rdma_broker(&[]);
    let bridge = Bridge::start(broker.addr);
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_slipstream"))
        .args(["bench", "--client", "native", "--workload", "latency-128b", "--duration", "2", "--warmup", "0.5"])
        .args(["--target", &format!("rdma-bridge={}", bridge.addr)])
        // The harness's own mode: it starts `serve --transport rdma` and a bridge itself.
        .args(["--target", "slipstream:rdma"])
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("run slipstream bench");
    assert!(status.success(), "slipstream bench through the bridge failed");
    let text = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("results.json parses");
    // Labelled by the harness itself, from what it found on the machine (rxe0 is software).
    let notes = v["notes"].as_array().expect("notes");
    let rdma_label = format!("FUNCTIONAL ONLY for RDMA: {}", std::env::var("RXE_DEV").unwrap_or("rxe0".into()));
    assert!(
        notes.iter().any(|n| n.as_str().is_some_and(|n| n.starts_with(&rdma_label))),
        "not labelled functional: {notes:?}"
    );
    assert!(
        v["machine"]["rdma_devices"].as_array().is_some_and(|d| d.iter().any(|d| d["software"] == true)),
        "soft-RoCE device not recorded: {}",
        v["machine"]
    );
    let runs = v["workloads"][0]["targets"].as_array().expect("targets");
    let bridge_run = runs.iter().find(|t| t["name"] == "rdma-bridge").expect("the bridge target");
    println!("{bridge_run}");
    assert!(bridge_run["messages_sent"].as_u64().unwrap_or(0) > 0, "nothing went through the bridge");
    assert!(bridge_run["throughput_msgs_per_s"].as_f64().unwrap_or(0.0) > 0.0, "no throughput figure");
    assert!(bridge_run["publish"]["count"].as_u64().unwrap_or(0) > 0, "no latency figures");
    let own = runs.iter().find(|t| t["name"] == "slipstream rdma").expect("the slipstream:rdma target");
    assert!(own["messages_sent"].as_u64().unwrap_or(0) > 0, "nothing went through the harness's bridge");
    assert!(own["broker_cpu_s"].as_f64().is_some(), "no broker CPU figure for the harness's rdma broker");
}
