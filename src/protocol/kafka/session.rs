//! Kafka behind the dispatch seam: a [`Kafka`] listener opens a [`KafkaSession`] per
//! connection, which cuts frames with the one Kafka [`Framer`], decodes them, runs SASL's
//! requests itself ([`sasl`]) and the rest through [`handle_request`], and turns each
//! [`Outcome`] into a dispatch [`Step`] — encoding responses here, so the loop only ever
//! sees chunks.

use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::data::{self, Then};
use super::frame::{Framer, Side};
use super::sasl::{self, Auth, Verdict};
use super::{
    decode_frame, encode_response, handle_request, parked_deadline, poll_parked, Decoded, Endpoint, InFlight, Outcome,
    Parked,
};
use crate::broker::shard::PartResult;
use crate::broker::users::Mechanism;
use crate::buffer::Chunk;
use crate::dispatch::session::{self, Cx, Fault, Finish, Gather, Protocol, Session, Step};
use crate::framing::PREFIX;
use crate::metrics::{ApiStats, Names};

/// A Kafka listener: its advertised address, request size cap, request statistics, and
/// the SASL clients must authenticate with (none: no SASL).
pub struct Kafka {
    endpoint: Arc<Endpoint>,
    framer: Framer,
    stats: Arc<ApiStats>,
    sasl: Option<Arc<Sasl>>,
}

/// A listener's SASL settings.
pub struct Sasl {
    /// Offered, in order of preference.
    pub mechanisms: Vec<Mechanism>,
    /// A refused authentication's answer (and the close after it) waits this long, as
    /// Kafka's `connection.failed.authentication.delay.ms`: a client guessing passwords
    /// gets one guess per delay on a connection.
    pub failure_delay: std::time::Duration,
}

/// Kafka's names for the metrics: API keys as `ApiKey` spells them, error codes as `Errors`.
static NAMES: Names = Names {
    api: |slot| {
        i16::try_from(slot)
            .ok()
            .and_then(|k| kafka_protocol::messages::ApiKey::try_from(k).ok())
            .map_or_else(|| format!("unknown_{slot}"), |k| format!("{k:?}"))
    },
    error: super::error::name,
};

/// A request's counter slot: its API key (an impossible key counts in the last slot).
fn slot(api: i16) -> usize {
    usize::try_from(api).unwrap_or(usize::MAX)
}

/// Counts an answer and the error codes it carries.
fn count_answer(stats: &ApiStats, api: i16, body: &kafka_protocol::messages::ResponseKind, started: Instant) {
    stats.answered(slot(api), started.elapsed());
    super::error::for_each_error(body, |code| stats.error_answered(slot(api), code.into()));
}

/// Who a connection is when nothing authenticated it (Kafka's `User:ANONYMOUS`).
pub const ANONYMOUS: &str = "User:ANONYMOUS";

impl Kafka {
    pub fn new(endpoint: Endpoint, max_request_bytes: usize, sasl: Option<Sasl>) -> Kafka {
        let stats = ApiStats::register(format!("kafka://{}:{}", endpoint.host, endpoint.port), &NAMES);
        Kafka {
            endpoint: Arc::new(endpoint),
            framer: Framer::new(Side::Requests, max_request_bytes),
            stats,
            sasl: sasl.map(Arc::from),
        }
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
            principal: ANONYMOUS.to_string(),
        });
        let auth = if self.sasl.is_some() { Auth::Handshake } else { Auth::Done };
        Box::new(KafkaSession { framer: self.framer, client, auth, sasl: self.sasl.clone() })
    }
}

/// Who is connected, and through which listener: what handlers and finishers need.
struct Client {
    host: String,
    endpoint: Arc<Endpoint>,
    stats: Arc<ApiStats>,
    /// `User:<name>`: from SASL, else the client certificate's subject on a mutual-TLS
    /// listener, else [`ANONYMOUS`].
    principal: String,
}

/// One Kafka connection.
pub struct KafkaSession {
    framer: Framer,
    client: Arc<Client>,
    auth: Auth,
    sasl: Option<Arc<Sasl>>,
}

impl KafkaSession {
    fn set_principal(&mut self, principal: String) {
        let c = &self.client;
        self.client =
            Arc::new(Client { host: c.host.clone(), endpoint: c.endpoint.clone(), stats: c.stats.clone(), principal });
    }

    /// Answers a SASL request, then keeps serving, authenticates, or closes.
    fn sasl_answer(
        &mut self,
        req: InFlight,
        body: kafka_protocol::messages::ResponseKind,
        verdict: Verdict,
        started: Instant,
    ) -> Result<Step, Fault> {
        let chunks = encode_response(&req, &body, Vec::new()).map_err(|e| Fault::Internal(e.to_string()))?;
        count_answer(&self.client.stats, req.api as i16, &body, started);
        self.after(chunks, verdict)
    }

