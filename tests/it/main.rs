//! slipstream's integration tests: one binary, real processes, real clients.

#[macro_use]
mod harness;

mod bad_input;
mod bench_smoke;
mod clients;
mod cold_reads;
mod crash;
mod disk_full;
mod groups;
mod idle_conns;
mod listeners;
mod long_poll;
mod metrics;
mod ops;
mod packaging;
#[cfg(feature = "rdma")]
mod rdma;
mod rocketmq;
mod rocketmq_grpc;
mod security;
mod sidecar;
mod ustack;
