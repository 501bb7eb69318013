//! The dispatch loop on its own: real cores (`Core::run` on threads, real shards and
//! partition logs in a temporary directory) behind an in-memory transport, speaking a
//! small line protocol. No broker process, no sockets: what is tested is the loop's own
//! promises — answers in request order, a parked request holding back the ready answers
//! behind it, gathers across cores, faults closing one connection alone, idle close and
//! abort.

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::session::{Cx, Fault, Finish, Gather, Parked, Protocol, Session, Step};
use super::{build_cores, Shared};
use crate::broker::shard::{PartOp, PartResult};
use crate::broker::Broker;
use crate::buffer::{chunks_len, Chunk};
use crate::config::ServeArgs;
use crate::log::batch::build_batch;
use crate::log::FileWorker;
use crate::transport::{CloseReason, Completion, ConnId, Transport, TransportKind};
use crate::wake::Wake;

const WAIT: Duration = Duration::from_secs(10);

// ---- an in-memory transport --------------------------------------------------------

#[derive(Default)]
struct MemState {
    /// Completions for the core's next poll.
    ready: VecDeque<Completion>,
    /// The receive the core has outstanding, per connection.
    recv: HashMap<ConnId, BytesMut>,
    /// Bytes the peer sent that no receive has taken yet.
    inbound: HashMap<ConnId, Vec<u8>>,
    /// Everything sent to each peer, in order.
    sent: HashMap<ConnId, Vec<u8>>,
    /// Connections whose peer does not read: their sends never complete.
    stalled: HashMap<ConnId, usize>,
    /// How each connection was ended by the core: "close" or "abort".
    ended: HashMap<ConnId, &'static str>,
    woken: bool,
}

#[derive(Default)]
struct Mem {
    state: Mutex<MemState>,
    cv: Condvar,
}

impl Mem {
    fn with<R>(&self, f: impl FnOnce(&mut MemState) -> R) -> R {
        let r = f(&mut self.state.lock());
        self.cv.notify_all();
        r
    }

    /// Hands the peer's pending bytes to the outstanding receive, if both are there.
    fn deliver(s: &mut MemState, conn: ConnId) {
        let Some(bytes) = s.inbound.get_mut(&conn).filter(|b| !b.is_empty()) else { return };
        let Some(mut buf) = s.recv.remove(&conn) else { return };
        let n = bytes.len();
        buf.extend_from_slice(bytes);
        bytes.clear();
        s.ready.push_back(Completion::Received { conn, buf, n });
    }
}

impl Wake for Mem {
    fn wake(&self) {
        self.with(|s| s.woken = true);
    }
}

struct MemTransport(Arc<Mem>);

impl Transport for MemTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn recv(&mut self, conn: ConnId, buf: BytesMut, _max: usize) {
        self.0.with(|s| {
            s.recv.insert(conn, buf);
            Mem::deliver(s, conn);
        });
    }

    fn send(&mut self, conn: ConnId, chunks: Vec<Chunk>) {
        self.0.with(|s| {
            let n = chunks_len(&chunks);
            if let Some(held) = s.stalled.get_mut(&conn) {
                *held += n;
                return;
            }
            let out = s.sent.entry(conn).or_default();
            chunks.iter().for_each(|c| out.extend_from_slice(c));
            s.ready.push_back(Completion::Sent { conn, chunks });
        });
    }

    fn close(&mut self, conn: ConnId) {
        self.end(conn, "close");
    }

    fn abort(&mut self, conn: ConnId) {
        self.end(conn, "abort");
    }

    fn stop_accepting(&mut self) {}

    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> std::io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.0.state.lock();
        while s.ready.is_empty() && !s.woken {
            match deadline {
                Some(d) if self.0.cv.wait_until(&mut s, d).timed_out() => break,
                Some(_) => {}
                None => self.0.cv.wait(&mut s),
            }
        }
        s.woken = false;
        out.extend(s.ready.drain(..));
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.0.clone()
    }

    fn unsent_bytes(&self, conn: ConnId) -> usize {
        self.0.state.lock().stalled.get(&conn).copied().unwrap_or(0)
    }
}

