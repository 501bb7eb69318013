//! The `slipstream` command.
#![deny(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use slipstream::config::ServeArgs;
use std::ffi::OsString;

#[derive(Parser)]
#[command(
    name = "slipstream",
    about = "Kafka-compatible broker data path on a memory-mapped commit log",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as one JSON object each (`ts`, `level`, `target`, `msg`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print the version, the commit, the features built in and which transports this
    /// kernel supports.
    #[arg(long, short = 'V')]
    version: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    // `--version` needs no subcommand: answer it before the parser asks for one.
    if std::env::args().nth(1).is_some_and(|a| a == "--version" || a == "-V") {
        print!("{}", version_report());
        return Ok(());
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if cli.version {
        print!("{}", version_report());
        return Ok(());
    }
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

/// `slipstream --version`: what was built, and what this machine can run.
fn version_report() -> String {
    let mut out = format!("slipstream {} (commit {})\n", env!("CARGO_PKG_VERSION"), env!("SLIPSTREAM_COMMIT"));
    let features: Vec<&str> =
        [("rdma", cfg!(feature = "rdma"))].iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect();
    out.push_str(&format!(
        "features: {}\n",
        if features.is_empty() { "none (default build)".to_string() } else { features.join(", ") }
    ));
    out.push_str("transports on this machine:\n");
    for (kind, support) in slipstream::transport::kernel_support() {
        let (state, why) = match support {
            slipstream::transport::Support::Yes(w) => ("yes", w),
            slipstream::transport::Support::No(w) => ("no", w),
            slipstream::transport::Support::NotBuilt(w) => ("not built", w),
        };
        out.push_str(&format!("  {:<7} {state} ({why})\n", format!("{kind:?}").to_lowercase()));
    }
    out
}

/// Text lines (env_logger's) or one JSON object per line, for log collectors. The level
/// filter comes from `RUST_LOG` (default `info`) either way.
fn init_logging(format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        b.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": buf.timestamp_micros().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
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
