//! gRPC messages to and from the remoting data model: a `pb::Message` a producer sends
//! becomes the same [`Message`] (properties, body) a remoting producer's would, and a
//! stored record reads back as a `pb::Message` with its system properties, whoever
//! produced it (Kafka, remoting or gRPC).

use bytes::Bytes;
use kafka_protocol::records::Record;
use md5::{Digest as _, Md5};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};

use super::pb;
use crate::metrics::{self, Path};
use crate::protocol::rocketmq::message::{self, Message, PROPERTY_KEYS, PROPERTY_TAGS};

/// `MessageConst.PROPERTY_UNIQ_CLIENT_MESSAGE_ID_KEYIDX`: the producer's message id.
pub const P_UNIQ_KEY: &str = "UNIQ_KEY";
/// `MessageConst.PROPERTY_SHARDING_KEY`: a FIFO message's group.
pub const P_SHARDING_KEY: &str = "__SHARDINGKEY";
pub const P_TIMER_DELIVER_MS: &str = "TIMER_DELIVER_MS";
/// The largest body accepted (and told to producers in their settings), as the proxy's.
pub const MAX_BODY: usize = 4 << 20;

/// Properties the broker keeps for itself: never user properties, never accepted from one.
const SYSTEM: [&str; 25] = [
    "TIMER_OUT_MS",
    "TAGS",
    "KEYS",
    "UNIQ_KEY",
    "__SHARDINGKEY",
    "TRAN_MSG",
    "PGROUP",
    "REAL_TOPIC",
    "REAL_QID",
    "DELAY",
    "TIMER_DELIVER_MS",
    "TIMER_DELAY_SEC",
    "TIMER_DELAY_MS",
    "__STARTDELIVERTIME",
    "WAIT",
    "TRANSACTION_CHECK_TIMES",
    "MSG_REGION",
    "TRACE_ON",
    "MIN_OFFSET",
    "MAX_OFFSET",
    "RETRY_TOPIC",
    "ORIGIN_MESSAGE_ID",
    "RECONSUME_TIME",
    "MAX_RECONSUME_TIMES",
    "CONSUME_START_TIME",
];

fn is_system(key: &str) -> bool {
    SYSTEM.contains(&key) || key.starts_with("__rmq.")
}

/// Why a message is refused: the code and the reason.
pub type Refusal = (pb::Code, String);

fn refuse(code: pb::Code, why: impl Into<String>) -> Refusal {
    (code, why.into())
}

