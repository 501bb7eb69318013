//! Any bytes as a client's side of a SASL exchange (PLAIN, or SCRAM's client-first and
//! client-final messages, with a well-formed client-first half the time so the final
//! message's checks are reached): the server must refuse or accept, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slipstream::broker::users::{Mechanism, SaslServer, ScramCredential, Users};
use std::sync::OnceLock;

fn users() -> &'static Users {
    static USERS: OnceLock<(tempfile::TempDir, Users)> = OnceLock::new();
    &USERS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let users = Users::open(dir.path()).expect("users");
            users
                .update(|e| {
                    for m in Mechanism::SCRAM {
                        let c = ScramCredential::from_password(m, "pw", 4096).expect("credential");
                        e.set("u", m, c).expect("set");
                    }
                })
                .expect("update");
            (dir, users)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let mech = [Mechanism::Plain, Mechanism::ScramSha256, Mechanism::ScramSha512][first as usize % 3];
    let mut server = SaslServer::new(mech);
    if mech != Mechanism::Plain && first & 0x80 != 0 {
        if server.step(users(), b"n,,n=u,r=fuzznonce").is_err() {
            return;
        }
        let _ = server.step(users(), rest);
        return;
    }
    let mut parts = rest.splitn(2, |b| *b == 0xff);
    for part in parts.by_ref() {
        if server.step(users(), part).is_err() {
            return;
        }
    }
});
