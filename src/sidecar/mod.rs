//! Sidecars that sit beside unmodified Kafka clients or brokers.
//!
//! - [`bridge`] (feature `rdma`): on the client host, Kafka TCP in, RDMA out to a broker
//!   serving `--transport rdma`.
//! - [`rewrite`]: the metadata rewriting that keeps clients coming back through a
//!   sidecar's address.
#[cfg(feature = "rdma")]
pub mod bridge;
pub mod rewrite;
