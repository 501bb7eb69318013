//! SASL on Kafka listeners, and the SCRAM admin APIs.
//!
//! A connection to a `SASL_*` listener starts in [`Auth::Handshake`]: ApiVersions and
//! SaslHandshake are all it may send. SaslHandshake v1 picks the mechanism, and
//! SaslAuthenticate requests (v0–v2) carry the exchange; SaslHandshake v0 (older clients)
//! means the exchange follows as bare length-prefixed tokens, no Kafka header. The
//! exchange itself is [`crate::broker::users::SaslServer`]'s. A wrong password, a
//! mechanism not offered, a handshake out of turn or any other request before
//! authentication gets Kafka's error and the connection is closed after it, logged with
//! the peer (never the client's bytes: PLAIN carries the password).
//!
//! # Invariants
//! - A connection is authenticated only by a completed exchange; the principal is
//!   `User:<name>` of that exchange and never changes afterwards (no re-authentication:
//!   `session_lifetime_ms` is 0).

use bytes::Bytes;
use kafka_protocol::messages::alter_user_scram_credentials_response::AlterUserScramCredentialsResult;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResult,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse, DescribeUserScramCredentialsRequest,
    DescribeUserScramCredentialsResponse, ResponseKind, SaslAuthenticateRequest, SaslAuthenticateResponse,
    SaslHandshakeRequest, SaslHandshakeResponse,
};
use std::collections::{BTreeMap, BTreeSet};

use super::acls::allowed_on_cluster;
use super::{sb, Ctx, ErrorCode, Outcome};
use crate::broker::acl::Operation;
use crate::broker::users::{
    AuthError, Mechanism, SaslServer, SaslStep, ScramCredential, Users, MAX_ITERATIONS, MIN_ITERATIONS,
};

/// Where a connection is in authentication.
pub enum Auth {
    /// Authenticated, or no SASL on this listener.
    Done,
    /// Waiting for SaslHandshake.
    Handshake,
    /// SaslHandshake v1 done: SaslAuthenticate requests carry the exchange.
    Authenticate(SaslServer),
    /// SaslHandshake v0 done: the exchange comes as bare tokens.
    RawTokens(SaslServer),
}

/// What the session does after answering.
pub enum Verdict {
    /// Keep serving.
    Continue,
    /// Authenticated as this user.
    Authenticated(String),
    /// Close the connection after the answer (logged with the peer).
    Refuse(String),
}

pub fn handshake(
    auth: &mut Auth,
    offered: &[Mechanism],
    version: i16,
    r: SaslHandshakeRequest,
) -> (ResponseKind, Verdict) {
    let mut resp = SaslHandshakeResponse::default();
    resp.mechanisms = offered.iter().map(|m| sb(m.name())).collect();
    let verdict = match auth {
        Auth::Handshake => match r.mechanism.parse::<Mechanism>() {
            Ok(m) if offered.contains(&m) => {
                let server = SaslServer::new(m);
                *auth = if version == 0 { Auth::RawTokens(server) } else { Auth::Authenticate(server) };
                Verdict::Continue
            }
            _ => {
                resp.error_code = ErrorCode::UnsupportedSaslMechanism.code();
                Verdict::Refuse(format!("SASL mechanism '{}' is not offered here", r.mechanism.as_str()))
            }
        },
        // As Kafka's request handler answers it once a connection is past authentication
        // (or on a listener without SASL): an error, the connection stays.
        Auth::Done => {
            resp.error_code = ErrorCode::IllegalSaslState.code();
            Verdict::Continue
        }
        Auth::Authenticate(_) | Auth::RawTokens(_) => {
            resp.error_code = ErrorCode::IllegalSaslState.code();
            Verdict::Refuse("a second SaslHandshake during authentication".into())
        }
    };
    (resp.into(), verdict)
}

pub fn authenticate(auth: &mut Auth, users: &Users, r: SaslAuthenticateRequest) -> (ResponseKind, Verdict) {
    let mut resp = SaslAuthenticateResponse::default();
    let Auth::Authenticate(server) = auth else {
        resp.error_code = ErrorCode::IllegalSaslState.code();
        let done = matches!(auth, Auth::Done);
        resp.error_message = Some(sb(if done {
            "SaslAuthenticate request received after successful authentication"
        } else {
            "SaslAuthenticate request before SaslHandshake"
        }));
        let verdict =
            if done { Verdict::Continue } else { Verdict::Refuse("SaslAuthenticate before SaslHandshake".into()) };
        return (resp.into(), verdict);
    };
    let (bytes, verdict) = exchange(auth_step(server, users, &r.auth_bytes));
    match &verdict {
        Verdict::Refuse(_) => {
            resp.error_code = ErrorCode::SaslAuthenticationFailed.code();
            resp.error_message = Some(sb(&format!(
                "Authentication failed during authentication due to invalid credentials with SASL mechanism {}",
                server.mechanism()
            )));
        }
        Verdict::Authenticated(_) => *auth = Auth::Done,
        Verdict::Continue => {}
    }
    resp.auth_bytes = bytes;
    (resp.into(), verdict)
}

