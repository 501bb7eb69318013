//! Any bytes as a request stream and as every response the sidecar and the bridge
//! rewrite (Produce, Fetch, Metadata, ApiVersions, FindCoordinator, DeleteTopics, DescribeCluster): the
//! first byte picks the API, the second the version, the third how brokers are
//! advertised; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slipstream::sidecar::cluster::PortPlan;
use slipstream::sidecar::rewrite::{rewrite, Fixed, RequestLog};

fuzz_target!(|data: &[u8]| {
    let _ = RequestLog::default().observe(data);
    if data.len() >= 3 {
        let api = [0i16, 1, 3, 10, 18, 20, 60][data[0] as usize % 7];
        let version = i16::from(data[1] % 19);
        let body = bytes::Bytes::copy_from_slice(&data[3..]);
        if data[2] % 2 == 0 {
            let _ = rewrite(api, version, body.clone(), &mut Fixed::new("bridge", 9092));
        } else {
            // Per-broker ports, refusing node ids that do not fit.
            let _ = rewrite(api, version, body, &mut PortPlan::new("sidecar", 60000, Vec::new()));
        }
    }
});
