//! Sidecars that sit beside unmodified Kafka clients or brokers.
//!
//! - [`proxy`]: `slipstream sidecar`, in front of a Kafka cluster the user already runs;
//!   every broker gets a sidecar listener ([`cluster`]).
//! - [`bridge`] (feature `rdma`): on the client host, Kafka TCP in, RDMA out to a broker
//!   serving `--transport rdma`.
//! - [`rewrite`]: the answer rewriting (sans-IO) that keeps clients coming back through
//!   a sidecar's address, shared by both.
#[cfg(feature = "rdma")]
pub mod bridge;
pub mod cache;
pub mod cluster;
pub mod front;
pub mod local_fetch;
pub mod proxy;
pub mod rewrite;
pub mod tls;