/// A bare token after SaslHandshake v0; the answer is a bare token too. A failure is
/// told by closing (v0 has no error field).
pub fn raw_token(auth: &mut Auth, users: &Users, token: &[u8]) -> (Bytes, Verdict) {
    let Auth::RawTokens(server) = auth else {
        return (Bytes::new(), Verdict::Refuse("a SASL token out of turn".into()));
    };
    let (bytes, verdict) = exchange(auth_step(server, users, token));
    if let Verdict::Authenticated(_) = verdict {
        *auth = Auth::Done;
    }
    (bytes, verdict)
}

fn auth_step(server: &mut SaslServer, users: &Users, input: &[u8]) -> (Mechanism, Result<SaslStep, AuthError>) {
    (server.mechanism(), server.step(users, input))
}

fn exchange((mech, step): (Mechanism, Result<SaslStep, AuthError>)) -> (Bytes, Verdict) {
    match step {
        Ok(SaslStep::Continue(b)) => (Bytes::from(b), Verdict::Continue),
        Ok(SaslStep::Done { user, response }) => (Bytes::from(response), Verdict::Authenticated(user)),
        Err(e) => (Bytes::new(), Verdict::Refuse(format!("{mech} authentication failed: {e}"))),
    }
}

/// DescribeUserScramCredentials: the named users (every user if none is named).
pub fn describe_credentials(ctx: &Ctx<'_>, r: DescribeUserScramCredentialsRequest) -> Outcome {
    if !allowed_on_cluster(ctx, Operation::Describe) {
        let mut resp = DescribeUserScramCredentialsResponse::default();
        resp.error_code = ErrorCode::ClusterAuthorizationFailed.code();
        resp.error_message = Some(sb("Cluster authorization failed."));
        return Outcome::respond(resp);
    }
    let users = &ctx.broker.users;
    let all: BTreeMap<String, Vec<(Mechanism, u32)>> = users.list().into_iter().collect();
    let mut resp = DescribeUserScramCredentialsResponse::default();
    let info = |creds: &[(Mechanism, u32)]| {
        creds
            .iter()
            .map(|(m, i)| {
                let mut c = CredentialInfo::default();
                c.mechanism = m.kafka_id();
                c.iterations = *i as i32;
                c
            })
            .collect()
    };
    match r.users.filter(|u| !u.is_empty()) {
        None => {
            for (name, creds) in &all {
                let mut res = DescribeUserScramCredentialsResult::default();
                res.user = sb(name);
                res.credential_infos = info(creds);
                resp.results.push(res);
            }
        }
        Some(asked) => {
            let mut seen = BTreeSet::new();
            let duplicated: BTreeSet<&str> =
                asked.iter().map(|u| u.name.as_str()).filter(|n| !seen.insert(*n)).collect();
            let mut done = BTreeSet::new();
            for u in &asked {
                let name = u.name.as_str();
                if !done.insert(name) {
                    continue;
                }
                let mut res = DescribeUserScramCredentialsResult::default();
                res.user = sb(name);
                if duplicated.contains(name) {
                    res.error_code = ErrorCode::DuplicateResource.code();
                    res.error_message = Some(sb(&format!(
                        "Cannot describe SCRAM credentials for the same user twice in a single request: {name}"
                    )));
                } else if let Some(creds) = all.get(name) {
                    res.credential_infos = info(creds);
                } else {
                    res.error_code = ErrorCode::ResourceNotFound.code();
                    res.error_message =
                        Some(sb(&format!("Attempt to describe a user credential that does not exist: {name}")));
                }
                resp.results.push(res);
            }
        }
    }
    Outcome::respond(resp)
}

