//! The `slipstream` command.

#[path = "../bench/harness/mod.rs"]
mod bench;

use anyhow::Context;
use clap::{Parser, Subcommand};
use slipstream::config::ServeArgs;

#[derive(Parser)]
#[command(name = "slipstream", version, about = "Kafka-compatible broker data path on a memory-mapped commit log")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (embedded default: Kafka on 127.0.0.1:9092, data in ./data, tcp).
    Serve(ServeArgs),
    /// Run latency/throughput workloads against slipstream and other Kafka brokers.
    Bench(bench::BenchArgs),
    /// Accept Kafka TCP clients and carry them over RDMA to a `--transport rdma` broker.
    #[cfg(feature = "rdma")]
    Bridge(slipstream::sidecar::bridge::BridgeArgs),
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = args.resolve().context("invalid settings")?;
            slipstream::server::serve(cfg).context("slipstream serve failed")?;
        }
        Command::Bench(args) => bench::run(args)?,
        #[cfg(feature = "rdma")]
        Command::Bridge(args) => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).context("signal handler")?;
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone()).context("signal handler")?;
            slipstream::sidecar::bridge::run(&args, stop).context("slipstream bridge failed")?;
        }
    }
    Ok(())
}
