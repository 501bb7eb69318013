//! RocketMQ messages on a Kafka log: how a sent message becomes a record, and how a
//! record (whoever produced it) becomes the message a PULL answer carries.
//!
//! # The mapping (also in docs/rocketmq.md)
//! A RocketMQ message is stored as one Kafka record (a batch send: one record batch of
//! them): value = body, key = the `KEYS` property, timestamp = born timestamp, and every
//! property a record header (`TAGS`, `KEYS`, `UNIQ_KEY`, user properties). The message
//! fields a record has no place for ride in headers named `__rmq.*` (`__rmq.flag`,
//! `__rmq.born_host`, `__rmq.reconsume_times`), written only when not the default. Back
//! the other way, a record produced by a Kafka client reads as a message with the value
//! as body, `KEYS` = the key (unless a `KEYS` header says otherwise), and every header
//! whose name and value are text as a property.
//!
//! Compressed bodies are inflated at send, so every consumer, Kafka or RocketMQ, reads
//! the body the application sent.
//!
//! # Invariants
//! - Decoders check every length against what is left before slicing; nothing is
//!   allocated from an unchecked length (fuzz target `rocketmq_frame`).

use bytes::{BufMut, Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType, NO_PARTITION_LEADER_EPOCH,
    NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use thiserror::Error;

use crate::broker::Topic;
use crate::metrics::{self, Path};

pub const NAME_VALUE_SEPARATOR: char = '\u{1}';
pub const PROPERTY_SEPARATOR: char = '\u{2}';

pub const PROPERTY_KEYS: &str = "KEYS";
pub const PROPERTY_TAGS: &str = "TAGS";

/// Message sys flags (Apache RocketMQ `MessageSysFlag`).
pub const SYSFLAG_COMPRESSED: i32 = 1;
pub const SYSFLAG_BORNHOST_V6: i32 = 1 << 4;
pub const SYSFLAG_STOREHOST_V6: i32 = 1 << 5;
/// Bits 8–10: the compression type of a compressed body (0 or 1 << 8: zlib).
const SYSFLAG_COMPRESSION_TYPE: i32 = 0x7 << 8;

/// `MESSAGE_MAGIC_CODE` (v1: one-byte topic length) and `_V2` (two-byte).
const MAGIC_V1: i32 = -626_843_481;
const MAGIC_V2: i32 = -626_843_477;

/// An inflated body larger than this is refused (a zlib bomb must not cost memory).
const MAX_INFLATED: usize = 16 << 20;

const H_FLAG: &str = "__rmq.flag";
const H_BORN_HOST: &str = "__rmq.born_host";
const H_RECONSUME: &str = "__rmq.reconsume_times";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("truncated message ({0})")]
    Truncated(&'static str),
    #[error("properties are not text")]
    Properties,
    #[error("compressed body cannot be inflated: {0}")]
    Compressed(String),
    #[error("properties of {0} bytes exceed 32767")]
    PropertiesTooLong(usize),
    #[error("cannot encode the record batch: {0}")]
    Encode(String),
}

/// A message as a producer sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub flag: i32,
    pub born_timestamp: i64,
    pub born_host: Option<SocketAddr>,
    pub reconsume_times: i32,
    pub properties: Vec<(String, String)>,
    pub body: Bytes,
}

