//! Results: the JSON file, the terminal table and the self-contained HTML report.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

use super::stats::Summary;
use super::workload::Workload;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    /// The machine's RDMA devices (`/sys/class/infiniband`).
    #[serde(default)]
    pub rdma_devices: Vec<RdmaDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RdmaDevice {
    pub name: String,
    /// Implemented by the kernel on top of an ordinary netdev (soft-RoCE's rdma_rxe, siw),
    /// not by a NIC: the kernel registers such devices as virtual, with no bus device.
    pub software: bool,
}

impl Machine {
    pub fn describe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_string());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find(|l| l.starts_with("PRETTY_NAME="))
            .map_or("unknown".into(), |l| l.trim_start_matches("PRETTY_NAME=").trim_matches('"').to_string());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            os,
            rdma_devices: rdma_devices(),
        }
    }

    /// What makes this machine's figures unrepresentative of hardware, one sentence each;
    /// the harness prints them with every report so a figure never travels without them.
    pub fn caveats(&self) -> Vec<String> {
        let mut out = Vec::new();
        // qemu's TCG names its CPU so: every instruction is translated, not run.
        if self.cpu.contains("TCG") {
            out.push(format!(
                "FUNCTIONAL ONLY: the CPU is emulated ({}); no figure here says anything about hardware.",
                self.cpu
            ));
        }
        let soft: Vec<&str> = self.rdma_devices.iter().filter(|d| d.software).map(|d| d.name.as_str()).collect();
        if !soft.is_empty() {
            out.push(format!(
                "FUNCTIONAL ONLY for RDMA: {} is software RDMA (soft-RoCE or siw, run by the kernel's CPU, not a NIC); \
                 figures through it say nothing about RDMA hardware.",
                soft.join(", ")
            ));
        }
        out
    }
}

