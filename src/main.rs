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
    }
    Ok(())
}
