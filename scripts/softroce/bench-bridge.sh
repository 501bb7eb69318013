#!/usr/bin/env bash
# `slipstream bench` through the RDMA bridge, inside the soft-RoCE VM, beside plain TCP to
# a broker in the same VM: writes docs/bench/rdma-functional/. FUNCTIONAL figures only:
# soft-RoCE under TCG emulation says nothing about RDMA hardware.
#   bash scripts/softroce/bench-bridge.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${RXE_IP:-}" ]; then
  cargo build --release --features rdma
  mkdir -p docs/bench/rdma-functional
  exec env VM_RW="$PWD/docs/bench/rdma-functional" bash scripts/softroce/run-in-vm.sh bash "$0"
fi
# Inside the VM.
B=target/release/slipstream
D=$(mktemp -d)
PORT=9393
$B serve --transport rdma --listen "$RXE_IP:$PORT" --data-dir "$D/rdma" --segment-bytes 16777216 2>"$D/broker.log" &
BROKER=$!
sleep 2
$B bridge --listen 127.0.0.1:19092 --upstream "$RXE_IP:$PORT" 2>"$D/bridge.log" &
BRIDGE=$!
sleep 1
trap 'kill $BROKER $BRIDGE 2>/dev/null || true' EXIT
timeout 900 $B bench --client native \
  --target "rdma-bridge=127.0.0.1:19092,pid=$BROKER" --target slipstream:tcp \
  --workload latency-128b --workload max-throughput-1k \
  --repetitions 1 --duration "${DURATION:-5}" --warmup 1 \
  --note "FUNCTIONAL ONLY: soft-RoCE (rdma_rxe) inside a qemu VM under TCG emulation; these figures say nothing about RDMA hardware" \
  --out docs/bench/rdma-functional
