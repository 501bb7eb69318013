#!/usr/bin/env bash
# Runs CMD in a client network namespace that reaches a broker on the user-space stack
# through a router namespace (issue 14's test topology), and removes it all afterwards,
# on failure too:
#
#   client ns  uc0 10.77.2.2 ──veth── uc1 10.77.2.1  router ns  us1 10.77.1.1 ──veth── us0 10.77.1.2  server ns
#                                     (netem here when asked, both legs)               (XDP + AF_XDP: the broker)
#
# Usage: run-in-netns.sh [--netem 'NETEM ARGS'] [--impair LOSS_PCT:REORDER_PCT] [--queues N] CMD...
# (--netem needs sch_netem, which some kernels lack, this CI's among them; --impair does
# loss and reordering with nftables and HTB instead: scripts/ustack/impair.sh.)
# Exports to CMD: USTACK_SERVER_NS (where to start `serve --transport ustack`), USTACK_IF
# (the interface to give it), USTACK_BROKER (IP:PORT the broker listens on, as the client
# namespace reaches it), USTACK_QUEUES (its receive queues: start that many cores), and
# USTACK_ROUTER_NS/USTACK_PEER_IF (the other end of the veth). The veth pair can have up to
# 4 queues: `ethtool -L` on both ends (in their namespaces) changes the count for a broker
# with another number of cores, as tests/it/harness.rs does.
# Needs root (namespaces, XDP). The kernel TCP in the server namespace owns 10.77.1.2 for
# everything but the broker's port (ARP, ping), as on a real host.
set -euo pipefail
netem=""
impair=""
queues=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --netem) netem="$2"; shift 2 ;;
    --impair) impair="$2"; shift 2 ;;
    --queues) queues="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--netem 'ARGS'] [--queues N] CMD..." >&2; exit 2; }
command -v ethtool >/dev/null || { echo "$0: ethtool is needed (apt-get install ethtool)" >&2; exit 2; }

# Names unique to this run: namespaces are global, and CI may run beside a session.
tag="$$"
srv="ustack-srv-$tag" rtr="ustack-rtr-$tag" cli="ustack-cli-$tag"
cleanup() {
  # Whatever CMD left in the namespaces goes with them.
  for ns in "$srv" "$rtr" "$cli"; do
    if ip netns pids "$ns" >/dev/null 2>&1; then
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

for ns in "$srv" "$rtr" "$cli"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
# Server leg. Queues: one per broker core (the XDP program drops the broker's packets on a
# queue without a socket).
ip link add us0 numtxqueues 4 numrxqueues 4 netns "$srv" type veth \
  peer name us1 numtxqueues 4 numrxqueues 4 netns "$rtr"
ip netns exec "$srv" ethtool -L us0 rx "$queues" tx "$queues"
ip netns exec "$rtr" ethtool -L us1 rx "$queues" tx "$queues"
ip -n "$srv" addr add 10.77.1.2/24 dev us0
ip -n "$rtr" addr add 10.77.1.1/24 dev us1
# Client leg.
ip link add uc0 netns "$cli" type veth peer name uc1 netns "$rtr"
ip -n "$cli" addr add 10.77.2.2/24 dev uc0
ip -n "$rtr" addr add 10.77.2.1/24 dev uc1
for l in "$srv:us0" "$rtr:us1" "$rtr:uc1" "$cli:uc0"; do
  ip -n "${l%%:*}" link set "${l#*:}" up
done
ip netns exec "$rtr" sysctl -qw net.ipv4.ip_forward=1
ip -n "$srv" route add default via 10.77.1.1
ip -n "$cli" route add default via 10.77.2.1
# Frames towards the stack carry real checksums (a veth would otherwise hand over
# partial ones, which a software stack rightly drops), and are not coalesced beyond the MTU.
ip netns exec "$rtr" ethtool -K us1 tx off tso off gso off gro off >/dev/null
ip netns exec "$srv" ethtool -K us0 gro off tso off gso off >/dev/null
if [[ -n "$netem" ]]; then
  ip netns exec "$rtr" tc qdisc add dev us1 root netem $netem
  ip netns exec "$rtr" tc qdisc add dev uc1 root netem $netem
fi
if [[ -n "$impair" ]]; then
  bash "$(dirname "$0")/impair.sh" "$rtr" on "${impair%%:*}" "${impair#*:}"
fi
# Both ends reachable before CMD starts.
ip netns exec "$cli" ping -c1 -W2 10.77.1.2 >/dev/null

export USTACK_SERVER_NS="$srv" USTACK_IF=us0 USTACK_BROKER=10.77.1.2:9092 USTACK_QUEUES="$queues" \
  USTACK_ROUTER_NS="$rtr" USTACK_PEER_IF=us1
set +e
ip netns exec "$cli" "$@"
rc=$?
set -e
exit $rc