/// The message a gRPC producer sent, as the remoting data model stores it.
pub fn from_pb(m: pb::Message, peer: Option<SocketAddr>) -> Result<Message, Refusal> {
    let sys = m.system_properties.unwrap_or_default();
    let mut props: Vec<(String, String)> = Vec::new();
    for (k, v) in m.user_properties {
        if is_system(&k) || k.is_empty() || k.contains(['\u{1}', '\u{2}']) || v.contains(['\u{1}', '\u{2}']) {
            return Err(refuse(
                pb::Code::IllegalMessagePropertyKey,
                format!("property key '{k}' is reserved or invalid"),
            ));
        }
        props.push((k, v));
    }
    if sys.message_id.is_empty() || sys.message_id.len() > 128 {
        return Err(refuse(pb::Code::IllegalMessageId, "a message needs a message id of at most 128 characters"));
    }
    props.push((P_UNIQ_KEY.into(), sys.message_id.clone()));
    if let Some(tag) = sys.tag.filter(|t| !t.is_empty()) {
        if tag.contains('|') || tag.trim().is_empty() || tag.contains(['\u{1}', '\u{2}']) {
            return Err(refuse(pb::Code::IllegalMessageTag, format!("tag '{tag}' is invalid")));
        }
        props.push((PROPERTY_TAGS.into(), tag));
    }
    if !sys.keys.is_empty() {
        if sys.keys.iter().any(|k| k.trim().is_empty() || k.contains(['\u{1}', '\u{2}'])) {
            return Err(refuse(pb::Code::IllegalMessageKey, "a message key is blank or invalid"));
        }
        props.push((PROPERTY_KEYS.into(), sys.keys.join(" ")));
    }
    let kind = pb::MessageType::try_from(sys.message_type).unwrap_or(pb::MessageType::Normal);
    let group = sys.message_group.filter(|g| !g.is_empty());
    let delivery = sys.delivery_timestamp.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    match kind {
        pb::MessageType::Fifo if group.is_none() => {
            return Err(refuse(pb::Code::MessagePropertyConflictWithType, "a FIFO message needs a message group"))
        }
        pb::MessageType::Delay if delivery.is_none() => {
            return Err(refuse(pb::Code::MessagePropertyConflictWithType, "a delay message needs a delivery time"))
        }
        pb::MessageType::Transaction if delivery.is_some() => {
            return Err(refuse(pb::Code::MessagePropertyConflictWithType, "a transactional message cannot be delayed"))
        }
        _ => {}
    }
    if let Some(g) = group {
        props.push((P_SHARDING_KEY.into(), g));
    }
    if let Some(at) = delivery {
        props.push((P_TIMER_DELIVER_MS.into(), at.to_string()));
    }
    if kind == pb::MessageType::Transaction {
        props.push(("TRAN_MSG".into(), "true".into()));
    }
    let body = match pb::Encoding::try_from(sys.body_encoding) {
        Ok(pb::Encoding::Gzip) => gunzip(&m.body)?,
        _ => m.body,
    };
    if body.is_empty() {
        return Err(refuse(pb::Code::MessageBodyEmpty, "the message body is empty"));
    }
    if body.len() > MAX_BODY {
        return Err(refuse(
            pb::Code::MessageBodyTooLarge,
            format!("the body of {} bytes exceeds {MAX_BODY}", body.len()),
        ));
    }
    let born_host = sys.born_host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)).or(peer);
    let born_timestamp = sys.born_timestamp.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    Ok(Message {
        flag: 0,
        born_timestamp: born_timestamp.unwrap_or_else(crate::log::now_ms),
        born_host,
        reconsume_times: 0,
        properties: props,
        body,
    })
}

/// Inflates a gzip body, refusing one that inflates past [`MAX_BODY`].
fn gunzip(body: &[u8]) -> Result<Bytes, Refusal> {
    let mut out = Vec::new();
    let limit = MAX_BODY as u64 + 1;
    flate2::read::GzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| refuse(pb::Code::MessageCorrupted, format!("the gzip body cannot be inflated: {e}")))?;
    metrics::count_copy(Path::RocketMqGrpc, out.len());
    Ok(out.into())
}

/// MD5 of the body in upper-case hex, as the proxy sends it (clients check it).
pub fn md5_hex(body: &[u8]) -> String {
    Md5::digest(body).iter().map(|b| format!("{b:02X}")).collect()
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Milliseconds of a protobuf duration (negative ones are zero).
pub fn millis(d: &prost_types::Duration) -> i64 {
    (d.seconds.saturating_mul(1000)).saturating_add(i64::from(d.nanos) / 1_000_000).max(0)
}

/// Where a delivered message came from, and how it is delivered.
pub struct Delivery<'a> {
    pub topic: &'a str,
    pub queue_id: i32,
    pub store_host: SocketAddr,
    /// The id when the record carries no `UNIQ_KEY` (e.g. a Kafka producer's).
    pub fallback_id: String,
    pub receipt_handle: Option<String>,
    pub attempt: i32,
    pub invisible_ms: Option<i64>,
}

