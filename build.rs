//! Generates the RocketMQ 5 gRPC API (`apache.rocketmq.v2`, vendored under
//! `proto/rocketmq`) for `protocol::rocketmq::grpc`: protox parses the files (no protoc
//! needed), tonic-prost-build writes the message types and the server trait to OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    commit();
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

/// The commit being built, for `slipstream --version` ("unknown" outside a git checkout).
fn commit() {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SLIPSTREAM_COMMIT={commit}");
    // Rebuilt when HEAD moves (a new commit on the branch, or another branch).
    if let Some(git) = run(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={git}/HEAD");
        if let Some(head) = run(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={git}/{head}");
        }
    }
}
