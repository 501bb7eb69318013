#!/usr/bin/env bash
# The log's append options (bench/micro/log_append.rs), measured on the disk that holds
# target/ and on tmpfs, one after the other. Writes docs/bench/log-append/results-*.json
# and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/bench/log-append
LOG_APPEND_OUT=docs/bench/log-append/results-disk.json cargo bench --bench log_append
LOG_APPEND_DIR=/dev/shm LOG_APPEND_OUT=docs/bench/log-append/results-tmpfs.json cargo bench --bench log_append
