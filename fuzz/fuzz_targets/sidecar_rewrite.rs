//! Any bytes as a request stream and as a broker-naming response the bridge rewrites: the
//! first byte picks the API, the second the version; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slipstream::sidecar::rewrite::{rewrite, RequestLog};

fuzz_target!(|data: &[u8]| {
    let _ = RequestLog::default().observe(data);
    if data.len() >= 2 {
        let api = [3i16, 10, 60][data[0] as usize % 3];
        let _ = rewrite(api, i16::from(data[1] % 14), &data[2..], "bridge", 9092);
    }
});