    fn after(&mut self, chunks: crate::buffer::IoChunks, verdict: Verdict) -> Result<Step, Fault> {
        Ok(match verdict {
            Verdict::Continue => Step::Respond(chunks),
            Verdict::Authenticated(user) => {
                log::debug!(host = self.client.host.as_str(), principal:% = format_args!("User:{user}"); "authenticated");
                self.set_principal(format!("User:{user}"));
                Step::Respond(chunks)
            }
            Verdict::Refuse(why) => match self.sasl.as_ref().map(|s| s.failure_delay).filter(|d| !d.is_zero()) {
                Some(delay) => Step::Park(Box::new(Delayed {
                    until: Instant::now() + delay,
                    step: Some(Step::Refuse(chunks, why)),
                })),
                None => Step::Refuse(chunks, why),
            },
        })
    }
}

/// A step held back until `until` (the failed-authentication delay). The connection's
/// later frames wait behind it (answers keep their order), so a client gets nothing
/// more out of the connection meanwhile.
struct Delayed {
    until: Instant,
    step: Option<Step>,
}

impl session::Parked for Delayed {
    fn deadline(&self) -> Option<Instant> {
        Some(self.until)
    }

    fn poll(&mut self, cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        if !force && cx.now < self.until {
            return None;
        }
        self.step.take().map(Ok)
    }
}

impl Session for KafkaSession {
    fn cut(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Fault> {
        self.framer.cut(buf).map_err(|e| Fault::BadInput(e.to_string()))
    }

    fn handle(&mut self, cx: &Cx<'_>, frame: Bytes) -> Result<Step, Fault> {
        if let Auth::RawTokens(_) = self.auth {
            // After SaslHandshake v0 the exchange is bare tokens, answered the same way.
            let (token, verdict) = sasl::raw_token(&mut self.auth, &cx.broker.users, &frame);
            let mut prefixed = bytes::BytesMut::with_capacity(PREFIX + token.len());
            prefixed.extend_from_slice(&(token.len() as u32).to_be_bytes());
            prefixed.extend_from_slice(&token);
            return self.after(vec![Chunk::Heap(prefixed.freeze())], verdict);
        }
        // The API key, for counting a frame that fails to decode under it.
        let raw_api = if frame.len() >= 2 { i16::from_be_bytes([frame[0], frame[1]]) } else { -1 };
        // The clock, not the loop's `now` (the time its batch of completions began): a
        // request answered at once still took the time it took.
        let started = Instant::now();
        let fail = |e: super::ProtocolError| {
            self.client.stats.failed(slot(raw_api));
            Fault::BadInput(e.to_string())
        };
        let (req, header, body) = match decode_frame(frame).map_err(fail)? {
            Decoded::Answer { req, body } => return step(&self.client, req, Outcome::respond(body), started),
            Decoded::Request { req, header, body } => (req, header, body),
        };
        use kafka_protocol::messages::RequestKind;
        let body = match body {
            RequestKind::SaslHandshake(r) => {
                let offered = self.sasl.as_ref().map_or(&[][..], |s| &s.mechanisms[..]);
                let (resp, verdict) = sasl::handshake(&mut self.auth, offered, req.version, r);
                return self.sasl_answer(req, resp, verdict, started);
            }
            RequestKind::SaslAuthenticate(r) => {
                let (resp, verdict) = sasl::authenticate(&mut self.auth, &cx.broker.users, r);
                return self.sasl_answer(req, resp, verdict, started);
            }
            other => other,
        };
        if !matches!(self.auth, Auth::Done) && req.api != kafka_protocol::messages::ApiKey::ApiVersions {
            self.client.stats.failed(slot(raw_api));
            return Err(Fault::BadInput(format!("{:?} request before SASL authentication", req.api)));
        }
        match handle_request(
            cx.broker,
            &self.client.endpoint,
            (req, header, body),
            &self.client.host,
            &self.client.principal,
            cx.now,
        ) {
            Ok((req, outcome)) => step(&self.client, req, outcome, started),
            Err(e) => {
                self.client.stats.failed(slot(raw_api));
                Err(Fault::BadInput(e.to_string()))
            }
        }
    }

    fn tls_established(&mut self, client_subject: Option<String>) {
        // With SASL the exchange names the principal; a certificate alone names it on SSL.
        if self.sasl.is_none() {
            if let Some(subject) = client_subject {
                self.set_principal(format!("User:{subject}"));
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
    Ok(match outcome {
        Outcome::NoResponse => {
            client.stats.answered(slot(api), started.elapsed());
            Step::Silent
        }
        Outcome::Respond(body, by_ref) => match encode_response(&req, &body, by_ref) {
            Ok(chunks) => {
                count_answer(&client.stats, api, &body, started);
                Step::Respond(chunks)
            }
            Err(e) => {
                client.stats.failed(slot(api));
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