impl MemTransport {
    fn end(&mut self, conn: ConnId, how: &'static str) {
        self.0.with(|s| {
            s.ended.entry(conn).or_insert(how);
            s.recv.remove(&conn);
            s.ready.push_back(Completion::Closed { conn, reason: CloseReason::Local });
        });
    }
}

// ---- a small line protocol -----------------------------------------------------------

/// One command per `\n`-terminated line:
/// - `say X`: answers `X`;
/// - `quiet`: answers nothing;
/// - `hold X`: parks until the gate opens (and the broker's notifier moves), then `X`;
/// - `late X MS`: parks until MS milliseconds have passed, then `X`;
/// - `append TOPIC P VALUE`: appends a record to partition P, answers `P@OFFSET`;
/// - `read TOPIC`: reads every partition of TOPIC from offset 0, answers each one's
///   high watermark;
/// - anything else, or a line over 64 bytes: bad input.
struct Lines {
    gate: Arc<AtomicBool>,
}

impl Protocol for Lines {
    fn name(&self) -> &str {
        "lines"
    }

    fn open(&self, _peer: SocketAddr) -> Box<dyn Session> {
        Box::new(LineSession { gate: self.gate.clone() })
    }
}

struct LineSession {
    gate: Arc<AtomicBool>,
}

const MAX_LINE: usize = 64;

fn answer(text: &str) -> Step {
    Step::Respond(vec![Chunk::Heap(Bytes::from(format!("{text}\n")))])
}

impl Session for LineSession {
    fn cut(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Fault> {
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) if i <= MAX_LINE => {
                let line = buf.split_to(i + 1).freeze();
                Ok(Some(line.slice(..i)))
            }
            None if buf.len() <= MAX_LINE => Ok(None),
            _ => Err(Fault::BadInput("line too long".into())),
        }
    }

    fn handle(&mut self, cx: &Cx<'_>, frame: Bytes) -> Result<Step, Fault> {
        let line = std::str::from_utf8(&frame).map_err(|e| Fault::BadInput(e.to_string()))?;
        let words: Vec<&str> = line.split(' ').collect();
        let bad = || Fault::BadInput(format!("bad command {line:?}"));
        Ok(match words.as_slice() {
            ["say", x] => answer(x),
            ["quiet"] => Step::Silent,
            ["hold", x] => Step::Park(Box::new(Held { gate: self.gate.clone(), text: x.to_string(), deadline: None })),
            ["late", x, ms] => {
                let ms: u64 = ms.parse().map_err(|_| bad())?;
                let deadline = Some(cx.now + Duration::from_millis(ms));
                Step::Park(Box::new(Held { gate: Arc::new(AtomicBool::new(false)), text: x.to_string(), deadline }))
            }
            ["append", topic, p, value] => {
                let p: i32 = p.parse().map_err(|_| bad())?;
                let key = cx.broker.topic(topic).and_then(|t| t.key(p)).ok_or_else(bad)?;
                let records = Bytes::from(build_batch(0, 0, &[value.as_bytes()]));
                Step::Gather(Gather { ops: vec![(key, PartOp::Append { records })], then: Box::new(Appended(p)) })
            }
            ["read", topic] => {
                let t = cx.broker.topic(topic).ok_or_else(bad)?;
                let ops = (0..t.meta.partitions)
                    .filter_map(|p| Some((t.key(p)?, PartOp::Read { offset: 0, max_bytes: 1 << 20 })))
                    .collect();
                Step::Gather(Gather { ops, then: Box::new(ReadAll) })
            }
            _ => return Err(bad()),
        })
    }

    fn recv_max(&self) -> usize {
        MAX_LINE + 1
    }
}

struct Held {
    gate: Arc<AtomicBool>,
    text: String,
    deadline: Option<Instant>,
}

impl Parked for Held {
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn poll(&mut self, _cx: &Cx<'_>, force: bool) -> Option<Result<Step, Fault>> {
        (force || self.gate.load(Ordering::Acquire)).then(|| Ok(answer(&self.text)))
    }
}

struct Appended(i32);

