#!/usr/bin/env bash
# RocketMQ workloads in one run: sync-send latency (one producer, one send in flight) and
# throughput with a consumer, through the RocketMQ remoting native client
# (`slipstream bench --protocol rocketmq`), against slipstream (tcp and io_uring), the
# rocketmq-rust broker 1.0.0 (name server + broker from crates.io) and the raw TCP
# limit; writes docs/bench/rocketmq/.
#
#   scripts/bench-rocketmq.sh            # REPS=3 DURATION=10 by default
#
# rocketmq-rust is built into target/peers the first time (`cargo install`, about 25
# minutes on two cores); PEER_BIN=DIR uses binaries built elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
duration=${DURATION:-10}
cargo build --release --workspace

bin=${PEER_BIN:-target/peers/bin}
if [ ! -x "$bin/rocketmq-broker-rust" ] || [ ! -x "$bin/rocketmq-namesrv-rust" ]; then
  echo "building rocketmq-rust 1.0.0 into target/peers (once)"
  cargo install --quiet --locked --root target/peers rocketmq-namesrv --version 1.0.0
  cargo install --quiet --locked --root target/peers rocketmq-broker --version 1.0.0
  bin=target/peers/bin
fi
bin=$(cd "$bin" && pwd)

# The rocketmq-rust broker stops writing (its log: "consume queue can not write") once it
# judges the disk nearly full, by the space left to unprivileged users (90 %), and its
# figures are then not its own: refuse to start that close.
used=$(python3 -c 'import os; s = os.statvfs("/tmp"); print(int(100 * (s.f_blocks - s.f_bavail) / s.f_blocks))')
if [ "$used" -ge 85 ]; then
  echo "the disk under /tmp is ${used}% used (by free space left to users): rocketmq-rust refuses writes near 90%; free some first" >&2
  exit 1
fi

# Its name server and broker, on loopback, with their data in a temporary directory.
# Both refuse to start without ROCKETMQ_HOME; the name server runs under the loopback
# development security profile; the broker cannot be bound to loopback from its config
# file (bindAddress is not a key it takes), so it runs without a security profile.
home=$(mktemp -d)
ns_port=29876
broker_port=20911
cat > "$home/broker.toml" <<TOML
[broker]
listenPort = $broker_port
brokerIp1 = "127.0.0.1"
storePathRootDir = "$home/store"
namesrvAddr = "127.0.0.1:$ns_port"
autoCreateTopicEnable = true

[broker.brokerIdentity]
brokerName = "broker-a"
brokerClusterName = "DefaultCluster"
brokerId = 0

[store]
haListenAddress = "127.0.0.1"
haListenPort = $((broker_port + 1))
storePathRootDir = "$home/store"
TOML
ROCKETMQ_HOME=$home ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback \
  "$bin/rocketmq-namesrv-rust" --listenPort $ns_port --bindAddress 127.0.0.1 > "$home/namesrv.log" 2>&1 &
ns_pid=$!
sleep 2
ROCKETMQ_HOME=$home "$bin/rocketmq-broker-rust" -c "$home/broker.toml" > "$home/broker.log" 2>&1 &
broker_pid=$!
trap 'kill $broker_pid $ns_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$home"' EXIT
for _ in $(seq 60); do
  (exec 3<>/dev/tcp/127.0.0.1/$broker_port) 2>/dev/null && break
  sleep 1
done
# The harness waits for the broker's registration with the name server (its topic
# creation asks the name server for the cluster until the broker is there).

./target/release/slipstream bench --protocol rocketmq \
  --target slipstream:tcp --target slipstream:uring \
  --target "rocketmq-rust=127.0.0.1:${ns_port},pid=${broker_pid}" \
  --workload rocketmq-sync-send --workload rocketmq-throughput-1k \
  --repetitions "$reps" --duration "$duration" \
  --note "slipstream with its log on disk (flush interval:1000); rocketmq-rust 1.0.0 broker with its defaults (ASYNC_FLUSH) and its store on the same disk." \
  --note "The RocketMQ native client: one request in flight per connection (SEND_MESSAGE_V2, SEND_BATCH_MESSAGE for batches); a consumer long-polls every queue with PULL_MESSAGE." \
  --out docs/bench/rocketmq
if grep -q "can not write" "$home/broker.log"; then
  echo "rocketmq-rust refused writes during the run, so its figures are not its own (its errors below)" >&2
  sed 's/\x1b\[[0-9;]*m//g' "$home/broker.log" | grep -E "ERROR" | head -5 >&2
  exit 1
fi
