//! Security on the broker's own listeners: TLS and mutual TLS, SASL PLAIN and SCRAM with
//! stock clients, the SCRAM admin APIs and `slipstream users`, refusals, certificate reload.

use crate::harness::{
    api_versions_over, flags, free_addrs, issue, make_certs, pem_der, run_client, tls_connect, BrokerProc,
};
use bytes::{BufMut, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A broker with a plaintext listener (for readiness) and one of each secured kind.
struct Secured {
    broker: BrokerProc,
    dir: tempfile::TempDir,
    sasl_ssl: SocketAddr,
    sasl_plaintext: SocketAddr,
    ssl: SocketAddr,
}

const USER: &str = "alice";
const PASSWORD: &str = "alice-secret";

impl Secured {
    fn start(transport: &[&str]) -> Secured {
        Self::start_with_users(transport, &[])
    }

    /// With users besides alice, made by `slipstream users` before the broker starts.
    fn start_with_users(transport: &[&str], more: &[(&str, &str)]) -> Secured {
        let dir = tempfile::tempdir().expect("tempdir");
        make_certs(dir.path());
        let data = dir.path().join("data");
        for (user, password) in [(USER, PASSWORD)].iter().chain(more) {
            users(&data, &["add", user, "--password", password]);
        }
        let a = free_addrs(4);
        let (sasl_ssl, sasl_plaintext, ssl) = (a[1], a[2], a[3]);
        let f = |n: &str| dir.path().join(n).to_string_lossy().to_string();
        let listeners = [
            format!("SASL_SSL://{sasl_ssl}"),
            format!("SASL_PLAINTEXT://{sasl_plaintext}"),
            format!("kafka://{ssl},security=SSL"),
        ];
        let (cert, key, ca) = (f("server.pem"), f("server.key"), f("ca.pem"));
        let base = [
            "--listen",
            &listeners[0],
            "--listen",
            &listeners[1],
            "--listen",
            &listeners[2],
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ];
        let broker = BrokerProc::start_with_data_at(a[0], data, &flags(&base, transport));
        Secured { broker, dir, sasl_ssl, sasl_plaintext, ssl }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().to_string()
    }

    /// The arguments both client suites take.
    fn suite_args(&self) -> Vec<String> {
        [
            ("--sasl-ssl", self.sasl_ssl.to_string()),
            ("--sasl-plaintext", self.sasl_plaintext.to_string()),
            ("--ssl", self.ssl.to_string()),
            ("--ca", self.path("ca.pem")),
            ("--cert", self.path("client.pem")),
            ("--key", self.path("client.key")),
            ("--user", USER.into()),
            ("--password", PASSWORD.into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    /// Waits for the broker's stats file to satisfy `ok`.
    fn stats_until(
        &self,
        what: &str,
        ok: impl Fn(&slipstream::metrics::Snapshot) -> bool,
    ) -> slipstream::metrics::Snapshot {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.broker.stats();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:?}\n{}", self.broker.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `slipstream users --data-dir DATA ARGS`, which must succeed.
fn users(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_slipstream"))
        .arg("users")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .expect("slipstream users");
    assert!(out.status.success(), "slipstream users {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

// Acceptance 1 of the security issue: confluent-kafka, kafka-python and kafkajs over
// SASL_SSL with SCRAM-SHA-512 and with PLAIN, SASL_PLAINTEXT with SCRAM-SHA-256, and
// mutual TLS; wrong passwords and unknown users refused. On every transport.
per_transport!(stock_clients_over_sasl_and_mutual_tls, |t: &[&str]| {
    let s = Secured::start(t);
    let args = s.suite_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let timeout = Duration::from_secs(300);
    run_client("python3", &[&["security_suite.py", "--client", "confluent"][..], &args].concat(), timeout);
    run_client("python3", &[&["security_suite.py", "--client", "kafka-python"][..], &args].concat(), timeout);
    run_client("node", &[&["security_suite.js"][..], &args].concat(), timeout);
    // Each client was refused twice at least (a wrong password, an unknown user), each
    // refusal logged with the peer; TLS took its copy of fetched bytes, no other path did.
    let stats = s.stats_until("refusals and TLS copies counted", |st| {
        st.connections_refused >= 6 && st.tls_record_bytes_copied > 0
    });
    assert_eq!(stats.fetch_bytes_copied, 0, "a copy on the plain fetch path");
    let log = s.broker.log_text();
    assert!(log.contains("closing connection: refused peer=127.0.0.1:"), "{log}");
    assert!(log.contains("SCRAM-SHA-512 authentication failed: invalid credentials"), "{log}");
    assert!(log.contains("PLAIN authentication failed: invalid credentials"), "{log}");
    assert!(!log.contains(&format!("{PASSWORD}x")), "a password reached the log");
});

/// Writes one request frame.
fn send<R: Encodable + HeaderVersion>(s: &mut impl Write, key: ApiKey, version: i16, correlation: i32, body: &R) {
    let mut h = RequestHeader::default();
    h.request_api_key = key as i16;
    h.request_api_version = version;
    h.correlation_id = correlation;
    h.client_id = Some(StrBytes::from_static_str("security-test"));
    let mut b = BytesMut::new();
    h.encode(&mut b, R::header_version(version)).expect("header");
    body.encode(&mut b, version).expect("body");
    let mut frame = BytesMut::new();
    frame.put_u32(b.len() as u32);
    frame.extend_from_slice(&b);
    s.write_all(&frame).expect("send");
}

/// Reads one answer frame (without its length), or `None` if the broker closed.
fn answer(s: &mut impl Read) -> Option<BytesMut> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(BytesMut::from(&body[..]))
}

/// An answer decoded as `R` (after its header).
fn decode<R: Decodable>(mut frame: BytesMut, key: ApiKey, version: i16) -> R {
    ResponseHeader::decode(&mut frame, key.response_header_version(version)).expect("response header");
    R::decode(&mut frame, version).expect("response")
}

/// Whether the broker closed `s` (reads EOF or a reset within a few seconds).
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// Whether the broker answered plaintext on a TLS port with at most a TLS alert, then
/// closed.
fn refused_as_tls(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut got = Vec::new();
    let closed = s.read_to_end(&mut got).is_ok() || got.is_empty();
    closed && got.len() < 16 && got.first().is_none_or(|b| *b == 21)
}

fn handshake(s: &mut TcpStream, version: i16, mechanism: &str) -> SaslHandshakeResponse {
    let mut r = SaslHandshakeRequest::default();
    r.mechanism = StrBytes::from_string(mechanism.into());
    send(s, ApiKey::SaslHandshake, version, 1, &r);
    decode(answer(s).expect("handshake answer"), ApiKey::SaslHandshake, version)
}

fn plain_token(user: &str, password: &str) -> Vec<u8> {
    [b"\0", user.as_bytes(), b"\0", password.as_bytes()].concat()
}

/// Each way a client can get authentication wrong gets Kafka's error and a closed
/// connection, logged with the peer, while a producer on another connection carries on;
/// SaslHandshake v0 (bare tokens) and a plaintext client on a TLS port are handled too.
#[test]
fn refusals_are_kafka_errors_and_cost_others_nothing() {
    let s = Secured::start(&[]);
    let sp = s.sasl_plaintext;
    let connect = || TcpStream::connect(sp).expect("connect");
    // A producer on the plaintext listener, running throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (addr, stop) = (s.broker.addr, stop.clone());
        std::thread::spawn(move || {
            let mut c = slipstream::client::Client::connect(addr, Duration::from_secs(5)).expect("client");
            assert_eq!(c.create_topic("steady", 1).expect("create"), 0);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = bytes::Bytes::from(slipstream::log::batch::build_batch(0, 1, &[b"steady"]));
                let p = c.produce("steady", 0, batch, -1).expect("produce while others are refused");
                assert_eq!(p.error_code, 0);
                n += 1;
            }
            n
        })
    };

    // 1. A request before authentication: closed, logged.
    let mut c = connect();
    send(&mut c, ApiKey::Metadata, 12, 1, &MetadataRequest::default());
    assert!(answer(&mut c).is_none() && closed(&mut c), "Metadata before authentication was answered");

    // 2. ApiVersions is allowed first; a mechanism not offered: UNSUPPORTED_SASL_MECHANISM
    // with the list, then closed.
    let mut c = connect();
    send(&mut c, ApiKey::ApiVersions, 3, 1, &ApiVersionsRequest::default());
    let v: ApiVersionsResponse = decode(answer(&mut c).expect("ApiVersions"), ApiKey::ApiVersions, 3);
    assert!(v.api_keys.iter().any(|k| k.api_key == ApiKey::SaslAuthenticate as i16 && k.max_version == 2));
    let h = handshake(&mut c, 1, "GSSAPI");
    assert_eq!(h.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    let offered: Vec<&str> = h.mechanisms.iter().map(|m| m.as_str()).collect();
    assert_eq!(offered, ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]);
    assert!(closed(&mut c));

    // 3. A second handshake (a client flooding them): ILLEGAL_SASL_STATE, closed.
    let mut c = connect();
    assert_eq!(handshake(&mut c, 1, "PLAIN").error_code, 0);
    assert_eq!(handshake(&mut c, 1, "PLAIN").error_code, 34, "ILLEGAL_SASL_STATE");
    assert!(closed(&mut c));

    // 4. A wrong password: SASL_AUTHENTICATION_FAILED with Kafka's message, after the
    // failed-authentication delay (100 ms by default, as Kafka's), closed.
    let mut c = connect();
    assert_eq!(handshake(&mut c, 1, "PLAIN").error_code, 0);
    let mut a = SaslAuthenticateRequest::default();
    a.auth_bytes = plain_token(USER, "wrong").into();
    let sent = std::time::Instant::now();
    send(&mut c, ApiKey::SaslAuthenticate, 2, 2, &a);
    let r: SaslAuthenticateResponse = decode(answer(&mut c).expect("answer"), ApiKey::SaslAuthenticate, 2);
    assert!(sent.elapsed() >= Duration::from_millis(100), "refused after {:?}, before the delay", sent.elapsed());
    assert_eq!(r.error_code, 58, "SASL_AUTHENTICATION_FAILED");
    assert!(r.error_message.as_deref().is_some_and(|m| m.contains("invalid credentials")), "{r:?}");
    assert!(closed(&mut c));

    // 5. The right password (v1 authenticate), then requests are served; a handshake after
    // authentication is an error that keeps the connection, as in Kafka.
    let mut c = connect();
    assert_eq!(handshake(&mut c, 1, "PLAIN").error_code, 0);
    a.auth_bytes = plain_token(USER, PASSWORD).into();
    send(&mut c, ApiKey::SaslAuthenticate, 1, 2, &a);
    let r: SaslAuthenticateResponse = decode(answer(&mut c).expect("answer"), ApiKey::SaslAuthenticate, 1);
    assert_eq!((r.error_code, r.session_lifetime_ms), (0, 0));
    send(&mut c, ApiKey::Metadata, 12, 3, &MetadataRequest::default());
    let m: MetadataResponse = decode(answer(&mut c).expect("metadata"), ApiKey::Metadata, 12);
    assert!(m.brokers.iter().any(|b| b.port == i32::from(sp.port())), "advertises the SASL listener itself");
    assert_eq!(handshake(&mut c, 1, "PLAIN").error_code, 34);
    send(&mut c, ApiKey::Metadata, 12, 4, &MetadataRequest::default());
    assert!(answer(&mut c).is_some(), "closed after a handshake out of turn");

    // 6. SaslHandshake v0: the exchange is bare length-prefixed tokens.
    let mut c = connect();
    assert_eq!(handshake(&mut c, 0, "PLAIN").error_code, 0);
    let token = plain_token(USER, PASSWORD);
    let mut frame = (token.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&token);
    c.write_all(&frame).expect("token");
    let reply = answer(&mut c).expect("a bare token back");
    assert!(reply.is_empty(), "PLAIN's answer is empty");
    send(&mut c, ApiKey::Metadata, 12, 5, &MetadataRequest::default());
    assert!(answer(&mut c).is_some(), "not served after a v0 exchange");
    let mut c = connect();
    assert_eq!(handshake(&mut c, 0, "PLAIN").error_code, 0);
    let token = plain_token(USER, "wrong");
    let mut frame = (token.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&token);
    c.write_all(&frame).expect("token");
    assert!(answer(&mut c).is_none_or(|t| t.is_empty()) && closed(&mut c), "a wrong v0 token was accepted");

    // 7. Plaintext Kafka to the TLS port: a TLS alert at most, closed, logged.
    let mut c = TcpStream::connect(s.ssl).expect("connect");
    send(&mut c, ApiKey::ApiVersions, 3, 1, &ApiVersionsRequest::default());
    assert!(refused_as_tls(&mut c), "plaintext answered on TLS");

    // 8. A TLS client without a certificate on the mutual-TLS listener: refused.
    let ca = s.dir.path().join("ca.pem");
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_, mut t) = tls_connect(s.ssl, &ca);
        api_versions_over(&mut t, 1);
    }));
    assert!(refused.is_err(), "served a TLS client without a certificate");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let produced = producer.join().expect("the producer carried on");
    assert!(produced > 0);
    let log = s.broker.log_text();
    for why in [
        "Metadata request before SASL authentication",
        "SASL mechanism 'GSSAPI' is not offered here",
        "a second SaslHandshake during authentication",
        "PLAIN authentication failed: invalid credentials",
        "TLS: ",
    ] {
        assert!(log.contains("closing connection") && log.contains(&format!("reason={why}")), "no {why:?}:\n{log}");
    }
    s.stats_until("refusals counted", |st| st.connections_refused >= 4);
}

