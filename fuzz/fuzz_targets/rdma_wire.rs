//! Any bytes as RDMA connection setup data or a received message: decoding must refuse or
//! accept, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slipstream::transport::rdma::wire::{Grant, Imm, Offer, SendHeader};

fuzz_target!(|data: &[u8]| {
    let _ = Offer::decode(data);
    let _ = Grant::decode(data);
    let _ = SendHeader::parse(data);
    if data.len() >= 4 {
        let _ = Imm::decode(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
    }
});
