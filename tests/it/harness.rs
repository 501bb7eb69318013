//! Starts and stops `slipstream serve` as a real process, and runs client programs.

/// Instantiates a test once per transport: `per_transport!(name, |transport| ...)` makes
/// `name::tcp`, `name::uring` and `name::uring_multishot`, each calling the body with the
/// broker flags that select that transport (io_uring's two receive modes count as two).
macro_rules! per_transport {
    ($name:ident, $body:expr) => {
        per_transport!(@each $name, $body, {});
    };
    // Also on the user-space stack: run in its network namespaces by scripts/test.sh
    // (`scripts/ustack/run-in-netns.sh cargo test ... ustack -- --ignored`).
    ($name:ident, $body:expr, ustack) => {
        per_transport!(@each $name, $body, {
            #[test]
            #[ignore = "needs the namespaces of scripts/ustack/run-in-netns.sh (scripts/test.sh runs it)"]
            fn ustack() {
                let t: &[&str] = &["--transport", "ustack"];
                ($body)(t)
            }
        });
    };
    (@each $name:ident, $body:expr, { $($extra:tt)* }) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn tcp() {
                let t: &[&str] = &["--transport", "tcp"];
                ($body)(t)
            }

            #[test]
            fn uring() {
                let t: &[&str] = &["--transport", "uring"];
                ($body)(t)
            }

            #[test]
            fn uring_multishot() {
                let t: &[&str] = &["--transport", "uring", "--uring-recv", "multishot"];
                ($body)(t)
            }

            $($extra)*
        }
    };
}

use slipstream::metrics::Snapshot;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Broker flags: `base`, then a transport's flags from `per_transport!`.
pub fn flags<'a>(base: &[&'a str], transport: &[&'a str]) -> Vec<&'a str> {
    [base, transport].concat()
}

pub struct BrokerProc {
    child: Option<Child>,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    ready: fn(SocketAddr) -> bool,
}

/// The user-space stack's test topology, from scripts/ustack/run-in-netns.sh: the broker
/// runs in the server namespace on its veth end, the test and its clients in the client
/// namespace.
struct Ustack {
    server_ns: String,
    router_ns: String,
    interface: String,
    peer: String,
    broker: SocketAddr,
}

impl Ustack {
    /// The topology, if `flags` select the ustack transport (which then needs it).
    fn of<S: AsRef<str>>(flags: &[S]) -> Option<Ustack> {
        let ustack = flags.windows(2).any(|w| w[0].as_ref() == "--transport" && w[1].as_ref() == "ustack");
        if !ustack {
            return None;
        }
        let var = |k: &str| {
            std::env::var(k)
                .unwrap_or_else(|_| panic!("{k} unset: ustack tests run inside scripts/ustack/run-in-netns.sh"))
        };
        Some(Ustack {
            server_ns: var("USTACK_SERVER_NS"),
            router_ns: var("USTACK_ROUTER_NS"),
            interface: var("USTACK_IF"),
            peer: var("USTACK_PEER_IF"),
            broker: var("USTACK_BROKER").parse().expect("USTACK_BROKER is IP:PORT"),
        })
    }

    /// `ip netns exec SERVER slipstream` with `--ustack-if`, after giving the veth one
    /// queue per core of this broker (`--cores`).
    fn command<S: AsRef<str>>(&self, flags: &[S]) -> Command {
        let cores = flags
            .windows(2)
            .find(|w| w[0].as_ref() == "--cores")
            .map_or("1".to_string(), |w| w[1].as_ref().to_string());
        for (ns, dev) in [(&self.server_ns, &self.interface), (&self.router_ns, &self.peer)] {
            // Exits non-zero when nothing changes; a count it could not set shows up as
            // the broker's own refusal (queues and cores must match).
            let _ = Command::new("ip")
                .args(["netns", "exec", ns, "ethtool", "-L", dev, "rx", &cores, "tx", &cores])
                .stderr(Stdio::null())
                .status();
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.server_ns, env!("CARGO_BIN_EXE_slipstream")]);
        c
    }
}

