#!/usr/bin/env python3
"""What the sidecar's tail cache saves the upstream: N consumer groups tailing one topic
through `slipstream sidecar` while a producer writes to it, with the cache on and off, in
one run. Figure: upstream fetch bytes per produced byte (the sidecar's own counters),
for 1, 2 and 4 groups (whole Fetch answer frames, so the figures with the cache off,
where answers are not decoded, count the same thing). Writes docs/bench/sidecar-fanout/results.json.

    python3 scripts/bench-sidecar-fanout.py        # RATE=4000 msg/s, SECONDS=10, 1 KiB
Needs the release build (`cargo build --release`) and confluent-kafka.
"""
import json
import shutil
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "slipstream"
OUT = ROOT / "docs" / "bench" / "sidecar-fanout"
RATE = int(os.environ.get("RATE", "4000"))
SECONDS = float(os.environ.get("SECONDS", "10"))
SIZE = 1024
PARTITIONS = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def read_stats(path):
    time.sleep(1.2)  # the sidecar rewrites it every second
    return json.loads(Path(path).read_text())


def run(groups, cache_bytes):
    """One broker, one sidecar, one producer at RATE, `groups` consumer groups."""
    tmp = tempfile.mkdtemp()
    bport, sport = free_port(), free_port()
    broker = subprocess.Popen([str(BIN), "serve", "--listen", f"127.0.0.1:{bport}", "--data-dir", f"{tmp}/data"],
                              stderr=subprocess.DEVNULL)
    wait_port(bport)
    stats = f"{tmp}/sidecar.json"
    side = subprocess.Popen([str(BIN), "sidecar", "--upstream", f"127.0.0.1:{bport}", "--listen",
                             f"127.0.0.1:{sport}", "--broker-port-base", str(free_port()), "--threads", "1",
                             "--tail-cache-bytes", str(cache_bytes), "--stats-file", stats],
                            stderr=subprocess.DEVNULL)
    wait_port(sport)
    bs = f"127.0.0.1:{sport}"
    try:
        admin = AdminClient({"bootstrap.servers": bs})
        admin.create_topics([NewTopic("fan", num_partitions=PARTITIONS, replication_factor=1)])["fan"].result(30)
        stop = threading.Event()
        counts = [0] * groups

        def consume(i):
            c = Consumer({"bootstrap.servers": bs, "group.id": f"g{i}", "auto.offset.reset": "earliest",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 100})
            c.subscribe(["fan"])
            while not stop.is_set():
                m = c.poll(0.2)
                if m is not None and not m.error():
                    counts[i] += 1
            c.close()

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(groups)]
        for t in threads:
            t.start()
        time.sleep(3)  # groups joined and tailing
        before = read_stats(stats)
        p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
        payload = os.urandom(SIZE)
        sent, start = 0, time.time()
        while time.time() - start < SECONDS:
            due = int((time.time() - start) * RATE)
            while sent < due:
                try:
                    p.produce("fan", value=payload)
                    sent += 1
                except BufferError:
                    p.poll(0.01)
            p.poll(0.001)
        p.flush(30)
        deadline = time.time() + 30
        while min(counts) < sent and time.time() < deadline:
            time.sleep(0.1)
        after = read_stats(stats)
        stop.set()
        for t in threads:
            t.join()
        produced = sent * SIZE
        d = {k: after[k] - before[k] for k in ("fetch_upstream_answer_bytes", "fetch_local_answer_bytes",
                                                "fetch_upstream", "fetch_local")}
        return {
            "groups": groups,
            "tail_cache": cache_bytes > 0,
            "messages": sent,
            "consumed_min": min(counts),
            "produced_payload_bytes": produced,
            **d,
            "upstream_fetch_bytes_per_produced_byte": d["fetch_upstream_answer_bytes"] / produced,
            "cache_fetch_bytes_per_produced_byte": d["fetch_local_answer_bytes"] / produced,
        }
    finally:
        for proc in (side, broker):
            proc.terminate()
            proc.wait(15)
        # The log written here is hundreds of MB per run: gone with the run.
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if not BIN.exists():
        sys.exit("build first: cargo build --release")
    rows = []
    for groups in (1, 2, 4):
        for cache in (256 << 20, 0):
            r = run(groups, cache)
            rows.append(r)
            print(f"{groups} group(s), cache {'on ' if r['tail_cache'] else 'off'}: upstream fetch bytes per produced "
                  f"byte {r['upstream_fetch_bytes_per_produced_byte']:.2f}, from the cache "
                  f"{r['cache_fetch_bytes_per_produced_byte']:.2f} ({r['consumed_min']}/{r['messages']} consumed)",
                  flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "created_unix_s": int(time.time()),
        "machine": {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version()},
        "workload": {"rate_msgs_per_s": RATE, "seconds": SECONDS, "message_bytes": SIZE, "partitions": PARTITIONS,
                     "client": "confluent-kafka (librdkafka), fetch.wait.max.ms 100"},
        "runs": rows,
    }
    (OUT / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
