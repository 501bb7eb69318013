//! A lean, blocking Kafka client: one connection, one request in flight.
//!
//! It exists to measure and test the broker with minimal client overhead (the bench
//! harness's native mode, the crash and bad-input tests), not to replace a real client
//! library: no metadata routing, no retries, no batching beyond what the caller builds.
//! Codecs are the same `kafka-protocol` crate the broker uses.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    CreateTopicsRequest, FetchRequest, ProduceRequest, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use thiserror::Error;

use crate::framing::{LengthError, PREFIX};
use crate::protocol::kafka::frame::{Framer, Side};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("codec: {0}")]
    Codec(String),
    #[error("response correlation id {got}, expected {want}")]
    Correlation { got: i32, want: i32 },
    #[error("response refused: {0}")]
    Frame(#[from] LengthError),
    #[error("broker error code {0}")]
    Kafka(i16),
}

const MAX_RESPONSE: usize = 256 << 20;
/// Non-flexible versions (no tagged fields): peers disagree on which tagged fields a
/// version may carry (Tansu 0.6 sends one in Fetch v12 that v12 does not define), and
/// these versions carry everything the tests and the bench need.
const PRODUCE_VERSION: i16 = 8;
const FETCH_VERSION: i16 = 11;

pub struct Client {
    stream: Conn,
    next_correlation: i32,
    client_id: StrBytes,
}

/// The connection: plain TCP, or TLS over it (rustls, blocking).
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// What a produce returned.
#[derive(Debug, Clone, Copy)]
pub struct Produced {
    pub base_offset: i64,
    pub error_code: i16,
}

/// What a single-partition fetch returned.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub error_code: i16,
    pub high_watermark: i64,
    pub records: Bytes,
}

impl Client {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, ClientError> {
        Ok(Client::over(Conn::Plain(tcp(addr, timeout)?)))
    }

    fn over(stream: Conn) -> Client {
        Client { stream, next_correlation: 1, client_id: StrBytes::from_static_str("slipstream-native") }
    }