/// AlterUserScramCredentials (on the file worker: it writes the users file). Each user's
/// changes are checked first and applied together; one result per user.
pub fn alter_credentials(ctx: &Ctx<'_>, r: AlterUserScramCredentialsRequest) -> Outcome {
    if !allowed_on_cluster(ctx, Operation::Alter) {
        let mut resp = AlterUserScramCredentialsResponse::default();
        let names: BTreeSet<&str> =
            r.deletions.iter().map(|d| d.name.as_str()).chain(r.upsertions.iter().map(|u| u.name.as_str())).collect();
        for user in names {
            let mut res = AlterUserScramCredentialsResult::default();
            res.user = sb(user);
            res.error_code = ErrorCode::ClusterAuthorizationFailed.code();
            res.error_message = Some(sb("Cluster authorization failed."));
            resp.results.push(res);
        }
        return Outcome::respond(resp);
    }
    let mut errors: BTreeMap<String, (ErrorCode, String)> = BTreeMap::new();
    let mut fail = |user: &str, code: ErrorCode, why: String| {
        errors.entry(user.to_string()).or_insert((code, why));
    };
    let mut order: Vec<String> = Vec::new();
    let mut note = |u: &str| {
        if !order.iter().any(|o| o == u) {
            order.push(u.to_string());
        }
    };
    let mut pairs = BTreeSet::new();
    for d in &r.deletions {
        let name = d.name.as_str();
        note(name);
        match Mechanism::from_kafka_id(d.mechanism) {
            _ if name.is_empty() => fail(name, ErrorCode::UnacceptableCredential, "Username must not be empty".into()),
            None => fail(name, ErrorCode::UnsupportedSaslMechanism, format!("Unknown SCRAM mechanism {}", d.mechanism)),
            Some(m) if !pairs.insert((name, m)) => fail(
                name,
                ErrorCode::DuplicateResource,
                format!("A user credential cannot be altered twice in the same request: {name}"),
            ),
            Some(_) => {}
        }
    }
    for u in &r.upsertions {
        let name = u.name.as_str();
        note(name);
        let mech = Mechanism::from_kafka_id(u.mechanism);
        match mech {
            _ if name.is_empty() => fail(name, ErrorCode::UnacceptableCredential, "Username must not be empty".into()),
            None => fail(name, ErrorCode::UnsupportedSaslMechanism, format!("Unknown SCRAM mechanism {}", u.mechanism)),
            // Deletions went in first: the same credential deleted and upserted is a duplicate.
            Some(m) if !pairs.insert((name, m)) => fail(
                name,
                ErrorCode::DuplicateResource,
                format!("A user credential cannot be altered twice in the same request: {name}"),
            ),
            Some(_) if !(MIN_ITERATIONS as i32..=MAX_ITERATIONS as i32).contains(&u.iterations) => fail(
                name,
                ErrorCode::UnacceptableCredential,
                format!("Iterations {} must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}", u.iterations),
            ),
            Some(m) if u.salted_password.len() != m.key_len() || u.salt.is_empty() => fail(
                name,
                ErrorCode::UnacceptableCredential,
                format!("A {m} salted password is {} bytes, with a salt", m.key_len()),
            ),
            Some(_) => {}
        }
    }
    let outcome = ctx.broker.users.update(|edit| {
        let mut missing = Vec::new();
        for d in &r.deletions {
            let name = d.name.as_str();
            if let Some(m) = Mechanism::from_kafka_id(d.mechanism) {
                if !errors.contains_key(name) && !edit.has(name, m) {
                    missing.push(name.to_string());
                }
            }
        }
        for name in missing {
            errors.entry(name.clone()).or_insert((
                ErrorCode::ResourceNotFound,
                format!("Attempt to delete a user credential that does not exist: {name}"),
            ));
        }
        for d in &r.deletions {
            if let (false, Some(m)) = (errors.contains_key(d.name.as_str()), Mechanism::from_kafka_id(d.mechanism)) {
                edit.remove(d.name.as_str(), Some(m));
            }
        }
        for u in &r.upsertions {
            if let (false, Some(m)) = (errors.contains_key(u.name.as_str()), Mechanism::from_kafka_id(u.mechanism)) {
                let cred = ScramCredential::from_salted(m, &u.salted_password, &u.salt, u.iterations as u32);
                if let Err(e) = edit.set(u.name.as_str(), m, cred) {
                    errors.insert(u.name.to_string(), (ErrorCode::UnacceptableCredential, e.to_string()));
                }
            }
        }
    });
    let mut resp = AlterUserScramCredentialsResponse::default();
    for user in order {
        let mut res = AlterUserScramCredentialsResult::default();
        res.user = sb(&user);
        if let Err(e) = &outcome {
            res.error_code = ErrorCode::KafkaStorageError.code();
            res.error_message = Some(sb(&e.to_string()));
        } else if let Some((code, why)) = errors.get(&user) {
            res.error_code = code.code();
            res.error_message = Some(sb(why));
        }
        resp.results.push(res);
    }
    if let Err(e) = outcome {
        log::error!("AlterUserScramCredentials: {e}");
    }
    Outcome::respond(resp)
}
