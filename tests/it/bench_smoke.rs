//! Issue 4, acceptance 3: a short run of `slipstream bench` against slipstream, and a
//! check that the JSON carries every field the report promises.

use serde_json::Value;
use std::process::Command;

fn has(v: &Value, path: &[&str]) -> bool {
    let mut cur = v;
    for key in path {
        match cur.get(key) {
            Some(next) => cur = next,
            None => return false,
        }
    }
    true
}

#[test]
fn bench_smoke_run_writes_every_field() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_slipstream"))
        .args(["bench", "--workload", "latency-128b", "--workload", "fanout", "--duration", "1", "--warmup", "0.3"])
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("run slipstream bench");
    assert!(status.success(), "slipstream bench failed");
    let text = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let html = std::fs::read_to_string(out.path().join("report.html")).expect("report.html");
    assert!(html.contains("<svg") && html.contains("latency-128b") && html.contains("fanout"));
    let v: Value = serde_json::from_str(&text).expect("results.json parses");
    for f in ["slipstream_version", "created_unix_s", "client", "notes"] {
        assert!(has(&v, &[f]), "missing {f}");
    }
    for f in ["cpu", "cores", "memory_gib", "kernel", "os"] {
        assert!(has(&v, &["machine", f]), "missing machine.{f}");
    }
    let workloads = v["workloads"].as_array().expect("workloads");
    assert_eq!(workloads.len(), 2);
    for w in workloads {
        let limits = w["limits"].as_array().expect("limits");
        assert_eq!(limits.len(), 2, "blocking and busy-poll limits");
        for l in limits {
            assert!(l["round_trip"]["count"].as_u64().unwrap_or(0) > 0);
        }
        let targets = w["targets"].as_array().expect("targets");
        assert_eq!(targets.len(), 1);
        let t = &targets[0];
        for f in [
            "name",
            "bootstrap",
            "repetitions",
            "measured_s",
            "messages_sent",
            "messages_received",
            "errors",
            "throughput_msgs_per_s",
            "throughput_mb_per_s",
            "consume_msgs_per_s",
            "broker_cpu_s",
            "broker_cpu_s_per_million_msgs",
            "publish_p50_over_limit",
            "per_second",
        ] {
            assert!(has(t, &[f]), "missing target field {f} in {}", w["workload"]["name"]);
        }
        for h in ["publish", "publish_delay", "end_to_end"] {
            for f in ["count", "mean_us", "min_us", "max_us", "percentiles_us", "curve"] {
                assert!(has(t, &[h, f]), "missing {h}.{f}");
            }
            let names: Vec<&str> =
                t[h]["percentiles_us"].as_array().expect("percentiles").iter().filter_map(|p| p[0].as_str()).collect();
            assert_eq!(names, ["p50", "p75", "p95", "p99", "p99.9", "p99.99"]);
        }
        assert!(t["messages_sent"].as_u64().unwrap_or(0) > 0, "nothing was sent");
        assert!(t["end_to_end"]["count"].as_u64().unwrap_or(0) > 0, "nothing was consumed");
        assert!(t["broker_cpu_s"].as_f64().is_some(), "broker CPU not measured");
        assert_eq!(t["errors"].as_u64(), Some(0));
    }
}

/// A backlog workload measures fetching: the backlog is written first, then drained, and
/// the figures are of messages fetched.
#[test]
fn bench_backlog_workload_measures_the_drain() {
    let out = tempfile::tempdir().expect("tempdir");
    let workload = out.path().join("small-backlog.toml");
    std::fs::write(
        &workload,
        "name = \"small-backlog\"\npartitions = 2\nmessage_size = 512\nproducers = 2\nbatch_messages = 16\n\
         backlog_messages = 20000\nwarmup_s = 0\nduration_s = 20\n",
    )
    .expect("write workload");
    let status = Command::new(env!("CARGO_BIN_EXE_slipstream"))
        .args(["bench", "--no-limit", "--workload"])
        .arg(&workload)
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("run slipstream bench");
    assert!(status.success(), "slipstream bench failed");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).expect("results.json"))
            .expect("results.json parses");
    let t = &v["workloads"][0]["targets"][0];
    assert_eq!(t["errors"].as_u64(), Some(0), "{t}");
    let received = t["messages_received"].as_u64().unwrap_or(0);
    // Every message of the backlog, counted once (the fill may overshoot by a batch per producer).
    assert!((20_000..=20_032).contains(&received), "drained {received} of 20000");
    assert_eq!(t["messages_sent"].as_u64(), Some(0), "the fill is not measured");
    let measured = t["measured_s"].as_f64().unwrap_or(0.0);
    assert!(measured > 0.0 && measured < 20.0, "the drain did not end by itself: {measured} s");
    let rate = t["throughput_msgs_per_s"].as_f64().unwrap_or(0.0);
    assert!((rate - received as f64 / measured).abs() < 1.0, "msg/s is of messages fetched: {rate}");
    assert!(t["broker_cpu_s_per_million_msgs"].as_f64().is_some(), "no CPU per message fetched");
}
