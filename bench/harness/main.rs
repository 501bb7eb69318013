//! `slipstream bench`: OpenMessaging-Benchmark-style workloads at microsecond resolution.
//!
//! This is the `slipstream-bench` binary, which `slipstream bench` runs: the harness is a
//! crate of its own so that building the broker never compiles librdkafka or the harness
//! (docs/architecture.md, "Crates"). It starts `slipstream` from beside itself.
//!
//! Unsafe code is denied but for two libc calls (signalling a child, the clock tick
//! rate), each allowed where it stands.
//!
//! Runs workloads (`bench/workloads/*.toml`) against targets — slipstream itself on each
//! transport (started and stopped by the harness, per repetition) or any Kafka bootstrap
//! address — interleaving repetitions so that machine drift hits every target alike, and
//! measures the machine's own limit (raw TCP ping-pong) in the same run. Writes a JSON
//! file, an HTML report and a terminal table.

#![deny(unsafe_code)]

mod grpc;
mod native;
mod rawtcp;
#[cfg(feature = "rdkafka-client")]
mod rdk;
mod report;
mod rmq;
mod stats;
mod workload;

use anyhow::{bail, Context};
use clap::{Args, Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use report::{Limit, Machine, Report, TargetResult, WorkloadResult};
use slipstream::transport::TransportKind;
use stats::Recorder;
use workload::Workload;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientKind {
    /// The lean native client (one request in flight per connection).
    Native,
    /// librdkafka, as users of librdkafka-based clients see the broker.
    #[cfg(feature = "rdkafka-client")]
    Rdkafka,
}

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            ClientKind::Native => "native",
            #[cfg(feature = "rdkafka-client")]
            ClientKind::Rdkafka => "rdkafka (librdkafka)",
        }
    }

    fn run(
        self,
        peer: &native::Peer,
        w: &Workload,
        topic: &str,
        fetch_wait_ms: i32,
        pid: Option<u32>,
        bar: &ProgressBar,
    ) -> anyhow::Result<native::RunOutput> {
        match self {
            ClientKind::Native => native::run(peer, w, topic, fetch_wait_ms, pid, bar),
            #[cfg(feature = "rdkafka-client")]
            ClientKind::Rdkafka => {
                if peer.tls_ca.is_some() {
                    bail!("TLS targets (--tls-ca) are measured with --client native");
                }
                rdk::run(peer.addr, w, topic, fetch_wait_ms, pid, bar)
            }
        }
    }
}

