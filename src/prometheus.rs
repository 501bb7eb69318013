//! The Prometheus endpoint (`serve --metrics-listen ADDR`, `GET /metrics`): the counters of
//! [`crate::metrics`], each listener's requests by API, and what the broker knows of its
//! partitions and groups, in the text exposition format (version 0.0.4).
//!
//! It runs on a thread of its own, never on a dispatch core: a scrape reads atomics, the
//! catalog, the group coordinator's lock (briefly, as a group request would) and the sizes
//! of the partitions' files.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::metrics::{self, ApiStats, LATENCY_BUCKETS};

/// Starts the endpoint on `addr`; it stops accepting once `stop` is set.
pub fn spawn(
    addr: SocketAddr,
    broker: Arc<Broker>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    log::info!("metrics: Prometheus endpoint on http://{addr}/metrics");
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, peer)) => {
                    if let Err(e) = answer(conn, &broker) {
                        log::debug!("metrics: scrape from {peer}: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    log::warn!("metrics: accept: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

/// One HTTP/1.x request: `GET /metrics` gets the exposition, anything else a 404.
fn answer(conn: TcpStream, broker: &Broker) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    // The request line and headers, bounded (nothing here needs a body).
    reader.by_ref().take(8192).read_line(&mut line)?;
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.by_ref().take(8192).read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(broker))
    } else {
        ("404 Not Found", "text/plain", "only /metrics is served here\n".to_string())
    };
    let mut out = conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

/// A label value, escaped as the format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text being written: families, each declared once before its samples.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; `labels` is the inside of the braces (empty for none).
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

/// The exposition, from the counters and the broker's state now.
pub fn render(broker: &Broker) -> String {
    let mut o = Exposition(String::new());
    o.family("slipstream_build_info", "gauge", "The running build.");
    let build = format!(
        "version=\"{}\",commit=\"{}\"",
        env!("CARGO_PKG_VERSION"),
        esc(option_env!("SLIPSTREAM_COMMIT").unwrap_or("unknown"))
    );
    o.sample("slipstream_build_info", &build, 1);

    // Requests by listener and API: the labels of each row made once.
    let listeners = ApiStats::all();
    let rows: Vec<_> = listeners
        .iter()
        .flat_map(|l| {
            l.rows().into_iter().map(|r| (format!("listener=\"{}\",api=\"{}\"", esc(&l.listener), esc(&r.api)), r))
        })
        .collect();
    o.family(
        "slipstream_requests_total",
        "counter",
        "Requests answered (or finished without an answer), by listener and API.",
    );
    for (labels, r) in &rows {
        o.sample("slipstream_requests_total", labels, r.requests);
    }
    o.family(
        "slipstream_request_errors_total",
        "counter",
        "Error codes in answers, by listener, API and error (Kafka's ErrorsPerSec without NONE; RocketMQ response codes, RocketMQ 5 status codes).",
    );
    for l in &listeners {
        for (api, error, n) in l.error_rows() {
            let labels = format!("listener=\"{}\",api=\"{}\",error=\"{}\"", esc(&l.listener), esc(&api), esc(&error));
            o.sample("slipstream_request_errors_total", &labels, n);
        }
    }
    o.family(
        "slipstream_request_failures_total",
        "counter",
        "Requests that could not be decoded, were of an unsupported version, or whose answer could not be encoded (the connection is closed), by listener and API.",
    );
    for (labels, r) in &rows {
        o.sample("slipstream_request_failures_total", labels, r.failures);
    }
    o.family(
        "slipstream_request_duration_seconds",
        "histogram",
        "From a request's arrival to its answer (a long poll's wait included), by listener and API.",
    );
    for (labels, r) in &rows {
        let mut cumulative = 0;
        for (le, count) in LATENCY_BUCKETS.iter().zip(&r.buckets) {
            cumulative += count;
            o.sample("slipstream_request_duration_seconds_bucket", &format!("{labels},le=\"{le}\""), cumulative);
        }
        o.sample("slipstream_request_duration_seconds_bucket", &format!("{labels},le=\"+Inf\""), r.requests);
        o.sample("slipstream_request_duration_seconds_sum", labels, r.latency_sum_secs);
        o.sample("slipstream_request_duration_seconds_count", labels, r.requests);
    }

    // Connections.
    let s = metrics::snapshot();
    o.single(
        "slipstream_connections_open",
        "gauge",
        "Client connections open now (every listener).",
        s.connections_accepted.saturating_sub(s.connections_closed),
    );
    o.single(
        "slipstream_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        s.connections_accepted,
    );
    o.single(
        "slipstream_connections_closed_bad_input_total",
        "counter",
        "Connections closed for bad input.",
        s.connections_closed_bad_input,
    );
    o.single(
        "slipstream_connections_refused_total",
        "counter",
        "Connections closed after a failed authentication.",
        s.connections_refused,
    );

    // Copies by path (the zero-copy claims, as the stats file has them).
    o.family("slipstream_copied_bytes_total", "counter", "Payload bytes copied in user space, by path.");
    for (path, v) in [
        ("produce_into_log", s.produce_bytes_copied),
        ("fetch_out", s.fetch_bytes_copied),
        ("receive_staging", s.receive_bytes_staged),
        ("rdma_tx_staging", s.rdma_tx_staged_bytes),
        ("rocketmq_send", s.rocketmq_send_bytes_copied),
        ("rocketmq_pull", s.rocketmq_pull_bytes_copied),
        ("rocketmq_grpc", s.rocketmq_grpc_bytes_copied),
        ("ustack_send_buffer", s.ustack_send_bytes_copied),
        ("ustack_umem", s.ustack_umem_bytes_written),
        ("tls_records", s.tls_record_bytes_copied),
    ] {
        o.sample("slipstream_copied_bytes_total", &format!("path=\"{path}\""), v);
    }
    o.family("slipstream_zero_copy_bytes_total", "counter", "Payload bytes that left by reference, by how.");
    for (path, v) in [
        ("fetch_by_reference", s.fetch_bytes_zero_copy),
        ("kernel_zero_copy_send", s.kernel_zero_copy_send_bytes),
        ("rdma_from_log", s.rdma_log_bytes_written),
    ] {
        o.sample("slipstream_zero_copy_bytes_total", &format!("path=\"{path}\""), v);
    }

    // The log.
    o.single(
        "slipstream_log_flushes_total",
        "counter",
        "Flushes of appended log bytes to stable storage.",
        s.log_flushes,
    );
    o.single("slipstream_log_segment_rolls_total", "counter", "Log segments rolled.", s.segment_rolls);
    o.single(
        "slipstream_log_page_cache_dropped_bytes_total",
        "counter",
        "Log bytes dropped from the page cache: behind the newest ones kept, and behind consumers catching up.",
        s.page_cache_dropped_bytes,
    );
    o.single(
        "slipstream_log_retention_deleted_segments_total",
        "counter",
        "Log segments deleted by retention.",
        s.retention_deleted_segments,
    );
    if let Ok(v) = rustix::fs::statvfs(&broker.settings.data_dir) {
        o.single(
            "slipstream_data_dir_free_bytes",
            "gauge",
            "Bytes available to the broker on the data directory's file system.",
            v.f_bavail.saturating_mul(v.f_frsize),
        );
    }

    // Topics and partitions.
    let topics = broker.topics();
    o.family(
        "slipstream_topic_bytes_in_total",
        "counter",
        "Record bytes appended to the topic's partitions since the broker started.",
    );
    for t in &topics {
        let bytes: u64 = t.partitions.iter().map(|p| p.appended()).sum();
        o.sample("slipstream_topic_bytes_in_total", &format!("topic=\"{}\"", esc(t.name())), bytes);
    }
    o.family(
        "slipstream_topic_bytes_out_total",
        "counter",
        "Record bytes read out of the topic's partitions for fetches and pulls since the broker started.",
    );
    for t in &topics {
        let bytes: u64 = t.partitions.iter().map(|p| p.read_bytes()).sum();
        o.sample("slipstream_topic_bytes_out_total", &format!("topic=\"{}\"", esc(t.name())), bytes);
    }
    // Every partition once: its labels, and the high watermark the group lag is measured
    // against (read once, so the two agree).
    let partitions: Vec<(String, &crate::broker::Topic, usize, i64)> = topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .enumerate()
                .map(move |(i, p)| (format!("topic=\"{}\",partition=\"{i}\"", esc(t.name())), &**t, i, p.next_offset()))
        })
        .collect();
    o.family("slipstream_partition_high_watermark", "gauge", "The partition's high watermark (next offset).");
    for (labels, _, _, hw) in &partitions {
        o.sample("slipstream_partition_high_watermark", labels, hw);
    }
    o.family("slipstream_partition_log_start_offset", "gauge", "The partition's first offset kept.");
    for (labels, t, i, _) in &partitions {
        o.sample("slipstream_partition_log_start_offset", labels, t.partitions[*i].log_start());
    }
    o.family(
        "slipstream_partition_log_size_bytes",
        "gauge",
        "Bytes of the partition's files on disk (segments and indexes, as allocated).",
    );
    for (labels, t, i, _) in &partitions {
        o.sample("slipstream_partition_log_size_bytes", labels, dir_bytes(&t.partition_dir(*i as i32)));
    }

    // Consumer groups: lag by committed offset.
    let hw: HashMap<(&str, i32), i64> = partitions.iter().map(|(_, t, i, hw)| ((t.name(), *i as i32), *hw)).collect();
    let mut lag: Vec<(String, String, i32, i64)> = {
        let groups = broker.groups.lock();
        groups
            .groups()
            .flat_map(|g| {
                g.offsets.iter().filter_map(|((topic, partition), c)| {
                    let end = *hw.get(&(topic.as_str(), *partition))?;
                    Some((g.id.clone(), topic.clone(), *partition, (end - c.offset).max(0)))
                })
            })
            .collect()
    };
    lag.sort();
    o.family(
        "slipstream_group_lag",
        "gauge",
        "High watermark minus the group's committed offset, by group and partition.",
    );
    for (g, t, p, l) in lag {
        o.sample("slipstream_group_lag", &format!("group=\"{}\",topic=\"{}\",partition=\"{p}\"", esc(&g), esc(&t)), l);
    }
    o.0
}

/// Bytes of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
