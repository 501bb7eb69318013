#!/usr/bin/env bash
# Kernel TCP against the user-space stack (AF_XDP + smoltcp) on one path: the broker in the
# server namespace of scripts/ustack/run-in-netns.sh, the bench clients (kernel TCP) in the
# client namespace, a router namespace between them. Each transport blocking and
# busy-polling, interleaved in one run; writes docs/bench/ustack/.
# The figure to read: ustack busy-poll publish p50 against kernel TCP blocking (goal ≤ 0.6×).
#
#   scripts/bench-ustack.sh        # REPS=3 DURATION=10 by default; needs root
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${USTACK_SERVER_NS:-}" ]]; then
  cargo build --release --workspace
  exec bash scripts/ustack/run-in-netns.sh bash "$0" "$@"
fi
reps=${REPS:-3}
duration=${DURATION:-10}
path="--netns=$USTACK_SERVER_NS,--addr=$USTACK_BROKER"
ustack="$path,--ustack-if=$USTACK_IF"
./target/release/slipstream bench \
  --target "slipstream:tcp,$path" --target "slipstream:tcp,$path,--busy-poll=true" \
  --target "slipstream:ustack,$ustack" --target "slipstream:ustack,$ustack,--busy-poll=true" \
  --workload latency-128b --workload max-throughput-1k \
  --repetitions "$reps" --duration "$duration" \
  --note "Every target is slipstream serve with its log on disk, in the server namespace of scripts/ustack/run-in-netns.sh; clients (kernel TCP) in the client namespace reach it through a router namespace over two veth pairs (the raw TCP limit below is loopback in the client namespace, not this path)." \
  --note "tcp: the kernel's TCP on the server's veth. ustack: smoltcp over AF_XDP on the same veth (native XDP, copy mode: veth has no zero-copy), the kernel's address and port steered to it by the XDP program. busy-poll: the broker's core spins in its poll instead of sleeping." \
  --out docs/bench/ustack
