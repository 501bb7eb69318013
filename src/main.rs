//! The `slipstream` command.
#![deny(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use slipstream::config::ServeArgs;
use std::ffi::OsString;

#[derive(Parser)]
#[command(name = "slipstream", version, about = "Kafka-compatible broker data path on a memory-mapped commit log")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (embedded default: Kafka on 127.0.0.1:9092, data in ./data, tcp).
    Serve(Box<ServeArgs>),
    /// Run latency/throughput workloads against slipstream and other Kafka brokers
    /// (the `slipstream-bench` binary beside this one; `slipstream bench --help`).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Stand in front of an existing Kafka cluster: clients bootstrap here, every broker
    /// gets a listener of its own, answers naming brokers are rewritten to name them.
    Sidecar(Box<slipstream::sidecar::proxy::SidecarArgs>),
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
        Command::Bench { args } => run_bench(args)?,
        Command::Sidecar(args) => slipstream::sidecar::proxy::run(&args).context("slipstream sidecar failed")?,
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

/// Runs the bench harness, a binary of its own (building the broker must not compile
/// librdkafka), found beside this one, and exits with its status.
fn run_bench(args: Vec<OsString>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the slipstream binary")?;
    let bench = exe.with_file_name("slipstream-bench");
    if !bench.exists() {
        anyhow::bail!(
            "`slipstream bench` needs the slipstream-bench binary beside {}: build it with \
             `cargo build --release -p slipstream-bench` (add `--features rdma` for the slipstream:rdma target)",
            exe.display()
        );
    }
    let status = std::process::Command::new(&bench).args(args).status().context("running slipstream-bench")?;
    std::process::exit(status.code().unwrap_or(1));
}
