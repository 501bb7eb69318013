//! Wire protocols. Each turns frames into typed requests, runs them against the
//! [`crate::broker`], and encodes responses into scatter/gather chunks.
//!
//! Only Kafka exists today; RocketMQ remoting will sit beside it.

pub mod kafka;
