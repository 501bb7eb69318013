"""confluent-kafka or kafka-python against slipstream's secured listeners.

For each way in: SCRAM-SHA-512 and PLAIN over SASL_SSL, SCRAM-SHA-256 over
SASL_PLAINTEXT, and mutual TLS over SSL: a topic created, 300 messages produced with
acks=all and read back intact by a consumer group. Then a wrong password and an unknown
user are refused.
"""
import argparse
import os
import time

from common import check_value, fail, ok, value

N = 300


def confluent(a, way, sec):
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    conf = {"bootstrap.servers": sec["bootstrap"], "security.protocol": sec["protocol"]}
    if "SSL" in sec["protocol"]:
        conf["ssl.ca.location"] = a.ca
    if sec.get("mechanism"):
        conf.update({"sasl.mechanism": sec["mechanism"], "sasl.username": sec["user"], "sasl.password": sec["password"]})
    if sec.get("cert"):
        conf.update({"ssl.certificate.location": sec["cert"], "ssl.key.location": sec["key"]})
    if sec.get("expect_refusal"):
        errors = []
        admin = AdminClient({**conf, "error_cb": errors.append})
        try:
            md = admin.list_topics(timeout=5)
            fail(f"{way}: metadata came back: {md.brokers}")
        except KafkaException:
            pass
        admin.poll(1)
        auth = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
        if not auth:
            fail(f"{way}: no authentication error reported: {[e.str() for e in errors]}")
        ok(f"{way}: refused: {auth[0].str()[:110]}")
        return
    topic = f"sec-{a.client}-{way}"
    admin = AdminClient(conf)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    p = Producer({**conf, "acks": "all", "enable.idempotence": True})
    for seq in range(N):
        p.produce(topic, value=value(way, seq))
    if p.flush(60):
        fail(f"{way}: not everything was acknowledged")
    debug = {"debug": os.environ["RDKAFKA_DEBUG"]} if os.environ.get("RDKAFKA_DEBUG") else {}
    c = Consumer({**conf, **debug, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    seen = set()
    got = []
    deadline = time.time() + 60
    while len(seen) < N and time.time() < deadline:
        m = c.poll(1)
        if m is None:
            continue
        if m.error():
            fail(f"{way}: {m.error()}")
        seen.add(check_value(m.value()))
        got.append((m.partition(), m.offset(), check_value(m.value())))
    c.close()
    if seen != set(range(N)):
        fail(f"{way}: read back {len(seen)} of {N}: {sorted(got)[:20]} {len(got)}")
    ok(f"{way}: {N} messages produced (idempotent, acks=all) and consumed by a group")


def kafka_python(a, way, sec):
    import ssl

    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError

    conf = {"bootstrap_servers": sec["bootstrap"], "security_protocol": sec["protocol"]}
    if "SSL" in sec["protocol"]:
        ctx = ssl.create_default_context(cafile=a.ca)
        if sec.get("cert"):
            ctx.load_cert_chain(sec["cert"], sec["key"])
        conf["ssl_context"] = ctx
    if sec.get("mechanism"):
        conf.update(
            {"sasl_mechanism": sec["mechanism"], "sasl_plain_username": sec["user"], "sasl_plain_password": sec["password"]}
        )
    if sec.get("expect_refusal"):
        try:
            admin = KafkaAdminClient(**conf, request_timeout_ms=5000)
            topics = admin.list_topics()
            fail(f"{way}: topics came back: {topics}")
        except KafkaError as e:
            ok(f"{way}: refused ({type(e).__name__}: {str(e)[:70]})")
        return
    topic = f"sec-{a.client}-{way}"
    admin = KafkaAdminClient(**conf)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()
    p = KafkaProducer(**conf, acks="all")
    futures = [p.send(topic, value(way, seq)) for seq in range(N)]
    for f in futures:
        f.get(timeout=60)
    p.close()
    c = KafkaConsumer(topic, **conf, group_id=f"g-{topic}", auto_offset_reset="earliest", consumer_timeout_ms=30000)
    seen = set()
    for m in c:
        seen.add(check_value(m.value))
        if len(seen) >= N:
            break
    c.commit()
    c.close()
    if seen != set(range(N)):
        fail(f"{way}: read back {len(seen)} of {N}")
    ok(f"{way}: {N} messages produced (acks=all) and consumed by a group")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", choices=["confluent", "kafka-python"], required=True)
    ap.add_argument("--sasl-ssl", required=True)
    ap.add_argument("--sasl-plaintext", required=True)
    ap.add_argument("--ssl", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    a = ap.parse_args()
    run = confluent if a.client == "confluent" else kafka_python
    who = {"user": a.user, "password": a.password}
    ways = [
        ("scram512", {"bootstrap": a.sasl_ssl, "protocol": "SASL_SSL", "mechanism": "SCRAM-SHA-512", **who}),
        ("plain", {"bootstrap": a.sasl_ssl, "protocol": "SASL_SSL", "mechanism": "PLAIN", **who}),
        ("scram256", {"bootstrap": a.sasl_plaintext, "protocol": "SASL_PLAINTEXT", "mechanism": "SCRAM-SHA-256", **who}),
        ("mtls", {"bootstrap": a.ssl, "protocol": "SSL", "cert": a.cert, "key": a.key}),
        (
            "wrong-password",
            {"bootstrap": a.sasl_ssl, "protocol": "SASL_SSL", "mechanism": "SCRAM-SHA-512", "user": a.user,
             "password": a.password + "x", "expect_refusal": True},
        ),
        (
            "unknown-user-plain",
            {"bootstrap": a.sasl_ssl, "protocol": "SASL_SSL", "mechanism": "PLAIN", "user": "nobody",
             "password": a.password, "expect_refusal": True},
        ),
    ]
    for way, sec in ways:
        run(a, way, sec)
    print("done", flush=True)


if __name__ == "__main__":
    main()
