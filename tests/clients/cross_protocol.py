"""The Kafka half of the cross-protocol round trip (confluent-kafka, librdkafka 2.x).

  python3 cross_protocol.py --bootstrap HOST:PORT --phase read|write

read: the 100 messages ali-ons sent to `cross-r2k` (ons_suite.js cross-send) read as Kafka
  records: body = value, KEYS = key, properties = headers.
write: 100 records to `cross-k2r`, key kk-i, headers TAGS (TagK for even i) and origin,
  which ons_suite.js cross-receive reads with a TagK subscription.
"""
import argparse
import sys

from confluent_kafka import Consumer, Producer


def read(bootstrap):
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "cross-kafka-reader",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    c.subscribe(["cross-r2k"])
    seen = {}
    polls = 0
    while len(seen) < 100 and polls < 600:
        polls += 1
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            raise AssertionError(f"consume error: {m.error()}")
        seen[m.value().decode()] = m
    c.close()
    assert len(seen) == 100, f"read {len(seen)} of the 100 RocketMQ messages"
    for i in range(100):
        m = seen[f"from-rocketmq-{i}"]
        assert m.key() == f"rk-{i}".encode(), f"key {m.key()!r}"
        headers = {k: v for k, v in (m.headers() or [])}
        assert headers.get("TAGS") == b"TagX", f"headers {headers}"
        assert headers.get("KEYS") == f"rk-{i}".encode(), f"headers {headers}"
        assert headers.get("user_prop") == f"v{i}".encode(), f"headers {headers}"
    print("read 100 RocketMQ messages as Kafka records")


def write(bootstrap):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(100):
        tag = b"TagK" if i % 2 == 0 else b"TagJ"
        p.produce("cross-k2r", key=f"kk-{i}", value=f"from-kafka-{i}",
                  headers=[("TAGS", tag), ("origin", b"kafka")])
    assert p.flush(30) == 0, "records left unacknowledged"
    print("wrote 100 Kafka records")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--phase", choices=["read", "write"], required=True)
    a = ap.parse_args()
    (read if a.phase == "read" else write)(a.bootstrap)
    print("done")


if __name__ == "__main__":
    sys.exit(main())
