#!/usr/bin/env bash
# tcp versus io_uring, side by side from one run (native client, so the broker dominates):
# produce round-trip latency at 128 B with 1 connection and with 64, produce and fetch
# throughput with 1 KiB messages in 64 KiB batches (fetch also draining a 3 GiB backlog),
# broker CPU per million messages.
# Writes docs/bench/transports/{results.json,report.html}.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
./target/release/slipstream bench --client native \
  --target slipstream:tcp --target slipstream:uring \
  --workload latency-128b --workload latency-128b-64conn --workload max-throughput-1k \
  --workload fetch-backlog-1k \
  --repetitions "${REPS:-3}" --duration "${DURATION:-10}" \
  --out docs/bench/transports

# The latency modes, measured the same way: busy-polling cores (both backends) and
# kernel submission polling (io_uring).
./target/release/slipstream bench --client native \
  --target slipstream:tcp --target slipstream:uring \
  --target slipstream:tcp,--busy-poll=true --target slipstream:uring,--busy-poll=true \
  --target slipstream:uring,--uring-sqpoll=true \
  --workload latency-128b \
  --repetitions "${REPS:-3}" --duration "${DURATION:-10}" \
  --out docs/bench/latency-modes

# io_uring's receive modes (single-shot RECV per read vs multishot RECV + provided-buffer
# ring), sleeping and busy-polling, against tcp.
./target/release/slipstream bench --client native \
  --target slipstream:tcp --target slipstream:uring --target slipstream:uring,--uring-recv=multishot \
  --target slipstream:tcp,--busy-poll=true --target slipstream:uring,--busy-poll=true \
  --target slipstream:uring,--uring-recv=multishot,--busy-poll=true \
  --workload latency-128b \
  --repetitions "${REPS:-2}" --duration "${DURATION:-6}" \
  --out docs/bench/uring-recv-latency
./target/release/slipstream bench --client native \
  --target slipstream:tcp --target slipstream:uring --target slipstream:uring,--uring-recv=multishot \
  --workload latency-128b-64conn --workload max-throughput-1k \
  --repetitions "${REPS:-2}" --duration "${DURATION:-6}" \
  --out docs/bench/uring-recv-throughput
