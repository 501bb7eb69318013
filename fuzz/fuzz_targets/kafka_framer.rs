//! Any bytes as a Kafka byte stream, fed in pieces whose sizes the input picks: the
//! framer cuts request and response frames, refuses bad lengths, and never panics or
//! reserves more than its cap; the sidecar's response tracker follows the same bytes.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use slipstream::protocol::kafka::frame::{response_correlation, Framer, RequestHead, Side};
use slipstream::sidecar::rewrite::{Fixed, RequestLog, Responses};

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    let step = usize::from(step.max(1));
    for side in [Side::Requests, Side::Responses] {
        let framer = Framer::new(side, MAX);
        let mut buf = BytesMut::new();
        for piece in stream.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match framer.cut(&mut buf) {
                    Ok(Some(frame)) => {
                        assert!(frame.len() <= MAX);
                        let _ = (RequestHead::peek(&frame), response_correlation(&frame));
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
                assert!(buf.capacity() <= 2 * (MAX + 4) + stream.len());
            }
        }
    }
    // The same bytes as requests and as their responses through the tracker.
    let mut requests = RequestLog::default();
    if requests.observe(stream).is_err() {
        return;
    }
    let mut responses = Responses::new(Fixed::new("sidecar", 9092));
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = match responses.passing() {
            Some(left) => {
                let n = left.min(rest.len());
                responses.passed(n);
                n
            }
            None => match responses.take(rest, &mut requests, &mut out) {
                Ok(n) => n,
                Err(_) => return,
            },
        };
        rest = &rest[n..];
    }
});
