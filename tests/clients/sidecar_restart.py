"""confluent-kafka through a sidecar that is SIGKILLed and restarted mid-stream.

--phase produce: produce paced, acks=all, idempotent, for --seconds, while the test kills
                 and restarts the sidecar; writes every acknowledged (partition, offset,
                 seq) to --out.
--phase verify:  a consumer group reads the topic back through the sidecar: every
                 acknowledged message is there, intact, at its offset.
"""
import argparse
import json
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from common import check_value, fail, ok, poll_until, value

TOPIC = "sidecar-restart"


def produce(bs, seconds, out):
    admin = AdminClient({"bootstrap.servers": bs})
    admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])[TOPIC].result(30)
    acked, errors = [], []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            acked.append((msg.partition(), msg.offset(), check_value(msg.value())))

    p = Producer({"bootstrap.servers": bs, "acks": "all", "enable.idempotence": True, "linger.ms": 2,
                  "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 500, "message.timeout.ms": 60000})
    seq, start = 0, time.time()
    while time.time() - start < seconds:
        for _ in range(20):
            p.produce(TOPIC, key=str(seq).encode(), value=value("restart", seq), on_delivery=report)
            seq += 1
        p.poll(0.01)
    left = p.flush(60)
    if left or errors:
        fail(f"{left} unflushed, errors {errors[:3]}")
    with open(out, "w") as f:
        json.dump(acked, f)
    ok(f"{len(acked)} of {seq} acknowledged across the sidecar's restart")


def verify(bs, path):
    with open(path) as f:
        acked = json.load(f)
    c = Consumer({"bootstrap.servers": bs, "group.id": "restart-check", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([TOPIC])
    got = {}
    poll_until(c, lambda: len(got) >= len(acked),
               lambda m: got.__setitem__((m.partition(), m.offset()), check_value(m.value())))
    c.close()
    missing = [(p, o, s) for p, o, s in acked if got.get((p, o)) != s]
    if missing:
        fail(f"{len(missing)} acknowledged messages missing or altered, e.g. {missing[:5]}")
    ok(f"all {len(acked)} acknowledged messages read back intact after the sidecar's restart")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--phase", choices=["produce", "verify"], required=True)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--acked", required=True)
    a = ap.parse_args()
    if a.phase == "produce":
        produce(a.bootstrap, a.seconds, a.acked)
    else:
        verify(a.bootstrap, a.acked)
    print("done", flush=True)


if __name__ == "__main__":
    main()
