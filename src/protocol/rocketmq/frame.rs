//! RocketMQ remoting framing and command headers, sans-IO: the one place remoting bytes
//! are cut into frames and headers decoded and encoded.
//!
//! A frame is `i32 total length` (everything after it), `i32 (serialize type << 24 |
//! header length)`, the header, then the body. The header is JSON (`code`, `language`,
//! `version`, `opaque`, `flag`, `remark`, `extFields`) or the binary `ROCKETMQ` layout
//! (`i16 code, u8 language, i16 version, i32 opaque, i32 flag, i32 remark length + remark,
//! i32 ext length + (i16 key length, key, i32 value length, value)*`). An answer goes out
//! in the serialization its request came in. Flag bit 0 marks a response, bit 1 a one-way
//! request (no answer wanted).
//!
//! # Invariants
//! - Every length read from the wire is checked against what is left of the frame before
//!   anything is sliced or allocated for it; decoding never panics (fuzz target
//!   `rocketmq_frame`).
//! - Frame bodies and message bodies are slices of the received buffer (no copy).

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::framing::{LengthError, Prefixed, PREFIX};

/// The largest frame accepted (RocketMQ's default `maxFrameLength` is also 16 MiB).
pub const MAX_FRAME: usize = 16 << 20;
/// A frame holds at least the serialize-type word.
const MIN_FRAME: usize = 4;

/// Flag bit: this command is a response.
pub const FLAG_RESPONSE: i32 = 1;
/// Flag bit: the request wants no answer.
pub const FLAG_ONEWAY: i32 = 1 << 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error(transparent)]
    Length(#[from] LengthError),
    #[error("header length {header} exceeds the frame's {frame} bytes")]
    HeaderLength { header: usize, frame: usize },
    #[error("unknown serialize type {0}")]
    SerializeType(u8),
    #[error("malformed JSON header: {0}")]
    Json(String),
    #[error("malformed binary header: {0}")]
    Binary(&'static str),
}

/// How a command header is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serialize {
    Json,
    RocketMq,
}

/// One remoting command (request or response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub code: i32,
    pub version: i32,
    pub opaque: i32,
    pub flag: i32,
    pub remark: Option<String>,
    /// The custom header, as strings (clients send JSON numbers and booleans too).
    pub ext: Vec<(String, String)>,
    pub body: Bytes,
    pub serialize: Serialize,
}

impl Command {
    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    /// A custom-header field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.ext.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A response to `req`: same opaque and serialization, the response flag set.
    pub fn response_to(req: &Command, code: i32, remark: Option<String>) -> Command {
        Command {
            code,
            version: req.version,
            opaque: req.opaque,
            flag: FLAG_RESPONSE,
            remark,
            ext: Vec::new(),
            body: Bytes::new(),
            serialize: req.serialize,
        }
    }

    /// A broker-initiated request (to a client).
    pub fn request(code: i32, ext: Vec<(String, String)>, oneway: bool, opaque: i32) -> Command {
        Command {
            code,
            version: 0,
            opaque,
            flag: if oneway { FLAG_ONEWAY } else { 0 },
            remark: None,
            ext,
            body: Bytes::new(),
            serialize: Serialize::Json,
        }
    }

