//! Acceptance 1 and 5 of the broker core: unmodified real clients, before and after a
//! broker restart, with the copy counters checked at the end.

use crate::harness::{flags, phases_across_restart, run_client, BrokerProc};
use std::time::Duration;

const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

fn suite(program: &str, script: &str, transport: &[&str]) {
    // On io_uring, exercise the zero-copy send path too (off by default: it loses over
    // loopback, but it is what a real NIC wants).
    let zc: &[&str] = if transport.contains(&"uring") { &["--uring-zc-threshold", "16384"] } else { &[] };
    suite_with(program, script, &[transport, zc].concat());
}

fn suite_with(program: &str, script: &str, broker_args: &[&str]) {
    let mut args = vec!["--default-partitions", "3"];
    args.extend_from_slice(broker_args);
    let mut broker = BrokerProc::start(&args);
    let bootstrap = broker.addr.to_string();
    phases_across_restart(&mut broker, program, &[script, "--bootstrap", &bootstrap], SUITE_TIMEOUT);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    // Zero-copy dispatch: fetched record bytes left by reference, produced bytes were
    // copied once (into the log). Counters are per process: the second run's figures.
    let s = broker.stats();
    println!("copy counters after phase 2: {s:?}");
    assert!(s.fetch_bytes_zero_copy > 0, "nothing was fetched by reference: {s:?}");
    assert_eq!(s.fetch_bytes_copied, 0, "fetch payload was copied in user space: {s:?}");
    assert_eq!(s.produce_bytes_copied, s.produce_payload_bytes, "produce payload copied more than once: {s:?}");
    if broker_args.contains(&"ustack") {
        // The user-space stack copies what it sends into its socket buffers (it keeps the
        // bytes for retransmission) and what it receives out of them: both counted, the
        // fetched records among them, and nothing else was copied.
        assert!(s.receive_bytes_staged > 0, "no received byte went through the stack's buffers: {s:?}");
        assert!(s.ustack_send_bytes_copied >= s.fetch_bytes_zero_copy, "fetched bytes not counted: {s:?}");
        assert!(s.ustack_umem_bytes_written >= s.ustack_send_bytes_copied, "UMEM writes not counted: {s:?}");
    } else if broker_args.contains(&"multishot") {
        // Multishot receive: bytes came through the provided-buffer ring (one staging copy,
        // counted apart from the one copy into the log).
        assert!(s.receive_bytes_staged > 0, "multishot receive mode was not used: {s:?}");
    } else {
        assert_eq!(s.receive_bytes_staged, 0, "received bytes were staged: {s:?}");
    }
    if broker_args.contains(&"--uring-zc-threshold") {
        // Large fetch responses went out with SENDMSG_ZC: not even the kernel copied them.
        assert!(s.kernel_zero_copy_send_bytes > 0, "no zero-copy sends on io_uring: {s:?}");
    }
}

per_transport!(confluent_kafka_librdkafka_2x, |t| suite("python3", "confluent_suite.py", t), ustack);

// Three cores: partitions are spread over them, so most requests arriving on one
// connection run partly on other cores (forwarded operations, gathered replies).
per_transport!(confluent_kafka_three_cores, |t| suite_with(
    "python3",
    "confluent_suite.py",
    &flags(&["--cores", "3"], t)
));

per_transport!(kafka_python_pure_python, |t| suite("python3", "kafka_python_suite.py", t), ustack);

per_transport!(kcat_librdkafka_2_0_2, |t| suite("python3", "kcat_suite.py", t), ustack);

per_transport!(kafkajs_pure_javascript, |t| suite("node", "kafkajs_suite.js", t), ustack);

// Admin and offset APIs through confluent-kafka's AdminClient: CreateTopics errors,
// DescribeConfigs, CreatePartitions, DescribeCluster, ListOffsets by time, acks=0,
// ListGroups, DescribeGroups, OffsetFetch, DeleteTopics.
per_transport!(admin_apis_confluent_kafka, |t| {
    let broker = BrokerProc::start(&flags(&["--cores", "2"], t));
    run_client("python3", &["admin_suite.py", "--bootstrap", &broker.addr.to_string()], SUITE_TIMEOUT);
});
