#!/usr/bin/env bash
# Installs what the test suite drives: kcat (Debian's, librdkafka 2.0.2), the Python
# clients (confluent-kafka bundles librdkafka 2.x; kafka-python is pure Python), kafkajs
# and ali-ons (pure JavaScript), and builds the rocketmq-client-rust suite (its own crate
# under tests/clients/rocketmq-rust). Idempotent; needs root for apt (CI and the dev
# machines are).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v kcat >/dev/null || need_apt+=(kcat)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# The user-space stack's namespaces (scripts/ustack/run-in-netns.sh).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ethtool >/dev/null || need_apt+=(ethtool)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v tc >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
# The RPM (scripts/build-rpm.sh) and its unit's check.
command -v rpmbuild >/dev/null || need_apt+=(rpm)
command -v rpm2cpio >/dev/null || need_apt+=(rpm2cpio)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

echo "setup: pip install -r tests/clients/requirements.txt"
# Debian's own python3 refuses system-wide pip installs (PEP 668); a pyenv one does not.
python3 -m pip install -q --disable-pip-version-check -r tests/clients/requirements.txt 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check --break-system-packages -r tests/clients/requirements.txt

echo "setup: npm ci (kafkajs, ali-ons)"
(cd tests/clients && npm ci --no-audit --no-fund --loglevel=error)

# rocketmq-client-rust 1.0.0 (about 2.5 minutes the first time; a debug build is plenty
# for a client). Into target/clients, where the tests look for it.
echo "setup: cargo build tests/clients/rocketmq-rust"
CARGO_TARGET_DIR=target/clients cargo build --quiet --locked --manifest-path tests/clients/rocketmq-rust/Cargo.toml
