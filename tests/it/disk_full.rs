//! A full disk costs writes, never the broker (issue 10): the data directory on a small
//! tmpfs of the test's own; a producer fills it while a consumer reads. Produces that
//! cannot be stored get KAFKA_STORAGE_ERROR, the consumer and metadata carry on, writes
//! resume by themselves once a topic holding the space is deleted, and a broker restarted
//! on a full disk serves every acknowledged message. Before segments were allocated ahead
//! of the writer, the broker died of SIGBUS here and could not start again.

use crate::harness::{flags, BrokerProc};
use bytes::Bytes;
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::{DeleteTopicsRequest, MetadataRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use slipstream::client::Client;
use slipstream::log::batch::{build_batch, for_each_value, split_checked};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KAFKA_STORAGE_ERROR: i16 = 56;
const SEGMENT: usize = 4 << 20;

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: usize) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "slipstream-disk-full"])
            .arg(dir.path())
            .status()
            .expect("run mount (the suite runs as root)");
        assert!(status.success(), "mounting a tmpfs failed (the suite runs as root)");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn connect(b: &BrokerProc) -> Client {
    Client::connect(b.addr, Duration::from_secs(5)).expect("connect")
}

/// Produces 64 KiB batches of one message to `topic` until the broker refuses one; returns
/// the acknowledged values.
fn produce_until_full(c: &mut Client, topic: &str, tag: &str, first_offset: i64) -> Vec<Vec<u8>> {
    let mut acked = Vec::new();
    for n in 0.. {
        let mut value = format!("{tag}-{n}-").into_bytes();
        value.resize(64 << 10, b'x');
        let p = c.produce(topic, 0, Bytes::from(build_batch(0, 0, &[&value])), -1).expect("produce");
        match p.error_code {
            0 => {
                assert_eq!(p.base_offset, first_offset + acked.len() as i64, "{topic}: offsets contiguous");
                acked.push(value);
            }
            KAFKA_STORAGE_ERROR => return acked,
            other => panic!("{topic}: produce answered {other}, not KAFKA_STORAGE_ERROR"),
        }
        assert!(n < 10_000, "{topic}: the disk never filled");
    }
    unreachable!()
}

/// Every value in `topic` partition 0, read from offset 0.
fn read_all(c: &mut Client, topic: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let f = c.fetch(topic, 0, out.len() as i64, 1 << 20, 0).expect("fetch");
        assert_eq!(f.error_code, 0, "fetch {topic}");
        if f.records.is_empty() {
            return out;
        }
        let before = out.len();
        let headers = split_checked(&f.records).expect("whole batches");
        let mut at = 0;
        for h in headers {
            let batch = &f.records[at..at + h.total_len()];
            at += h.total_len();
            if h.base_offset < out.len() as i64 {
                continue;
            }
            for_each_value(batch, &h, |v| out.push(v.to_vec()));
        }
        assert!(out.len() > before, "no progress reading {topic}");
    }
}

fn delete_topic(c: &mut Client, name: &str) {
    let mut req = DeleteTopicsRequest::default();
    let mut t = DeleteTopicState::default();
    t.name = Some(TopicName(StrBytes::from_string(name.to_string())));
    req.topics.push(t);
    req.timeout_ms = 5000;
    let r = c.call(&req, 6).expect("delete topics");
    assert_eq!(r.responses[0].error_code, 0, "delete {name}");
}

per_transport!(a_full_disk_costs_writes_never_the_broker, a_full_disk);

fn a_full_disk(transport: &[&str]) {
    let disk = Tmpfs::mount(40);
    let data: PathBuf = disk.path().join("data");
    let seg = SEGMENT.to_string();
    let base = ["--segment-bytes", seg.as_str(), "--flush", "always"];
    let mut broker = BrokerProc::start_with_data(data, &flags(&base, transport));
    let mut c = connect(&broker);
    assert_eq!(c.create_topic("t", 1).expect("create"), 0);
    assert_eq!(c.create_topic("filler", 1).expect("create"), 0);

    // A consumer reads `t` throughout, from its own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let stop = stop.clone();
        let addr = broker.addr;
        std::thread::spawn(move || {
            let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
            let mut next = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let f = c.fetch("t", 0, next, 1 << 20, 50).expect("consumer fetch");
                assert_eq!(f.error_code, 0, "the consumer's fetch failed while the disk was full");
                next += split_checked(&f.records).expect("batches").iter().map(|h| h.offset_count()).sum::<i64>();
            }
            next
        })
    };

    // `t` gets its first segment, then `filler` takes the rest of the disk.
    let mut acked = Vec::new();
    for n in 0..10 {
        let value = format!("before-{n}").into_bytes();
        let p = c.produce("t", 0, Bytes::from(build_batch(0, 0, &[&value])), -1).expect("produce");
        assert_eq!((p.error_code, p.base_offset), (0, n));
        acked.push(value);
    }
    let filled = produce_until_full(&mut c, "filler", "filler", 0);
    assert!(filled.len() > 100, "filler took {} batches", filled.len());
    // Now `t` too is refused once its segment is full; metadata still answers.
    let more = produce_until_full(&mut c, "t", "full", acked.len() as i64);
    acked.extend(more);
    let m = c.call(&MetadataRequest::default(), 12).expect("metadata on a full disk");
    assert_eq!(m.brokers.len(), 1);

    // Deleting the topic that holds the space lets writes resume, with no restart.
    delete_topic(&mut c, "filler");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = format!("after-{}", acked.len()).into_bytes();
        let p = c.produce("t", 0, Bytes::from(build_batch(0, 0, &[&value])), -1).expect("produce");
        if p.error_code == 0 {
            assert_eq!(p.base_offset, acked.len() as i64);
            acked.push(value);
            break;
        }
        assert_eq!(p.error_code, KAFKA_STORAGE_ERROR);
        assert!(Instant::now() < deadline, "writes did not resume after the space came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let consumed = consumer.join().expect("consumer");
    assert!(consumed > 0, "the consumer read nothing");
    assert_eq!(read_all(&mut c, "t"), acked, "acknowledged messages lost or altered");

    // Fill the disk again and restart the broker on it: it starts and serves everything.
    assert_eq!(c.create_topic("filler2", 1).expect("create"), 0);
    produce_until_full(&mut c, "filler2", "filler2", 0);
    drop(c);
    broker.kill();
    broker.spawn();
    let mut c = connect(&broker);
    assert_eq!(read_all(&mut c, "t"), acked, "acknowledged messages lost after a restart on a full disk");
    // Whether this one fits depends on what recovery could allocate; it is answered.
    let p = c.produce("filler2", 0, Bytes::from(build_batch(0, 0, &[b"still full?"])), -1).expect("produce");
    assert!([0, KAFKA_STORAGE_ERROR].contains(&p.error_code), "answered {}", p.error_code);
    assert!(broker.is_running());
}
