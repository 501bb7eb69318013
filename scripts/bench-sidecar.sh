#!/usr/bin/env bash
# What `slipstream sidecar` adds: the same broker direct and through a sidecar, in one run
# (interleaved), with the raw TCP limit measured in the same run; writes docs/bench/sidecar/.
# The figure to read: added publish p50 against one raw TCP ping-pong (one more hop,
# both ways).
#
#   scripts/bench-sidecar.sh        # REPS=3 DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
duration=${DURATION:-10}
cargo build --release --workspace

./target/release/slipstream bench \
  --target slipstream:tcp --target slipstream:tcp,--via-sidecar \
  --workload latency-128b --workload max-throughput-1k \
  --repetitions "$reps" --duration "$duration" \
  --note "slipstream serve on tcp with its log on disk, direct and with slipstream sidecar (one tokio worker thread) in front on loopback; broker CPU figures are the broker's alone." \
  --note "Kroxylicious, a Java Kafka proxy, reports about 0.2 ms added latency for comparison (its own documentation, other hardware)." \
  --out docs/bench/sidecar
