//! Acceptance 4: bad input costs only its sender. A well-behaved client produces and
//! fetches throughout; other connections send garbage, truncated frames, a 2 GiB length
//! prefix, a bad-CRC batch, unknown APIs and hostile array counts.

use crate::harness::BrokerProc;
use bytes::Bytes;
use kafka_protocol::messages::ApiVersionsRequest;
use slipstream::client::Client;
use slipstream::log::batch::build_batch;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// True if the broker closed the connection (EOF or reset) within a few seconds.
fn closed_by_broker(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an error response may come first
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}

fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write");
    s
}

/// A request frame: header v1 (api, version, correlation, client id "x") + body.
fn frame(api: i16, version: i16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&api.to_be_bytes());
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(&7i32.to_be_bytes());
    f.extend_from_slice(&1i16.to_be_bytes());
    f.push(b'x');
    f.extend_from_slice(body);
    let mut out = (f.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&f);
    out
}

per_transport!(bad_input_costs_only_the_sender, bad_input_costs_only_the_sender, ustack);

fn bad_input_costs_only_the_sender(transport: &[&str]) {
    let broker = BrokerProc::start(transport);
    let addr = broker.addr;
    let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(c.create_topic("good", 1).expect("create"), 0);
    assert_eq!(c.create_topic("victim", 1).expect("create"), 0);
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) || n < 200 {
                let v = format!("good-{n}");
                let p =
                    c.produce("good", 0, Bytes::from(build_batch(0, n, &[v.as_bytes()])), -1).expect("good produce");
                assert_eq!((p.error_code, p.base_offset), (0, n), "good client's produce disturbed");
                let f = c.fetch("good", 0, n, 1 << 20, 0).expect("good fetch");
                assert_eq!(f.error_code, 0);
                assert!(
                    f.records.windows(v.len()).any(|w| w == v.as_bytes()),
                    "good client's record {n} not read back"
                );
                n += 1;
            }
            n
        })
    };

    // 1. Garbage in a plausible frame (a garbage length prefix that is in range just
    //    waits for its bytes, as Kafka does; out-of-range prefixes are tested below).
    let mut junk = 4092u32.to_be_bytes().to_vec();
    junk.extend((0..4092u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8));
    assert!(closed_by_broker(&mut raw(addr, &junk)), "garbage: connection left open");
    // 2. A 2 GiB length prefix.
    assert!(closed_by_broker(&mut raw(addr, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0])), "2 GiB prefix: left open");
    // 3. A negative length prefix.
    assert!(closed_by_broker(&mut raw(addr, &[0xff, 0xff, 0xff, 0xfe])), "negative prefix: left open");
    // 4. A truncated frame, then the sender goes away.
    drop(raw(addr, &frame(18, 0, &[])[..7]));
    // 5. A frame too short for a header.
    assert!(closed_by_broker(&mut raw(addr, &[0, 0, 0, 3, 0, 18, 0])), "short frame: left open");
    // 6. Unknown API key; unsupported version of a known one.
    assert!(closed_by_broker(&mut raw(addr, &frame(999, 0, &[]))), "unknown api: left open");
    assert!(closed_by_broker(&mut raw(addr, &frame(0, 99, &[]))), "produce v99: left open");
    // 7. Malformed body: a produce v3 whose topic array claims 2^31-1 entries in 4 bytes
    //    (a decoder that reserved from that count would abort the whole process).
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i16).to_be_bytes()); // transactional id: null
    body.extend_from_slice(&(-1i16).to_be_bytes()); // acks
    body.extend_from_slice(&1000i32.to_be_bytes()); // timeout
    body.extend_from_slice(&i32::MAX.to_be_bytes()); // topic count
    assert!(closed_by_broker(&mut raw(addr, &frame(0, 3, &body))), "hostile array count: left open");
    // 8. ApiVersions from the future gets UNSUPPORTED_VERSION (v0 body), not a close.
    {
        let mut s = raw(addr, &frame(18, 99, &[]));
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut len = [0u8; 4];
        s.read_exact(&mut len).expect("ApiVersions answer");
        let mut resp = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut resp).expect("ApiVersions body");
        assert_eq!(i32::from_be_bytes([resp[0], resp[1], resp[2], resp[3]]), 7, "correlation id");
        assert_eq!(i16::from_be_bytes([resp[4], resp[5]]), 35, "UNSUPPORTED_VERSION");
    }
    // 9. A batch with a bad CRC: CORRUPT_MESSAGE, nothing stored, connection still usable.
    {
        let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
        let mut bad = build_batch(0, 1, &[b"tampered"]);
        let n = bad.len();
        bad[n - 3] ^= 0x55;
        let p = c.produce("victim", 0, Bytes::from(bad), -1).expect("answer");
        assert_eq!(p.error_code, 2, "bad CRC must be CORRUPT_MESSAGE");
        let p = c.produce("victim", 0, Bytes::from(build_batch(0, 1, &[b"fine"])), -1).expect("answer");
        assert_eq!((p.error_code, p.base_offset), (0, 0), "the bad batch took an offset");
        let _ = c.call(&ApiVersionsRequest::default(), 3).expect("connection still serves");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = good.join().expect("the well-behaved client failed");
    println!("well-behaved client completed {rounds} produce+fetch rounds during the abuse");
    let mut broker = broker;
    assert!(broker.is_running(), "broker died:\n{}", broker.log_tail());
    let log = broker.log_text();
    assert!(log.contains("closing connection: bad input peer="), "no logged reason for the closes:\n{log}");
    assert!(log.contains(" reason="), "no logged reason for the closes:\n{log}");
    assert!(broker.terminate().success());
    assert!(broker.stats().connections_closed_bad_input >= 7, "{:?}", broker.stats());
}