pub fn serves_api_versions(addr: SocketAddr) -> bool {
    let Ok(mut c) = slipstream::client::Client::connect(addr, Duration::from_millis(100)) else { return false };
    if c.stream().set_read_timeout(Some(Duration::from_millis(200))).is_err() {
        return false;
    }
    c.call(&kafka_protocol::messages::ApiVersionsRequest::default(), 0).is_ok()
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A first port `base` with `base..base + len` all free on loopback, for a process that
/// puts listeners at fixed offsets from it (the sidecar puts broker N at the port base
/// plus N). Taken below the kernel's ephemeral range, so that no connection's source
/// port (which the kernel takes from that range) can land on one of them between this
/// check and the process binding it, and never the same block twice in one test run.
pub fn free_port_block(len: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Blocks of BLOCK from FIRST up, starting at a place of this process's own.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    const BLOCK: u32 = 128;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32_768);
    let blocks = ephemeral_low.saturating_sub(FIRST) / BLOCK;
    assert!(u32::from(len) <= BLOCK && blocks > 0, "no room for {len} ports below {ephemeral_low}");
    let start = std::process::id() % blocks;
    for _ in 0..blocks {
        let n = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % blocks;
        let base = (FIRST + n * BLOCK) as u16;
        let all_free = (0..len).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no {len} free ports in a row below {ephemeral_low}");
}

/// `n` distinct free loopback addresses: held open together while chosen, so that two
/// listeners of one broker never get the same port.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    held.iter().map(|l| l.local_addr().expect("local addr")).collect()
}

impl BrokerProc {
    pub fn start(extra: &[&str]) -> BrokerProc {
        let addr: SocketAddr = match Ustack::of(extra) {
            Some(u) => u.broker,
            None => format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        };
        Self::start_at(addr, extra, serves_api_versions)
    }

    /// Starts a broker whose data directory is `data` (e.g. on a file system of the
    /// test's own).
    #[allow(dead_code)]
    pub fn start_with_data(data: PathBuf, extra: &[&str]) -> BrokerProc {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_with_data_at(addr, data, extra)
    }

    /// Like [`BrokerProc::start_with_data`], listening on `addr`.
    pub fn start_with_data_at(addr: SocketAddr, data: PathBuf, extra: &[&str]) -> BrokerProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = BrokerProc {
            ready: serves_api_versions,
            child: None,
            addr,
            data,
            log: dir.path().join("broker.log"),
            _dir: dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn();
        b
    }

    /// Starts a broker listening on `addr`, ready once `ready(addr)` says so.
    pub fn start_at(addr: SocketAddr, extra: &[&str], ready: fn(SocketAddr) -> bool) -> BrokerProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = BrokerProc {
            ready,
            child: None,
            addr,
            data: dir.path().join("data"),
            log: dir.path().join("broker.log"),
            _dir: dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn();
        b
    }

    /// Starts the process (again) on the same address and data directory; returns how long
    /// it took until it accepted connections.
    pub fn spawn(&mut self) -> Duration {
        assert!(self.child.is_none(), "broker already running");
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let started = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_slipstream"));
        if let Some(u) = Ustack::of(&self.extra) {
            cmd = u.command(&self.extra);
        }
        let child = cmd
            .args(["serve", "--listen", &self.addr.to_string(), "--data-dir"])
            .arg(&self.data)
            .args(&self.extra)
            .args(Ustack::of(&self.extra).map(|u| ["--ustack-if".to_string(), u.interface]).into_iter().flatten())
            .env("RUST_LOG", "info")
            // An error at start is one line; a backtrace after it would push it out of
            // the log tail a failing test prints.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slipstream");
        self.child = Some(child);
        loop {
            // Serving, not merely listening: a killed io_uring broker's listener can linger
            // a moment (the kernel tears its ring down asynchronously) and complete TCP
            // handshakes nobody will ever answer.
            if (self.ready)(self.addr) {
                return started.elapsed();
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("broker exited at start with {status}:\n{}", self.log_tail());
            }
            assert!(started.elapsed() < Duration::from_secs(20), "broker did not listen:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the graceful exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is
        // our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM)");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("broker did not stop within 15 s of SIGTERM:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stats(&self) -> Snapshot {
        let text = std::fs::read_to_string(self.data.join("stats.json")).expect("stats.json");
        serde_json::from_str(&text).expect("stats.json parses")
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client suite's phase 1, a graceful restart of `broker`, then its phase 2: `args` are
/// the client's own (script, address flags); `--phase N` is appended.
pub fn phases_across_restart(broker: &mut BrokerProc, program: &str, args: &[&str], timeout: Duration) {
    run_client(program, &[args, &["--phase", "1"]].concat(), timeout);
    assert!(broker.terminate().success(), "graceful stop failed:\n{}", broker.log_tail());
    broker.spawn();
    run_client(program, &[args, &["--phase", "2"]].concat(), timeout);
}

pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("clients")
}

/// Runs a client program in `tests/clients`, failing the test (with its output) unless it
/// exits 0 within `timeout` and prints `done`.
pub fn run_client(program: &str, args: &[&str], timeout: Duration) -> String {
    run_client_with_env(program, args, &[], timeout)
}

/// [`run_client`] with environment variables set for the client.
pub fn run_client_with_env(program: &str, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> String {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        // `cargo test` puts build-script library dirs on LD_LIBRARY_PATH; rdkafka-sys's own
        // librdkafka there would shadow the system one kcat is meant to test.
        .env_remove("LD_LIBRARY_PATH")
        .current_dir(clients_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (is the client installed? see README): {e}"));
    // Drained while the client runs: a chatty client must not stall on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out_reader = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_reader = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    print!("{out}");
    assert!(
        status.success() && out.contains("done"),
        "{program} {args:?} failed ({status}, {:.0?}):\n{out}\n{err}",
        started.elapsed()
    );
    out
}

// ---- TLS test material: certificates made with the openssl command line, and a client.

/// Runs the openssl command line in `dir`, failing the test if it fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/// A test CA (ca.pem, ca.key) and, signed by it, a server certificate for 127.0.0.1
/// (server.pem, server.key) and a client certificate (client.pem, client.key).
pub fn make_certs(dir: &std::path::Path) {
    openssl(
        dir,
        &[&["req", "-x509"][..], &EC, &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"]]
            .concat(),
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    issue(dir, "server", "server.ext");
    issue(dir, "client", "client.ext");
}

/// WHO.key and WHO.pem (CN=WHO), signed by the test CA with the extensions in `ext`.
pub fn issue(dir: &std::path::Path, who: &str, ext: &str) {
    let (key, csr, pem) = (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"));
    openssl(dir, &[&["req"][..], &EC, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={who}")]].concat());
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    );
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS session with the server at `addr` (verified against `ca`) and the certificate it
/// presented.
pub fn tls_connect(addr: SocketAddr, ca: &std::path::Path) -> (Vec<u8>, TlsStream) {
    let files = slipstream::tls::ClientFiles { ca: ca.to_path_buf(), cert_key: None };
    let cfg = files.load().expect("client TLS settings");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(cfg, name).expect("client");
    let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(addr).expect("connect"));
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("TLS handshake");
    }
    let cert = s.conn.peer_certificates().expect("a certificate")[0].to_vec();
    (cert, s)
}

pub fn pem_der(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path).expect("certificate").to_vec()
}

/// ApiVersions v0 over `s`, answered with its correlation id.
pub fn api_versions_over(s: &mut TlsStream, correlation: i32) {
    let mut frame = vec![0, 0, 0, 10, 0, 18, 0, 0];
    frame.extend_from_slice(&correlation.to_be_bytes());
    frame.extend_from_slice(&[0xff, 0xff]);
    s.write_all(&frame).expect("send");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("answer length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("answer");
    assert_eq!(&body[..4], &correlation.to_be_bytes(), "answered another request");
}
