//! slipstream's integration tests: one binary, real processes, real clients.

mod bad_input;
mod bench_smoke;
mod clients;
mod crash;
mod groups;
mod harness;
mod long_poll;
