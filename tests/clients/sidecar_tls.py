"""confluent-kafka over TLS to `slipstream sidecar --tls-cert ... --tls-client-ca ...`.

--phase mtls:    with a client certificate: 1,000 messages produced and read back intact.
--phase nocert:  without one: the handshake is refused, nothing gets through.
"""
import argparse
import time

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from common import check_value, fail, ok, poll_until, value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--phase", choices=["mtls", "nocert"], required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    tls = {"bootstrap.servers": a.bootstrap, "security.protocol": "SSL", "ssl.ca.location": a.ca}
    if a.phase == "nocert":
        admin = AdminClient({**tls, "socket.timeout.ms": 3000})
        try:
            md = admin.list_topics(timeout=5)
            fail(f"metadata came back without a client certificate: {md.brokers}")
        except KafkaException as e:
            ok(f"refused without a client certificate ({e.args[0].str()[:60]})")
        print("done", flush=True)
        return
    tls.update({"ssl.certificate.location": a.cert, "ssl.key.location": a.key})
    admin = AdminClient(tls)
    admin.create_topics([NewTopic("tls-topic", num_partitions=2, replication_factor=1)])["tls-topic"].result(30)
    p = Producer({**tls, "acks": "all"})
    for seq in range(1000):
        p.produce("tls-topic", value=value("tls", seq))
    if p.flush(60):
        fail("not everything was acknowledged over TLS")
    c = Consumer({**tls, "group.id": "tls", "auto.offset.reset": "earliest"})
    c.subscribe(["tls-topic"])
    seen = set()
    poll_until(c, lambda: len(seen) >= 1000, lambda m: seen.add(check_value(m.value())))
    c.close()
    if seen != set(range(1000)):
        fail(f"read back {len(seen)} of 1000 over TLS")
    ok("1,000 messages over mutual TLS, read back intact")
    print("done", flush=True)


if __name__ == "__main__":
    main()
