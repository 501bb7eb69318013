#!/usr/bin/env bash
# RocketMQ 5 gRPC beside RocketMQ remoting, in one run: sync-send latency (one producer,
# one send in flight) and throughput with a consumer, each target run with both client
# modes (`slipstream bench --protocol rocketmq --protocol rocketmq-grpc`), with the raw
# TCP limit measured in the same run; writes docs/bench/rocketmq-grpc/.
#
#   scripts/bench-rocketmq-grpc.sh        # REPS=3 DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
duration=${DURATION:-10}
cargo build --release --workspace

./target/release/slipstream bench --protocol rocketmq --protocol rocketmq-grpc \
  --target slipstream:tcp --target slipstream:uring \
  --workload rocketmq-sync-send --workload rocketmq-throughput-1k \
  --repetitions "$reps" --duration "$duration" \
  --note "slipstream with its log on disk (flush interval:1000); the transport names the dispatch cores' transport: the gRPC front runs on its own thread (tokio, HTTP/2) either way and hands partition operations to the cores." \
  --note "remoting: the native client, one request in flight per connection (SEND_MESSAGE_V2, SEND_BATCH_MESSAGE for batches), a consumer long-polling every queue with PULL_MESSAGE. grpc: tonic, one SendMessage in flight per HTTP/2 connection (a batch is one request of 32 messages), a simple consumer (ReceiveMessage over every queue, one AckMessage per batch)." \
  --out docs/bench/rocketmq-grpc