impl Finish for Appended {
    fn finish(self: Box<Self>, _cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault> {
        match results.as_slice() {
            [PartResult::Appended(info, _)] => Ok(answer(&format!("{}@{}", self.0, info.base_offset))),
            other => Err(Fault::Internal(format!("append failed: {other:?}"))),
        }
    }
}

struct ReadAll;

impl Finish for ReadAll {
    fn finish(self: Box<Self>, _cx: &Cx<'_>, results: Vec<PartResult>) -> Result<Step, Fault> {
        let marks: Vec<String> = results
            .iter()
            .map(|r| match r {
                PartResult::Read(r) => r.high_watermark.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        Ok(answer(&marks.join(" ")))
    }
}

// ---- the rig -----------------------------------------------------------------------

struct Rig {
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
    mems: Vec<Arc<Mem>>,
    gate: Arc<AtomicBool>,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    files_worker: Option<FileWorker>,
    next_conn: ConnId,
}

impl Rig {
    /// `cores` cores serving the line protocol, a topic `t` with one partition per core,
    /// and `idle_ms` as the idle limit.
    fn start(cores: usize, idle_ms: u64) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ServeArgs {
            data_dir: Some(dir.path().to_path_buf()),
            connections_max_idle_ms: Some(idle_ms),
            ..Default::default()
        };
        let settings = args.resolve().expect("settings").broker;
        let (files_worker, files) = FileWorker::spawn().expect("file worker");
        let (broker, shards) = Broker::open(settings, cores, files).expect("broker");
        let broker = Arc::new(broker);
        broker.create_topic("t", cores as i32, HashMap::new(), false).expect("topic");
        let mems: Vec<Arc<Mem>> = (0..cores).map(|_| Arc::default()).collect();
        let transports: Vec<Box<dyn Transport>> =
            mems.iter().map(|m| Box::new(MemTransport(m.clone())) as Box<dyn Transport>).collect();
        let gate = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(AtomicBool::new(false));
        let protocols: Vec<Arc<dyn Protocol>> = vec![Arc::new(Lines { gate: gate.clone() })];
        let shared =
            Shared { protocols, tls: Vec::new(), shutdown: shutdown.clone(), busy_poll: false, services: Vec::new() };
        let cores = build_cores(&broker, shards, transports, shared);
        let threads: Vec<JoinHandle<()>> = cores.into_iter().map(|c| std::thread::spawn(move || c.run())).collect();
        Rig { _dir: dir, broker, mems, gate, shutdown, threads, files_worker: Some(files_worker), next_conn: 1 }
    }

    /// A new connection on `core`.
    fn connect(&mut self, core: usize) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        self.mems[core].with(|s| s.ready.push_back(Completion::Accepted { conn, peer, listener: 0 }));
        conn
    }

    fn write(&self, core: usize, conn: ConnId, bytes: &str) {
        self.mems[core].with(|s| {
            s.inbound.entry(conn).or_default().extend_from_slice(bytes.as_bytes());
            Mem::deliver(s, conn);
        });
    }

    fn stall(&self, core: usize, conn: ConnId) {
        self.mems[core].with(|s| s.stalled.insert(conn, 0));
    }

    fn sent(&self, core: usize, conn: ConnId) -> String {
        let s = self.mems[core].state.lock();
        String::from_utf8_lossy(s.sent.get(&conn).map_or(&[][..], |v| v)).into_owned()
    }

    fn ended(&self, core: usize, conn: ConnId) -> Option<&'static str> {
        self.mems[core].state.lock().ended.get(&conn).copied()
    }

    /// Waits until `conn` was sent exactly `want`, or fails with what it was sent.
    fn wait_sent(&self, core: usize, conn: ConnId, want: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.sent(core, conn) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("connection {conn} was sent {:?}, expected {want:?}", self.sent(core, conn));
    }

    fn wait_ended(&self, core: usize, conn: ConnId) -> &'static str {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(how) = self.ended(core, conn) {
                return how;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("connection {conn} never ended");
    }

    fn stop(mut self) {
        self.shutdown.store(true, Ordering::Release);
        self.mems.iter().for_each(|m| m.wake());
        for t in self.threads.drain(..) {
            t.join().expect("core thread");
        }
        if let Some(w) = self.files_worker.take() {
            w.finish();
        }
    }
}

// ---- the tests -----------------------------------------------------------------------

