//! Generates the RocketMQ 5 gRPC API (`apache.rocketmq.v2`, vendored under
//! `proto/rocketmq`) for `protocol::rocketmq::grpc`: protox parses the files (no protoc
//! needed), tonic-prost-build writes the message types and the server trait to OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto/rocketmq";
    let files = ["apache/rocketmq/v2/service.proto"];
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        // The client (for `slipstream bench`) without tonic's channel: the bench brings it.
        .build_transport(false)
        .build_server(true)
        // Bodies as `Bytes`: decoded messages share the request buffer (no copy).
        .bytes(".apache.rocketmq.v2.Message.body")
        .compile_fds(fds)?;
    Ok(())
}
