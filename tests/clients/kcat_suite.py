"""kcat (Debian's, librdkafka 2.0.2: an older client with strict ApiVersions parsing).

kcat cannot create topics: the broker runs with --default-partitions 3 and topics are
auto-created by the producer's metadata request. Same phases as confluent_suite.py.
"""
import subprocess

from common import (BIG, N, N_AFTER, Tracker, big_value, check_mid_batch, check_resumed, check_value, fail, ok,
                    run_phases, value)

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def kcat(bs, *args, stdin=None, timeout=120):
    cmd = ["kcat", "-b", bs, "-X", "broker.version.fallback=2.0.0", *args]
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    if r.returncode != 0:
        fail(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
    return r.stdout


def produce(bs, topic, codec, seqs, extra=()):
    lines = b"".join(f"k{seq % 13}:".encode() + value(codec, seq) + b"\n" for seq in seqs)
    kcat(bs, "-P", "-t", topic, "-K:", "-z", codec, "-X", "acks=all", *extra, stdin=lines)


def consume_group(bs, topic, group, count):
    out = kcat(bs, "-G", group, "-X", "auto.offset.reset=earliest", "-X", "enable.auto.commit=true",
               "-X", "auto.commit.interval.ms=100", "-e", "-q", "-f", "%p %o %s\n", topic)
    t = Tracker()
    for line in out.splitlines():
        p, o, v = line.split(b" ", 2)
        t.add(int(p), int(o), v)
    if len(t.seen) != count:
        fail(f"{topic}: consumed {len(t.seen)} of {count}")
    return t


def phase1(bs):
    for codec in CODECS:
        topic = f"kc-{codec}"
        produce(bs, topic, codec, range(N))
        md = kcat(bs, "-L", "-t", topic).decode()
        if "3 partitions" not in md:
            fail(f"{topic}: metadata {md}")
        consume_group(bs, topic, f"kc-g-{codec}", N)
        ok(f"{topic}: {N} produced (acks=all, {codec}), consumed in order through group kc-g-{codec}")

    big = big_value()
    # kcat reads lines: the big value has no newline bytes by construction (sha256 blocks
    # may contain 0x0a, so use the file-as-message mode instead).
    with open("/tmp/kcat-big.bin", "wb") as f:
        f.write(big)
    kcat(bs, "-P", "-t", "kc-big", "-p", "0", "-X", "acks=all",
         "-X", "message.max.bytes=4000000", "/tmp/kcat-big.bin")
    out = kcat(bs, "-C", "-t", "kc-big", "-p", "0", "-o", "0", "-c", "1", "-e", "-q", "-D", "",
               "-X", "fetch.max.bytes=8000000", "-X", "receive.message.max.bytes=16000000")
    if out != big:
        fail(f"1 MiB message came back as {len(out)} bytes")
    ok(f"1 MiB message ({BIG} bytes) round-tripped intact")

    lines = b"".join(value("mid", seq) + b"\n" for seq in range(20))
    kcat(bs, "-P", "-t", "kc-mid", "-p", "0", "-X", "linger.ms=200", stdin=lines)
    out = kcat(bs, "-C", "-t", "kc-mid", "-p", "0", "-o", "7", "-c", "13", "-e", "-q", "-f", "%o %s\n")
    got = [(int(o), check_value(v)) for o, v in (l.split(b" ", 1) for l in out.splitlines())]
    check_mid_batch(got, 7)


def phase2(bs):
    for codec in CODECS:
        topic = f"kc-{codec}"
        produce(bs, topic, codec, range(N, N + N_AFTER))
        # kcat cannot read committed offsets; getting exactly the new messages shows it.
        check_resumed(topic, consume_group(bs, topic, f"kc-g-{codec}", N_AFTER), None)


if __name__ == "__main__":
    run_phases(phase1, phase2)
