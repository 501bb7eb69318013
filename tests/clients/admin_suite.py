"""Admin and offset APIs through confluent-kafka's AdminClient and consumer:
CreateTopics (with configs), DescribeConfigs, CreatePartitions, DescribeCluster,
ListGroups, DescribeGroups, OffsetFetch for a group, ListOffsets (earliest, latest,
by timestamp), acks=0, DeleteTopics; and the errors for bad requests."""
import argparse
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic

from common import fail, ok


def expect_error(code, what, fn):
    """`fn` must fail with the Kafka error named `code`."""
    try:
        fn()
    except KafkaException as e:
        if e.args[0].name() != code:
            fail(f"{what}: {e} (wanted {code})")
        return
    fail(f"{what} succeeded")


def main(bs):
    admin = AdminClient({"bootstrap.servers": bs})
    fs = admin.create_topics([NewTopic("adm-a", 2, 1, config={"retention.ms": "3600000"}), NewTopic("adm-b", 1, 1)])
    for f in fs.values():
        f.result(10)
    expect_error("TOPIC_ALREADY_EXISTS", "creating an existing topic",
                 lambda: admin.create_topics([NewTopic("adm-a", 2, 1)])["adm-a"].result(10))
    expect_error("INVALID_REPLICATION_FACTOR", "replication factor 3 on one broker",
                 lambda: admin.create_topics([NewTopic("adm-rf", 1, 3)])["adm-rf"].result(10))
    ok("CreateTopics: created, duplicate and impossible replication refused with their codes")

    res = admin.describe_configs([ConfigResource("topic", "adm-a")])
    cfg = list(res.values())[0].result(10)
    if cfg["retention.ms"].value != "3600000" or cfg["cleanup.policy"].value != "delete":
        fail(f"DescribeConfigs: {[(k, v.value) for k, v in cfg.items()]}")
    ok(f"DescribeConfigs: retention.ms={cfg['retention.ms'].value} (set at creation), {len(cfg)} entries")

    admin.create_partitions([NewPartitions("adm-a", 4)])["adm-a"].result(10)
    md = admin.list_topics("adm-a", timeout=10)
    if len(md.topics["adm-a"].partitions) != 4:
        fail(f"CreatePartitions: metadata shows {len(md.topics['adm-a'].partitions)}")
    expect_error("INVALID_PARTITIONS", "shrinking partitions",
                 lambda: admin.create_partitions([NewPartitions("adm-a", 2)])["adm-a"].result(10))
    ok("CreatePartitions: 2 -> 4, shrinking refused")

    cluster = admin.describe_cluster().result(10)
    if len(cluster.nodes) != 1 or cluster.controller is None:
        fail(f"DescribeCluster: {cluster}")
    ok(f"DescribeCluster: cluster {cluster.cluster_id}, nodes {[n.id for n in cluster.nodes]}")

    # Timestamps: three messages at known CreateTimes, then ListOffsets by time.
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 0})
    base = int(time.time() * 1000) - 10_000
    for i in range(3):
        p.produce("adm-b", value=f"t{i}".encode(), partition=0, timestamp=base + i * 1000)
        p.flush(10)
    c = Consumer({"bootstrap.servers": bs, "group.id": "adm-g", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    lo, hi = c.get_watermark_offsets(TopicPartition("adm-b", 0), timeout=10)
    if (lo, hi) != (0, 3):
        fail(f"ListOffsets earliest/latest: {(lo, hi)}")
    found = c.offsets_for_times([TopicPartition("adm-b", 0, base + 1000)], timeout=10)[0].offset
    beyond = c.offsets_for_times([TopicPartition("adm-b", 0, base + 99_000)], timeout=10)[0].offset
    if found != 1 or beyond != -1:
        fail(f"ListOffsets by time: {found}, beyond the end {beyond}")
    ok("ListOffsets: earliest 0, latest 3, by timestamp -> offset 1, after the last -> -1")

    # acks=0: no answer comes, but the message lands.
    p0 = Producer({"bootstrap.servers": bs, "acks": "0"})
    p0.produce("adm-b", value=b"fire-and-forget", partition=0)
    p0.flush(10)
    deadline = time.time() + 10
    while time.time() < deadline and c.get_watermark_offsets(TopicPartition("adm-b", 0), timeout=10)[1] != 4:
        time.sleep(0.1)
    if c.get_watermark_offsets(TopicPartition("adm-b", 0), timeout=10)[1] != 4:
        fail("acks=0 message never landed")
    ok("acks=0 produce landed without an answer")

    # A group with a committed offset shows up in ListGroups / DescribeGroups / OffsetFetch.
    c.subscribe(["adm-b"])
    got = 0
    deadline = time.time() + 20
    while got < 4 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got += 1
    c.commit(asynchronous=False)
    groups = admin.list_consumer_groups().result(10)
    if "adm-g" not in [g.group_id for g in groups.valid]:
        fail(f"ListGroups: {[g.group_id for g in groups.valid]}")
    desc = admin.describe_consumer_groups(["adm-g"])["adm-g"].result(10)
    if str(desc.state).split(".")[-1] != "STABLE" or len(desc.members) != 1:
        fail(f"DescribeGroups: {desc.state} {desc.members}")
    from confluent_kafka import ConsumerGroupTopicPartitions
    offs = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions("adm-g")])["adm-g"].result(10)
    if [(tp.topic, tp.partition, tp.offset) for tp in offs.topic_partitions] != [("adm-b", 0, 4)]:
        fail(f"OffsetFetch: {offs.topic_partitions}")
    c.close()
    ok("ListGroups, DescribeGroups (Stable, 1 member) and OffsetFetch (adm-b/0 at 4)")

    admin.delete_topics(["adm-a"])["adm-a"].result(10)
    if "adm-a" in admin.list_topics(timeout=10).topics:
        fail("DeleteTopics: still listed")
    expect_error("UNKNOWN_TOPIC_OR_PART", "deleting a missing topic",
                 lambda: admin.delete_topics(["adm-a"])["adm-a"].result(10))
    ok("DeleteTopics: gone from metadata; deleting again is UNKNOWN_TOPIC_OR_PARTITION")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    main(ap.parse_args().bootstrap)
    print("done", flush=True)
