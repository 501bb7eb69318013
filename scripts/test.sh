#!/usr/bin/env bash
# The whole test suite, as CI runs it: sets up the real clients and the soft-RoCE VM's
# host packages, then lint + tests on the host, then the RDMA tests inside the VM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-test-deps.sh
bash scripts/softroce/setup.sh
cargo fmt -p slipstream -p slipstream-bench --check
# The workspace: the broker and the bench harness (its own crate, so building the broker
# never compiles librdkafka).
cargo clippy --workspace --all-targets --features rdma -- -D warnings
# The fuzz targets are their own crate (cargo fuzz builds them): compile them so they
# cannot drift from the decoders they drive (in the main target directory, which already
# holds their dependencies' check builds).
(cd fuzz && CARGO_TARGET_DIR=../target cargo check --locked --bins)
# The API docs build without a broken or private link (module docs name their parts).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features rdma -p slipstream
# The binaries themselves: `slipstream bench` (tested below) runs the slipstream-bench
# binary from beside `slipstream`, and `cargo test` builds only the binaries of the package
# whose tests it runs.
cargo build --workspace --bins --features rdma
# Two threads: the machines have two cores and every integration test runs a broker
# process plus client processes.
cargo test --workspace --all-targets --features rdma -- --test-threads=2
# The user-space stack: the ustack variants (ignored above) run one at a time in the
# namespaces of scripts/ustack/run-in-netns.sh (a broker per test on the same veth).
bash scripts/ustack/run-in-netns.sh \
  cargo test --features rdma --test it ustack -- --ignored --test-threads=1
# The host kernel has no RDMA: the RDMA tests (ignored above) run in a qemu VM with
# soft-RoCE, on binaries built here. The package alone resolves some build dependencies'
# features differently from the workspace (prost-build's indexmap), so build exactly what
# the VM runs first: it then finds everything fresh and writes no build into its tmpfs.
cargo test --features rdma --test it --no-run
VM_TIMEOUT=1500 bash scripts/softroce/run-in-vm.sh \
  timeout 1400 cargo test --features rdma --test it rdma:: -- --ignored --test-threads=1
