"""confluent-kafka through `slipstream sidecar` to librdkafka's 3-broker mock cluster.

The mock cluster (node ids 1-3) runs in this process, reached through ctypes on the
librdkafka the confluent-kafka wheel bundles. The sidecar (started here, its binary given
with --sidecar) stands in front of it. While a producer (acks=all, idempotent) carries on,
partition leaders move, and then a leader broker goes down and comes back. Afterwards a
consumer group reads everything back: every acknowledged message is there, intact.
Every address the clients connected to was the sidecar's (from librdkafka's own
connection log), and the broker list they were given names only sidecar ports.
"""
import argparse
import ctypes
import glob
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import confluent_kafka
from confluent_kafka import Consumer, Producer

from common import check_value, fail, ok, poll_until, value

TOPIC = "mock-leaders"
PARTITIONS = 3
COUNT = 3000


def load_librdkafka():
    libs = os.path.join(os.path.dirname(os.path.dirname(confluent_kafka.__file__)), "confluent_kafka.libs")
    found = glob.glob(os.path.join(libs, "librdkafka*.so*"))
    if not found:
        fail(f"no librdkafka in {libs}")
    lib = ctypes.CDLL(found[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_partition_set_leader.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                                       ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    return lib


class MockCluster:
    def __init__(self, brokers):
        self.lib = load_librdkafka()
        errstr = ctypes.create_string_buffer(512)
        # The cluster lives in a handle of its own (RD_KAFKA_PRODUCER = 0).
        self.rk = self.lib.rd_kafka_new(0, self.lib.rd_kafka_conf_new(), errstr, len(errstr))
        if not self.rk:
            fail(f"rd_kafka_new: {errstr.value}")
        self.mc = self.lib.rd_kafka_mock_cluster_new(self.rk, brokers)
        if not self.mc:
            fail("rd_kafka_mock_cluster_new failed")
        self.bootstraps = self.lib.rd_kafka_mock_cluster_bootstraps(self.mc).decode()

    def create_topic(self, topic, partitions):
        err = self.lib.rd_kafka_mock_topic_create(self.mc, topic.encode(), partitions, 3)
        if err:
            fail(f"mock topic create: error {err}")

    def set_leader(self, topic, partition, broker):
        if self.lib.rd_kafka_mock_partition_set_leader(self.mc, topic.encode(), partition, broker):
            fail("set leader failed")

    def down(self, broker):
        self.lib.rd_kafka_mock_broker_set_down(self.mc, broker)

    def up(self, broker):
        self.lib.rd_kafka_mock_broker_set_up(self.mc, broker)


class Connections(logging.Handler):
    """librdkafka's debug log, kept for the addresses it connected to."""

    PATTERN = re.compile(r"Connecting to ipv[46]#\[?([0-9a-fA-F.:]+?)\]?:(\d+)")

    def __init__(self):
        super().__init__()
        self.ports = set()

    def emit(self, record):
        m = self.PATTERN.search(record.getMessage())
        if m:
            self.ports.add(int(m.group(2)))


def wait_listening(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    fail(f"sidecar not listening on {port}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sidecar", required=True, help="the slipstream binary")
    ap.add_argument("--port", type=int, required=True, help="sidecar bootstrap port")
    ap.add_argument("--broker-port-base", type=int, required=True,
                    help="broker N at this + N; the caller picks it with ports 1-3 above it free")
    ap.add_argument("--log", required=True, help="where the sidecar logs")
    a = ap.parse_args()

    mock = MockCluster(3)
    mock.create_topic(TOPIC, PARTITIONS)
    upstream_ports = {int(b.rsplit(":", 1)[1]) for b in mock.bootstraps.split(",")}
    base = a.broker_port_base
    side_ports = {a.port} | {base + n for n in (1, 2, 3)}
    with open(a.log, "ab") as logf:
        side = subprocess.Popen([a.sidecar, "sidecar", "--upstream", mock.bootstraps, "--listen",
                                 f"127.0.0.1:{a.port}", "--broker-port-base", str(base)],
                                stdout=subprocess.DEVNULL, stderr=logf)
    try:
        wait_listening(a.port)
        run(a, mock, side_ports, upstream_ports)
    finally:
        side.terminate()
        side.wait(15)


def run(a, mock, side_ports, upstream_ports):
    bs = f"127.0.0.1:{a.port}"
    conns = Connections()
    logger = logging.getLogger("rdkafka")
    logger.addHandler(conns)
    logger.setLevel(logging.DEBUG)
    acked, errors = [], []

    def report(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked.append((msg.partition(), msg.offset(), msg.value()))

    p = Producer({"bootstrap.servers": bs, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
                  "retry.backoff.ms": 100, "message.timeout.ms": 60000, "debug": "broker",
                  "topic.metadata.refresh.interval.ms": 1000}, logger=logger)
    brokers = p.list_topics(timeout=10).brokers
    named = {b.port for b in brokers.values()}
    if {b.id for b in brokers.values()} != {1, 2, 3} or not named <= side_ports:
        fail(f"metadata through the sidecar named {[(b.id, b.host, b.port) for b in brokers.values()]}")
    ok(f"metadata names the 3 brokers at sidecar ports {sorted(named)}")

    # Sent in chunks, each acknowledged before the next: every event below lands between
    # acknowledged sends, with more to send after it.
    for seq in range(COUNT):
        if seq == COUNT // 3:
            # Every partition's leader moves to the next broker.
            for part in range(PARTITIONS):
                mock.set_leader(TOPIC, part, (part + 1) % 3 + 1)
            ok(f"leaders moved at message {seq}")
        if seq == 2 * COUNT // 3:
            # Broker 2 leads a partition now: down while messages are on their way to it.
            mock.down(2)
            threading.Timer(2.0, mock.up, args=(2,)).start()
            down_at = time.time()
            ok(f"broker 2 down for 2 s from message {seq}")
        while True:
            try:
                p.produce(TOPIC, key=str(seq).encode(), value=value("mock", seq), on_delivery=report)
                break
            except BufferError:
                p.poll(0.1)
        if seq % 100 == 99:
            if p.flush(60):
                fail(f"chunk ending at {seq} not acknowledged in 60 s")
            if seq == 2 * COUNT // 3 + 99:
                # Partition 0's leader was down: its messages waited for it.
                waited = time.time() - down_at
                if waited < 1.5:
                    fail(f"the chunk sent into the outage was acknowledged after {waited:.2f} s")
                ok(f"the chunk sent into the outage was acknowledged {waited:.1f} s later, once broker 2 was back")
    left = p.flush(90)
    if left or errors:
        fail(f"{left} unflushed, errors {errors[:3]}")
    ok(f"{len(acked)} acknowledged through leader moves and a broker outage")

    c = Consumer({"bootstrap.servers": bs, "group.id": "mock-group", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "debug": "broker"}, logger=logger)
    c.subscribe([TOPIC])
    got = {}
    poll_until(c, lambda: len(got) >= len(acked),
               lambda m: got.__setitem__((m.partition(), m.offset()), m.value()), timeout=90)
    c.close()
    missing = [(part, off) for part, off, v in acked if got.get((part, off)) != v]
    if missing:
        fail(f"{len(missing)} acknowledged messages missing or altered, e.g. {missing[:5]}")
    seqs = {check_value(v) for v in got.values()}
    if seqs != set(range(COUNT)):
        fail(f"consumed {len(seqs)} distinct messages, want {COUNT}")
    ok(f"a consumer group read back all {COUNT} acknowledged messages intact")

    if not conns.ports:
        fail("librdkafka logged no connections (debug log not captured)")
    if not conns.ports <= side_ports or conns.ports & upstream_ports:
        fail(f"clients connected to {sorted(conns.ports)}; the sidecar's are {sorted(side_ports)}, "
             f"the brokers' {sorted(upstream_ports)}")
    ok(f"every connection the clients made went to a sidecar port: {sorted(conns.ports)}")
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
