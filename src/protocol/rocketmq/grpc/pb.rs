//! The `apache.rocketmq.v2` messages and the `MessagingService` server trait, generated
//! by `build.rs` from the vendored `proto/rocketmq` files.
#![allow(clippy::all, missing_docs, rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/apache.rocketmq.v2.rs"));