/// The wire protocol the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Kafka,
    /// RocketMQ remoting (native client): slipstream targets get a RocketMQ listener and
    /// name server; an external target's address is its name server.
    Rocketmq,
    /// RocketMQ 5 gRPC (`apache.rocketmq.v2.MessagingService`, as the 5.x SDKs): slipstream
    /// targets get a `rocketmq-grpc` listener; an external target's address is its proxy.
    RocketmqGrpc,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Kafka => "kafka",
            Protocol::Rocketmq => "remoting",
            Protocol::RocketmqGrpc => "grpc",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What the clients speak [default: kafka]. Repeatable: every target is then run
    /// with each protocol, side by side in one report.
    #[arg(long = "protocol", value_enum)]
    pub protocols: Vec<Protocol>,
    /// Workload name (from bench/workloads) or file; repeatable [default: latency-128b].
    #[arg(long = "workload")]
    pub workloads: Vec<String>,
    /// Target: `slipstream:TRANSPORT[,FLAG...]` (started by the harness with those extra
    /// `serve` flags, e.g. `slipstream:uring,--busy-poll=true`; `slipstream:rdma` listens on
    /// the RDMA address in $SLIPSTREAM_RDMA_IP, or $RXE_IP in the soft-RoCE VM, and the
    /// clients go through a `slipstream bridge` the harness starts beside it) or
    /// `NAME=HOST:PORT[,pid=PID]` (any Kafka-compatible broker; the pid enables its CPU
    /// figures). Repeatable. Five flags are the harness's own, not `serve`'s: `--data-parent=DIR` makes the
    /// broker's data directory in DIR (e.g. /dev/shm), not in $TMPDIR; `--via-sidecar`
    /// puts a `slipstream sidecar` in front of the broker and the clients bootstrap there
    /// (CPU figures stay the broker's alone); `--netns=NS` and `--addr=IP:PORT` start the
    /// broker in network namespace NS listening on ADDR, for paths other than loopback
    /// (scripts/bench-ustack.sh: kernel TCP and the user-space stack over one veth path);
    /// `--tls-ca=PEM` adds an `SSL://` listener (with the target's `--tls-cert=` and
    /// `--tls-key=`) and measures it, the native client trusting PEM (scripts/bench-tls.sh).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Add slipstream on every transport built into this binary to the targets (rdma only
    /// when an RDMA address is configured; ustack never: it needs an interface and a path
    /// of its own, scripts/bench-ustack.sh).
    #[arg(long)]
    pub matrix: bool,
    /// Repetitions per target, interleaved across targets.
    #[arg(long, default_value_t = 1)]
    pub repetitions: usize,
    #[arg(long, value_enum, default_value_t = ClientKind::Native)]
    pub client: ClientKind,
    /// Override every workload's measured duration (seconds).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Override every workload's warm-up (seconds).
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Consumers' fetch max wait (ms). Brokers that sleep the full wait even when data is
    /// there (Tansu) need it low for a fair end-to-end figure.
    #[arg(long, default_value_t = 100)]
    pub fetch_wait_ms: i32,
    /// Dispatch cores for the slipstream targets the harness starts.
    #[arg(long, default_value_t = 1)]
    pub broker_cores: usize,
    /// Skip the raw TCP limit measurement.
    #[arg(long)]
    pub no_limit: bool,
    /// Where results.json, report.html and the broker logs go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Re-render `report.html` (and print the table) from an existing results.json
    /// instead of running anything.
    #[arg(long)]
    pub render: Option<PathBuf>,
    /// A note to print in the report (repeatable), e.g. how a peer was configured.
    #[arg(long = "note")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
enum Target {
    Slipstream(TransportKind, Vec<String>),
    External { name: String, addr: SocketAddr, pid: Option<u32> },
}

impl Target {
    fn parse(spec: &str) -> anyhow::Result<Target> {
        if let Some(rest) = spec.strip_prefix("slipstream:") {
            let mut parts = rest.split(',');
            let t = parts.next().unwrap_or_default();
            let kind = TransportKind::from_str(t, true).map_err(|e| anyhow::anyhow!("target '{spec}': {e}"))?;
            let flags: Vec<String> = parts.map(str::to_string).collect();
            if let Some(bad) = flags.iter().find(|f| !f.starts_with("--")) {
                bail!("target '{spec}': '{bad}' is not a flag (write --name=value)");
            }
            return Ok(Target::Slipstream(kind, flags));
        }
        let Some((name, rest)) = spec.split_once('=') else {
            bail!("target '{spec}': expected slipstream:TRANSPORT or NAME=HOST:PORT[,pid=PID]");
        };
        let mut parts = rest.split(',');
        let addr_s = parts.next().unwrap_or_default();
        let addr = addr_s
            .to_socket_addrs()
            .with_context(|| format!("target '{spec}': bad address"))?
            .next()
            .with_context(|| format!("target '{spec}': address resolves to nothing"))?;
        let mut pid = None;
        for p in parts {
            match p.split_once('=') {
                Some(("pid", v)) => pid = Some(v.parse().with_context(|| format!("target '{spec}': bad pid"))?),
                _ => bail!("target '{spec}': unknown option '{p}'"),
            }
        }
        Ok(Target::External { name: name.to_string(), addr, pid })
    }

    fn name(&self) -> String {
        match self {
            Target::Slipstream(k, flags) => {
                let mut n = format!("slipstream {}", format!("{k:?}").to_lowercase());
                // Where it runs is the same for every target of such a run: not in the name.
                for f in flags.iter().filter(|f| !is_placement_flag(f)) {
                    n.push(' ');
                    n.push_str(f.trim_start_matches("--"));
                }
                if flags.iter().any(|f| f.starts_with("--tls-ca=")) {
                    n.push_str(" tls");
                }
                n
            }
            Target::External { name, .. } => name.clone(),
        }
    }
}