impl Message {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses `name \x01 value \x02 …` (the last separator optional).
pub fn parse_properties(s: &str) -> Vec<(String, String)> {
    s.split(PROPERTY_SEPARATOR)
        .filter(|item| !item.is_empty())
        .filter_map(|item| item.split_once(NAME_VALUE_SEPARATOR))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn format_properties(props: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in props {
        s.push_str(k);
        s.push(NAME_VALUE_SEPARATOR);
        s.push_str(v);
        s.push(PROPERTY_SEPARATOR);
    }
    s
}

/// Inflates a body the producer compressed (zlib), if it did; returns the body and the
/// sys flag without the compression bits.
pub fn plain_body(body: Bytes, sys_flag: i32) -> Result<(Bytes, i32), MessageError> {
    if sys_flag & SYSFLAG_COMPRESSED == 0 {
        return Ok((body, sys_flag));
    }
    let kind = sys_flag & SYSFLAG_COMPRESSION_TYPE;
    if kind != 0 && kind != 1 << 8 {
        return Err(MessageError::Compressed(format!("compression type {} (only zlib is read)", kind >> 8)));
    }
    let mut out = Vec::new();
    let mut z = flate2::read::ZlibDecoder::new(&body[..]).take(MAX_INFLATED as u64 + 1);
    z.read_to_end(&mut out).map_err(|e| MessageError::Compressed(e.to_string()))?;
    if out.len() > MAX_INFLATED {
        return Err(MessageError::Compressed(format!("inflates beyond {MAX_INFLATED} bytes")));
    }
    Ok((Bytes::from(out), sys_flag & !(SYSFLAG_COMPRESSED | SYSFLAG_COMPRESSION_TYPE)))
}

/// A checked big-endian reader.
struct Reader<'a> {
    b: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, MessageError> {
        if self.b.len() - self.at < n {
            return Err(MessageError::Truncated(what));
        }
        self.at += n;
        Ok(self.b.slice(self.at - n..self.at))
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, MessageError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, MessageError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn len32(&mut self, what: &'static str) -> Result<usize, MessageError> {
        usize::try_from(self.i32(what)?).map_err(|_| MessageError::Truncated(what))
    }
}

/// One message of a batch send: flag, body, properties.
pub type BatchEntry = (i32, Bytes, Vec<(String, String)>);

/// Decodes a SEND_BATCH_MESSAGE body (`MessageDecoder.encodeMessages`): per message
/// `i32 total, i32 magic, i32 body crc, i32 flag, i32 body length, body, i16 properties
/// length, properties`. Born time and host come from the request header.
pub fn decode_batch(body: &Bytes) -> Result<Vec<BatchEntry>, MessageError> {
    let mut r = Reader { b: body, at: 0 };
    let mut out = Vec::new();
    while r.at < body.len() {
        let total = r.len32("total size")?;
        let mut m = Reader { b: &r.take(total.saturating_sub(4), "message")?, at: 0 };
        let _magic = m.i32("magic")?;
        let _crc = m.i32("body crc")?;
        let flag = m.i32("flag")?;
        let len = m.len32("body length")?;
        let payload = m.take(len, "body")?;
        let plen = usize::try_from(m.i16("properties length")?).map_err(|_| MessageError::Truncated("properties"))?;
        let props = m.take(plen, "properties")?;
        let props = std::str::from_utf8(&props).map_err(|_| MessageError::Properties)?;
        out.push((flag, payload, parse_properties(props)));
    }
    Ok(out)
}

fn header(name: &str, value: impl Into<Bytes>) -> (StrBytes, Option<Bytes>) {
    (StrBytes::from_string(name.to_string()), Some(value.into()))
}

/// The Kafka record a message is stored as.
pub fn to_record(m: &Message) -> Record {
    let mut headers = IndexMap::new();
    for (k, v) in &m.properties {
        let (k, v) = header(k, v.clone());
        headers.insert(k, v);
    }
    if m.flag != 0 {
        let (k, v) = header(H_FLAG, m.flag.to_string());
        headers.insert(k, v);
    }
    if let Some(h) = m.born_host {
        let (k, v) = header(H_BORN_HOST, h.to_string());
        headers.insert(k, v);
    }
    if m.reconsume_times != 0 {
        let (k, v) = header(H_RECONSUME, m.reconsume_times.to_string());
        headers.insert(k, v);
    }
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: NO_SEQUENCE,
        timestamp: m.born_timestamp,
        key: m.property(PROPERTY_KEYS).map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Some(m.body.clone()),
        headers,
    }
}

/// One record batch holding `records` (offsets relative from 0; the log assigns them).
pub fn encode_batch(records: &[Record]) -> Result<Bytes, MessageError> {
    let mut records = records.to_vec();
    for (i, r) in records.iter_mut().enumerate() {
        r.offset = i as i64;
    }
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(&mut buf, &records, &RecordEncodeOptions { version: 2, compression: Compression::None })
        .map_err(|e| MessageError::Encode(e.to_string()))?;
    Ok(buf.freeze())
}

/// Where a stored message is, for the message id and the PULL fields.
pub struct Stored<'a> {
    pub topic: &'a str,
    pub queue_id: i32,
    pub store_host: SocketAddr,
    pub physical_offset: i64,
}