    /// This command without its body (what a request that waits keeps of itself).
    pub fn head(&self) -> Command {
        Command { body: Bytes::new(), ..self.clone() }
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Command {
        self.ext.push((key.to_string(), value.to_string()));
        self
    }

    /// Decodes a frame body (the bytes after the total-length prefix).
    pub fn decode(frame: Bytes) -> Result<Command, FrameError> {
        let word = frame.get(..4).ok_or(FrameError::HeaderLength { header: 4, frame: frame.len() })?;
        let serialize = match word[0] {
            0 => Serialize::Json,
            1 => Serialize::RocketMq,
            other => return Err(FrameError::SerializeType(other)),
        };
        let header_len = u32::from_be_bytes([0, word[1], word[2], word[3]]) as usize;
        if header_len > frame.len() - 4 {
            return Err(FrameError::HeaderLength { header: header_len, frame: frame.len() });
        }
        let header = &frame[4..4 + header_len];
        let mut cmd = match serialize {
            Serialize::Json => decode_json(header)?,
            Serialize::RocketMq => decode_binary(header)?,
        };
        cmd.body = frame.slice(4 + header_len..);
        Ok(cmd)
    }

    /// Encodes the prefix and header; the body follows as its own chunk(s), `body_len`
    /// bytes long.
    pub fn encode_head(&self, body_len: usize) -> Bytes {
        let header = match self.serialize {
            Serialize::Json => encode_json(self),
            Serialize::RocketMq => encode_binary(self),
        };
        let mut out = BytesMut::with_capacity(8 + header.len());
        out.put_u32((4 + header.len() + body_len) as u32);
        let kind: u32 = match self.serialize {
            Serialize::Json => 0,
            Serialize::RocketMq => 1,
        };
        out.put_u32(kind << 24 | (header.len() as u32 & 0x00ff_ffff));
        out.extend_from_slice(&header);
        out.freeze()
    }

    /// The whole frame in one buffer (tests, tools, small answers).
    pub fn encode(&self) -> Bytes {
        let head = self.encode_head(self.body.len());
        let mut out = BytesMut::with_capacity(head.len() + self.body.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.body);
        out.freeze()
    }
}

/// The code of a command whose head [`Command::encode_head`] made (length prefix on), read
/// back without decoding the header: how the metrics learn a response's code from an
/// encoded answer. `None` for anything else.
pub fn code_of_head(head: &[u8]) -> Option<i32> {
    let kind = *head.get(4)?;
    let header = head.get(8..)?;
    match kind {
        // Binary: the code is the header's first field.
        1 => Some(i16::from_be_bytes([*header.first()?, *header.get(1)?]).into()),
        // JSON: serde_json writes an object's keys sorted, "code" first.
        0 => {
            let rest = header.strip_prefix(br#"{"code":"#)?;
            let end = rest.iter().position(|b| !(b.is_ascii_digit() || *b == b'-'))?;
            std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// Cuts remoting frames off a byte stream.
#[derive(Debug, Clone, Copy)]
pub struct Framer {
    prefixed: Prefixed,
}

impl Default for Framer {
    fn default() -> Self {
        Framer { prefixed: Prefixed::new(MIN_FRAME, MAX_FRAME) }
    }
}

impl Framer {
    /// Cuts the next whole frame body (after the length prefix) off `buf`.
    pub fn cut(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, LengthError> {
        self.prefixed.cut(buf)
    }

    /// The largest buffer a frame needs, prefix included.
    pub fn recv_max(&self) -> usize {
        self.prefixed.max + PREFIX
    }
}

fn decode_json(header: &[u8]) -> Result<Command, FrameError> {
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| FrameError::Json(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| FrameError::Json("not an object".into()))?;
    let int = |name: &str| -> Result<i32, FrameError> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(0),
            Some(serde_json::Value::Number(n)) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| FrameError::Json(format!("{name} is not a 32-bit integer"))),
            Some(serde_json::Value::String(s)) => {
                s.parse().map_err(|_| FrameError::Json(format!("{name} is not a 32-bit integer")))
            }
            Some(_) => Err(FrameError::Json(format!("{name} is not a number"))),
        }
    };
    let code = int("code")?;
    let version = int("version")?;
    let opaque = int("opaque")?;
    let flag = int("flag")?;
    let remark = match obj.get("remark") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let mut ext = Vec::new();
    match obj.get("extFields") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(fields)) => {
            for (k, v) in fields {
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    // Absent fields: as if not sent.
                    serde_json::Value::Null => continue,
                    _ => return Err(FrameError::Json(format!("extFields.{k} is not a string or number"))),
                };
                ext.push((k.clone(), s));
            }
        }
        Some(_) => return Err(FrameError::Json("extFields is not an object".into())),
    }
    Ok(Command { code, version, opaque, flag, remark, ext, body: Bytes::new(), serialize: Serialize::Json })
}

fn encode_json(cmd: &Command) -> Vec<u8> {
    let ext: serde_json::Map<String, serde_json::Value> =
        cmd.ext.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    let mut obj = serde_json::json!({
        "code": cmd.code,
        "language": "JAVA",
        "version": cmd.version,
        "opaque": cmd.opaque,
        "flag": cmd.flag,
        "extFields": ext,
        "serializeTypeCurrentRPC": "JSON",
    });
    if let (Some(r), Some(o)) = (&cmd.remark, obj.as_object_mut()) {
        o.insert("remark".into(), serde_json::Value::String(r.clone()));
    }
    // A Value of strings and numbers always serializes.
    serde_json::to_vec(&obj).unwrap_or_default()
}

/// A checked reader over a binary header.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Binary(what));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, FrameError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, FrameError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, len: usize, what: &'static str) -> Result<String, FrameError> {
        String::from_utf8(self.take(len, what)?.to_vec()).map_err(|_| FrameError::Binary(what))
    }
}