/// Kafka's SCRAM admin APIs (confluent-kafka's AdminClient) and `slipstream users` manage
/// the same users; a running broker follows the command's changes.
#[test]
fn scram_credentials_through_the_admin_api_and_the_users_command() {
    let s = Secured::start(&[]);
    run_client(
        "python3",
        &["scram_admin.py", "--bootstrap", &s.sasl_plaintext.to_string(), "--user", USER, "--password", PASSWORD],
        Duration::from_secs(120),
    );
    let listed = users(&s.broker.data, &["list"]);
    assert!(listed.contains("bob\tSCRAM-SHA-256 (iterations 8192)"), "{listed}");
    // The command removes alice's SCRAM-SHA-512 credential: the broker follows within
    // seconds (SCRAM-SHA-512 refused, SCRAM-SHA-256 still fine).
    users(&s.broker.data, &["remove", USER, "--mechanism", "SCRAM-SHA-512"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.broker.log_text().contains("users reloaded") {
        assert!(Instant::now() < deadline, "the broker did not reload users:\n{}", s.broker.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    run_client(
        "python3",
        &[
            "scram_admin.py",
            "--bootstrap",
            &s.sasl_plaintext.to_string(),
            "--user",
            USER,
            "--password",
            PASSWORD,
            "--after-removal",
        ],
        Duration::from_secs(120),
    );
}

/// SIGHUP reloads the broker's certificate and key: new TLS connections get the new
/// certificate, an open one goes on, and files that do not load leave TLS as it was.
#[test]
fn broker_tls_certificates_reload_on_sighup() {
    let s = Secured::start(&[]);
    let d = s.dir.path();
    issue(d, "server2", "server.ext");
    let ca = d.join("ca.pem");
    let (first, mut open) = tls_connect(s.sasl_ssl, &ca);
    assert_eq!(first, pem_der(&d.join("server.pem")));
    api_versions_over(&mut open, 1);
    let hup = |expect: &str, n: usize| {
        let pid = s.broker.pid().expect("running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.broker.log_text().matches(expect).count() < n {
            assert!(Instant::now() < deadline, "no {expect:?} after SIGHUP:\n{}", s.broker.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    std::fs::copy(d.join("server2.pem"), d.join("server.pem")).expect("copy");
    std::fs::copy(d.join("server2.key"), d.join("server.key")).expect("copy");
    hup("TLS certificates reloaded", 1);
    let (second, mut again) = tls_connect(s.sasl_ssl, &ca);
    assert_eq!(second, pem_der(&d.join("server2.pem")), "a new connection after SIGHUP got the old certificate");
    api_versions_over(&mut again, 2);
    api_versions_over(&mut open, 3);
    std::fs::write(d.join("server.pem"), "not a certificate").expect("write");
    hup("TLS reload failed", 1);
    let (third, _) = tls_connect(s.sasl_ssl, &ca);
    assert_eq!(third, pem_der(&d.join("server2.pem")), "a failed reload changed the certificate");
}

// Acceptance 1's ACLs: per resource type (topic: produce; group: consume; cluster: topic
// creation) refused with Kafka's errors, then allowed once granted; a deny wins; the
// certificate's subject is the principal on the mutual-TLS listener. On tcp and uring.
per_transport!(acls_refuse_then_allow_per_resource_type, |t: &[&str]| {
    let flags = [&["--authorizer", "acl", "--super-users", "User:admin"][..], t].concat();
    let s = Secured::start_with_users(&flags, &[("admin", "admin-pw")]);
    run_client(
        "python3",
        &[
            "acl_suite.py",
            "--sasl-ssl",
            &s.sasl_ssl.to_string(),
            "--ssl",
            &s.ssl.to_string(),
            "--ca",
            &s.path("ca.pem"),
            "--cert",
            &s.path("client.pem"),
            "--key",
            &s.path("client.key"),
        ],
        Duration::from_secs(300),
    );
    let acls = std::fs::read_to_string(s.broker.data.join("acls.json")).expect("acls.json");
    assert!(acls.contains("User:CN=client"), "{acls}");
});

/// TLS on RocketMQ remoting listeners (the same layer under every protocol): the name
/// server and the broker role answer over TLS; plaintext to them is refused.
#[test]
fn rocketmq_remoting_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let f = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let a = free_addrs(3);
    let (l1, l2) = (format!("rocketmq://{},security=SSL", a[1]), format!("rocketmq-namesrv://{},security=SSL", a[2]));
    let (cert, key) = (f("server.pem"), f("server.key"));
    let args = ["--listen", &l1, "--listen", &l2, "--tls-cert", &cert, "--tls-key", &key];
    let broker = BrokerProc::start_at(a[0], &args, crate::harness::serves_api_versions);
    let ca = dir.path().join("ca.pem");
    let (_, mut ns) = tls_connect(a[2], &ca);
    let route = crate::rocketmq::call(&mut ns, &crate::rocketmq::request(105, 1, &[("topic", "TBW102")]));
    assert_eq!(route.code, 0, "GET_ROUTEINFO_BY_TOPIC over TLS: {route:?}");
    let body: serde_json::Value = serde_json::from_slice(&route.body).expect("route JSON");
    assert_eq!(body["brokerDatas"][0]["brokerAddrs"]["0"], serde_json::Value::String(a[1].to_string()));
    let (_, mut b) = tls_connect(a[1], &ca);
    assert_eq!(crate::rocketmq::call(&mut b, &crate::rocketmq::request(46, 2, &[])).code, 0, "CHECK_CLIENT_CONFIG");
    let mut plain = TcpStream::connect(a[1]).expect("connect");
    plain.write_all(&crate::rocketmq::request(46, 3, &[]).encode()).expect("write");
    assert!(refused_as_tls(&mut plain), "plaintext answered on a TLS remoting port");
    assert!(broker.log_text().contains("TLS: "), "{}", broker.log_tail());
}

/// TLS on the RocketMQ 5 gRPC listener: rocketmq-client-nodejs with `sslEnabled` sends and
/// receives through it; a plaintext gRPC client is refused.
#[test]
fn rocketmq_grpc_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let f = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let a = free_addrs(4);
    let grpc = format!("rocketmq-grpc://{},security=SSL", a[1]);
    let (rmq, ns) = (format!("rocketmq://{}", a[2]), format!("rocketmq-namesrv://{}", a[3]));
    let (cert, key) = (f("server.pem"), f("server.key"));
    let args = ["--listen", &grpc, "--listen", &rmq, "--listen", &ns, "--tls-cert", &cert, "--tls-key", &key];
    let broker = BrokerProc::start_at(a[0], &args, crate::harness::serves_api_versions);
    let endpoints = a[1].to_string();
    let ca = f("ca.pem");
    crate::harness::run_client_with_env(
        "node",
        &["grpc_suite.js", "--endpoints", &endpoints, "--phase", "tls", "--ssl", "true"],
        &[("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", &ca)],
        Duration::from_secs(300),
    );
    // A plaintext client: the TLS handshake fails on the broker's side, logged.
    let mut plain = TcpStream::connect(a[1]).expect("connect");
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("write");
    assert!(refused_as_tls(&mut plain), "plaintext HTTP/2 served on a TLS gRPC port");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.log_text().contains("rocketmq-grpc: closing connection: TLS") {
        assert!(Instant::now() < deadline, "no TLS refusal logged:\n{}", broker.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}
