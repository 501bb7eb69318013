//! Memory per idle connection (issue 10): 10,000 connections that each did one
//! ApiVersions and then sit idle must cost the broker at most 8 KiB each, and the memory
//! must come back when they close. (They cost 65 KiB each, kept after closing, when every
//! connection got a 64 KiB receive buffer at accept.) Prints the figures.

use crate::harness::BrokerProc;
use slipstream::client::Client;
use std::time::{Duration, Instant};

const CONNS: usize = 10_000;
const MAX_PER_CONN: usize = 8 << 10;
/// What may stay resident after they close: a quarter of what they took, or 4 MiB (the
/// allocator keeps some, and the pages of io_uring's provided-buffer ring, once touched,
/// are the core's for good).
fn may_keep(growth: usize) -> usize {
    (growth / 4).max(4 << 20)
}

/// The broker's anonymous resident memory, in bytes (`RssAnon` in /proc/PID/status).
fn rss_anon(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon");
    kib << 10
}

per_transport!(ten_thousand_idle_connections_cost_at_most_8_kib_each, idle_connections);

/// One of these tests at a time: each holds 10,000 descriptors in this process.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn idle_connections(transport: &[&str]) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // Both ends hold a descriptor per connection.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open file limit");
    let broker = BrokerProc::start(transport);
    let pid = broker.pid().expect("running");
    // Warm the broker up first, so one-time allocations are not charged to the connections.
    for _ in 0..100 {
        Client::connect(broker.addr, Duration::from_secs(5)).expect("connect").api_versions().expect("api versions");
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_anon(pid);
    let mut conns = Vec::with_capacity(CONNS);
    let started = Instant::now();
    for _ in 0..CONNS {
        let mut c = Client::connect(broker.addr, Duration::from_secs(5)).expect("connect");
        c.api_versions().expect("api versions");
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let open = rss_anon(pid);
    let per_conn = open.saturating_sub(before) / CONNS;
    drop(conns);
    // The broker sees the closes and drops the connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut closed = rss_anon(pid);
    while closed.saturating_sub(before) > may_keep(open.saturating_sub(before)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        closed = rss_anon(pid);
    }
    println!(
        "{transport:?}: {CONNS} idle connections (opened in {:.1?}): broker anonymous memory {:.1} MiB before, \
         {:.1} MiB with them open ({per_conn} bytes per connection), {:.1} MiB after they closed",
        started.elapsed(),
        before as f64 / (1 << 20) as f64,
        open as f64 / (1 << 20) as f64,
        closed as f64 / (1 << 20) as f64,
    );
    assert!(per_conn <= MAX_PER_CONN, "{per_conn} bytes per idle connection (at most {MAX_PER_CONN})");
    assert!(
        closed.saturating_sub(before) <= may_keep(open.saturating_sub(before)),
        "memory not returned after the connections closed: {before} -> {open} -> {closed} bytes"
    );
}
