"""ACLs through confluent-kafka (broker run with --authorizer acl --super-users User:admin).

admin (a super user, SCRAM) grants and revokes with CreateAcls/DeleteAcls; alice (SCRAM)
and a mutual-TLS client (User:CN=client) are refused, then allowed, per resource type:
- topic: produce refused (TOPIC_AUTHORIZATION_FAILED) until WRITE on the topic;
- group: consume refused (GROUP_AUTHORIZATION_FAILED) with READ on the topic alone,
  allowed once READ on a prefixed group pattern is granted;
- cluster: topic creation refused until CREATE on the cluster;
- a deny wins over an allow; DeleteAcls restores the refusal; DescribeAcls lists;
- the certificate's subject is the principal on the SSL listener.
"""
import argparse
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from common import fail, ok

TOPIC = "acl-orders"


def sasl(a, user, password):
    return {
        "bootstrap.servers": a.sasl_ssl,
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": a.ca,
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": user,
        "sasl.password": password,
    }


def produce(conf, n=20):
    """The delivery errors of n messages (empty: all delivered)."""
    errors = []
    p = Producer({**conf, "acks": "all", "message.timeout.ms": 10000})
    for i in range(n):
        p.produce(TOPIC, value=b"m%d" % i, on_delivery=lambda e, m: e and errors.append(e.code()))
    p.flush(30)
    return errors


def consume(conf, group, want):
    """(messages read, errors seen) within 20 s."""
    errors = []
    c = Consumer({**conf, "group.id": group, "auto.offset.reset": "earliest", "error_cb": lambda e: errors.append(e.code())})
    c.subscribe([TOPIC])
    n = 0
    deadline = time.time() + 20
    while n < want and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            errors.append(m.error().code())
            if m.error().code() in (KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED):
                break
            continue
        n += 1
    c.close()
    return n, errors


def grant(admin, *bindings):
    for b, f in admin.create_acls(list(bindings)).items():
        f.result(10)


def allow(rt, name, principal, op, pattern=ResourcePatternType.LITERAL, perm=AclPermissionType.ALLOW):
    return AclBinding(rt, name, pattern, principal, "*", op, perm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sasl-ssl", required=True)
    ap.add_argument("--ssl", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    admin = AdminClient(sasl(a, "admin", "admin-pw"))
    alice = sasl(a, "alice", "alice-secret")
    alice_admin = AdminClient(alice)
    admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])[TOPIC].result(30)

    # ACL APIs are the cluster's: alice may not use them.
    futures = alice_admin.create_acls([allow(ResourceType.TOPIC, TOPIC, "User:alice", AclOperation.ALL)])
    for f in futures.values():
        try:
            f.result(10)
            fail("alice created an ACL")
        except KafkaException as e:
            if e.args[0].code() != KafkaError.CLUSTER_AUTHORIZATION_FAILED:
                fail(f"CreateAcls by alice: {e}")
    ok("CreateAcls by a non-super-user: CLUSTER_AUTHORIZATION_FAILED")

    # Topic: WRITE.
    errors = produce(alice)
    if set(errors) != {KafkaError.TOPIC_AUTHORIZATION_FAILED}:
        fail(f"produce without WRITE: {errors}")
    grant(admin, allow(ResourceType.TOPIC, TOPIC, "User:alice", AclOperation.WRITE))
    if produce(alice):
        fail("produce with WRITE on the topic failed")
    ok("produce: TOPIC_AUTHORIZATION_FAILED, then delivered once WRITE was granted")

    # Group: READ on the topic alone is not enough to consume in a group.
    grant(admin, allow(ResourceType.TOPIC, TOPIC, "User:alice", AclOperation.READ))
    n, errors = consume(alice, "acl-group-1", 20)
    if n or KafkaError.GROUP_AUTHORIZATION_FAILED not in errors:
        fail(f"consume without READ on the group: {n} read, errors {errors}")
    grant(admin, allow(ResourceType.GROUP, "acl-group-", "User:alice", AclOperation.READ, ResourcePatternType.PREFIXED))
    n, errors = consume(alice, "acl-group-1", 20)
    if n != 20:
        fail(f"consume with READ on the group: {n} read, errors {errors}")
    ok("consume: GROUP_AUTHORIZATION_FAILED, then 20 read once READ on the prefixed group pattern was granted")

    # A deny wins.
    deny = allow(ResourceType.TOPIC, TOPIC, "User:alice", AclOperation.READ, perm=AclPermissionType.DENY)
    grant(admin, deny)
    n, errors = consume(alice, "acl-group-2", 20)
    if n or KafkaError.TOPIC_AUTHORIZATION_FAILED not in errors:
        fail(f"consume with a DENY on the topic: {n} read, errors {errors}")
    listed = admin.describe_acls(
        AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, "User:alice", None, AclOperation.ANY,
                         AclPermissionType.ANY)
    ).result(10)
    if len(listed) != 4:
        fail(f"DescribeAcls for alice: {listed}")
    deleted = admin.delete_acls(
        [AclBindingFilter(ResourceType.TOPIC, TOPIC, ResourcePatternType.LITERAL, "User:alice", "*", AclOperation.READ,
                          AclPermissionType.DENY)]
    )
    for f in deleted.values():
        if len(f.result(10)) != 1:
            fail("DeleteAcls removed other than the one DENY")
    n, errors = consume(alice, "acl-group-2", 20)
    if n != 20:
        fail(f"consume after the DENY was deleted: {n}, {errors}")
    ok("a DENY on the topic wins over the ALLOW; DescribeAcls lists 4 bindings; DeleteAcls lifts the DENY")

    # Cluster: CREATE.
    try:
        alice_admin.create_topics([NewTopic("alice-made", num_partitions=1, replication_factor=1)])["alice-made"].result(10)
        fail("alice created a topic without CREATE")
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_AUTHORIZATION_FAILED:
            fail(f"CreateTopics without CREATE: {e}")
    grant(admin, allow(ResourceType.BROKER, "kafka-cluster", "User:alice", AclOperation.CREATE))
    alice_admin.create_topics([NewTopic("alice-made", num_partitions=1, replication_factor=1)])["alice-made"].result(10)
    ok("create topic: TOPIC_AUTHORIZATION_FAILED, then created once CREATE on the cluster was granted")

    # Mutual TLS: the certificate's subject is the principal.
    mtls = {
        "bootstrap.servers": a.ssl,
        "security.protocol": "SSL",
        "ssl.ca.location": a.ca,
        "ssl.certificate.location": a.cert,
        "ssl.key.location": a.key,
    }
    if produce(mtls, 5) != [KafkaError.TOPIC_AUTHORIZATION_FAILED] * 5:
        fail("the mTLS client produced without WRITE")
    grant(admin, allow(ResourceType.TOPIC, TOPIC, "User:CN=client", AclOperation.WRITE))
    if produce(mtls, 5):
        fail("the mTLS client could not produce with WRITE granted to User:CN=client")
    ok("mutual TLS: refused, then allowed once User:CN=client was granted WRITE")
    print("done", flush=True)


if __name__ == "__main__":
    main()
