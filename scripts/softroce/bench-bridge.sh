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
# Inside the VM: the harness starts `serve --transport rdma` on $RXE_IP and a bridge in
# front of it for `slipstream:rdma`, and a loopback TCP broker for `slipstream:tcp`. The
# report labels itself functional: the harness sees the emulated CPU and the software rxe0.
exec target/release/slipstream bench --client native \
  --target slipstream:rdma --target slipstream:tcp \
  --workload latency-128b --workload max-throughput-1k \
  --repetitions 1 --duration "${DURATION:-5}" --warmup 1 \
  --out docs/bench/rdma-functional
