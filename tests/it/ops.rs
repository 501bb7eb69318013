//! What operators look at: `slipstream --version` and machine-readable logs.

use crate::harness::{serves_api_versions, BrokerProc};
use std::process::Command;

/// The version, the commit it was built from, the features built in, and which
/// transports this machine can run, each with its reason.
#[test]
fn version_names_the_commit_the_features_and_the_transports_here() {
    let out = Command::new(env!("CARGO_BIN_EXE_slipstream")).arg("--version").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{text}");
    let commit = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().expect("git");
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
    assert!(text.starts_with(&format!("slipstream {} (commit ", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(commit.is_empty() || text.contains(&commit), "built from {commit}:\n{text}");
    let features = if cfg!(feature = "rdma") { "features: rdma" } else { "features: none" };
    assert!(text.contains(features), "{text}");
    for kind in ["tcp     yes", "uring   ", "rdma    ", "ustack  yes (this kernel opens AF_XDP sockets)"] {
        assert!(text.contains(kind), "{kind:?} missing:\n{text}");
    }
    // The same with -V, and after other flags it is still a flag of its own.
    let short = Command::new(env!("CARGO_BIN_EXE_slipstream")).arg("-V").output().expect("run");
    assert_eq!(String::from_utf8_lossy(&short.stdout), text);
}

/// `--log-format json`: every line the broker logs is one JSON object with a timestamp,
/// a level, a target and the message.
#[test]
fn json_logs_are_one_object_per_line() {
    let mut broker = BrokerProc::start(&["--log-format", "json"]);
    assert!(serves_api_versions(broker.addr));
    assert!(broker.terminate().success());
    let log = broker.log_text();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["ts", "level", "target", "msg"] {
            assert!(v[field].is_string(), "{field} missing: {line}");
        }
        lines += 1;
    }
    assert!(lines >= 2, "the broker logged its start and stop:\n{log}");
    assert!(log.contains("\"level\":\"INFO\""), "{log}");
    // Fields are keys of their own: the listener line names its listener and cores.
    let serving = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["msg"] == "slipstream serving")
        .unwrap_or_else(|| panic!("no listener line:\n{log}"));
    assert_eq!(serving["listen"], serde_json::Value::String(broker.addr.to_string()), "{serving}");
    assert_eq!((serving["protocol"].as_str(), serving["cores"].as_u64()), (Some("kafka"), Some(1)), "{serving}");
}
