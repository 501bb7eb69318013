#!/usr/bin/env bash
# The whole test suite, as CI runs it: sets up the real clients, then lint + tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-test-deps.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Two threads: the machines have two cores and every integration test runs a broker
# process plus client processes.
cargo test --all-targets -- --test-threads=2
