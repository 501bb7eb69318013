"""Three confluent-kafka consumers in one group; one is SIGKILLed mid-stream.

Each member appends "partition offset" for every message it processes to its own file
(flushed) *before* committing, so what is committed was recorded. After the kill the
survivors must be assigned the dead member's partitions once its session times out,
and the union of all records must cover every offset of every partition.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import atexit

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from common import fail, ok

TOPIC = "failover"
GROUP = "failover-g"
SESSION_MS = 6000


def member(bs, idx, outdir):
    out = open(os.path.join(outdir, f"member-{idx}.txt"), "a", buffering=1)
    assigned = os.path.join(outdir, f"assigned-{idx}.txt")

    def on_assign(c, parts):
        with open(assigned, "a") as f:
            f.write(" ".join(str(p.partition) for p in parts) + f" @{time.time()}\n")

    c = Consumer({"bootstrap.servers": bs, "group.id": GROUP, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "session.timeout.ms": SESSION_MS,
                  "heartbeat.interval.ms": 500, "partition.assignment.strategy": "range"})
    c.subscribe([TOPIC], on_assign=on_assign)
    while not os.path.exists(os.path.join(outdir, "stop")):
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        out.write(f"{m.partition()} {m.offset()}\n")
        out.flush()
        os.fsync(out.fileno())
        try:
            c.commit(message=m, asynchronous=False)
        except KafkaException as e:
            # As any real consumer: a commit refused mid-rebalance is retried by whoever
            # owns the partition next (at-least-once).
            print(f"member {idx}: commit failed: {e}", file=sys.stderr, flush=True)
        time.sleep(0.002)  # slow enough that the kill lands mid-stream
    c.close()


def main(bs):
    admin = AdminClient({"bootstrap.servers": bs})  # must outlive its futures
    admin.create_topics([NewTopic(TOPIC, 3, 1)])[TOPIC].result(10)
    p = Producer({"bootstrap.servers": bs, "acks": "all"})

    def produce(n, start):
        for i in range(n):
            p.produce(TOPIC, value=f"m{start + i}".encode(), partition=(start + i) % 3)
        if p.flush(30):
            fail("produce did not complete")

    produce(3000, 0)
    outdir = tempfile.mkdtemp(prefix="failover-")
    atexit.register(shutil.rmtree, outdir, True)
    procs = [subprocess.Popen([sys.executable, __file__, "--bootstrap", bs, "--member", str(i), "--outdir", outdir],
                              stdout=subprocess.DEVNULL)
             for i in range(3)]
    atexit.register(lambda: [pr.kill() for pr in procs if pr.poll() is None])

    def lines(i, kind="member"):
        path = os.path.join(outdir, f"{kind}-{i}.txt")
        return open(path).read().splitlines() if os.path.exists(path) else []

    # Wait until all three hold partitions and are consuming.
    deadline = time.time() + 60
    while time.time() < deadline:
        latest = [lines(i, "assigned")[-1:] for i in range(3)]
        if all(l and l[0].split("@")[0].strip() for l in latest) and all(len(lines(i)) > 20 for i in range(3)):
            break
        time.sleep(0.2)
    else:
        fail(f"members never all consumed: {[lines(i, 'assigned') for i in range(3)]}")
    victim_parts = lines(0, "assigned")[-1].split("@")[0].split()
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    killed_at = time.time()
    ok(f"member 0 (partitions {victim_parts}) SIGKILLed after {len(lines(0))} messages")
    produce(1000, 3000)

    # The survivors must pick up the victim's partitions.
    takeover = None
    while time.time() < killed_at + 60:
        for i in (1, 2):
            for l in lines(i, "assigned"):
                parts, at = l.split("@")
                if float(at) > killed_at and any(p in parts.split() for p in victim_parts):
                    takeover = float(at) - killed_at
        if takeover is not None:
            break
        time.sleep(0.2)
    if takeover is None:
        fail("no survivor was assigned the dead member's partitions")
    ok(f"survivors took over partitions {victim_parts} {takeover:.1f} s after the kill (session timeout {SESSION_MS} ms)")

    # Everything is eventually consumed by someone.
    want = {p: set(range(4000 // 3 + (1 if p < 4000 % 3 else 0))) for p in range(3)}
    deadline = time.time() + 90
    while time.time() < deadline:
        seen = {p: set() for p in range(3)}
        for i in range(3):
            for l in lines(i):
                part, off = l.split()
                seen[int(part)].add(int(off))
        if all(want[p] <= seen[p] for p in range(3)):
            break
        time.sleep(0.5)
    open(os.path.join(outdir, "stop"), "w").close()
    for pr in procs[1:]:
        pr.wait(timeout=30)
    missing = {p: len(want[p] - seen[p]) for p in range(3)}
    if any(missing.values()):
        fail(f"messages never consumed per partition: {missing}")
    dups = sum(len(lines(i)) for i in range(3)) - sum(len(w) for w in want.values())
    ok(f"all 4000 messages consumed across the group ({dups} redelivered after the kill, at-least-once)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--member", type=int)
    ap.add_argument("--outdir")
    a = ap.parse_args()
    if a.member is not None:
        member(a.bootstrap, a.member, a.outdir)
    else:
        main(a.bootstrap)
        print("done", flush=True)
