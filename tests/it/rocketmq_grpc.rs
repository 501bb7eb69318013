//! RocketMQ 5 over gRPC: rocketmq-client-nodejs 1.0.8 (the official Node.js SDK) against
//! the `rocketmq-grpc` listener, on the same log as the remoting and Kafka clients.
//!
//! The gRPC front runs on its own runtime, not on a transport: only the tests that also
//! drive remoting or Kafka clients run once per transport.

use crate::harness::{flags, free_addrs, run_client, serves_api_versions, BrokerProc};
use std::time::Duration;

const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

/// A broker with the harness's Kafka listener, a gRPC listener and RocketMQ remoting
/// (broker and name server); returns it with the gRPC and name-server addresses.
fn start(transport: &[&str], extra: &[&str]) -> (BrokerProc, String, String) {
    let a = free_addrs(4);
    let (grpc, rmq, ns) = (a[1].to_string(), a[2].to_string(), a[3].to_string());
    let (l0, l1, l2) =
        (format!("rocketmq-grpc://{grpc}"), format!("rocketmq://{rmq}"), format!("rocketmq-namesrv://{ns}"));
    let mut args = vec!["--listen", &l0, "--listen", &l1, "--listen", &l2, "--default-partitions", "4"];
    args.extend_from_slice(extra);
    let broker = BrokerProc::start_at(a[0], &flags(&args, transport), serves_api_versions);
    (broker, grpc, ns)
}

fn suite(endpoints: &str, phase: &str, more: &[&str]) {
    let mut args = vec!["grpc_suite.js", "--endpoints", endpoints, "--phase", phase];
    args.extend_from_slice(more);
    run_client("node", &args, SUITE_TIMEOUT);
}

// 10,000 messages; a tag-filtered SimpleConsumer, a PushConsumer, and a group that stops
// part way, then resumes after a restart with every message it had not acknowledged and
// none it had. The copy counters say what the gRPC path copied.
#[test]
fn grpc_producer_consumers_and_restart() {
    let (mut broker, grpc, _) = start(&[], &[]);
    let state = std::env::temp_dir().join(format!("slipstream-grpc-state-{}", std::process::id()));
    let state = state.to_string_lossy().into_owned();
    suite(&grpc, "send", &["--state", &state]);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    broker.spawn();
    suite(&grpc, "resume", &["--state", &state]);
    let _ = std::fs::remove_file(&state);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    let s = broker.stats();
    println!("copy counters: {s:?}");
    // A send copies the body into the record batch (as a remoting send), the log copies
    // the batch once; a receive's one copy is protobuf's encoding of the body.
    assert!(s.rocketmq_send_bytes_copied > 0 && s.rocketmq_grpc_bytes_copied > 0, "{s:?}");
    assert_eq!(s.produce_bytes_copied, s.produce_payload_bytes, "stored more than once: {s:?}");
}

// FIFO message groups in order (with failures redelivered in place), delay messages,
// transactions (commit, rollback, check-back both ways), redelivery after the invisible
// time with ChangeInvisibleDuration, and the dead-letter queue after the last attempt.
#[test]
fn grpc_fifo_delay_transactions_redelivery_and_dead_letters() {
    let fast = [
        "--rocketmq-transaction-timeout-ms",
        "1000",
        "--rocketmq-transaction-check-interval-ms",
        "1000",
        "--rocketmq-max-delivery-attempts",
        "2",
    ];
    let (_broker, grpc, _) = start(&[], &fast);
    for phase in ["fifo", "delay", "transaction", "invisible", "dlq"] {
        suite(&grpc, phase, &[]);
    }
}

// One log, three protocols: gRPC -> confluent-kafka and back, gRPC -> ali-ons and back.
per_transport!(grpc_cross_protocol, |t| {
    let (broker, grpc, ns) = start(t, &[]);
    let bootstrap = broker.addr.to_string();
    suite(&grpc, "cross-send", &[]);
    run_client("python3", &["cross_protocol.py", "--bootstrap", &bootstrap, "--phase", "read"], SUITE_TIMEOUT);
    run_client("python3", &["cross_protocol.py", "--bootstrap", &bootstrap, "--phase", "write"], SUITE_TIMEOUT);
    suite(&grpc, "cross-receive", &[]);
    suite(&grpc, "cross-ons", &["--namesrv", &ns]);
});

// The RPCs the Node.js SDK does not call (QueryOffset, PullMessage with long polling,
// UpdateOffset / GetOffset, ForwardMessageToDeadLetterQueue) through its generated stubs;
// then bad input: malformed protobuf, an unknown topic, forged receipt handles, an
// oversized body, an RPC not served, a request without a client id, a SQL filter — each
// refused with its status, while another consumer's long poll goes on unharmed.
#[test]
fn grpc_offsets_pull_forward_and_bad_input() {
    let (mut broker, grpc, _) = start(&[], &[]);
    suite(&grpc, "raw-rpcs", &[]);
    suite(&grpc, "bad-input", &[]);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
}