/// Flags that say where the broker runs, not how (left out of a target's name): the
/// harness's `--netns`/`--addr`, and the interface the user-space stack is given.
fn is_placement_flag(f: &str) -> bool {
    ["--netns=", "--addr=", "--ustack-if=", "--tls-cert=", "--tls-key=", "--tls-ca="].iter().any(|p| f.starts_with(p))
}

/// Flags of a `slipstream:` target that the harness takes itself (never passed to `serve`).
/// `--tls-ca=PATH`: the broker also gets a TLS listener (`SSL://`, with the target's
/// `--tls-cert=`/`--tls-key=`), and the clients connect to it trusting PATH.
fn is_harness_flag(f: &str) -> bool {
    ["--data-parent=", "--netns=", "--addr=", "--tls-ca="].iter().any(|p| f.starts_with(p)) || f == "--via-sidecar"
}

/// The RDMA address `slipstream:rdma` targets listen on.
fn rdma_ip() -> Option<String> {
    std::env::var("SLIPSTREAM_RDMA_IP").or_else(|_| std::env::var("RXE_IP")).ok().filter(|s| !s.is_empty())
}

/// `n` distinct free loopback addresses (held open together while chosen, so two of them
/// are never the same port).
fn free_loopback_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let held = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    Ok(held.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?)
}

fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(format!("127.0.0.1:{port}").parse()?)
}

/// A slipstream broker the harness started (and, for rdma, the bridge in front of it, or
/// with `--via-sidecar`, a `slipstream sidecar`); stopped (SIGTERM) on drop.
struct Spawned {
    child: Child,
    bridge: Option<Child>,
    /// Where clients connect: the broker, or its bridge or sidecar.
    addr: SocketAddr,
    /// The RocketMQ name server, when started with one.
    namesrv: Option<SocketAddr>,
    /// The RocketMQ 5 gRPC endpoint, when started with one.
    grpc: Option<SocketAddr>,
    /// With `--tls-ca=`: `addr` is the TLS listener, its certificate signed by this CA.
    tls_ca: Option<PathBuf>,
    _data: tempfile::TempDir,
}

