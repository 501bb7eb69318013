#!/usr/bin/env bash
# Loss and reordering on the ustack test topology's router (scripts/ustack/run-in-netns.sh),
# for kernels without sch_netem (this project's CI kernel has none):
#   loss:       nftables drops LOSS % of forwarded packets, both directions, at random;
#   reordering: REORDER % of the packets on each router leg, picked at random by a classic
#               BPF classifier (`ld rand`), wait in a 50 Mbit/s HTB class while the rest
#               pass at 10 Gbit/s, so later packets overtake them.
# Usage: impair.sh ROUTER_NS on LOSS_PCT REORDER_PCT | impair.sh ROUTER_NS off
#        impair.sh ROUTER_NS stats   (packets dropped, packets held back: "DROPPED HELD")
set -euo pipefail
ns="$1" what="$2"
legs=(us1 uc1)
if [[ "$what" == off ]]; then
  ip netns exec "$ns" nft delete table inet slipstream_impair 2>/dev/null || true
  for l in "${legs[@]}"; do ip netns exec "$ns" tc qdisc del dev "$l" root 2>/dev/null || true; done
  exit 0
fi
if [[ "$what" == stats ]]; then
  dropped=$(ip netns exec "$ns" nft list table inet slipstream_impair | sed -n 's/.*counter packets \([0-9]*\).*/\1/p')
  held=0
  for l in "${legs[@]}"; do
    n=$(ip netns exec "$ns" tc -s class show dev "$l" classid 1:20 | sed -n 's/^ *Sent [0-9]* bytes \([0-9]*\) pkt.*/\1/p')
    held=$((held + ${n:-0}))
  done
  echo "${dropped:-0} $held"
  exit 0
fi
loss="$3" reorder="$4"
command -v nft >/dev/null || { echo "$0: nft is needed (apt-get install nftables)" >&2; exit 2; }
ip netns exec "$ns" nft -f - <<NFT
table inet slipstream_impair {
  chain forward_impair {
    type filter hook forward priority 0; policy accept;
    numgen random mod 10000 < $((loss * 100)) counter drop
  }
}
NFT
# ld rand; jgt THRESHOLD -> ret 0 (no match: the fast default class) ; else ret 1:20.
threshold=$(( reorder * 4294967296 / 100 ))
for l in "${legs[@]}"; do
  ip netns exec "$ns" tc qdisc replace dev "$l" root handle 1: htb default 10 r2q 1000
  ip netns exec "$ns" tc class add dev "$l" parent 1: classid 1:10 htb rate 10gbit quantum 60000
  ip netns exec "$ns" tc class add dev "$l" parent 1: classid 1:20 htb rate 50mbit quantum 60000
  ip netns exec "$ns" tc filter add dev "$l" parent 1: bpf \
    bytecode "4,32 0 0 4294963256,37 0 1 $threshold,6 0 0 0,6 0 0 65568"
done
