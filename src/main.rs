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
    /// Manage SASL users (their SCRAM credentials in DATA_DIR/users.json); a running broker
    /// picks changes up within a second. Kafka's AlterUserScramCredentials does the same.
    Users(UsersArgs),
}

#[derive(clap::Args)]
struct UsersArgs {
    /// The broker's data directory.
    #[arg(long, default_value = "./data")]
    data_dir: std::path::PathBuf,
    #[command(subcommand)]
    action: UsersAction,
}

#[derive(Subcommand)]
enum UsersAction {
    /// Add a user, or set its password (reads it from stdin unless --password is given).
    Add {
        name: String,
        #[arg(long)]
        password: Option<String>,
        /// SCRAM mechanisms to keep credentials for (PLAIN is checked against them)
        /// [default: both].
        #[arg(long, value_delimiter = ',')]
        mechanism: Vec<String>,
        #[arg(long, default_value_t = slipstream::broker::users::MIN_ITERATIONS)]
        iterations: u32,
    },
    /// Remove a user (or one mechanism's credential of it).
    Remove {
        name: String,
        #[arg(long)]
        mechanism: Option<String>,
    },
    /// List users with their mechanisms and iterations.
    List,
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
        Command::Users(args) => users(args)?,
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

/// `slipstream users`.
fn users(args: UsersArgs) -> anyhow::Result<()> {
    use slipstream::broker::users::{Mechanism, ScramCredential, Users};
    let mechanism = |m: &str| -> anyhow::Result<Mechanism> {
        match m.parse() {
            Ok(m) if Mechanism::SCRAM.contains(&m) => Ok(m),
            _ => anyhow::bail!("unknown SCRAM mechanism '{m}' (SCRAM-SHA-256, SCRAM-SHA-512)"),
        }
    };
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let users = Users::open(&args.data_dir)?;
    match args.action {
        UsersAction::Add { name, password, mechanism: mechs, iterations } => {
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if password.is_empty() {
                anyhow::bail!("empty password");
            }
            let mechs = if mechs.is_empty() {
                Mechanism::SCRAM.to_vec()
            } else {
                mechs.iter().map(|m| mechanism(m)).collect::<anyhow::Result<_>>()?
            };
            let creds = mechs
                .iter()
                .map(|m| Ok((*m, ScramCredential::from_password(*m, &password, iterations)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            users.update(|e| creds.into_iter().try_for_each(|(m, c)| e.set(&name, m, c)))??;
            println!("user {name}: {}", mechs.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "));
        }
        UsersAction::Remove { name, mechanism: m } => {
            let m = m.as_deref().map(mechanism).transpose()?;
            if !users.update(|e| e.remove(&name, m))? {
                anyhow::bail!("no such user or credential: {name}");
            }
            println!("removed {name}{}", m.map(|m| format!(" ({m})")).unwrap_or_default());
        }
        UsersAction::List => {
            for (name, creds) in users.list() {
                let creds: Vec<String> = creds.iter().map(|(m, i)| format!("{m} (iterations {i})")).collect();
                println!("{name}\t{}", creds.join(", "));
            }
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
            let mut line = serde_json::Map::new();
            line.insert("ts".into(), buf.timestamp_micros().to_string().into());
            line.insert("level".into(), record.level().as_str().into());
            line.insert("target".into(), record.target().into());
            line.insert("msg".into(), record.args().to_string().into());
            // The record's fields (`peer`, `reason`, …) as keys of their own; the four
            // above are never overwritten.
            let _ = record.key_values().visit(&mut JsonFields(&mut line));
            writeln!(buf, "{}", serde_json::Value::Object(line))
        });
    }
    b.init();
}

/// Collects a log record's key-value fields into a JSON object.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: log::kv::Key<'kvs>, value: log::kv::Value<'kvs>) -> Result<(), log::kv::Error> {
        let value = match (value.to_u64(), value.to_i64()) {
            (Some(n), _) => n.into(),
            (None, Some(n)) => n.into(),
            _ => value.to_string().into(),
        };
        self.0.entry(key.as_str().to_string()).or_insert(value);
        Ok(())
    }
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