impl Spawned {
    fn start(
        kind: TransportKind,
        flags: &[String],
        cores: usize,
        log: &Path,
        protocol: Protocol,
    ) -> anyhow::Result<Spawned> {
        // Every address this broker listens on, chosen together.
        let picked = free_loopback_addrs(4)?;
        let netns = flags.iter().find_map(|f| f.strip_prefix("--netns="));
        let at = flags.iter().find_map(|f| f.strip_prefix("--addr="));
        let listen: SocketAddr = if let Some(a) = at {
            a.parse().with_context(|| format!("--addr={a}: expected IP:PORT"))?
        } else if kind == TransportKind::Rdma {
            let ip = rdma_ip().context("slipstream:rdma needs SLIPSTREAM_RDMA_IP (an address of an RDMA device)")?;
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            format!("{ip}:{port}").parse().context("bad SLIPSTREAM_RDMA_IP")?
        } else {
            picked[0]
        };
        let parent = flags.iter().find_map(|f| f.strip_prefix("--data-parent="));
        // Harness options, not serve flags: where the data lives, and a sidecar in front.
        let via_sidecar = flags.iter().any(|f| f == "--via-sidecar");
        let tls_ca = flags.iter().find_map(|f| f.strip_prefix("--tls-ca=")).map(PathBuf::from);
        if tls_ca.is_some() && (via_sidecar || kind == TransportKind::Rdma) {
            bail!("--tls-ca= measures the broker's own TLS listener: not with --via-sidecar or rdma");
        }
        let flags: Vec<&String> = flags.iter().filter(|f| !is_harness_flag(f)).collect();
        let data = match parent {
            Some(dir) => tempfile::tempdir_in(dir).with_context(|| format!("a data directory in {dir}"))?,
            None => tempfile::tempdir()?,
        };
        let exe = slipstream_binary()?;
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let (mut extra, mut namesrv, mut grpc) = (Vec::new(), None, None);
        // The gRPC runs make their topics through the remoting admin request.
        if matches!(protocol, Protocol::Rocketmq | Protocol::RocketmqGrpc) {
            let addrs = &picked[1..];
            extra.extend([
                "--listen".to_string(),
                format!("rocketmq://{}", addrs[0]),
                "--listen".to_string(),
                format!("rocketmq-namesrv://{}", addrs[1]),
            ]);
            namesrv = Some(addrs[1]);
            if protocol == Protocol::RocketmqGrpc {
                extra.extend(["--listen".to_string(), format!("rocketmq-grpc://{}", addrs[2])]);
                grpc = Some(addrs[2]);
            }
        }
        if tls_ca.is_some() {
            extra.extend(["--listen".to_string(), format!("SSL://{}", picked[3])]);
        }
        let mut cmd = Command::new(&exe);
        if let Some(ns) = netns {
            // `ip netns exec` execs the broker: the child's pid is still the broker's.
            cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(&exe);
        }
        let child = cmd
            .args(["serve", "--listen", &listen.to_string(), "--cores", &cores.to_string(), "--transport"])
            .arg(format!("{kind:?}").to_lowercase())
            .arg("--data-dir")
            .arg(data.path())
            .args(&extra)
            .args(flags)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .context("starting slipstream serve")?;
        let mut s = Spawned { child, bridge: None, addr: listen, namesrv, grpc, tls_ca: None, _data: data };
        if via_sidecar {
            // Clients bootstrap at the sidecar; the broker (node 0) is served at picked[3].
            s.addr = free_loopback_addr()?;
            let logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
            let sidecar = Command::new(&exe)
                .args(["sidecar", "--listen", &s.addr.to_string(), "--upstream", &listen.to_string()])
                .args(["--broker-port-base", &picked[3].port().to_string(), "--threads", "1"])
                .stdout(Stdio::null())
                .stderr(logf)
                .spawn()
                .context("starting slipstream sidecar")?;
            s.bridge = Some(sidecar);
        } else if kind == TransportKind::Rdma {
            s.addr = free_loopback_addr()?;
            let logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
            let bridge = Command::new(&exe)
                .args(["bridge", "--listen", &s.addr.to_string(), "--upstream", &listen.to_string()])
                .stdout(Stdio::null())
                .stderr(logf)
                .spawn()
                .context("starting slipstream bridge")?;
            s.bridge = Some(bridge);
        }
        // Ready when a request is answered (through the bridge too, for rdma).
        let started = Instant::now();
        loop {
            let answered = slipstream::client::Client::connect(s.addr, Duration::from_millis(200))
                .and_then(|mut c| c.api_versions())
                .is_ok();
            if answered {
                if tls_ca.is_some() {
                    // Ready on the plaintext listener; measured on the TLS one.
                    s.addr = picked[3];
                    s.tls_ca = tls_ca;
                }
                return Ok(s);
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                bail!("slipstream serve --transport {kind:?} exited at start ({status}); see {}", log.display());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("slipstream serve did not answer within 30 s; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut b) = self.bridge.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        // SAFETY: kill(2) with our own child's pid; no memory involved.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Accum {
    recorder: Recorder,
    per_second: Vec<u64>,
    measured_s: f64,
    cpu_s: Option<f64>,
    reps: usize,
    bootstrap: String,
}

#[derive(Parser)]
#[command(
    name = "slipstream bench",
    version,
    about = "Run latency/throughput workloads against slipstream and other Kafka brokers"
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    run(Cli::parse().args)
}

/// The `slipstream` binary built beside this one (cargo puts every binary of the
/// workspace in one directory, and packages install them side by side).
fn slipstream_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the slipstream-bench binary")?;
    let sibling = exe.with_file_name("slipstream");
    anyhow::ensure!(
        sibling.exists(),
        "no slipstream binary beside {}: build it (cargo build --release)",
        exe.display()
    );
    Ok(sibling)
}

fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(json) = &args.render {
        let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let report: Report = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        let html = json.with_file_name("report.html");
        std::fs::write(&html, report::html(&report)).with_context(|| format!("writing {}", html.display()))?;
        print!("{}", report::table(&report));
        println!("\nwrote {}", html.display());
        return Ok(());
    }
    let workload_names =
        if args.workloads.is_empty() { vec!["latency-128b".to_string()] } else { args.workloads.clone() };
    let workloads: Vec<Workload> = workload_names
        .iter()
        .map(|n| Workload::find(n).map(|w| w.scaled(args.duration, args.warmup)))
        .collect::<anyhow::Result<_>>()?;
    let mut targets: Vec<Target> = args.targets.iter().map(|s| Target::parse(s)).collect::<anyhow::Result<_>>()?;
    if args.matrix {
        for k in slipstream::transport::built() {
            // rdma needs an RDMA address, ustack an interface of its own (and a path
            // that is not loopback: scripts/bench-ustack.sh): neither is a matrix default.
            if (k == TransportKind::Rdma && rdma_ip().is_none()) || k == TransportKind::Ustack {
                continue;
            }
            if !targets.iter().any(|t| matches!(t, Target::Slipstream(x, f) if *x == k && f.is_empty())) {
                targets.push(Target::Slipstream(k, Vec::new()));
            }
        }
    }
    if targets.is_empty() {
        targets.push(Target::Slipstream(TransportKind::Tcp, Vec::new()));
    }
    let protocols = if args.protocols.is_empty() { vec![Protocol::Kafka] } else { args.protocols.clone() };
    // Every target with every protocol; named by both when there is more than one.
    let mut runs: Vec<(Target, Protocol, String)> = Vec::new();
    for t in &targets {
        for p in &protocols {
            let name = if protocols.len() > 1 { format!("{} ({})", t.name(), p.label()) } else { t.name() };
            runs.push((t.clone(), *p, name));
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let broker_log = args.out.join("brokers.log");
    let mut results = Vec::new();
    for w in &workloads {
        let per_run = (w.duration_s.ceil() as u64).max(1);
        let bar = ProgressBar::new(per_run * (runs.len() * args.repetitions) as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} s  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let mut accums: Vec<Accum> = runs.iter().map(|_| Accum::default()).collect();
        // Interleaved: rep 0 of every target, then rep 1 of every target, ...
        for rep in 0..args.repetitions {
            for (ti, (target, protocol, name)) in runs.iter().enumerate() {
                bar.set_prefix(format!("{name} #{}", rep + 1));
                let topic = format!("bench-{}-{}", w.name, uuid::Uuid::new_v4().simple());
                let (out, bootstrap) = match (target, *protocol) {
                    (Target::Slipstream(kind, flags), protocol) => {
                        let s = Spawned::start(*kind, flags, args.broker_cores, &broker_log, protocol)?;
                        let pid = Some(s.child.id());
                        match (protocol, s.namesrv, s.grpc) {
                            (Protocol::RocketmqGrpc, Some(ns), Some(g)) => {
                                let create = |t: &str, q: i32| rmq::create_topic(ns, t, q).map(|_| ());
                                (grpc::run(g, Some(&create), w, &topic, pid, &bar)?, g.to_string())
                            }
                            (Protocol::Rocketmq, Some(ns), _) => (rmq::run(ns, w, &topic, pid, &bar)?, ns.to_string()),
                            _ => {
                                let peer = native::Peer { addr: s.addr, tls_ca: s.tls_ca.clone() };
                                (args.client.run(&peer, w, &topic, args.fetch_wait_ms, pid, &bar)?, s.addr.to_string())
                            }
                        }
                    }
                    (Target::External { addr, pid, .. }, Protocol::Rocketmq) => {
                        (rmq::run(*addr, w, &topic, *pid, &bar)?, addr.to_string())
                    }
                    (Target::External { addr, pid, .. }, Protocol::RocketmqGrpc) => {
                        (grpc::run(*addr, None, w, &topic, *pid, &bar)?, addr.to_string())
                    }
                    (Target::External { addr, pid, .. }, Protocol::Kafka) => {
                        let peer = native::Peer { addr: *addr, tls_ca: None };
                        (args.client.run(&peer, w, &topic, args.fetch_wait_ms, *pid, &bar)?, addr.to_string())
                    }
                };
                let a = &mut accums[ti];
                a.recorder.merge(&out.recorder);
                a.per_second.extend(out.per_second);
                a.measured_s += out.measured_s;
                a.cpu_s = match (a.cpu_s, out.broker_cpu_s) {
                    (prev, Some(c)) => Some(prev.unwrap_or(0.0) + c),
                    (prev, None) => prev,
                };
                a.reps += 1;
                a.bootstrap = bootstrap;
            }
        }
        bar.finish_and_clear();
        let mut limits = Vec::new();
        if !args.no_limit {
            let d = Duration::from_secs_f64(w.duration_s.clamp(0.5, 5.0));
            eprintln!("measuring the raw TCP limit ({} B ping-pong, {:.1} s each)...", w.message_size, d.as_secs_f64());
            limits.push(Limit {
                name: "raw TCP ping-pong".into(),
                round_trip: rawtcp::ping_pong(w.message_size, d, false)?.summary(),
            });
            limits.push(Limit {
                name: "raw TCP busy-poll".into(),
                round_trip: rawtcp::ping_pong(w.message_size, d, true)?.summary(),
            });
        }
        let targets_out = runs
            .iter()
            .zip(accums)
            .map(|((_, _, name), a)| {
                let publish = a.recorder.publish.summary();
                let ratio = if publish.count == 0 {
                    Vec::new()
                } else {
                    limits.iter().map(|l| (l.name.clone(), publish.p("p50") / l.round_trip.p("p50"))).collect()
                };
                // A backlog workload measures fetching: its rates are of messages fetched.
                let (msgs, bytes) = if w.backlog_messages > 0 {
                    let m = a.recorder.messages_received;
                    (m, m * w.message_size as u64)
                } else {
                    (a.recorder.messages_sent, a.recorder.bytes_sent)
                };
                TargetResult {
                    name: name.clone(),
                    bootstrap: a.bootstrap,
                    repetitions: a.reps,
                    measured_s: a.measured_s,
                    messages_sent: a.recorder.messages_sent,
                    messages_received: a.recorder.messages_received,
                    errors: a.recorder.errors,
                    throughput_msgs_per_s: msgs as f64 / a.measured_s.max(1e-9),
                    throughput_mb_per_s: bytes as f64 / a.measured_s.max(1e-9) / 1e6,
                    consume_msgs_per_s: a.recorder.messages_received as f64
                        / a.measured_s.max(1e-9)
                        / w.consumer_groups.max(1) as f64,
                    publish,
                    publish_delay: a.recorder.publish_delay.summary(),
                    end_to_end: a.recorder.end_to_end.summary(),
                    broker_cpu_s: a.cpu_s,
                    broker_cpu_s_per_million_msgs: a.cpu_s.filter(|_| msgs > 0).map(|c| c / msgs as f64 * 1e6),
                    publish_p50_over_limit: ratio,
                    per_second: a.per_second,
                }
            })
            .collect();
        results.push(WorkloadResult { workload: w.clone(), limits, targets: targets_out });
    }
    let machine = Machine::describe();
    let mut notes = machine.caveats();
    notes.extend(args.notes.iter().cloned());
    notes.push(format!(
        "Consumers long-poll with fetch max wait {} ms; slipstream answers a parked fetch as soon as data arrives.",
        args.fetch_wait_ms
    ));
    let report = Report {
        slipstream_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        machine,
        client: protocols
            .iter()
            .map(|p| match p {
                Protocol::Kafka => args.client.name(),
                Protocol::Rocketmq => "rocketmq remoting (native)",
                Protocol::RocketmqGrpc => "rocketmq 5 gRPC (tonic)",
            })
            .collect::<Vec<_>>()
            .join(" / "),
        notes,
        workloads: results,
    };
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let html = args.out.join("report.html");
    std::fs::write(&html, report::html(&report)).with_context(|| format!("writing {}", html.display()))?;
    print!("{}", report::table(&report));
    println!("\nwrote {} and {}", json.display(), html.display());
    Ok(())
}
