//! Kafka behind the dispatch seam: a [`Kafka`] listener opens a [`KafkaSession`] per
//! connection, which cuts frames with the one Kafka [`Framer`], runs them through
//! [`handle_frame`], and turns each [`Outcome`] into a dispatch [`Step`] — encoding
//! responses here, so the loop only ever sees chunks.

use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;

use super::data::{self, Then};
use super::frame::{Framer, Side};
use super::{encode_response, handle_frame, parked_deadline, poll_parked, Endpoint, InFlight, Outcome, Parked};
use crate::broker::shard::PartResult;
use crate::dispatch::session::{self, Cx, Fault, Finish, Gather, Protocol, Session, Step};
use crate::framing::PREFIX;

/// A Kafka listener: its advertised address and request size cap.
pub struct Kafka {
    endpoint: Arc<Endpoint>,
    framer: Framer,
}

impl Kafka {
    pub fn new(endpoint: Endpoint, max_request_bytes: usize) -> Kafka {
        Kafka { endpoint: Arc::new(endpoint), framer: Framer::new(Side::Requests, max_request_bytes) }
    }
}

impl Protocol for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }

    fn open(&self, peer: SocketAddr) -> Box<dyn Session> {
        let client = Arc::new(Client { host: peer.ip().to_string(), endpoint: self.endpoint.clone() });
        Box::new(KafkaSession { framer: self.framer, client })
    }
}

/// Who is connected, and through which listener: what handlers and finishers need.
struct Client {
    host: String,
    endpoint: Arc<Endpoint>,
}

/// One Kafka connection.
pub struct KafkaSession {
    framer: Framer,
    client: Arc<Client>,
}

impl Session for KafkaSession {
    fn cut(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Fault> {
        self.framer.cut(buf).map_err(|e| Fault::BadInput(e.to_string()))
    }

    fn handle(&mut self, cx: &Cx<'_>, frame: Bytes) -> Result<Step, Fault> {
        let (req, outcome) = handle_frame(cx.broker, &self.client.endpoint, frame, &self.client.host, cx.now)
            .map_err(|e| Fault::BadInput(e.to_string()))?;
        step(&self.client, req, outcome)
    }

    fn recv_max(&self) -> usize {
        self.framer.max() + PREFIX
    }
}

/// Turns a handler's outcome into the loop's next step.
fn step(client: &Arc<Client>, req: InFlight, outcome: Outcome) -> Result<Step, Fault> {
    Ok(match outcome {
        Outcome::NoResponse => Step::Silent,
        Outcome::Respond(body, by_ref) => {
            Step::Respond(encode_response(&req, &body, by_ref).map_err(|e| Fault::Internal(e.to_string()))?)
        }
        Outcome::Park(parked) => Step::Park(Box::new(KafkaParked { client: client.clone(), req, parked })),
        Outcome::Gather(data::Gather { ops, then }) => {
            Step::Gather(Gather { ops, then: Box::new(KafkaFinish { client: client.clone(), req, then }) })
        }
    })
}

struct KafkaFinish {
    client: Arc<Client>,
    req: InFlight,
    then: Then,
}

impl Finish for KafkaFinish {
    fn finish(self: Box<Self>, cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault> {
        let outcome = data::finish(self.then, results, &self.client.host, cx.now);
        step(&self.client, self.req, outcome)
    }
}

struct KafkaParked {
    client: Arc<Client>,
    req: InFlight,
    parked: Parked,
}

impl session::Parked for KafkaParked {
    fn deadline(&self) -> Option<std::time::Instant> {
        parked_deadline(&self.parked)
    }

    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        let outcome = poll_parked(cx.broker, &self.parked, cx.now, force)?;
        Some(step(&self.client, self.req, outcome))
    }
}
