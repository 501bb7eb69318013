"""Kafka's SCRAM admin APIs through confluent-kafka's AdminClient, over SASL_PLAINTEXT.

Default: describe every user (alice, made by `slipstream users add`), create bob with
SCRAM-SHA-256 (8192 iterations) by AlterUserScramCredentials and log in as bob, and see
Kafka's errors for an unknown user, a credential that does not exist and too few
iterations.
--after-removal: alice's SCRAM-SHA-512 credential was removed by `slipstream users
remove`: SCRAM-SHA-512 is refused, SCRAM-SHA-256 and PLAIN still log in.
"""
import argparse

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from common import fail, ok


def admin(bootstrap, mechanism, user, password, errors=None):
    conf = {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": mechanism,
        "sasl.username": user,
        "sasl.password": password,
    }
    if errors is not None:
        conf["error_cb"] = errors.append
    return AdminClient(conf)


def logs_in(bootstrap, mechanism, user, password):
    errors = []
    a = admin(bootstrap, mechanism, user, password, errors)
    try:
        a.list_topics(timeout=5)
        return True
    except KafkaException:
        a.poll(1)
        if not any(e.code() == KafkaError._AUTHENTICATION for e in errors):
            fail(f"{user}/{mechanism}: failed, but not as an authentication failure: {[e.str() for e in errors]}")
        return False


def error_of(future):
    try:
        future.result(10)
        return None
    except KafkaException as e:
        return e.args[0].code()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--after-removal", action="store_true")
    a = ap.parse_args()
    if a.after_removal:
        if logs_in(a.bootstrap, "SCRAM-SHA-512", a.user, a.password):
            fail("SCRAM-SHA-512 still logs in after its credential was removed")
        for m in ("SCRAM-SHA-256", "PLAIN"):
            if not logs_in(a.bootstrap, m, a.user, a.password):
                fail(f"{m} refused after another mechanism's credential was removed")
        ok("after `slipstream users remove`: SCRAM-SHA-512 refused, SCRAM-SHA-256 and PLAIN log in")
        print("done", flush=True)
        return

    adm = admin(a.bootstrap, "SCRAM-SHA-512", a.user, a.password)
    everyone = adm.describe_user_scram_credentials().result(10)
    infos = {(i.mechanism, i.iterations) for i in everyone[a.user].scram_credential_infos}
    if infos != {(ScramMechanism.SCRAM_SHA_256, 4096), (ScramMechanism.SCRAM_SHA_512, 4096)}:
        fail(f"{a.user}: described as {infos}")
    ok(f"described {a.user}: SCRAM-SHA-256 and SCRAM-SHA-512, 4096 iterations")

    bob = UserScramCredentialUpsertion("bob", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 8192), b"bob-pw")
    adm.alter_user_scram_credentials([bob])["bob"].result(10)
    desc = adm.describe_user_scram_credentials(["bob", "nobody"])
    bob_infos = [(i.mechanism, i.iterations) for i in desc["bob"].result(10).scram_credential_infos]
    if bob_infos != [(ScramMechanism.SCRAM_SHA_256, 8192)]:
        fail(f"bob described as {bob_infos}")
    if error_of(desc["nobody"]) != KafkaError.RESOURCE_NOT_FOUND:
        fail("an unknown user was not RESOURCE_NOT_FOUND")
    if not logs_in(a.bootstrap, "SCRAM-SHA-256", "bob", "bob-pw"):
        fail("bob cannot log in with the credential the admin API made")
    if logs_in(a.bootstrap, "SCRAM-SHA-256", "bob", "bob-pw-not"):
        fail("bob logs in with a wrong password")
    ok("bob made by AlterUserScramCredentials logs in with SCRAM-SHA-256; an unknown user is RESOURCE_NOT_FOUND")

    gone = UserScramCredentialDeletion("bob", ScramMechanism.SCRAM_SHA_512)
    if error_of(adm.alter_user_scram_credentials([gone])["bob"]) != KafkaError.RESOURCE_NOT_FOUND:
        fail("deleting a credential that does not exist was not RESOURCE_NOT_FOUND")
    weak = UserScramCredentialUpsertion("carol", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 100), b"pw")
    if error_of(adm.alter_user_scram_credentials([weak])["carol"]) != KafkaError.UNACCEPTABLE_CREDENTIAL:
        fail("100 iterations were not UNACCEPTABLE_CREDENTIAL")
    ok("Kafka's errors: RESOURCE_NOT_FOUND for a missing credential, UNACCEPTABLE_CREDENTIAL for 100 iterations")
    print("done", flush=True)


if __name__ == "__main__":
    main()