/// The RDMA devices the kernel lists; a device whose sysfs node lies under
/// `/sys/devices/virtual` has no bus device behind it, i.e. it is software.
fn rdma_devices() -> Vec<RdmaDevice> {
    let Ok(dir) = std::fs::read_dir("/sys/class/infiniband") else { return Vec::new() };
    let mut out: Vec<RdmaDevice> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let real = std::fs::canonicalize(e.path()).ok()?;
            Some(RdmaDevice {
                name: e.file_name().to_string_lossy().into_owned(),
                software: real.starts_with("/sys/devices/virtual"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limit {
    pub name: String,
    pub round_trip: Summary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetResult {
    pub name: String,
    pub bootstrap: String,
    pub repetitions: usize,
    pub measured_s: f64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub errors: u64,
    pub throughput_msgs_per_s: f64,
    pub throughput_mb_per_s: f64,
    /// Messages the consumers received per measured second, per consumer group.
    pub consume_msgs_per_s: f64,
    pub publish: Summary,
    pub publish_delay: Summary,
    pub end_to_end: Summary,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_s_per_million_msgs: Option<f64>,
    /// p50 publish latency over the p50 raw-TCP round trip (blocking, busy-poll).
    pub publish_p50_over_limit: Vec<(String, f64)>,
    /// Messages acknowledged in each measured second, repetitions one after another.
    pub per_second: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub workload: Workload,
    pub limits: Vec<Limit>,
    pub targets: Vec<TargetResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub slipstream_version: String,
    pub created_unix_s: u64,
    pub machine: Machine,
    /// Which client measured: `native` (lean, one request in flight per connection).
    pub client: String,
    pub notes: Vec<String>,
    pub workloads: Vec<WorkloadResult>,
}

/// The terminal table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for w in &r.workloads {
        let _ = writeln!(out, "\n== {} ({} B, {} client) ==", w.workload.name, w.workload.message_size, r.client);
        let _ = writeln!(
            out,
            "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7}",
            "target (µs)",
            "pub p50",
            "pub p99",
            "pub p99.9",
            "pub max",
            "e2e p50",
            "e2e p99",
            "msg/s",
            "MB/s",
            "cpu s/M",
            "×limit"
        );
        for l in &w.limits {
            let s = &l.round_trip;
            let _ = writeln!(
                out,
                "{:<22} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7}",
                l.name,
                s.p("p50"),
                s.p("p99"),
                s.p("p99.9"),
                s.max_us,
                "-",
                "-",
                "-",
                "-",
                "-",
                "1.00"
            );
        }
        for t in &w.targets {
            let ratio = t.publish_p50_over_limit.first().map_or("-".to_string(), |(_, v)| format!("{v:.2}"));
            let cpu = t.broker_cpu_s_per_million_msgs.map_or("-".to_string(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "{:<22} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>8.1} {:>8} {:>7}",
                t.name,
                t.publish.p("p50"),
                t.publish.p("p99"),
                t.publish.p("p99.9"),
                t.publish.max_us,
                t.end_to_end.p("p50"),
                t.end_to_end.p("p99"),
                t.throughput_msgs_per_s,
                t.throughput_mb_per_s,
                cpu,
                ratio
            );
        }
    }
    out
}

const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Latency-percentile curves: x = number of nines (log scale of 1/(1-p)), y = µs, log.
fn percentile_svg(series: &[(String, &Summary)]) -> String {
    let (w, h, l, b) = (720.0, 360.0, 70.0, 40.0);
    let xs = |p: f64| -> f64 {
        let nines = if p >= 100.0 { 6.0 } else { -(1.0 - p / 100.0).log10() };
        l + nines.clamp(0.0, 6.0) / 6.0 * (w - l - 20.0)
    };
    let values: Vec<f64> =
        series.iter().flat_map(|(_, s)| s.curve.iter().map(|(_, v)| *v)).filter(|v| *v > 0.0).collect();
    // Decades spanning the data (1 µs .. 10 µs when there is none).
    let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let lo = if lo.is_finite() { lo.max(0.1).log10().floor() } else { 0.0 };
    let hi = values.iter().cloned().fold(0.0, f64::max).max(1.0).log10().ceil().max(lo + 1.0);
    let ys = |v: f64| -> f64 { h - b - (v.max(0.1).log10() - lo) / (hi - lo) * (h - b - 20.0) };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    for (p, label) in [
        (0.0, "0%"),
        (50.0, "50%"),
        (90.0, "90%"),
        (99.0, "99%"),
        (99.9, "99.9%"),
        (99.99, "99.99%"),
        (99.999, "99.999%"),
        (100.0, "max"),
    ] {
        let x = xs(p);
        let _ = write!(
            svg,
            r##"<line x1="{x}" y1="20" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            h - b,
            h - b + 16.0
        );
    }
    let mut e = lo as i32;
    while e as f64 <= hi {
        let y = ys(10f64.powi(e));
        let label = 10f64.powi(e);
        let _ = write!(
            svg,
            r##"<line x1="{l}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label} µs</text>"##,
            w - 20.0,
            l - 6.0,
            y + 4.0
        );
        e += 1;
    }
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s.curve.iter().map(|(p, v)| format!("{:.1},{:.1}", xs(*p), ys(*v))).collect();
        let _ = write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        let _ =
            write!(svg, r#"<text x="{}" y="{}" fill="{color}">{}</text>"#, l + 10.0, 34.0 + 16.0 * i as f64, esc(name));
    }
    svg.push_str("</svg>");
    svg
}

/// Throughput over time, one line per target.
fn throughput_svg(series: &[(String, &[u64])]) -> String {
    let (w, h, l, b) = (720.0, 260.0, 80.0, 36.0);
    let n = series.iter().map(|(_, s)| s.len()).max().unwrap_or(1).max(2);
    let top = series.iter().flat_map(|(_, s)| s.iter().copied()).max().unwrap_or(1).max(1) as f64 * 1.1;
    let xs = |i: usize| l + i as f64 / (n - 1) as f64 * (w - l - 20.0);
    let ys = |v: u64| h - b - v as f64 / top * (h - b - 20.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    for k in 0..=4 {
        let v = top / 4.0 * k as f64;
        let y = ys(v as u64);
        let _ = write!(
            svg,
            r##"<line x1="{l}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}/s</text>"##,
            w - 20.0,
            l - 6.0,
            y + 4.0,
            v
        );
    }
    let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="middle">measured seconds</text>"#, (w + l) / 2.0, h - 8.0);
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s.iter().enumerate().map(|(j, v)| format!("{:.1},{:.1}", xs(j), ys(*v))).collect();
        let _ = write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        let _ =
            write!(svg, r#"<text x="{}" y="{}" fill="{color}">{}</text>"#, l + 10.0, 34.0 + 16.0 * i as f64, esc(name));
    }
    svg.push_str("</svg>");
    svg
}

/// The self-contained HTML report.
pub fn html(r: &Report) -> String {
    let m = &r.machine;
    let mut out = String::from("<!doctype html><html><head><meta charset=\"utf-8\"><title>slipstream bench</title><style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#555}</style></head><body>");
    let _ = write!(
        out,
        "<h1>slipstream latency benchmark</h1><p>{} · {} cores · {} GiB · kernel {} · {}<br>client: <b>{}</b> · slipstream {}</p>",
        esc(&m.cpu), m.cores, m.memory_gib, esc(&m.kernel), esc(&m.os), esc(&r.client), esc(&r.slipstream_version)
    );
    for n in &r.notes {
        let _ = write!(out, "<p class=\"note\">{}</p>", esc(n));
    }
    for w in &r.workloads {
        let wl = &w.workload;
        let _ = write!(out, "<h2>{}</h2><p>{}</p>", esc(&wl.name), esc(&wl.description));
        out.push_str("<table><tr><th>target (µs)</th><th>publish p50</th><th>p99</th><th>p99.9</th><th>p99.99</th><th>max</th><th>e2e p50</th><th>e2e p99</th><th>delay p99</th><th>msg/s</th><th>MB/s</th><th>broker CPU s / M msgs</th><th>p50 × limit</th></tr>");
        for l in &w.limits {
            let s = &l.round_trip;
            let _ = write!(out, "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>–</td><td>–</td><td>–</td><td>–</td><td>–</td><td>–</td><td>1.00</td></tr>", esc(&l.name), s.p("p50"), s.p("p99"), s.p("p99.9"), s.p("p99.99"), s.max_us);
        }
        for t in &w.targets {
            let ratio = t.publish_p50_over_limit.first().map_or("–".into(), |(_, v)| format!("{v:.2}"));
            let cpu = t.broker_cpu_s_per_million_msgs.map_or("–".into(), |v| format!("{v:.2}"));
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.0}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
                esc(&t.name), t.publish.p("p50"), t.publish.p("p99"), t.publish.p("p99.9"), t.publish.p("p99.99"), t.publish.max_us,
                t.end_to_end.p("p50"), t.end_to_end.p("p99"), t.publish_delay.p("p99"), t.throughput_msgs_per_s, t.throughput_mb_per_s, cpu, ratio
            );
        }
        out.push_str("</table><h3>Publish latency by percentile</h3>");
        let mut series: Vec<(String, &Summary)> = w.limits.iter().map(|l| (l.name.clone(), &l.round_trip)).collect();
        series.extend(w.targets.iter().map(|t| (format!("{} publish", t.name), &t.publish)));
        out.push_str(&percentile_svg(&series));
        out.push_str("<h3>End-to-end latency by percentile</h3>");
        let e2e: Vec<(String, &Summary)> =
            w.targets.iter().map(|t| (format!("{} end-to-end", t.name), &t.end_to_end)).collect();
        out.push_str(&percentile_svg(&e2e));
        out.push_str("<h3>Throughput over time</h3>");
        let tp: Vec<(String, &[u64])> = w.targets.iter().map(|t| (t.name.clone(), t.per_second.as_slice())).collect();
        out.push_str(&throughput_svg(&tp));
    }
    out.push_str("</body></html>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpu: &str, devices: &[(&str, bool)]) -> Machine {
        Machine {
            cpu: cpu.into(),
            cores: 2,
            memory_gib: 2.0,
            kernel: "6.1.0".into(),
            os: "Debian".into(),
            rdma_devices: devices.iter().map(|(n, s)| RdmaDevice { name: (*n).into(), software: *s }).collect(),
        }
    }

    #[test]
    fn software_rdma_and_emulation_label_the_figures_functional() {
        assert!(machine("AMD EPYC 7B13", &[("mlx5_0", false)]).caveats().is_empty(), "hardware is not labelled");
        let c = machine("AMD EPYC 7B13", &[("mlx5_0", false), ("rxe0", true)]).caveats();
        assert_eq!(c.len(), 1);
        assert!(c[0].starts_with("FUNCTIONAL ONLY for RDMA: rxe0 "), "{c:?}");
        let c = machine("QEMU TCG CPU version 2.5+", &[("rxe0", true)]).caveats();
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].contains("emulated"), "{c:?}");
    }

    #[test]
    fn reports_written_before_rdma_devices_were_recorded_still_render() {
        let m: Machine =
            serde_json::from_str(r#"{"cpu":"x","cores":2,"memory_gib":1.0,"kernel":"k","os":"o"}"#).expect("parses");
        assert!(m.rdma_devices.is_empty());
    }
}
