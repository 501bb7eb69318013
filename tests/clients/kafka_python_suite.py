"""kafka-python (pure Python) against slipstream; same phases as confluent_suite.py."""
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from common import (BIG, N, N_AFTER, Tracker, big_value, check_mid_batch, check_resumed, check_value, fail, ok,
                    run_phases, value)

CODECS = [None, "gzip", "snappy", "lz4", "zstd"]


def name(codec):
    return f"kp-{codec or 'none'}"


def produce(bs, topic, codec, seqs):
    p = KafkaProducer(bootstrap_servers=bs, acks="all", compression_type=codec, linger_ms=5,
                      max_request_size=4 << 20)
    futures = [p.send(topic, key=str(seq % 13).encode(), value=value(codec or "none", seq)) for seq in seqs]
    p.flush(60)
    metas = [f.get(timeout=30) for f in futures]
    p.close()
    return metas


def consume_group(bs, topic, group, count, timeout=60):
    c = KafkaConsumer(bootstrap_servers=bs, group_id=group, auto_offset_reset="earliest",
                      enable_auto_commit=False, session_timeout_ms=6000)
    c.subscribe([topic])
    t = Tracker()
    deadline = time.time() + timeout
    while len(t.seen) < count and time.time() < deadline:
        for tp, msgs in c.poll(timeout_ms=500).items():
            for m in msgs:
                t.add(m.partition, m.offset, m.value)
    extra = c.poll(timeout_ms=1000)
    if any(extra.values()):
        fail(f"{topic}: unexpected extra messages")
    c.commit()
    committed = {p: c.committed(TopicPartition(topic, p)) for p in range(3)}
    c.close()
    return t, committed


def phase1(bs):
    admin = KafkaAdminClient(bootstrap_servers=bs)
    admin.create_topics([NewTopic(name(c), 3, 1) for c in CODECS] + [NewTopic("kp-big", 1, 1), NewTopic("kp-mid", 1, 1)])
    admin.close()
    ok("created topics")
    for codec in CODECS:
        topic = name(codec)
        metas = produce(bs, topic, codec, range(N))
        if len(metas) != N:
            fail(f"{topic}: {len(metas)} acked")
        t, committed = consume_group(bs, topic, f"kp-g-{codec}", N)
        if len(t.seen) != N:
            fail(f"{topic}: consumed {len(t.seen)} of {N}")
        ends = {p: t.next_offset.get(p) for p in range(3)}
        if any(committed[p] != ends[p] for p in range(3) if ends[p] is not None):
            fail(f"{topic}: committed {committed}, consumed up to {ends}")
        ok(f"{topic}: {N} produced (acks=all, {codec}), consumed in order, committed {committed}")

    big = big_value()
    produce_big = KafkaProducer(bootstrap_servers=bs, acks="all", max_request_size=4 << 20)
    produce_big.send("kp-big", value=big, partition=0).get(timeout=30)
    produce_big.close()
    c = KafkaConsumer(bootstrap_servers=bs, auto_offset_reset="earliest", enable_auto_commit=False,
                      fetch_max_bytes=8 << 20, max_partition_fetch_bytes=4 << 20)
    c.assign([TopicPartition("kp-big", 0)])
    c.seek(TopicPartition("kp-big", 0), 0)
    got = None
    deadline = time.time() + 30
    while got is None and time.time() < deadline:
        for _, msgs in c.poll(timeout_ms=500).items():
            got = msgs[0].value
    c.close()
    if got != big:
        fail("1 MiB message did not come back intact")
    ok(f"1 MiB message ({BIG} bytes) round-tripped intact")

    p = KafkaProducer(bootstrap_servers=bs, acks="all", linger_ms=200, batch_size=1 << 20)
    futures = [p.send("kp-mid", value=value("mid", seq), partition=0) for seq in range(20)]
    p.flush()
    offsets = sorted(f.get(timeout=30).offset for f in futures)
    p.close()
    if offsets != list(range(offsets[0], offsets[0] + 20)):
        fail(f"mid-batch: offsets {offsets}")
    start = offsets[0] + 7
    c = KafkaConsumer(bootstrap_servers=bs, enable_auto_commit=False)
    tp = TopicPartition("kp-mid", 0)
    c.assign([tp])
    c.seek(tp, start)
    got = []
    deadline = time.time() + 30
    while len(got) < 13 and time.time() < deadline:
        for _, msgs in c.poll(timeout_ms=500).items():
            got.extend((m.offset, check_value(m.value)) for m in msgs)
    c.close()
    check_mid_batch(got, start)


def phase2(bs):
    for codec in CODECS:
        topic = name(codec)
        produce(bs, topic, codec, range(N, N + N_AFTER))
        c = KafkaConsumer(bootstrap_servers=bs, group_id=f"kp-g-{codec}", enable_auto_commit=False)
        committed = {p: c.committed(TopicPartition(topic, p)) for p in range(3)}
        c.close()
        t, _ = consume_group(bs, topic, f"kp-g-{codec}", N_AFTER)
        check_resumed(topic, t, committed)


if __name__ == "__main__":
    run_phases(phase1, phase2)