    /// Connects over TLS, checking the broker's certificate against the CAs in `ca`
    /// (PEM) for the address's IP; the handshake completes before this returns.
    pub fn connect_tls(addr: SocketAddr, timeout: Duration, ca: &std::path::Path) -> Result<Client, ClientError> {
        let tls = |e: String| ClientError::Io(io::Error::other(e));
        let files = crate::tls::ClientFiles { ca: ca.to_path_buf(), cert_key: None };
        let config = files.load().map_err(|e| tls(e.to_string()))?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| tls(e.to_string()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp(addr, timeout)?);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Client::over(Conn::Tls(Box::new(s))))
    }

    /// Writes one request frame; returns its correlation id.
    fn send_request<R: Request>(&mut self, req: &R, version: i16) -> Result<i32, ClientError> {
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        let mut header = RequestHeader::default();
        header.request_api_key = R::KEY;
        header.request_api_version = version;
        header.correlation_id = correlation;
        header.client_id = Some(self.client_id.clone());
        let mut buf = BytesMut::with_capacity(256);
        buf.extend_from_slice(&[0; 4]);
        header.encode(&mut buf, R::header_version(version)).map_err(codec)?;
        req.encode(&mut buf, version).map_err(codec)?;
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&buf)?;
        Ok(correlation)
    }

    /// Sends `req` at `version` and waits for its response.
    pub fn call<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response, ClientError> {
        let correlation = self.send_request(req, version)?;
        let mut frame = self.read_frame()?;
        let resp_header = ResponseHeader::decode(&mut frame, R::Response::header_version(version)).map_err(codec)?;
        if resp_header.correlation_id != correlation {
            return Err(ClientError::Correlation { got: resp_header.correlation_id, want: correlation });
        }
        R::Response::decode(&mut frame, version).map_err(codec)
    }

    /// Sends a produce with acks=0 (no response comes back).
    pub fn produce_no_ack(&mut self, topic: &str, partition: i32, records: Bytes) -> Result<(), ClientError> {
        self.send_request(&produce_request(topic, partition, records, 0), PRODUCE_VERSION).map(drop)
    }

    fn read_frame(&mut self) -> Result<Bytes, ClientError> {
        let mut prefix = [0u8; PREFIX];
        self.stream.read_exact(&mut prefix)?;
        let len = Framer::new(Side::Responses, MAX_RESPONSE).body_len(prefix)?;
        let mut frame = vec![0u8; len];
        self.stream.read_exact(&mut frame)?;
        Ok(Bytes::from(frame))
    }

    /// ApiVersions v0: the cheapest request every broker answers (a readiness probe).
    pub fn api_versions(&mut self) -> Result<kafka_protocol::messages::ApiVersionsResponse, ClientError> {
        self.call(&kafka_protocol::messages::ApiVersionsRequest::default(), 0)
    }

    pub fn create_topic(&mut self, name: &str, partitions: i32) -> Result<i16, ClientError> {
        let mut t = CreatableTopic::default();
        t.name = TopicName(StrBytes::from_string(name.to_string()));
        t.num_partitions = partitions;
        t.replication_factor = 1;
        let mut req = CreateTopicsRequest::default();
        req.topics.push(t);
        req.timeout_ms = 5000;
        let resp = self.call(&req, 5)?;
        Ok(resp.topics.first().map_or(-1, |t| t.error_code))
    }

    pub fn produce(&mut self, topic: &str, partition: i32, records: Bytes, acks: i16) -> Result<Produced, ClientError> {
        let req = produce_request(topic, partition, records, acks);
        let resp = self.call(&req, PRODUCE_VERSION)?;
        let p = resp
            .responses
            .first()
            .and_then(|t| t.partition_responses.first())
            .ok_or_else(|| ClientError::Codec("empty produce response".into()))?;
        Ok(Produced { base_offset: p.base_offset, error_code: p.error_code })
    }

    pub fn fetch(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: i32,
        max_wait_ms: i32,
    ) -> Result<Fetched, ClientError> {
        let resp = self.call(&fetch_request(topic, partition, offset, max_bytes, max_wait_ms), FETCH_VERSION)?;
        let p = resp
            .responses
            .first()
            .and_then(|t| t.partitions.first())
            .ok_or_else(|| ClientError::Codec("empty fetch response".into()))?;
        Ok(Fetched {
            error_code: p.error_code,
            high_watermark: p.high_watermark,
            records: p.records.clone().unwrap_or_default(),
        })
    }

    /// Sends a fetch without reading its response (for tests of peers that do not read).
    pub fn send_fetch(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: i32,
        max_wait_ms: i32,
    ) -> Result<(), ClientError> {
        self.send_request(&fetch_request(topic, partition, offset, max_bytes, max_wait_ms), FETCH_VERSION).map(drop)
    }

    /// The raw socket, for tests that need to misbehave.
    pub fn stream(&mut self) -> &mut TcpStream {
        match &mut self.stream {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &mut s.sock,
        }
    }
}

/// A connected socket, answers awaited at most 30 s.
fn tcp(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

fn codec(e: anyhow::Error) -> ClientError {
    ClientError::Codec(e.to_string())
}

fn fetch_request(topic: &str, partition: i32, offset: i64, max_bytes: i32, max_wait_ms: i32) -> FetchRequest {
    let mut fp = FetchPartition::default();
    fp.partition = partition;
    fp.fetch_offset = offset;
    fp.partition_max_bytes = max_bytes;
    let mut ft = FetchTopic::default();
    ft.topic = TopicName(StrBytes::from_string(topic.to_string()));
    ft.partitions.push(fp);
    let mut req = FetchRequest::default();
    req.max_wait_ms = max_wait_ms;
    req.min_bytes = 1;
    req.max_bytes = max_bytes;
    req.session_epoch = -1;
    req.topics.push(ft);
    req
}

fn produce_request(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    let mut pd = PartitionProduceData::default();
    pd.index = partition;
    pd.records = Some(records);
    let mut td = TopicProduceData::default();
    td.name = TopicName(StrBytes::from_string(topic.to_string()));
    td.partition_data.push(pd);
    let mut req = ProduceRequest::default();
    req.acks = acks;
    req.timeout_ms = 30_000;
    req.topic_data.push(td);
    req
}