#[test]
fn pipelined_answers_leave_in_request_order_and_silent_requests_take_no_place() {
    let mut rig = Rig::start(1, 60_000);
    let c = rig.connect(0);
    // Split mid-line: the session sees whole frames only.
    rig.write(0, c, "say a\nquiet\nsa");
    rig.write(0, c, "y b\nappend t 0 x\nsay c\n");
    rig.wait_sent(0, c, "a\nb\n0@0\nc\n");
    rig.stop();
}

#[test]
fn a_parked_request_holds_back_the_ready_answers_behind_it() {
    let mut rig = Rig::start(1, 60_000);
    let c = rig.connect(0);
    let other = rig.connect(0);
    rig.write(0, c, "say a\nhold b\nsay c\n");
    rig.wait_sent(0, c, "a\n");
    // Another connection is not held back by this one's parked request.
    rig.write(0, other, "say z\n");
    rig.wait_sent(0, other, "z\n");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.sent(0, c), "a\n", "`say c` overtook the parked `hold b`");
    rig.gate.store(true, Ordering::Release);
    rig.broker.notifier.notify();
    rig.wait_sent(0, c, "a\nb\nc\n");
    // A deadline answers a parked request with nothing else happening.
    rig.write(0, c, "late d 50\nsay e\n");
    rig.wait_sent(0, c, "a\nb\nc\nd\ne\n");
    rig.stop();
}

#[test]
fn a_gather_across_cores_answers_once_every_owner_has() {
    let mut rig = Rig::start(2, 60_000);
    let t = rig.broker.topic("t").expect("topic");
    let owners: Vec<usize> = (0..2).map(|p| rig.broker.owner(t.key(p).expect("key"))).collect();
    assert_ne!(owners[0], owners[1], "one partition per core");
    // Core 0 serves the connection; the partition core 1 owns is appended to and read
    // by core 1 on core 0's behalf.
    let c = rig.connect(0);
    rig.write(0, c, "append t 0 x\nappend t 1 y\nappend t 1 z\nread t\nsay done\n");
    // High watermarks after one record in partition 0 and two in partition 1.
    rig.wait_sent(0, c, "0@0\n1@0\n1@1\n1 2\ndone\n");
    rig.stop();
}

#[test]
fn bad_input_closes_its_connection_alone_after_the_answers_before_it() {
    let mut rig = Rig::start(1, 60_000);
    let bad = rig.connect(0);
    let good = rig.connect(0);
    rig.write(0, bad, "say a\nhello\nsay b\n");
    assert_eq!(rig.wait_ended(0, bad), "close");
    assert_eq!(rig.sent(0, bad), "a\n", "answered after the bad frame, or not before it");
    rig.write(0, bad, "say c\n");
    rig.write(0, good, "say ok\n");
    rig.wait_sent(0, good, "ok\n");
    assert_eq!(rig.sent(0, bad), "a\n");
    // A frame the framer refuses is bad input too.
    let long = rig.connect(0);
    rig.write(0, long, &"x".repeat(MAX_LINE + 1));
    assert_eq!(rig.wait_ended(0, long), "close");
    rig.stop();
}

#[test]
fn idle_connections_are_closed_and_ones_not_reading_are_aborted() {
    let mut rig = Rig::start(1, 200);
    let half = rig.connect(0);
    let deaf = rig.connect(0);
    let busy = rig.connect(0);
    let started = Instant::now();
    rig.write(0, half, "say incompl");
    rig.stall(0, deaf);
    rig.write(0, deaf, "say never-read\n");
    // A connection with a request in flight is not idle, however long it waits.
    rig.write(0, busy, "hold h\n");
    assert_eq!(rig.wait_ended(0, half), "close", "a peer holding half a request is closed gracefully");
    assert_eq!(rig.wait_ended(0, deaf), "abort", "a peer that stopped reading cannot be closed gracefully");
    assert!(started.elapsed() >= Duration::from_millis(200), "closed before the idle limit");
    assert_eq!(rig.ended(0, busy), None);
    rig.gate.store(true, Ordering::Release);
    rig.broker.notifier.notify();
    rig.wait_sent(0, busy, "h\n");
    rig.stop();
}
