#!/usr/bin/env bash
# The comparison report in one command: slipstream on every transport built into this
# binary, Tansu, and the raw-TCP limit, on latency-128b, fixed-rate-1k and
# max-throughput-1k, through librdkafka and through the native client. Writes
# docs/bench/{native,rdkafka}/{results.json,report.html}.
#
#   scripts/bench-report.sh            # REPS=3 DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
duration=${DURATION:-10}
cargo build --release --workspace
tansu_pid=$(bash scripts/tansu.sh start 9192)
trap 'bash scripts/tansu.sh stop' EXIT
for client in native rdkafka; do
  ./target/release/slipstream bench --client "$client" --matrix \
    --target "tansu=127.0.0.1:9192,pid=${tansu_pid}" \
    --workload latency-128b --workload fixed-rate-1k --workload max-throughput-1k \
    --repetitions "$reps" --duration "$duration" --fetch-wait-ms 5 \
    --note "Tansu 0.6.0 with the memory:// storage engine (no disk); slipstream with its log on disk (flush interval:1000)." \
    --note "Fetch max wait is 5 ms for every target: Tansu sleeps the full wait even when data is there." \
    --out "docs/bench/${client}"
done
