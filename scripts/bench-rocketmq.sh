#!/usr/bin/env bash
# RocketMQ workloads in one run: sync-send latency (one producer, one send in flight) and
# throughput with a consumer, through the RocketMQ remoting native client, against
# slipstream (tcp and io_uring) and the raw TCP limit; writes docs/bench/rocketmq/.
#
# A RocketMQ peer joins when its name server is given:
#   ROCKETMQ_PEER=127.0.0.1:9876 ROCKETMQ_PEER_PID=1234 scripts/bench-rocketmq.sh
# (rocketmq-rust: `cargo install rocketmq-namesrv rocketmq-broker --version 1.0.0`; the
# broker needs ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback.)
#
#   scripts/bench-rocketmq.sh            # REPS=3 DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
duration=${DURATION:-10}
cargo build --release --workspace
targets=(--target slipstream:tcp --target slipstream:uring)
notes=(--note "slipstream with its log on disk (flush interval:1000); the native client: one request in flight per connection, bodies of the workload's size.")
if [ -n "${ROCKETMQ_PEER:-}" ]; then
  peer="rocketmq-rust=${ROCKETMQ_PEER}"
  [ -n "${ROCKETMQ_PEER_PID:-}" ] && peer="${peer},pid=${ROCKETMQ_PEER_PID}"
  targets+=(--target "$peer")
else
  notes+=(--note "No RocketMQ peer in this run: rocketmq-rust 1.0.0's name server exits at start on this machine (core.service.failed, exit 70); see docs/bench/README.md.")
fi
./target/release/slipstream bench --protocol rocketmq "${targets[@]}" \
  --workload rocketmq-sync-send --workload rocketmq-throughput-1k \
  --repetitions "$reps" --duration "$duration" "${notes[@]}" \
  --out docs/bench/rocketmq
