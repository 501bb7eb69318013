//! Any bytes as one Kafka request frame: decoding must refuse or accept, never panic,
//! never reserve memory from an unchecked length.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slipstream::protocol::kafka::decode_frame(bytes::Bytes::copy_from_slice(data));
});
