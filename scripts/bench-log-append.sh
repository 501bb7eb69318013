#!/usr/bin/env bash
# The log's append options (bench/micro/log_append.rs), measured on the disk that holds
# target/ and on tmpfs, one after the other: 1 GiB cells of every option at 1 KiB and
# 64 KiB appends (results-disk.json, results-tmpfs.json), then 8 GiB cells of the options
# that matter for a sustained run at 64 KiB, with MB appended second by second
# (results-sustained-disk.json, results-sustained-tmpfs.json: on these VMs fresh memory
# costs a host fault per page once recently freed memory is used up; each of these cells
# starts once the kernel has given what the last one freed back to the host). Prints the
# tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/log-append
mkdir -p "$out"
cargo bench --bench log_append --no-run
LOG_APPEND_OUT=$out/results-disk.json cargo bench --bench log_append
LOG_APPEND_DIR=/dev/shm LOG_APPEND_OUT=$out/results-tmpfs.json cargo bench --bench log_append
sustained() {
  LOG_APPEND_MODES=memcpy,pwrite,pwrite-ahead,pwrite-drop,direct LOG_APPEND_SIZES=65536 LOG_APPEND_MIB=8192 LOG_APPEND_REPS=2 LOG_APPEND_QUIESCE=1 \
    "$@" cargo bench --bench log_append
}
sustained env LOG_APPEND_OUT=$out/results-sustained-disk.json
sustained env LOG_APPEND_DIR=/dev/shm LOG_APPEND_OUT=$out/results-sustained-tmpfs.json
