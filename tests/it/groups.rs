//! Acceptance 2: a 3-member consumer group loses one member to SIGKILL; the survivors
//! take over its partitions after the session timeout and nothing is lost.

use crate::harness::{flags, run_client, BrokerProc};
use std::time::Duration;

per_transport!(group_member_sigkilled_survivors_take_over, group_failover, ustack);

fn group_failover(transport: &[&str]) {
    let broker = BrokerProc::start(&flags(&["--cores", "2"], transport));
    let bootstrap = broker.addr.to_string();
    run_client("python3", &["group_failover.py", "--bootstrap", &bootstrap], Duration::from_secs(300));
}
