//! Kafka behind the dispatch seam: a [`Kafka`] listener opens a [`KafkaSession`] per
//! connection, which cuts frames with the one Kafka [`Framer`], runs them through
//! [`handle_frame`], and turns each [`Outcome`] into a dispatch [`Step`] — encoding
//! responses here, so the loop only ever sees chunks.

use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::data::{self, Then};
use super::frame::{Framer, Side};
use super::{encode_response, handle_frame, parked_deadline, poll_parked, Endpoint, InFlight, Outcome, Parked};
use crate::broker::shard::PartResult;
use crate::dispatch::session::{self, Cx, Fault, Finish, Gather, Protocol, Session, Step};
use crate::framing::PREFIX;
use crate::metrics::ApiStats;

/// A Kafka listener: its advertised address, request size cap and request statistics.
pub struct Kafka {
    endpoint: Arc<Endpoint>,
    framer: Framer,
    stats: Arc<ApiStats>,
}

impl Kafka {
    pub fn new(endpoint: Endpoint, max_request_bytes: usize) -> Kafka {
        let stats = ApiStats::register("kafka", format!("kafka://{}:{}", endpoint.host, endpoint.port));
        Kafka { endpoint: Arc::new(endpoint), framer: Framer::new(Side::Requests, max_request_bytes), stats }
    }
}

impl Protocol for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }

    fn open(&self, peer: SocketAddr) -> Box<dyn Session> {
        let client = Arc::new(Client {
            host: peer.ip().to_string(),
            endpoint: self.endpoint.clone(),
            stats: self.stats.clone(),
        });
        Box::new(KafkaSession { framer: self.framer, client })
    }
}

/// Who is connected, and through which listener: what handlers and finishers need.
struct Client {
    host: String,
    endpoint: Arc<Endpoint>,
    stats: Arc<ApiStats>,
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
        // The API key, for counting a frame that fails to decode under it.
        let raw_api = if frame.len() >= 2 { i16::from_be_bytes([frame[0], frame[1]]) } else { -1 };
        // The clock, not the loop's `now` (the time its batch of completions began): a
        // request answered at once still took the time it took.
        let started = Instant::now();
        match handle_frame(cx.broker, &self.client.endpoint, frame, &self.client.host, cx.now) {
            Ok((req, outcome)) => step(&self.client, req, outcome, started),
            Err(e) => {
                self.client.stats.failed(raw_api);
                Err(Fault::BadInput(e.to_string()))
            }
        }
    }

    fn recv_max(&self) -> usize {
        self.framer.max() + PREFIX
    }
}

/// Turns a handler's outcome into the loop's next step; a request whose handling began at
/// `started` and is done now is counted with its latency (parked and gathered ones when
/// they finish: a long poll's wait is part of its latency, as in Kafka's TotalTimeMs).
fn step(client: &Arc<Client>, req: InFlight, outcome: Outcome, started: Instant) -> Result<Step, Fault> {
    let api = req.api as i16;
    let done = |client: &Arc<Client>| client.stats.answered(api, started.elapsed());
    Ok(match outcome {
        Outcome::NoResponse => {
            done(client);
            Step::Silent
        }
        Outcome::Respond(body, by_ref) => match encode_response(&req, &body, by_ref) {
            Ok(chunks) => {
                done(client);
                Step::Respond(chunks)
            }
            Err(e) => {
                client.stats.failed(api);
                return Err(Fault::Internal(e.to_string()));
            }
        },
        Outcome::Park(parked) => Step::Park(Box::new(KafkaParked { client: client.clone(), req, parked, started })),
        Outcome::Gather(data::Gather { ops, then }) => {
            Step::Gather(Gather { ops, then: Box::new(KafkaFinish { client: client.clone(), req, then, started }) })
        }
    })
}

struct KafkaFinish {
    client: Arc<Client>,
    req: InFlight,
    then: Then,
    started: Instant,
}

impl Finish for KafkaFinish {
    fn finish(self: Box<Self>, cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault> {
        let outcome = data::finish(self.then, results, &self.client.host, cx.now);
        step(&self.client, self.req, outcome, self.started)
    }
}

struct KafkaParked {
    client: Arc<Client>,
    req: InFlight,
    parked: Parked,
    started: Instant,
}

impl session::Parked for KafkaParked {
    fn deadline(&self) -> Option<std::time::Instant> {
        parked_deadline(&self.parked)
    }

    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        let outcome = poll_parked(cx.broker, &self.parked, cx.now, force)?;
        Some(step(&self.client, self.req, outcome, self.started))
    }
}
