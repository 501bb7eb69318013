#!/usr/bin/env bash
# Installs what scripts/softroce/run-in-vm.sh needs on the host (Debian; root).
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static cpio iproute2 rdma-core ibverbs-providers libibverbs1 librdmacm1
      ibverbs-utils rdmacm-utils xz-utils cmake clang)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "softroce setup: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
