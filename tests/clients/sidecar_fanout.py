"""Several consumer groups reading one topic through `slipstream sidecar`: the tail cache.

--phase fanout:  produce --count messages, then --groups consumer groups read them all,
                 one after the other; each checks every message intact. From the
                 sidecar's counters (--stats): after the first group, the others are served
                 from the cache (local fetch bytes grow, upstream fetch bytes barely).
--phase tail:    --groups groups consume at once while a producer writes: every group gets
                 every message intact; the upstream serves about one fetch stream.
--phase rules:   a topic deleted through the sidecar and created again under the same
                 name with other data: a new group sees only the new data; a read_committed
                 consumer reads it too (below the last stable offset, no transactions: the
                 cache may serve it).
With --client kafka-python the same phases run on kafka-python (which uses fetch
sessions when the broker offers them; those go upstream).
"""
import argparse
import json
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from common import check_value, fail, ok, poll_until, value


def stats(path):
    # The sidecar rewrites the file every second: wait for a fresh one.
    time.sleep(1.2)
    with open(path) as f:
        return json.load(f)


def create(bs, topic):
    admin = AdminClient({"bootstrap.servers": bs})  # kept alive until the result is in
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)


def produce(bs, topic, tag, count):
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
    for seq in range(count):
        while True:
            try:
                p.produce(topic, key=str(seq).encode(), value=value(tag, seq))
                break
            except BufferError:
                p.poll(0.1)
    if p.flush(60):
        fail("produce did not finish")


def consume_confluent(bs, topic, group, count, isolation="read_uncommitted"):
    c = Consumer({"bootstrap.servers": bs, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "isolation.level": isolation})
    c.subscribe([topic])
    got = {}
    poll_until(c, lambda: len(got) >= count, lambda m: got.__setitem__((m.partition(), m.offset()), m.value()))
    c.close()
    return list(got.values())


def consume_kafka_python(bs, topic, group, count, isolation="read_uncommitted"):
    from kafka import KafkaConsumer
    c = KafkaConsumer(topic, bootstrap_servers=bs, group_id=group, auto_offset_reset="earliest",
                      enable_auto_commit=False, isolation_level=isolation)
    got = {}
    deadline = time.time() + 60
    while len(got) < count and time.time() < deadline:
        for tp, msgs in c.poll(timeout_ms=500).items():
            for m in msgs:
                got[(tp.partition, m.offset)] = m.value
    c.close()
    return list(got.values())


def check(values, tag, count, who):
    seqs = set()
    for v in values:
        if not v.startswith(f"{tag}:".encode()):
            fail(f"{who}: a message of another topic's life: {v[:40]!r}")
        seqs.add(check_value(v))
    if seqs != set(range(count)):
        fail(f"{who}: {len(seqs)} distinct messages, want {count}")


def fanout(a, consume):
    topic = f"fanout-{a.client}"
    create(a.bootstrap, topic)
    produce(a.bootstrap, topic, "fan", a.count)
    before = stats(a.stats)
    rows = []
    for g in range(a.groups):
        check(consume(a.bootstrap, topic, f"{topic}-g{g}", a.count), "fan", a.count, f"group {g}")
        now = stats(a.stats)
        rows.append({k: now[k] - before[k] for k in ("fetch_upstream_bytes", "fetch_local_bytes", "fetch_local")})
        before = now
        ok(f"group {g}: all {a.count} intact; upstream fetch bytes {rows[-1]['fetch_upstream_bytes']}, "
           f"from the cache {rows[-1]['fetch_local_bytes']} in {rows[-1]['fetch_local']} answers")
    print("fanout:" + json.dumps(rows), flush=True)
    if a.expect_local:
        later = rows[1:]
        if not later or any(r["fetch_local_bytes"] == 0 for r in later):
            fail(f"later groups were not served from the cache: {rows}")
        first = rows[0]["fetch_upstream_bytes"]
        if any(r["fetch_upstream_bytes"] * 4 > first for r in later):
            fail(f"later groups still fetched much from upstream: {rows}")
        ok("groups after the first were served from the tail cache")


def tail(a, consume):
    """--groups groups consume concurrently while the producer writes: each gets every
    message intact, and the upstream serves about one fetch stream, not one per group."""
    import threading
    topic = f"tailing-{a.client}"
    create(a.bootstrap, topic)
    results = [None] * a.groups
    before = stats(a.stats)

    def run(i):
        results[i] = consume(a.bootstrap, topic, f"{topic}-g{i}", a.count)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(a.groups)]
    for t in threads:
        t.start()
    time.sleep(3)  # the groups joined and wait at the (empty) tail
    p = Producer({"bootstrap.servers": a.bootstrap, "acks": "all", "linger.ms": 5})
    for seq in range(a.count):
        p.produce(topic, key=str(seq).encode(), value=value("tail", seq))
        if seq % 100 == 99:
            p.flush(30)
            time.sleep(0.02)  # a stream, not one burst
    p.flush(30)
    for t in threads:
        t.join()
    for i, values in enumerate(results):
        check(values, "tail", a.count, f"tailing group {i}")
    after = stats(a.stats)
    up = after["fetch_upstream_answer_bytes"] - before["fetch_upstream_answer_bytes"]
    local = after["fetch_local_answer_bytes"] - before["fetch_local_answer_bytes"]
    print("tail:" + json.dumps({"upstream_answer_bytes": up, "local_answer_bytes": local}), flush=True)
    ok(f"{a.groups} groups tailing together got all {a.count} intact; upstream fetch answers {up} bytes, "
       f"from the cache {local}")
    if a.expect_local and not (local > up and up * (a.groups - 1) < local * 2):
        fail(f"the groups did not share one upstream stream: upstream {up}, cache {local}")


def rules(a, consume):
    topic = f"recreated-{a.client}"
    admin = AdminClient({"bootstrap.servers": a.bootstrap})
    create(a.bootstrap, topic)
    produce(a.bootstrap, topic, "old", a.count)
    check(consume(a.bootstrap, topic, f"{topic}-a", a.count), "old", a.count, "first life")
    check(consume(a.bootstrap, topic, f"{topic}-b", a.count), "old", a.count, "first life, again")
    admin.delete_topics([topic])[topic].result(30)
    time.sleep(0.5)
    create(a.bootstrap, topic)
    produce(a.bootstrap, topic, "new", a.count // 2)
    check(consume(a.bootstrap, topic, f"{topic}-c", a.count // 2), "new", a.count // 2, "second life")
    ok("a topic deleted and created again: only its new data is served")
    before = stats(a.stats)
    check(consume(a.bootstrap, topic, f"{topic}-d", a.count // 2, "read_committed"), "new", a.count // 2,
          "read_committed")
    after = stats(a.stats)
    if a.expect_local and after["fetch_local_bytes"] == before["fetch_local_bytes"]:
        fail("a read_committed consumer of a topic without transactions was not served from the cache")
    ok("a read_committed consumer read the new data intact "
       f"({after['fetch_local_bytes'] - before['fetch_local_bytes']} record bytes from the cache)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--phase", choices=["fanout", "tail", "rules"], required=True)
    ap.add_argument("--client", choices=["confluent", "kafka-python"], default="confluent")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--expect-local", action="store_true")
    a = ap.parse_args()
    consume = consume_confluent if a.client == "confluent" else consume_kafka_python
    {"fanout": fanout, "tail": tail, "rules": rules}[a.phase](a, consume)
    print("done", flush=True)


if __name__ == "__main__":
    main()