/// A stored record as a gRPC message. The body is shared with the read (the one copy is
/// protobuf's encoding into the HTTP/2 frame, counted here).
pub fn to_pb(record: &Record, at: &Delivery<'_>) -> pb::Message {
    let m = message::record_to_message(record, at.store_host);
    let mut sys = pb::SystemProperties {
        message_id: at.fallback_id.clone(),
        body_digest: Some(pb::Digest { r#type: pb::DigestType::Md5 as i32, checksum: md5_hex(&m.body) }),
        body_encoding: pb::Encoding::Identity as i32,
        message_type: pb::MessageType::Normal as i32,
        born_timestamp: Some(timestamp(m.born_timestamp)),
        born_host: m.born_host.map(|h| h.ip().to_string()).unwrap_or_default(),
        store_timestamp: Some(timestamp(record.timestamp)),
        store_host: at.store_host.to_string(),
        receipt_handle: at.receipt_handle.clone(),
        queue_id: at.queue_id,
        queue_offset: Some(record.offset),
        invisible_duration: at.invisible_ms.map(duration),
        delivery_attempt: Some(at.attempt),
        ..Default::default()
    };
    let mut user = std::collections::HashMap::new();
    for (k, v) in m.properties {
        match k.as_str() {
            P_UNIQ_KEY => sys.message_id = v,
            PROPERTY_TAGS => sys.tag = Some(v),
            PROPERTY_KEYS => sys.keys = v.split(' ').filter(|k| !k.is_empty()).map(str::to_string).collect(),
            P_SHARDING_KEY => {
                sys.message_group = Some(v);
                sys.message_type = pb::MessageType::Fifo as i32;
            }
            P_TIMER_DELIVER_MS | "TIMER_OUT_MS" => {
                if let Ok(at) = v.parse::<i64>() {
                    sys.delivery_timestamp = Some(timestamp(at));
                    sys.message_type = pb::MessageType::Delay as i32;
                }
            }
            k if is_system(k) => {}
            _ => {
                user.insert(k, v);
            }
        }
    }
    metrics::count_copy(Path::RocketMqGrpc, m.body.len());
    pb::Message {
        topic: Some(pb::Resource { resource_namespace: String::new(), name: at.topic.to_string() }),
        user_properties: user,
        system_properties: Some(sys),
        body: m.body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produced(kind: pb::MessageType, group: Option<&str>) -> pb::Message {
        pb::Message {
            topic: Some(pb::Resource { resource_namespace: String::new(), name: "t".into() }),
            user_properties: [("color".to_string(), "blue".to_string())].into_iter().collect(),
            system_properties: Some(pb::SystemProperties {
                tag: Some("a".into()),
                keys: vec!["k1".into(), "k2".into()],
                message_id: "01ABC".into(),
                message_type: kind as i32,
                message_group: group.map(str::to_string),
                ..Default::default()
            }),
            body: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn a_grpc_message_survives_the_log() {
        let m = from_pb(produced(pb::MessageType::Fifo, Some("g1")), None).unwrap();
        assert_eq!(m.property("UNIQ_KEY"), Some("01ABC"));
        assert_eq!(m.property("KEYS"), Some("k1 k2"));
        let mut record = message::to_record(&m);
        record.offset = 42;
        let store: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let at = Delivery {
            topic: "t",
            queue_id: 3,
            store_host: store,
            fallback_id: "X".into(),
            receipt_handle: Some("h".into()),
            attempt: 2,
            invisible_ms: Some(1500),
        };
        let back = to_pb(&record, &at);
        let sys = back.system_properties.unwrap();
        assert_eq!(sys.message_id, "01ABC");
        assert_eq!(sys.tag.as_deref(), Some("a"));
        assert_eq!(sys.keys, vec!["k1", "k2"]);
        assert_eq!(sys.message_group.as_deref(), Some("g1"));
        assert_eq!(sys.message_type, pb::MessageType::Fifo as i32);
        assert_eq!(sys.queue_offset, Some(42));
        assert_eq!(sys.delivery_attempt, Some(2));
        assert_eq!(sys.body_digest.unwrap().checksum, "5D41402ABC4B2A76B9719D911017C592");
        assert_eq!(back.user_properties.get("color").map(String::as_str), Some("blue"));
        assert_eq!(back.body, Bytes::from_static(b"hello"));
    }

    #[test]
    fn bad_messages_are_refused_with_their_code() {
        let code = |m: pb::Message| from_pb(m, None).unwrap_err().0;
        assert_eq!(code(produced(pb::MessageType::Fifo, None)), pb::Code::MessagePropertyConflictWithType);
        let mut m = produced(pb::MessageType::Normal, None);
        m.user_properties.insert("UNIQ_KEY".into(), "x".into());
        assert_eq!(code(m), pb::Code::IllegalMessagePropertyKey);
        let mut m = produced(pb::MessageType::Normal, None);
        m.body = Bytes::new();
        assert_eq!(code(m), pb::Code::MessageBodyEmpty);
        let mut m = produced(pb::MessageType::Normal, None);
        if let Some(s) = m.system_properties.as_mut() {
            s.body_encoding = pb::Encoding::Gzip as i32;
        }
        assert_eq!(code(m), pb::Code::MessageCorrupted);
    }
}
