//! Fetches of log pages the kernel evicted never wait on the disk in a dispatch core
//! (issue 10): the owner core finds them out of memory (`mincore`), the file worker brings
//! them in, and the parked fetch is answered once they are there. The proof is the
//! threads' own major-fault counts (`/proc/PID/task/*/stat`): the core's stays where it
//! was while every evicted byte is fetched back, byte for byte.

use crate::harness::{flags, free_addrs, serves_api_versions, BrokerProc};
use crate::rocketmq::{call, request};
use bytes::{Bytes, BytesMut};
use slipstream::client::Client;
use slipstream::log::batch::build_batch;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Major faults taken so far by each thread of `pid`, by thread name.
fn major_faults(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`: the name may hold spaces, so split at the last ')'.
        let (head, tail) = stat.rsplit_once(')').expect("stat");
        let comm = head.split_once('(').expect("comm").1.to_string();
        // After the name: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt, majflt.
        let majflt = tail.split_whitespace().nth(9).and_then(|v| v.parse().ok()).expect("majflt");
        out.push((comm, majflt));
    }
    out
}

fn faults_of(pid: u32, name: &str) -> u64 {
    major_faults(pid).iter().filter(|(n, _)| n == name).map(|(_, f)| f).sum()
}

/// Bytes of `file` in the page cache (`fincore`, util-linux).
fn cached_bytes(file: &Path) -> u64 {
    let out = Command::new("fincore").args(["--bytes", "--noheadings", "--raw", "-o", "RES"]).arg(file).output();
    let out = out.expect("fincore (util-linux)");
    assert!(out.status.success(), "fincore: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("fincore's RES")
}

/// Partition 0's segment files of `topic` (`DATA/topics/<id>/topic.json` names it).
fn segments(data: &Path, topic: &str) -> Vec<PathBuf> {
    let dir = std::fs::read_dir(data.join("topics"))
        .expect("topics dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let meta = std::fs::read_to_string(p.join("topic.json")).unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&meta).is_ok_and(|m| m["name"] == topic)
        })
        .expect("the topic's directory")
        .join("0");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("partition dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Drops `topic`'s segments from the page cache (pages nobody mapped go: nothing has read
/// them through the broker's mapping); returns the bytes still cached.
fn evict(data: &Path, topic: &str) -> u64 {
    let logs = segments(data, topic);
    for log in &logs {
        let f = std::fs::File::open(log).expect("segment");
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    }
    logs.iter().map(|l| cached_bytes(l)).sum()
}

/// Pulls queue 0 of `topic` over RocketMQ remoting (PULL_MESSAGE, suspending) from offset
/// 0 to `end`; returns the messages received.
fn pull_all(s: &mut TcpStream, topic: &str, end: i64) -> usize {
    let (mut offset, mut messages, mut opaque) = (0i64, 0usize, 100);
    let deadline = Instant::now() + Duration::from_secs(60);
    while offset < end {
        assert!(Instant::now() < deadline, "pulled up to {offset} of {end} in 60 s");
        opaque += 1;
        let at = offset.to_string();
        let ext = [
            ("consumerGroup", "cold-readers"),
            ("topic", topic),
            ("queueId", "0"),
            ("queueOffset", at.as_str()),
            ("maxMsgNums", "32"),
            ("sysFlag", "6"), // suspend, subscription given
            ("commitOffset", "0"),
            ("suspendTimeoutMillis", "5000"),
            ("subscription", "*"),
            ("subVersion", "0"),
        ];
        let resp = call(s, &request(11, opaque, &ext));
        match resp.code {
            0 => {
                // Each message starts with its total size (an i32).
                let mut body = &resp.body[..];
                while body.len() >= 4 {
                    let size = i32::from_be_bytes(body[..4].try_into().expect("size")) as usize;
                    assert!(size >= 4 && size <= body.len(), "message size {size}");
                    body = &body[size..];
                    messages += 1;
                }
            }
            20 => {} // PULL_RETRY_IMMEDIATELY
            code => panic!("pull answered {code}: {:?}", resp.remark),
        }
        offset = resp.field("nextBeginOffset").and_then(|v| v.parse().ok()).expect("nextBeginOffset");
    }
    messages
}

/// Produces `batches` batches of 16 one-KiB records; returns what was stored, in order.
fn produce(c: &mut Client, topic: &str, batches: i64) -> BytesMut {
    let mut stored = BytesMut::new();
    for b in 0..batches {
        let values: Vec<Vec<u8>> = (0..16).map(|i| vec![(b * 16 + i) as u8; 1024]).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        // Its base offset as the broker will assign it, so stored bytes equal these.
        let batch = build_batch(b * 16, 1_700_000_000_000 + b, &refs);
        let p = c.produce(topic, 0, Bytes::from(batch.clone()), -1).expect("produce");
        assert_eq!((p.error_code, p.base_offset), (0, b * 16));
        stored.extend_from_slice(&batch);
    }
    stored
}

/// Fetches everything up to `end` from offset 0; returns the batches' bytes.
fn fetch_all(c: &mut Client, topic: &str, end: i64) -> BytesMut {
    let mut got = BytesMut::new();
    let mut offset = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while offset < end {
        assert!(Instant::now() < deadline, "fetched up to {offset} of {end} in 60 s");
        let f = c.fetch(topic, 0, offset, 256 << 10, 500).expect("fetch");
        assert_eq!(f.error_code, 0);
        let mut at = 0;
        while at + 61 <= f.records.len() {
            let len = i32::from_be_bytes(f.records[at + 8..at + 12].try_into().expect("length")) as usize + 12;
            let count = i32::from_be_bytes(f.records[at + 57..at + 61].try_into().expect("count")) as i64;
            got.extend_from_slice(&f.records[at..at + len]);
            offset += count;
            at += len;
        }
    }
    got
}

per_transport!(fetching_evicted_pages_never_faults_on_a_core, |t| {
    // Every produce is on disk before it is acknowledged, so its pages are clean and can
    // be dropped from the page cache.
    let a = free_addrs(2);
    let rocketmq = format!("rocketmq://{}", a[1]);
    let broker =
        BrokerProc::start_at(a[0], &flags(&["--flush", "always", "--listen", &rocketmq], t), serves_api_versions);
    let mut c = Client::connect(broker.addr, Duration::from_secs(5)).expect("connect");
    for topic in ["warm", "cold", "cold-pull"] {
        assert_eq!(c.create_topic(topic, 1).expect("create"), 0);
    }
    // Both read paths once, on another topic: their code is paged in before the count starts.
    produce(&mut c, "warm", 4);
    fetch_all(&mut c, "warm", 64);
    let mut r = TcpStream::connect(a[1]).expect("connect");
    r.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    pull_all(&mut r, "warm", 64);
    let stored = produce(&mut c, "cold", 256); // 4 MiB
    produce(&mut c, "cold-pull", 256);
    let cached = evict(&broker.data, "cold") + evict(&broker.data, "cold-pull");
    assert!(cached < (stored.len() / 2) as u64, "{cached} bytes of {} still cached: nothing to test", 2 * stored.len());

    let pid = broker.pid().expect("running");
    let (core_before, files_before) = (faults_of(pid, "core-0"), faults_of(pid, "files"));
    let got = fetch_all(&mut c, "cold", 256 * 16);
    let (core_after, files_after) = (faults_of(pid, "core-0"), faults_of(pid, "files"));
    println!(
        "{} bytes fetched of {cached} cached: major faults core-0 {core_before} → {core_after}, files {files_before} → {files_after}",
        got.len()
    );
    assert_eq!(got.len(), stored.len(), "fetched a different number of bytes");
    let first_difference = got.iter().zip(stored.iter()).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "fetched bytes differ from what was produced");
    assert_eq!(core_after, core_before, "the dispatch core waited on the disk");
    assert!(files_after > files_before, "the file worker read nothing back: were the pages evicted?");

    // RocketMQ remoting: long-polling pulls of the other evicted topic.
    let pulled = pull_all(&mut r, "cold-pull", 256 * 16);
    let (core_pulled, files_pulled) = (faults_of(pid, "core-0"), faults_of(pid, "files"));
    println!("{pulled} messages pulled: major faults core-0 {core_after} → {core_pulled}, files {files_after} → {files_pulled}");
    assert_eq!(pulled, 256 * 16);
    assert_eq!(core_pulled, core_after, "the dispatch core waited on the disk for a pull");
    assert!(files_pulled > files_after, "the file worker read nothing back for the pulls");
});
