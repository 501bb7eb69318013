"""confluent-kafka (librdkafka 2.x) against slipstream.

phase 1: per codec, create a 3-partition topic, produce 10k messages with acks=all,
         consume them all in order through a consumer group, commit; a 1 MiB message;
         a consumer starting at an offset inside a batch.
phase 2: (after a broker restart) produce 500 more per codec; the group resumes exactly
         after its committed offsets.
"""
import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from common import (BIG, N, N_AFTER, Tracker, big_value, check_mid_batch, check_resumed, check_value, fail, ok,
                    run_phases, value)

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def produce(bs, topic, codec, seqs):
    acked = []
    errors = []

    def report(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked.append((msg.partition(), msg.offset()))

    p = Producer({"bootstrap.servers": bs, "acks": "all", "compression.type": codec,
                  "enable.idempotence": True, "linger.ms": 5})
    for seq in seqs:
        while True:
            try:
                p.produce(topic, key=str(seq % 13).encode(), value=value(codec, seq), on_delivery=report)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    left = p.flush(60)
    if left or errors:
        fail(f"{topic}: {left} unflushed, errors {errors[:3]}")
    return acked


def consume_group(bs, topic, group, count, timeout=60):
    c = Consumer({"bootstrap.servers": bs, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "session.timeout.ms": 6000})
    c.subscribe([topic])
    t = Tracker()
    deadline = time.time() + timeout
    while len(t.seen) < count and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                continue
            fail(f"{topic}: consumer error {m.error()}")
        t.add(m.partition(), m.offset(), m.value())
    # Nothing more must arrive.
    extra = c.poll(1.0)
    if extra is not None and not extra.error():
        fail(f"{topic}: unexpected extra message at offset {extra.offset()}")
    c.commit(asynchronous=False)
    committed = {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)}
    c.close()
    return t, committed


def phase1(bs):
    admin = AdminClient({"bootstrap.servers": bs})
    topics = [f"ck-{c}" for c in CODECS] + ["ck-big", "ck-mid"]
    for t, f in admin.create_topics([NewTopic(t, 3, 1) for t in topics]).items():
        f.result(10)
    ok("created topics")
    for codec in CODECS:
        topic = f"ck-{codec}"
        acked = produce(bs, topic, codec, range(N))
        if len(acked) != N:
            fail(f"{topic}: {len(acked)} acked")
        t, committed = consume_group(bs, topic, f"ck-g-{codec}", N)
        if len(t.seen) != N:
            fail(f"{topic}: consumed {len(t.seen)} of {N}")
        ends = {p: t.next_offset.get(p, 0) for p in range(3)}
        if any(committed.get(p, -1001) not in (ends[p], -1001) for p in range(3)):
            fail(f"{topic}: committed {committed}, consumed up to {ends}")
        ok(f"{topic}: {N} produced (acks=all, {codec}), consumed in order, committed {committed}")

    # A 1 MiB message.
    big = big_value()
    p = Producer({"bootstrap.servers": bs, "acks": "all", "message.max.bytes": 4 << 20})
    p.produce("ck-big", value=big, partition=0)
    if p.flush(30):
        fail("1 MiB message not acknowledged")
    c = Consumer({"bootstrap.servers": bs, "group.id": "ck-big-g", "auto.offset.reset": "earliest",
                  "fetch.max.bytes": 8 << 20, "max.partition.fetch.bytes": 4 << 20,
                  "receive.message.max.bytes": 16 << 20})
    c.assign([TopicPartition("ck-big", 0, 0)])
    m = None
    deadline = time.time() + 30
    while time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            break
    c.close()
    if m is None or m.error() or m.value() != big:
        fail("1 MiB message did not come back intact")
    ok(f"1 MiB message ({BIG} bytes) round-tripped intact")

    # One batch of 20 records; a consumer starting inside it sees no gap.
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 200, "batch.num.messages": 100})
    offsets = []
    for seq in range(20):
        p.produce("ck-mid", value=value("mid", seq), partition=1,
                  on_delivery=lambda e, m: offsets.append(m.offset()))
    p.flush(30)
    offsets.sort()
    if offsets != list(range(offsets[0], offsets[0] + 20)):
        fail(f"mid-batch: offsets {offsets}")
    start = offsets[0] + 7
    c = Consumer({"bootstrap.servers": bs, "group.id": "ck-mid-g", "enable.auto.commit": False})
    c.assign([TopicPartition("ck-mid", 1, start)])
    got = []
    deadline = time.time() + 30
    while len(got) < 13 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append((m.offset(), check_value(m.value())))
    c.close()
    check_mid_batch(got, start)


def phase2(bs):
    for codec in CODECS:
        topic = f"ck-{codec}"
        produce(bs, topic, codec, range(N, N + N_AFTER))
        c = Consumer({"bootstrap.servers": bs, "group.id": f"ck-g-{codec}", "auto.offset.reset": "earliest",
                      "enable.auto.commit": False})
        committed = {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)}
        c.close()
        t, _ = consume_group(bs, topic, f"ck-g-{codec}", N_AFTER)
        check_resumed(topic, t, committed)


if __name__ == "__main__":
    run_phases(phase1, phase2)
