#!/usr/bin/env bash
# The log on disk against the log on tmpfs (issue 10): max-throughput-1k and latency-128b
# with the broker's data directory on the disk that holds $TMPDIR and on /dev/shm,
# repetitions interleaved, tcp and uring (native client). Then a cpu-clock profile of a
# broker with its data on disk during max-throughput-1k: the share of the core threads'
# samples spent handling page faults.
# Writes docs/bench/log/{results.json,report.html,perf-disk.txt,perf-summary.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/log
cargo build --release --workspace
./target/release/slipstream bench --client native \
  --target slipstream:tcp --target slipstream:tcp,--data-parent=/dev/shm \
  --target slipstream:uring --target slipstream:uring,--data-parent=/dev/shm \
  --workload max-throughput-1k --workload latency-128b \
  --repetitions "${REPS:-3}" --duration "${DURATION:-10}" \
  --note "slipstream:T is the data directory on disk (\$TMPDIR, ${TMPDIR:-/tmp}); slipstream:T,--data-parent=/dev/shm on tmpfs." \
  --out "$out"

# The profile: a broker of our own, on disk, profiled while the harness drives it.
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/slipstream serve --listen "127.0.0.1:$port" --data-dir "$data" 2>"$data.log" &
broker=$!
trap 'kill $broker 2>/dev/null || true; rm -rf "$data" "$data.log" "$data.perf"' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
perf record -e cpu-clock -g -p "$broker" -o "$data.perf" -- sleep "$(( ${DURATION:-10} + 4 ))" 2>/dev/null &
perfpid=$!
./target/release/slipstream bench --client native --target "disk=127.0.0.1:$port,pid=$broker" \
  --workload max-throughput-1k --repetitions 1 --duration "${DURATION:-10}" --out "$data.bench" >/dev/null
wait $perfpid
# Children share of the fault entry point among the core threads' samples.
perf report -i "$data.perf" --children --comms core-0,core-1 --sort symbol --stdio 2>/dev/null \
  | grep -E '^ +[0-9.]+%' > "$out/perf-disk.txt" || true
fault=$(awk '$NF != "" && / asm_exc_page_fault / {print $1; exit}' "$out/perf-disk.txt" | tr -d '%')
echo "{\"core_threads_page_fault_share_pct\": ${fault:-0}, \"kernel\": \"$(uname -r)\", \"date\": \"$(date -u +%F)\"}" > "$out/perf-summary.json"
echo "page-fault handling: ${fault:-0}% of the core threads' samples (docs/bench/log/perf-disk.txt)"
