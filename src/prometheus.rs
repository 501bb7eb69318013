//! The Prometheus endpoint (`serve --metrics-listen ADDR`, `GET /metrics`): the counters of
//! [`crate::metrics`], each listener's requests by API, and what the broker knows of its
//! partitions and groups, in the text exposition format (version 0.0.4).
//!
//! It runs on a thread of its own, never on a dispatch core: a scrape reads atomics, the
//! catalog, the group coordinator's lock (briefly, as a group request would) and the sizes
//! of the partitions' files.

use std::collections::BTreeMap;
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

/// The exposition, from the counters and the broker's state now.
pub fn render(broker: &Broker) -> String {
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };

    family(&mut o, "slipstream_build_info", "gauge", "The running build.");
    let _ = writeln!(
        o,
        "slipstream_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        esc(option_env!("SLIPSTREAM_COMMIT").unwrap_or("unknown"))
    );

    // Requests by listener and API.
    let listeners = ApiStats::all();
    let api_name = |protocol: &str, api: usize| -> String {
        match protocol {
            "kafka" => kafka_protocol::messages::ApiKey::try_from(api as i16)
                .map_or_else(|_| format!("unknown_{api}"), |k| format!("{k:?}")),
            _ => api.to_string(),
        }
    };
    let rows: Vec<_> = listeners.iter().map(|l| (l, l.rows())).collect();
    family(
        &mut o,
        "slipstream_requests_total",
        "counter",
        "Requests answered (or finished without an answer), by listener and API.",
    );
    for (l, rs) in &rows {
        for (api, n, _, _, _) in rs {
            let _ = writeln!(
                o,
                "slipstream_requests_total{{listener=\"{}\",api=\"{}\"}} {n}",
                esc(&l.listener),
                api_name(l.protocol, *api)
            );
        }
    }
    family(
        &mut o,
        "slipstream_request_errors_total",
        "counter",
        "Requests that could not be decoded, were of an unsupported version, or whose answer could not be encoded (the connection is closed), by listener and API.",
    );
    for (l, rs) in &rows {
        for (api, _, e, _, _) in rs {
            let _ = writeln!(
                o,
                "slipstream_request_errors_total{{listener=\"{}\",api=\"{}\"}} {e}",
                esc(&l.listener),
                api_name(l.protocol, *api)
            );
        }
    }
    family(
        &mut o,
        "slipstream_request_duration_seconds",
        "histogram",
        "From a request's arrival to its answer (a long poll's wait included), by listener and API.",
    );
    for (l, rs) in &rows {
        for (api, n, _, buckets, sum) in rs {
            let labels = format!("listener=\"{}\",api=\"{}\"", esc(&l.listener), api_name(l.protocol, *api));
            let mut cumulative = 0;
            for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += buckets[i];
                let _ = writeln!(o, "slipstream_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(o, "slipstream_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {n}");
            let _ = writeln!(o, "slipstream_request_duration_seconds_sum{{{labels}}} {sum}");
            let _ = writeln!(o, "slipstream_request_duration_seconds_count{{{labels}}} {n}");
        }
    }

    // Connections.
    let a = metrics::activity();
    family(&mut o, "slipstream_connections_open", "gauge", "Client connections open now (every listener).");
    let _ = writeln!(o, "slipstream_connections_open {}", a.connections_accepted.saturating_sub(a.connections_closed));
    family(&mut o, "slipstream_connections_accepted_total", "counter", "Client connections accepted.");
    let _ = writeln!(o, "slipstream_connections_accepted_total {}", a.connections_accepted);
    let s = metrics::snapshot();
    family(&mut o, "slipstream_connections_closed_bad_input_total", "counter", "Connections closed for bad input.");
    let _ = writeln!(o, "slipstream_connections_closed_bad_input_total {}", s.connections_closed_bad_input);

    // Copies by path (the zero-copy claims, as the stats file has them).
    family(&mut o, "slipstream_copied_bytes_total", "counter", "Payload bytes copied in user space, by path.");
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
    ] {
        let _ = writeln!(o, "slipstream_copied_bytes_total{{path=\"{path}\"}} {v}");
    }
    family(&mut o, "slipstream_zero_copy_bytes_total", "counter", "Payload bytes that left by reference, by how.");
    for (path, v) in [
        ("fetch_by_reference", s.fetch_bytes_zero_copy),
        ("kernel_zero_copy_send", s.kernel_zero_copy_send_bytes),
        ("rdma_from_log", s.rdma_log_bytes_written),
    ] {
        let _ = writeln!(o, "slipstream_zero_copy_bytes_total{{path=\"{path}\"}} {v}");
    }

    // The log.
    family(&mut o, "slipstream_log_flushes_total", "counter", "Flushes of appended log bytes to stable storage.");
    let _ = writeln!(o, "slipstream_log_flushes_total {}", a.log_flushes);
    family(&mut o, "slipstream_log_segment_rolls_total", "counter", "Log segments rolled.");
    let _ = writeln!(o, "slipstream_log_segment_rolls_total {}", a.segment_rolls);
    family(&mut o, "slipstream_log_retention_deleted_segments_total", "counter", "Log segments deleted by retention.");
    let _ = writeln!(o, "slipstream_log_retention_deleted_segments_total {}", a.retention_deleted_segments);
    let data_dir = &broker.settings.data_dir;
    if let Ok(v) = rustix::fs::statvfs(data_dir) {
        family(
            &mut o,
            "slipstream_data_dir_free_bytes",
            "gauge",
            "Bytes available to the broker on the data directory's file system.",
        );
        let _ = writeln!(o, "slipstream_data_dir_free_bytes {}", v.f_bavail.saturating_mul(v.f_frsize));
    }

    // Topics and partitions.
    let topics = broker.topics();
    let mut hw: BTreeMap<(String, i32), i64> = BTreeMap::new();
    family(
        &mut o,
        "slipstream_topic_bytes_in_total",
        "counter",
        "Record bytes appended to the topic's partitions since the broker started.",
    );
    for t in &topics {
        let bytes: u64 = t.partitions.iter().map(|p| p.appended()).sum();
        let _ = writeln!(o, "slipstream_topic_bytes_in_total{{topic=\"{}\"}} {bytes}", esc(t.name()));
    }
    family(
        &mut o,
        "slipstream_topic_bytes_out_total",
        "counter",
        "Record bytes read out of the topic's partitions for fetches and pulls since the broker started.",
    );
    for t in &topics {
        let bytes: u64 = t.partitions.iter().map(|p| p.read_bytes()).sum();
        let _ = writeln!(o, "slipstream_topic_bytes_out_total{{topic=\"{}\"}} {bytes}", esc(t.name()));
    }
    family(&mut o, "slipstream_partition_high_watermark", "gauge", "The partition's high watermark (next offset).");
    for t in &topics {
        for (i, p) in t.partitions.iter().enumerate() {
            hw.insert((t.name().to_string(), i as i32), p.next_offset());
            let _ = writeln!(
                o,
                "slipstream_partition_high_watermark{{topic=\"{}\",partition=\"{i}\"}} {}",
                esc(t.name()),
                p.next_offset()
            );
        }
    }
    family(&mut o, "slipstream_partition_log_start_offset", "gauge", "The partition's first offset kept.");
    for t in &topics {
        for (i, p) in t.partitions.iter().enumerate() {
            let _ = writeln!(
                o,
                "slipstream_partition_log_start_offset{{topic=\"{}\",partition=\"{i}\"}} {}",
                esc(t.name()),
                p.log_start()
            );
        }
    }
    family(
        &mut o,
        "slipstream_partition_log_size_bytes",
        "gauge",
        "Bytes of the partition's files on disk (segments and indexes, as allocated).",
    );
    for t in &topics {
        for i in 0..t.partitions.len() {
            let size = dir_bytes(&t.partition_dir(i as i32));
            let _ = writeln!(
                o,
                "slipstream_partition_log_size_bytes{{topic=\"{}\",partition=\"{i}\"}} {size}",
                esc(t.name())
            );
        }
    }

    // Consumer groups: lag by committed offset.
    let lag: Vec<(String, String, i32, i64)> = {
        let groups = broker.groups.lock();
        groups
            .groups()
            .flat_map(|g| {
                g.offsets.iter().filter_map(|((topic, partition), c)| {
                    let end = *hw.get(&(topic.clone(), *partition))?;
                    Some((g.id.clone(), topic.clone(), *partition, (end - c.offset).max(0)))
                })
            })
            .collect()
    };
    family(
        &mut o,
        "slipstream_group_lag",
        "gauge",
        "High watermark minus the group's committed offset, by group and partition.",
    );
    let mut lag = lag;
    lag.sort();
    for (g, t, p, l) in lag {
        let _ =
            writeln!(o, "slipstream_group_lag{{group=\"{}\",topic=\"{}\",partition=\"{p}\"}} {l}", esc(&g), esc(&t));
    }
    o
}

/// Bytes of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
