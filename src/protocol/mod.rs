//! Wire protocols. Each turns frames into typed requests, runs them against the
//! [`crate::broker`], and encodes responses into scatter/gather chunks.
//!
//! Kafka and RocketMQ remoting (its name server and broker roles) sit side by side on
//! the same broker: a message sent by one is read by the other.

pub mod kafka;
pub mod rocketmq;