/// The id RocketMQ calls the offset message id: store host, port and physical offset, in
/// upper-case hex (16 bytes for IPv4 hosts, 28 for IPv6).
pub fn offset_msg_id(store_host: SocketAddr, physical_offset: i64) -> String {
    let mut b = Vec::with_capacity(28);
    match store_host.ip() {
        IpAddr::V4(ip) => b.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => b.extend_from_slice(&ip.octets()),
    }
    b.put_i32(i32::from(store_host.port()));
    b.put_i64(physical_offset);
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// The physical offset slipstream reports for a message: 11 bits naming the topic, 8 the
/// queue, 34 the queue offset — 53 bits, because JavaScript clients (ali-ons) read it into
/// a double and send it back in CONSUMER_SEND_MSG_BACK. Unique per message of queues
/// 0–255 below 2^34 messages, which is what message ids need; it is not a byte position.
pub fn physical_offset(topic_tag: u16, queue_id: i32, offset: i64) -> i64 {
    (i64::from(topic_tag & TAG_MASK) << 42) | ((i64::from(queue_id) & 0xff) << 34) | (offset & OFFSET_MASK)
}

const TAG_MASK: u16 = 0x7ff;
const OFFSET_MASK: i64 = (1 << 34) - 1;

/// Splits a physical offset back into (topic tag, queue, offset).
pub fn split_physical_offset(p: i64) -> (u16, i32, i64) {
    (((p >> 42) as u16) & TAG_MASK, ((p >> 34) & 0xff) as i32, p & OFFSET_MASK)
}

/// The tag [`physical_offset`] names a topic by.
pub fn topic_tag(id: &uuid::Uuid) -> u16 {
    (id.as_u64_pair().0 as u16) & TAG_MASK
}

fn put_host(out: &mut BytesMut, host: SocketAddr) {
    match host.ip() {
        IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
    }
    out.put_i32(i32::from(host.port()));
}

/// The message a record reads as (see the module's mapping); `born_host` defaults to
/// `store_host` for records that carry none.
pub fn record_to_message(record: &Record, store_host: SocketAddr) -> Message {
    let mut props: Vec<(String, String)> = Vec::new();
    let mut m = Message {
        flag: 0,
        born_timestamp: record.timestamp,
        born_host: Some(store_host),
        reconsume_times: 0,
        properties: Vec::new(),
        body: record.value.clone().unwrap_or_default(),
    };
    for (k, v) in &record.headers {
        let Some(v) = v.as_ref().and_then(|v| std::str::from_utf8(v).ok()) else { continue };
        match k.as_str() {
            H_FLAG => m.flag = v.parse().unwrap_or(0),
            H_BORN_HOST => m.born_host = v.parse().ok().or(m.born_host),
            H_RECONSUME => m.reconsume_times = v.parse().unwrap_or(0),
            name if !name.contains([NAME_VALUE_SEPARATOR, PROPERTY_SEPARATOR])
                && !v.contains([NAME_VALUE_SEPARATOR, PROPERTY_SEPARATOR]) =>
            {
                props.push((name.to_string(), v.to_string()))
            }
            _ => {}
        }
    }
    if !props.iter().any(|(k, _)| k == PROPERTY_KEYS) {
        if let Some(key) = record.key.as_ref().and_then(|k| std::str::from_utf8(k).ok()) {
            if !key.is_empty() && !key.contains([NAME_VALUE_SEPARATOR, PROPERTY_SEPARATOR]) {
                props.push((PROPERTY_KEYS.to_string(), key.to_string()));
            }
        }
    }
    m.properties = props;
    m
}

/// Appends the message a record reads as, in the commit-log layout clients decode
/// (`MessageDecoder`), to `out`. Properties the client adds itself (queue offsets,
/// min/max offset) are not written.
pub fn encode_for_pull(out: &mut BytesMut, record: &Record, at: &Stored<'_>, store_timestamp: i64) {
    let m = record_to_message(record, at.store_host);
    let (flag, reconsume) = (m.flag, m.reconsume_times);
    let born_host = m.born_host.unwrap_or(at.store_host);
    let mut props = m.properties;
    let mut properties = format_properties(&props);
    // The properties length is an i16: drop what does not fit rather than corrupt.
    while properties.len() > i16::MAX as usize && props.pop().is_some() {
        properties = format_properties(&props);
    }
    let body: &[u8] = record.value.as_deref().unwrap_or_default();
    let topic = at.topic.as_bytes();
    let v2 = topic.len() > 127;
    let mut sys_flag = 0;
    if born_host.is_ipv6() {
        sys_flag |= SYSFLAG_BORNHOST_V6;
    }
    if at.store_host.is_ipv6() {
        sys_flag |= SYSFLAG_STOREHOST_V6;
    }
    let host_len = |h: SocketAddr| if h.is_ipv6() { 20 } else { 8 };
    let total = 4
        + 4
        + 4
        + 4
        + 4
        + 8
        + 8
        + 4
        + 8
        + host_len(born_host)
        + 8
        + host_len(at.store_host)
        + 4
        + 8
        + 4
        + body.len()
        + if v2 { 2 } else { 1 }
        + topic.len()
        + 2
        + properties.len();
    out.reserve(total);
    out.put_i32(total as i32);
    out.put_i32(if v2 { MAGIC_V2 } else { MAGIC_V1 });
    out.put_i32(crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(body) as i32);
    out.put_i32(at.queue_id);
    out.put_i32(flag);
    out.put_i64(record.offset);
    out.put_i64(at.physical_offset);
    out.put_i32(sys_flag);
    out.put_i64(record.timestamp);
    put_host(out, born_host);
    out.put_i64(store_timestamp);
    put_host(out, at.store_host);
    out.put_i32(reconsume);
    out.put_i64(0);
    out.put_i32(body.len() as i32);
    out.extend_from_slice(body);
    if v2 {
        out.put_i16(topic.len() as i16);
    } else {
        out.put_u8(topic.len() as u8);
    }
    out.extend_from_slice(topic);
    out.put_i16(properties.len() as i16);
    out.extend_from_slice(properties.as_bytes());
}

/// Appends the message `rec` of queue `queue_id` of `topic` reads as (see
/// [`encode_for_pull`]), stored on `store_host`; the copy is counted.
pub fn encode_stored(out: &mut BytesMut, topic: &Topic, queue_id: i32, rec: &Record, store_host: SocketAddr) {
    let at = Stored {
        topic: topic.name(),
        queue_id,
        store_host,
        physical_offset: physical_offset(topic_tag(&topic.meta.id), queue_id, rec.offset),
    };
    let before = out.len();
    encode_for_pull(out, rec, &at, rec.timestamp);
    metrics::count_copy(Path::RocketMqPull, out.len() - before);
}

/// The `TAGS` a record carries (a header of that name).
pub fn record_tag(record: &Record) -> Option<&str> {
    record
        .headers
        .iter()
        .find(|(k, _)| k.as_str() == PROPERTY_TAGS)
        .and_then(|(_, v)| v.as_ref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// A tag subscription: `*` (or empty) takes everything, `a || b` those tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    All,
    Tags(Vec<String>),
}

impl TagFilter {
    pub fn parse(expr: &str) -> TagFilter {
        let expr = expr.trim();
        if expr.is_empty() || expr == "*" {
            return TagFilter::All;
        }
        TagFilter::Tags(expr.split("||").map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect())
    }

    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags(tags) => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    #[test]
    fn properties_round_trip() {
        let p = vec![("TAGS".to_string(), "a".to_string()), ("KEYS".to_string(), "k1 k2".to_string())];
        assert_eq!(parse_properties(&format_properties(&p)), p);
        assert_eq!(parse_properties("A\u{1}1\u{2}B\u{1}2"), vec![("A".into(), "1".into()), ("B".into(), "2".into())]);
    }

    #[test]
    fn a_message_survives_the_record_and_reads_back_for_pull() {
        let m = Message {
            flag: 3,
            born_timestamp: 1_700_000_000_000,
            born_host: Some("10.0.0.9:5555".parse().expect("addr")),
            reconsume_times: 0,
            properties: vec![("TAGS".into(), "TagA".into()), ("KEYS".into(), "k".into())],
            body: Bytes::from_static(b"hello"),
        };
        let batch = encode_batch(&[to_record(&m)]).expect("encodes");
        let mut b = batch.clone();
        let set = RecordBatchDecoder::decode(&mut b).expect("decodes");
        let rec = &set.records[0];
        assert_eq!(rec.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(record_tag(rec), Some("TagA"));
        let mut out = BytesMut::new();
        let host: SocketAddr = "127.0.0.1:10911".parse().expect("addr");
        encode_for_pull(
            &mut out,
            rec,
            &Stored { topic: "T", queue_id: 2, store_host: host, physical_offset: physical_offset(7, 2, 0) },
            5,
        );
        let out = out.freeze();
        let mut r = Reader { b: &out, at: 0 };
        assert_eq!(r.len32("total").expect("total"), out.len());
        assert_eq!(r.i32("magic").expect("magic"), MAGIC_V1);
        r.take(4, "crc").expect("crc");
        assert_eq!(r.i32("queue").expect("queue"), 2);
        assert_eq!(r.i32("flag").expect("flag"), 3);
        assert!(out.ends_with(format_properties(&m.properties).as_bytes()));
        assert_eq!(split_physical_offset(physical_offset(7, 2, 99)), (7, 2, 99));
        assert!(physical_offset(0x7ff, 255, (1 << 34) - 1) < 1 << 53, "exact in a double");
        assert_eq!(offset_msg_id(host, 1).len(), 32);
    }

    #[test]
    fn tag_filters() {
        assert!(TagFilter::parse("*").matches(None));
        let f = TagFilter::parse("a || b");
        assert!(f.matches(Some("b")) && !f.matches(Some("c")) && !f.matches(None));
    }

    #[test]
    fn batch_bodies_are_checked() {
        let mut b = BytesMut::new();
        b.put_i32(4 + 4 + 4 + 4 + 4 + 2 + 2 + 3);
        b.put_i32(0);
        b.put_i32(0);
        b.put_i32(9);
        b.put_i32(2);
        b.extend_from_slice(b"hi");
        b.put_i16(3);
        b.extend_from_slice(b"A\x01b");
        let msgs = decode_batch(&b.clone().freeze()).expect("decodes");
        assert_eq!(msgs[0].0, 9);
        assert_eq!(msgs[0].2, vec![("A".to_string(), "b".to_string())]);
        b.truncate(b.len() - 1);
        assert!(decode_batch(&b.freeze()).is_err());
        let bomb = Bytes::from_static(&[0x78, 0x9c, 0xff]);
        assert!(plain_body(bomb, SYSFLAG_COMPRESSED).is_err());
    }
}
