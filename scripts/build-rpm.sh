#!/usr/bin/env bash
# Builds the slipstream RPM (packaging/slipstream.spec) with rpmbuild (on Debian: the `rpm`
# package) around a binary built beforehand, and lists what it holds.
#
#   scripts/build-rpm.sh [--binary PATH] [--out DIR]
#
# Without --binary it builds `target/release/slipstream` first. The RPM lands in DIR
# (default target/rpm). openEuler's own build runs `rpmbuild -bb packaging/slipstream.spec`
# on the source tarball instead, with cargo in %build.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
out="target/rpm"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
command -v rpmbuild >/dev/null || { echo "$0: rpmbuild is needed (apt-get install rpm)" >&2; exit 2; }
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
if [[ -z "$binary" ]]; then
  cargo build --release
  binary=target/release/slipstream
fi
binary=$(realpath "$binary")
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
mkdir -p "$top"/{SOURCES,BUILD,RPMS,SPECS,SRPMS}
# The source tarball %install takes the unit, the configuration and the docs from.
tar czf "$top/SOURCES/slipstream-$version.tar.gz" --transform "s,^,slipstream-$version/," \
  packaging README.md docs/architecture.md docs/sidecar.md docs/rdma.md docs/rocketmq.md docs/ustack.md
# --nodeps: a Debian host has no rpm database of build dependencies (none are needed with
# a prebuilt binary).
rpmbuild -bb --nodeps --with prebuilt \
  --define "_topdir $top" \
  --define "prebuilt_bin $binary" \
  --define "slipstream_version $version" \
  --define "_build_id_links none" \
  packaging/slipstream.spec >"$top/rpmbuild.log" 2>&1 || { cat "$top/rpmbuild.log" >&2; exit 1; }
mkdir -p "$out"
rpm=$(find "$top/RPMS" -name '*.rpm' | head -1)
cp "$rpm" "$out/"
echo "$out/$(basename "$rpm")"
rpm -qlp "$out/$(basename "$rpm")" >&2
