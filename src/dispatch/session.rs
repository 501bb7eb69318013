//! The protocol seam: what a wire protocol gives the dispatch loop, and what it gets.
//!
//! The dispatch loop knows no wire protocol. Each listener is bound to a [`Protocol`],
//! which opens a [`Session`] per accepted connection. A session owns everything that is
//! the protocol's: cutting frames off received bytes (sans-IO), handling a frame, and
//! encoding answers into scatter/gather chunks. A handled frame becomes a [`Step`]:
//!
//! - `Respond`: encoded chunks, sent in the connection's order;
//! - `Silent`: nothing to send (Kafka's acks=0 produce, RocketMQ's one-way requests);
//! - `Park`: a [`Parked`] operation (Kafka's long-poll fetch and group joins, RocketMQ's
//!   long-poll pull) that the loop re-polls whenever the broker's notifier moves and at
//!   its deadline;
//! - `Gather`: partition operations for their owner cores and a [`Finish`] that turns
//!   their results into the next step once all are in.
//!
//! The loop owns what is the same for every protocol: per-connection ordering, coalescing
//! ready answers into one vectored send, backpressure, idle and abort policy, and routing
//! partition operations across cores.
//!
//! # Invariants
//! - On an [`Session::ordered`] connection (Kafka's: clients match answers by order), a
//!   step's answer goes out after every answer to an earlier frame of the same
//!   connection, whatever the step: a parked or gathering request holds back the ready
//!   answers behind it. Otherwise (RocketMQ's: answers carry the request's opaque) each
//!   answer goes as soon as it is ready, and a long-poll pull holds back nothing.
//! - A [`Fault`] closes its connection alone, after the answers already queued for it;
//!   nothing the peer sent after the faulty frame is handled.

use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

use crate::broker::shard::{PartOp, PartResult};
use crate::broker::{Broker, PartKey};
use crate::buffer::IoChunks;

/// What a session may reach while it handles a frame.
pub struct Cx<'a> {
    pub broker: &'a Arc<Broker>,
    /// When the loop took this turn's completions.
    pub now: Instant,
}

/// What a handled frame (or a finished gather, or a woken parked operation) became.
pub enum Step {
    /// The encoded answer.
    Respond(IoChunks),
    /// Nothing to answer.
    Silent,
    /// Wait for data, a rebalance, or a deadline.
    Park(Box<dyn Parked>),
    /// Run partition operations on their owners, then finish.
    Gather(Gather),
    /// Send this answer, then close the connection: the peer is refused (a failed
    /// authentication; logged as a warning with the reason and the peer).
    Refuse(IoChunks, String),
    /// Send these frames now and keep waiting: how a parked watcher pushes
    /// server-initiated frames (RocketMQ's NOTIFY_CONSUMER_IDS_CHANGED and
    /// CHECK_TRANSACTION_STATE) to its connection. They queue behind the connection's
    /// earlier answers like any other; on an unordered session they leave at once.
    Emit(IoChunks, Box<dyn Parked>),
}

/// Partition operations (run by each partition's owner core) and what to do with their
/// results, which arrive in `ops` order.
pub struct Gather {
    pub ops: Vec<(PartKey, PartOp)>,
    pub then: Box<dyn Finish>,
}

/// Completes a [`Gather`].
pub trait Finish: Send {
    fn finish(self: Box<Self>, cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault>;
}

/// A request waiting for something.
pub trait Parked: Send {
    /// When it must be answered regardless (`None`: only when it is ready).
    fn deadline(&self) -> Option<Instant>;
    /// The next step once it is ready; `force` asks for an answer now with whatever
    /// there is (deadline passed, shutdown).
    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>>;
}

/// Why a connection must be closed.
#[derive(Debug, Error)]
pub enum Fault {
    /// The peer sent something the protocol refuses (logged as a warning, counted).
    #[error("{0}")]
    BadInput(String),
    /// Our own failure, e.g. a response that cannot be encoded (logged as an error):
    /// closing beats leaving the client waiting forever.
    #[error("{0}")]
    Internal(String),
    /// The peer is refused (failed authentication), after the answer saying so.
    #[error("{0}")]
    Refused(String),
}

/// One connection's protocol state.
pub trait Session: Send {
    /// Cuts the next whole frame off the front of `buf`; `Ok(None)` until one is there.
    fn cut(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Fault>;
    /// Handles one frame.
    fn handle(&mut self, cx: &Cx<'_>, frame: Bytes) -> Result<Step, Fault>;
    /// The most bytes a receive buffer must grow to: the largest frame with its prefix.
    fn recv_max(&self) -> usize;
    /// Whether answers must leave in request order (the client matches them by order).
    fn ordered(&self) -> bool {
        true
    }
    /// On a TLS listener: the handshake is complete, before the first frame. The subject
    /// of the client's certificate (RFC 2253), if it presented one.
    fn tls_established(&mut self, _client_subject: Option<String>) {}
}

/// A wire protocol, bound to a listener: opens a session per connection.
pub trait Protocol: Send + Sync {
    /// For logs (`kafka`, `rocketmq`, …).
    fn name(&self) -> &str;
    fn open(&self, peer: SocketAddr) -> Box<dyn Session>;
    /// Work the protocol runs inside the broker with no connection (RocketMQ's delayed
    /// delivery): core 0 takes it once at start and runs it like a parked request of a
    /// connection of its own — re-polled when the notifier moves and at its deadline,
    /// its gathers routed like any other — until it answers anything but `Park` or
    /// `Gather` (what it answers is dropped). It is forced at shutdown and must end then.
    fn service(&self) -> Option<Box<dyn Parked>> {
        None
    }
}