per_transport!(
    idle_connection_holding_half_a_request_is_closed,
    idle_connection_holding_half_a_request_is_closed,
    ustack
);

/// `--connections-max-idle-ms`: a peer that sends half a request and goes quiet (a
/// slow-loris) is closed once idle, while a client that keeps talking — and a parked long
/// poll — stay connected.
fn idle_connection_holding_half_a_request_is_closed(transport: &[&str]) {
    let broker = BrokerProc::start(&crate::harness::flags(&["--connections-max-idle-ms", "700"], transport));
    let addr = broker.addr;
    let mut half = raw(addr, &frame(18, 3, &[])[..9]);
    let started = Instant::now();
    let mut talker = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(talker.create_topic("idle", 1).expect("create"), 0);
    let mut long_poll = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    // A fetch parked for 3 s (longer than the idle limit) is work in flight, not idleness.
    let parked = std::thread::spawn(move || long_poll.fetch("idle", 0, 0, 1 << 20, 3000).map(|f| f.error_code));
    while started.elapsed() < Duration::from_secs(3) {
        talker.call(&ApiVersionsRequest::default(), 0).expect("an active client is never idle");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed_by_broker(&mut half), "the half-request connection was not closed");
    assert!(started.elapsed() < Duration::from_secs(9), "closed too late");
    assert_eq!(parked.join().expect("long poll").expect("a parked fetch is not idle"), 0);
    talker.call(&ApiVersionsRequest::default(), 0).expect("still served");
    assert!(broker.log_text().contains("connections-max-idle-ms"), "no reason logged");
}

per_transport!(a_peer_that_stops_reading_is_closed_once_idle, a_peer_that_stops_reading_is_closed_once_idle, ustack);

/// A peer that asks for far more than the socket buffers hold and then never reads is
/// idle as Kafka counts it (no bytes move either way): it is closed after
/// `--connections-max-idle-ms`, dropping the answers it left, while others are served.
fn a_peer_that_stops_reading_is_closed_once_idle(transport: &[&str]) {
    let broker = BrokerProc::start(&crate::harness::flags(&["--connections-max-idle-ms", "700"], transport));
    let addr = broker.addr;
    let mut writer = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(writer.create_topic("unread", 1).expect("create"), 0);
    let value = vec![7u8; 512 * 1024];
    for _ in 0..8 {
        let batch = Bytes::from(build_batch(0, 0, &[&value, &value]));
        assert_eq!(writer.produce("unread", 0, batch, -1).expect("produce").error_code, 0);
    }
    // 8 MiB in the log; 40 fetches of all of it ask for 320 MiB of answers.
    let mut sink = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    for _ in 0..40 {
        sink.send_fetch("unread", 0, 0, 16 << 20, 0).expect("send a fetch");
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        writer.call(&ApiVersionsRequest::default(), 0).expect("an active client is served");
        std::thread::sleep(Duration::from_millis(200));
    }
    writer.call(&ApiVersionsRequest::default(), 0).expect("still served");
    let log = broker.log_text();
    assert!(log.contains("not reading"), "no reason logged:\n{log}");
    // All that reaches the peer now is what the socket buffers held when it was cut off,
    // then the end of the stream: the rest of its 320 MiB was dropped.
    let s = sink.stream();
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the peer that stopped reading was not closed ({total} bytes read)")
            }
            Err(_) => break, // reset: the broker closed with our requests unread
        }
    }
    assert!(total < 64 << 20, "{total} bytes arrived: the unsent answers were not dropped");
}