fn decode_binary(header: &[u8]) -> Result<Command, FrameError> {
    let mut r = Reader { b: header };
    let code = i32::from(r.i16("code")?);
    let _language = r.u8("language")?;
    let version = i32::from(r.i16("version")?);
    let opaque = r.i32("opaque")?;
    let flag = r.i32("flag")?;
    let remark_len = r.i32("remark length")?;
    let remark = match usize::try_from(remark_len) {
        Ok(0) => None,
        Ok(n) => Some(r.string(n, "remark")?),
        Err(_) => return Err(FrameError::Binary("negative remark length")),
    };
    let ext_len = usize::try_from(r.i32("ext length")?).map_err(|_| FrameError::Binary("negative ext length"))?;
    let mut fields = Reader { b: r.take(ext_len, "ext fields")? };
    let mut ext = Vec::new();
    while !fields.b.is_empty() {
        let klen = usize::try_from(fields.i16("key length")?).map_err(|_| FrameError::Binary("key length"))?;
        let k = fields.string(klen, "key")?;
        let vlen = usize::try_from(fields.i32("value length")?).map_err(|_| FrameError::Binary("value length"))?;
        let v = fields.string(vlen, "value")?;
        ext.push((k, v));
    }
    Ok(Command { code, version, opaque, flag, remark, ext, body: Bytes::new(), serialize: Serialize::RocketMq })
}

fn encode_binary(cmd: &Command) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.put_i16(cmd.code as i16);
    out.put_u8(0); // language: JAVA
    out.put_i16(cmd.version as i16);
    out.put_i32(cmd.opaque);
    out.put_i32(cmd.flag);
    match &cmd.remark {
        Some(r) => {
            out.put_i32(r.len() as i32);
            out.extend_from_slice(r.as_bytes());
        }
        None => out.put_i32(0),
    }
    let mut ext = Vec::new();
    for (k, v) in &cmd.ext {
        ext.put_i16(k.len() as i16);
        ext.extend_from_slice(k.as_bytes());
        ext.put_i32(v.len() as i32);
        ext.extend_from_slice(v.as_bytes());
    }
    out.put_i32(ext.len() as i32);
    out.extend_from_slice(&ext);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(serialize: Serialize) {
        let cmd = Command {
            code: 310,
            version: 317,
            opaque: 42,
            flag: FLAG_ONEWAY,
            remark: Some("hé".into()),
            ext: vec![("a".into(), "group".into()), ("e".into(), "3".into())],
            body: Bytes::from_static(b"payload"),
            serialize,
        };
        let mut buf = BytesMut::from(&cmd.encode()[..]);
        let frame = Framer::default().cut(&mut buf).expect("length").expect("whole");
        let back = Command::decode(frame).expect("decodes");
        assert_eq!(back, cmd);
        assert!(back.is_oneway() && !back.is_response());
        for code in [0, 17, 310, -1] {
            let c = Command { code, ..cmd.clone() };
            assert_eq!(code_of_head(&c.encode_head(c.body.len())), Some(code), "{serialize:?}");
        }
        assert_eq!(code_of_head(b"\0\0\0\x05\x07\0\0\x01x"), None);
    }

    #[test]
    fn json_and_binary_headers_round_trip() {
        roundtrip(Serialize::Json);
        roundtrip(Serialize::RocketMq);
    }

    #[test]
    fn json_ext_fields_may_be_numbers_or_booleans() {
        let header = br#"{"code":14,"language":"JAVA","version":121,"opaque":7,"flag":0,"extFields":{"queueId":3,"unitMode":false,"topic":"t","skip":null}}"#;
        let mut frame = Vec::new();
        frame.put_u32(header.len() as u32);
        frame.extend_from_slice(header);
        let cmd = Command::decode(Bytes::from(frame)).expect("decodes");
        assert_eq!(cmd.field("queueId"), Some("3"));
        assert_eq!(cmd.field("unitMode"), Some("false"));
        assert_eq!(cmd.field("skip"), None);
        assert!(cmd.remark.is_none());
    }

    #[test]
    fn malformed_headers_are_errors() {
        for frame in [
            &[0u8, 0, 0][..],
            &[0, 0, 0, 9, b'{'][..],
            &[0, 0, 0, 1, b'{'][..],
            &[2, 0, 0, 0][..],
            &[1, 0, 0, 4, 0, 1, 0, 0][..],
            // Binary: remark length beyond the header.
            &[1, 0, 0, 17, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff][..],
        ] {
            assert!(Command::decode(Bytes::copy_from_slice(frame)).is_err(), "{frame:?}");
        }
    }
}
