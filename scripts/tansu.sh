#!/usr/bin/env bash
# Builds (once) and starts Tansu, a Kafka-compatible broker in Rust, as a comparison peer
# for `slipstream bench`. Not run in CI: the build takes about 20 minutes on 2 cores.
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
    if ! command -v tansu >/dev/null; then
      echo "tansu: building tansu 0.6.0 (about 20 minutes)..." >&2
      cargo install --locked tansu@0.6.0 --features dynostore >&2
    fi
    tansu broker --listener-url "tcp://127.0.0.1:${port}" --advertised-listener-url "tcp://127.0.0.1:${port}" \
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
