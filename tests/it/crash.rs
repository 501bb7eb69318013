//! Acceptance 3: SIGKILL mid-stream, 20 times; every acknowledged batch survives.

use crate::harness::{flags, BrokerProc};
use bytes::Bytes;
use slipstream::client::Client;
use slipstream::log::batch::{build_batch, BatchHeader};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOPIC: &str = "crash";

/// Partitions: with two cores, consecutive partitions have different owners, so one of
/// them is always owned by a core other than the one holding the producer's connection.
const PARTITIONS: i32 = 2;

/// (partition, base offset, batch as produced) of every acknowledged produce.
type Acked = Arc<Mutex<Vec<(i32, i64, Vec<u8>)>>>;

/// Reads a whole partition back: base offset -> batch bytes.
fn read_all(addr: std::net::SocketAddr, partition: i32) -> BTreeMap<i64, Bytes> {
    let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    let mut out = BTreeMap::new();
    let mut offset = 0;
    loop {
        let f = c.fetch(TOPIC, partition, offset, 4 << 20, 0).expect("fetch");
        assert_eq!(f.error_code, 0, "fetch at {offset}");
        if f.records.is_empty() {
            assert_eq!(offset, f.high_watermark, "log ends before its high watermark");
            return out;
        }
        let mut pos = 0;
        while pos < f.records.len() {
            let h = BatchHeader::parse_checked(&f.records[pos..]).expect("stored batch is valid");
            assert!(h.base_offset <= offset, "offsets jump from {offset} to {}", h.base_offset);
            if h.last_offset() >= offset {
                assert_eq!(h.base_offset, offset, "offsets not contiguous");
                out.insert(h.base_offset, f.records.slice(pos..pos + h.total_len()));
                offset = h.last_offset() + 1;
            }
            pos += h.total_len();
        }
    }
}

// With 64 KiB kept in the page cache, what lies further back is written back and dropped
// by the file worker all along: killed mid-drop, nothing acknowledged may go either.
per_transport!(
    sigkill_mid_stream_20_times_loses_no_acknowledged_batch,
    |t| crash_rounds(&flags(
        &["--flush", "always", "--segment-bytes", "1048576", "--page-cache-keep-bytes", "65536"],
        t
    )),
    ustack
);

// The same with two cores and more partitions than cores, so the producer's connection
// and the partition's owner differ for some runs.
per_transport!(
    sigkill_mid_stream_two_cores,
    |t| crash_rounds(&flags(&["--flush", "always", "--segment-bytes", "1048576", "--cores", "2"], t)),
    ustack
);

fn crash_rounds(args: &[&str]) {
    let mut broker = BrokerProc::start(args);
    let addr = broker.addr;
    let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(c.create_topic(TOPIC, PARTITIONS).expect("create"), 0);
    drop(c);
    let acked: Acked = Arc::default();
    let mut recovery = Vec::new();
    let mut seq = 0u64;
    for round in 0..20 {
        let producer = {
            let acked = acked.clone();
            let start_seq = seq;
            std::thread::spawn(move || {
                let mut seq = start_seq;
                let Ok(mut c) = Client::connect(addr, Duration::from_secs(2)) else {
                    return seq;
                };
                loop {
                    let values: Vec<Vec<u8>> = (0..10).map(|i| format!("r{round}-s{seq}-{i}").into_bytes()).collect();
                    let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
                    let batch = build_batch(0, seq as i64, &refs);
                    let partition = (seq % PARTITIONS as u64) as i32;
                    seq += 1;
                    match c.produce(TOPIC, partition, Bytes::from(batch.clone()), -1) {
                        Ok(p) if p.error_code == 0 => {
                            acked.lock().expect("lock").push((partition, p.base_offset, batch))
                        }
                        Ok(p) => panic!("produce refused with error {}", p.error_code),
                        Err(_) => return seq, // the broker died under us
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(30 + (round * 37 % 70) as u64));
        broker.kill();
        seq = producer.join().expect("producer thread");
        let took = broker.spawn();
        recovery.push(took);
        let logs: Vec<_> = (0..PARTITIONS).map(|p| read_all(addr, p)).collect();
        let acked = acked.lock().expect("lock");
        for (partition, base, produced) in acked.iter() {
            let stored = logs[*partition as usize]
                .get(base)
                .unwrap_or_else(|| panic!("round {round}: acknowledged batch at {partition}/{base} is gone"));
            // Byte for byte as produced, but for the base offset the broker patched in.
            assert_eq!(&stored[8..], &produced[8..], "round {round}: batch at {base} altered");
        }
        println!(
            "round {round:2}: {} acknowledged batches intact, log has {} batches, restart to listening {:.1} ms",
            acked.len(),
            logs.iter().map(BTreeMap::len).sum::<usize>(),
            took.as_secs_f64() * 1e3
        );
    }
    let mean = recovery.iter().map(Duration::as_secs_f64).sum::<f64>() / recovery.len() as f64;
    let worst = recovery.iter().max().copied().unwrap_or_default();
    println!(
        "recovery (spawn to listening) over 20 SIGKILLs: mean {:.1} ms, worst {:.1} ms",
        mean * 1e3,
        worst.as_secs_f64() * 1e3
    );
    let text = broker.log_text();
    let logged: Vec<&str> = text.lines().filter(|l| l.contains("data directory")).map(|l| l.trim()).collect::<Vec<_>>();
    println!("broker's own recovery log lines (last 3): {:?}", &logged[logged.len().saturating_sub(3)..]);
    assert!(acked.lock().expect("lock").len() > 20, "the producer hardly produced anything");
}
