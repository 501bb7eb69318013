"""Shared checks for the Python client suites: message shapes and verification."""
import argparse
import hashlib
import sys

N = 10_000
N_AFTER = 500
BIG = 1 << 20


def value(codec, seq):
    # Compressible but distinct; the digest proves the bytes came back intact.
    body = f"{codec}:{seq}:".encode() + b"slipstream " * (seq % 7 + 3)
    return body + hashlib.sha1(body).hexdigest().encode()


def check_value(v):
    body, digest = v[:-40], v[-40:]
    if hashlib.sha1(body).hexdigest().encode() != digest:
        raise AssertionError(f"corrupt message {v[:60]!r}")
    _, seq, _ = body.split(b":", 2)
    return int(seq)


def big_value():
    block = hashlib.sha256(b"big").digest()
    return (block * (BIG // len(block) + 1))[:BIG]


class Tracker:
    """Checks per-partition order and collects what was seen."""

    def __init__(self):
        self.last = {}
        self.seen = set()
        self.first_offset = {}
        self.next_offset = {}

    def add(self, partition, offset, v):
        seq = check_value(v)
        if partition in self.last and seq <= self.last[partition]:
            raise AssertionError(f"partition {partition}: seq {seq} after {self.last[partition]} (out of order)")
        if partition in self.next_offset and offset != self.next_offset[partition]:
            # Offsets are contiguous in a partition: a jump means a skipped record.
            raise AssertionError(f"partition {partition}: offset {offset} after {self.next_offset[partition] - 1}")
        self.last[partition] = seq
        self.first_offset.setdefault(partition, offset)
        self.next_offset[partition] = offset + 1
        if seq in self.seen:
            raise AssertionError(f"duplicate seq {seq}")
        self.seen.add(seq)


def check_resumed(topic, t, committed):
    """Phase 2: the group got exactly the N_AFTER new messages, each partition starting
    at its committed offset (`committed`: partition -> offset, or None when the client
    cannot read committed offsets)."""
    if len(t.seen) != N_AFTER or min(t.seen, default=None) != N:
        fail(f"{topic}: after restart got {len(t.seen)} messages, lowest seq {min(t.seen, default=None)}")
    for part, first in t.first_offset.items():
        if committed is not None and committed.get(part) != first:
            fail(f"{topic}: partition {part} resumed at {first}, committed {committed.get(part)}")
    how = f"exactly after the committed offsets {committed}" if committed is not None else "after its committed offsets"
    ok(f"{topic}: resumed {how} and got the {N_AFTER} new messages")


def check_mid_batch(got, start):
    """A consumer started at offset `start`, inside a 20-record batch whose records carry
    seq 0..19: `got` is its (offset, seq) pairs; it must see start..start+12, no gap, with
    seq 7 first."""
    if [o for o, _ in got] != list(range(start, start + 13)) or got[0][1] != 7:
        fail(f"mid-batch consumer from {start} got {got[:3]}...")
    ok(f"consumer starting at offset {start} inside a 20-record batch saw {start}..{start + 12}, no gap")


def poll_until(consumer, done, on_message, timeout=60):
    """Polls a confluent-kafka consumer until `done()` or `timeout` s, handing each message
    to `on_message`; end-of-partition events are skipped, any other error fails."""
    import time
    from confluent_kafka import KafkaError
    deadline = time.time() + timeout
    while not done() and time.time() < deadline:
        m = consumer.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                continue
            fail(f"consumer error {m.error()}")
        on_message(m)


def ok(msg):
    print(f"ok: {msg}", flush=True)


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def run_phases(phase1, phase2):
    """The suites' command line: --bootstrap HOST:PORT --phase 1|2; prints `done`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--phase", type=int, choices=(1, 2), required=True)
    a = ap.parse_args()
    (phase1 if a.phase == 1 else phase2)(a.bootstrap)
    print("done", flush=True)
