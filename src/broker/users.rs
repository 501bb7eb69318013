//! SASL users: SCRAM credentials kept in `users.json` under the data dir, and the server
//! side of the SCRAM (RFC 5802, RFC 7677) and PLAIN (RFC 4616) exchanges, sans-IO: a
//! protocol carries the bytes (Kafka's SaslAuthenticate).
//!
//! Only salted keys are stored, never a password: `StoredKey = H(HMAC(SaltedPassword,
//! "Client Key"))` and `ServerKey = HMAC(SaltedPassword, "Server Key")`, as Kafka stores
//! them. PLAIN is checked against a user's SCRAM credential (the password salted and
//! hashed again), so one store serves every mechanism.
//!
//! The file is written by the broker (Kafka's AlterUserScramCredentials, on the file
//! worker) and by `slipstream users` (while the broker runs or not); both replace it whole
//! under an advisory lock, and the broker reads it again when it changes.
//!
//! # Invariants
//! - An unknown user and a wrong password fail the same way, at the same step.
//! - Decoders of client messages never panic: every field is checked.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use parking_lot::RwLock;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// SCRAM iterations Kafka accepts (`ScramMechanism.minIterations` .. 16384).
pub const MIN_ITERATIONS: u32 = 4096;
pub const MAX_ITERATIONS: u32 = 16384;

/// A SASL mechanism this broker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mechanism {
    ScramSha256,
    ScramSha512,
    Plain,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
            Mechanism::Plain => "PLAIN",
        }
    }

    /// The SCRAM mechanisms, which have credentials of their own.
    pub const SCRAM: [Mechanism; 2] = [Mechanism::ScramSha256, Mechanism::ScramSha512];

    /// Kafka's numbering in the SCRAM admin APIs (`ScramMechanism`: 1 and 2).
    pub fn kafka_id(self) -> i8 {
        match self {
            Mechanism::ScramSha256 => 1,
            Mechanism::ScramSha512 => 2,
            Mechanism::Plain => 0,
        }
    }

    pub fn from_kafka_id(id: i8) -> Option<Mechanism> {
        match id {
            1 => Some(Mechanism::ScramSha256),
            2 => Some(Mechanism::ScramSha512),
            _ => None,
        }
    }

    fn algorithms(self) -> (hmac::Algorithm, &'static digest::Algorithm, pbkdf2::Algorithm) {
        match self {
            Mechanism::ScramSha512 => (hmac::HMAC_SHA512, &digest::SHA512, pbkdf2::PBKDF2_HMAC_SHA512),
            // PLAIN has no hash of its own; callers never ask.
            _ => (hmac::HMAC_SHA256, &digest::SHA256, pbkdf2::PBKDF2_HMAC_SHA256),
        }
    }

    /// The length of its salted password and keys.
    pub fn key_len(self) -> usize {
        self.algorithms().1.output_len()
    }
}

impl std::str::FromStr for Mechanism {
    type Err = ();
    fn from_str(s: &str) -> Result<Mechanism, ()> {
        match s.to_ascii_uppercase().as_str() {
            "SCRAM-SHA-256" => Ok(Mechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(Mechanism::ScramSha512),
            "PLAIN" => Ok(Mechanism::Plain),
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One SCRAM credential (base64 in the file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    pub salt: String,
    pub stored_key: String,
    pub server_key: String,
    pub iterations: u32,
}

impl ScramCredential {
    /// From a password: salts it (a fresh random salt) and derives the keys.
    pub fn from_password(mech: Mechanism, password: &str, iterations: u32) -> Result<ScramCredential, UsersError> {
        let mut salt = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| UsersError::Random)?;
        let salted = salted_password(mech, password.as_bytes(), &salt, iterations)?;
        Ok(ScramCredential::from_salted(mech, &salted, &salt, iterations))
    }

    /// From a salted password (what Kafka's AlterUserScramCredentials carries).
    pub fn from_salted(mech: Mechanism, salted: &[u8], salt: &[u8], iterations: u32) -> ScramCredential {
        let (h, d, _) = mech.algorithms();
        let key = hmac::Key::new(h, salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored_key = digest::digest(d, client_key.as_ref());
        let server_key = hmac::sign(&key, b"Server Key");
        ScramCredential {
            salt: B64.encode(salt),
            stored_key: B64.encode(stored_key.as_ref()),
            server_key: B64.encode(server_key.as_ref()),
            iterations,
        }
    }
}

fn salted_password(mech: Mechanism, password: &[u8], salt: &[u8], iterations: u32) -> Result<Vec<u8>, UsersError> {
    let n = NonZeroU32::new(iterations).ok_or(UsersError::Iterations(iterations))?;
    let mut out = vec![0u8; mech.key_len()];
    pbkdf2::derive(mech.algorithms().2, n, salt, password, &mut out);
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a users file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("iterations {0} out of range {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations(u32),
    #[error("{0} has no credential of its own (PLAIN is checked against the SCRAM credentials)")]
    NotScram(Mechanism),
    #[error("a user name must be 1..=255 bytes")]
    BadName,
    #[error("no random bytes from the system")]
    Random,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct UsersFile {
    /// user -> mechanism name -> credential.
    users: BTreeMap<String, BTreeMap<String, ScramCredential>>,
}

/// The users of a data directory.
pub struct Users {
    path: PathBuf,
    state: RwLock<(UsersFile, Option<SystemTime>)>,
}

impl Users {
    pub fn open(data_dir: &Path) -> Result<Users, UsersError> {
        let path = data_dir.join("users.json");
        let (file, mtime) = read(&path)?;
        Ok(Users { path, state: RwLock::new((file, mtime)) })
    }

    /// Reads the file again if it changed since it was read (`slipstream users` edits it
    /// beside a running broker). A file that does not parse keeps the users in memory.
    pub fn reload_if_changed(&self) {
        let now = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if now == self.state.read().1 {
            return;
        }
        match read(&self.path) {
            Ok(fresh) => {
                log::info!(path:% = self.path.display(), users = fresh.0.users.len(); "users reloaded");
                *self.state.write() = fresh;
            }
            Err(e) => log::error!("users file changed but cannot be read, keeping the users in memory: {e}"),
        }
    }

    pub fn credential(&self, user: &str, mech: Mechanism) -> Option<ScramCredential> {
        self.state.read().0.users.get(user)?.get(mech.name()).cloned()
    }

    /// Any SCRAM credential of `user` (for PLAIN), the strongest first.
    fn any_credential(&self, user: &str) -> Option<(Mechanism, ScramCredential)> {
        let state = self.state.read();
        let creds = state.0.users.get(user)?;
        [Mechanism::ScramSha512, Mechanism::ScramSha256]
            .into_iter()
            .find_map(|m| Some((m, creds.get(m.name())?.clone())))
    }

    /// Every user with its mechanisms and iterations.
    pub fn list(&self) -> Vec<(String, Vec<(Mechanism, u32)>)> {
        let state = self.state.read();
        state
            .0
            .users
            .iter()
            .map(|(u, creds)| {
                let m = creds.iter().filter_map(|(m, c)| Some((m.parse().ok()?, c.iterations))).collect();
                (u.clone(), m)
            })
            .collect()
    }

    /// Applies `change` to the file under its lock, writes it whole and keeps it. Blocking
    /// file work: the file worker's or a command's, never a dispatch core's.
    pub fn update<T>(&self, change: impl FnOnce(&mut UsersEdit<'_>) -> T) -> Result<T, UsersError> {
        let io = |source| UsersError::Io { path: self.path.clone(), source };
        let lock_path = self.path.with_extension("lock");
        let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| io(e.into()))?;
        // What is on disk now, not what we read last: a command may have written since.
        let (mut file, _) = read(&self.path)?;
        let out = change(&mut UsersEdit { file: &mut file });
        let text = serde_json::to_vec_pretty(&file).map_err(|e| io(e.into()))?;
        super::replace_durably(&self.path, &text).map_err(io)?;
        let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        *self.state.write() = (file, mtime);
        Ok(out)
    }
}

/// The users file while [`Users::update`] holds it.
pub struct UsersEdit<'a> {
    file: &'a mut UsersFile,
}

impl UsersEdit<'_> {
    pub fn set(&mut self, user: &str, mech: Mechanism, cred: ScramCredential) -> Result<(), UsersError> {
        if user.is_empty() || user.len() > 255 {
            return Err(UsersError::BadName);
        }
        if !Mechanism::SCRAM.contains(&mech) {
            return Err(UsersError::NotScram(mech));
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&cred.iterations) {
            return Err(UsersError::Iterations(cred.iterations));
        }
        self.file.users.entry(user.to_string()).or_default().insert(mech.name().to_string(), cred);
        Ok(())
    }

    /// Removes one credential (`Some`) or the user (`None`); false if there was none.
    pub fn remove(&mut self, user: &str, mech: Option<Mechanism>) -> bool {
        let Some(creds) = self.file.users.get_mut(user) else { return false };
        let removed = match mech {
            Some(m) => creds.remove(m.name()).is_some(),
            None => {
                creds.clear();
                true
            }
        };
        if creds.is_empty() {
            self.file.users.remove(user);
        }
        removed
    }

    pub fn has(&self, user: &str, mech: Mechanism) -> bool {
        self.file.users.get(user).is_some_and(|c| c.contains_key(mech.name()))
    }
}

fn read(path: &Path) -> Result<(UsersFile, Option<SystemTime>), UsersError> {
    match fs::read(path) {
        Ok(bytes) => {
            let file = serde_json::from_slice(&bytes)
                .map_err(|e| UsersError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
            Ok((file, fs::metadata(path).and_then(|m| m.modified()).ok()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((UsersFile::default(), None)),
        Err(source) => Err(UsersError::Io { path: path.to_path_buf(), source }),
    }
}

/// Why an exchange failed: what the client is told is only "authentication failed".
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("malformed {0} message: {1}")]
    Malformed(Mechanism, &'static str),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// What a step of an exchange produced.
#[derive(Debug)]
pub enum SaslStep {
    /// Send this and wait for the client's next message.
    Continue(Vec<u8>),
    /// Authenticated as `user`; send `response` (SCRAM's server-final; empty for PLAIN).
    Done { user: String, response: Vec<u8> },
}

/// The server side of one authentication.
pub struct SaslServer {
    mech: Mechanism,
    state: ScramState,
}

enum ScramState {
    Start,
    /// Server-first sent.
    First {
        user: String,
        cred: ScramCredential,
        nonce: String,
        client_first_bare: String,
        server_first: String,
        gs2_header: String,
    },
    Finished,
}

impl SaslServer {
    pub fn new(mech: Mechanism) -> SaslServer {
        SaslServer { mech, state: ScramState::Start }
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mech
    }

    /// Takes the client's next message.
    pub fn step(&mut self, users: &Users, input: &[u8]) -> Result<SaslStep, AuthError> {
        let state = std::mem::replace(&mut self.state, ScramState::Finished);
        match (self.mech, state) {
            (Mechanism::Plain, ScramState::Start) => plain(users, input),
            (_, ScramState::Start) => self.client_first(users, input),
            (_, ScramState::First { user, cred, nonce, client_first_bare, server_first, gs2_header }) => {
                let first = First { user, cred, nonce, client_first_bare, server_first, gs2_header };
                self.client_final(input, first)
            }
            (_, ScramState::Finished) => Err(AuthError::Unsupported("the exchange is over")),
        }
    }

    fn client_first(&mut self, users: &Users, input: &[u8]) -> Result<SaslStep, AuthError> {
        let bad = |why| AuthError::Malformed(self.mech, why);
        let msg = std::str::from_utf8(input).map_err(|_| bad("not UTF-8"))?;
        // gs2-header: cbind flag, authzid, then the bare message.
        let mut parts = msg.splitn(3, ',');
        let cbind = parts.next().ok_or_else(|| bad("no gs2 header"))?;
        let authzid = parts.next().ok_or_else(|| bad("no gs2 header"))?;
        let bare = parts.next().ok_or_else(|| bad("no client-first-message-bare"))?;
        match cbind {
            "n" | "y" => {}
            _ if cbind.starts_with("p=") => return Err(AuthError::Unsupported("channel binding is not supported")),
            _ => return Err(bad("gs2 channel-binding flag")),
        }
        let mut user = None;
        let mut cnonce = None;
        for attr in bare.split(',') {
            match attr.split_once('=') {
                Some(("n", v)) => user = Some(sasl_name(v).ok_or_else(|| bad("user name"))?),
                Some(("r", v)) if !v.is_empty() && v.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') => {
                    cnonce = Some(v.to_string())
                }
                Some(("m", _)) => return Err(AuthError::Unsupported("mandatory SCRAM extension")),
                Some((k, _)) if k.len() == 1 => {}
                // Kafka's extensions (`tokenauth=true`): delegation tokens are not served.
                Some(("tokenauth", v)) if v.eq_ignore_ascii_case("true") => {
                    return Err(AuthError::Unsupported("delegation tokens are not supported"))
                }
                Some(_) => {}
                None => return Err(bad("attribute without '='")),
            }
        }
        let user = user.ok_or_else(|| bad("no user name"))?;
        let cnonce = cnonce.ok_or_else(|| bad("no nonce"))?;
        if let Some(a) = authzid.strip_prefix("a=") {
            if sasl_name(a).as_deref() != Some(user.as_str()) {
                return Err(AuthError::Unsupported("an authorization id other than the user"));
            }
        } else if !authzid.is_empty() {
            return Err(bad("authzid"));
        }
        let cred = users.credential(&user, self.mech).ok_or(AuthError::InvalidCredentials)?;
        let mut snonce = [0u8; 24];
        ring::rand::SystemRandom::new().fill(&mut snonce).map_err(|_| AuthError::Unsupported("no randomness"))?;
        let nonce = format!("{cnonce}{}", B64.encode(snonce));
        let server_first = format!("r={nonce},s={},i={}", cred.salt, cred.iterations);
        let gs2_header = format!("{cbind},{authzid},");
        self.state = ScramState::First {
            user,
            cred,
            nonce,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            gs2_header,
        };
        Ok(SaslStep::Continue(server_first.into_bytes()))
    }

    fn client_final(&mut self, input: &[u8], f: First) -> Result<SaslStep, AuthError> {
        let bad = |why| AuthError::Malformed(self.mech, why);
        let msg = std::str::from_utf8(input).map_err(|_| bad("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or_else(|| bad("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            match attr.split_once('=') {
                Some(("c", v)) => channel = Some(v),
                Some(("r", v)) => nonce = Some(v),
                Some(_) => {}
                None => return Err(bad("attribute without '='")),
            }
        }
        if channel.and_then(|c| B64.decode(c).ok()).as_deref() != Some(f.gs2_header.as_bytes()) {
            return Err(bad("channel binding differs from the gs2 header"));
        }
        if nonce != Some(f.nonce.as_str()) {
            return Err(AuthError::InvalidCredentials);
        }
        let proof = B64.decode(proof).map_err(|_| bad("proof is not base64"))?;
        let (h, d, _) = self.mech.algorithms();
        let stored_key = B64.decode(&f.cred.stored_key).map_err(|_| AuthError::InvalidCredentials)?;
        let server_key = B64.decode(&f.cred.server_key).map_err(|_| AuthError::InvalidCredentials)?;
        if proof.len() != stored_key.len() {
            return Err(AuthError::InvalidCredentials);
        }
        let auth_message = format!("{},{},{without_proof}", f.client_first_bare, f.server_first);
        let client_signature = hmac::sign(&hmac::Key::new(h, &stored_key), auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_signature.as_ref()).map(|(a, b)| a ^ b).collect();
        let computed = digest::digest(d, &client_key);
        if !equal(computed.as_ref(), &stored_key) {
            return Err(AuthError::InvalidCredentials);
        }
        let server_signature = hmac::sign(&hmac::Key::new(h, &server_key), auth_message.as_bytes());
        let response = format!("v={}", B64.encode(server_signature.as_ref())).into_bytes();
        Ok(SaslStep::Done { user: f.user, response })
    }
}

struct First {
    user: String,
    cred: ScramCredential,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
}

/// PLAIN: `[authzid] NUL authcid NUL password`, checked against the user's SCRAM
/// credential.
fn plain(users: &Users, input: &[u8]) -> Result<SaslStep, AuthError> {
    let bad = |why| AuthError::Malformed(Mechanism::Plain, why);
    let mut parts = input.split(|b| *b == 0);
    let (Some(authzid), Some(user), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected authzid NUL user NUL password"));
    };
    let user = std::str::from_utf8(user).map_err(|_| bad("user name is not UTF-8"))?;
    if user.is_empty() || password.is_empty() {
        return Err(bad("empty user name or password"));
    }
    if !authzid.is_empty() && authzid != user.as_bytes() {
        return Err(AuthError::Unsupported("an authorization id other than the user"));
    }
    let (mech, cred) = users.any_credential(user).ok_or(AuthError::InvalidCredentials)?;
    let salt = B64.decode(&cred.salt).map_err(|_| AuthError::InvalidCredentials)?;
    let salted = salted_password(mech, password, &salt, cred.iterations).map_err(|_| AuthError::InvalidCredentials)?;
    let again = ScramCredential::from_salted(mech, &salted, &salt, cred.iterations);
    if !equal(again.stored_key.as_bytes(), cred.stored_key.as_bytes()) {
        return Err(AuthError::InvalidCredentials);
    }
    Ok(SaslStep::Done { user: user.to_string(), response: Vec::new() })
}

/// `saslname`: `=2C` is ',' and `=3D` is '='; any other '=' is malformed.
fn sasl_name(v: &str) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// Compares without an early exit (the time does not tell how much matched).
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's side of SCRAM, as RFC 5802 computes it.
    fn client_final(mech: Mechanism, password: &str, client_first_bare: &str, server_first: &str) -> String {
        let (h, d, _) = mech.algorithms();
        let attrs: BTreeMap<&str, &str> = server_first.split(',').filter_map(|a| a.split_once('=')).collect();
        let salt = B64.decode(attrs["s"]).unwrap();
        let iterations: u32 = attrs["i"].parse().unwrap();
        let salted = salted_password(mech, password.as_bytes(), &salt, iterations).unwrap();
        let client_key = hmac::sign(&hmac::Key::new(h, &salted), b"Client Key");
        let stored_key = digest::digest(d, client_key.as_ref());
        let without_proof = format!("c=biws,r={}", attrs["r"]);
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = hmac::sign(&hmac::Key::new(h, stored_key.as_ref()), auth_message.as_bytes());
        let proof: Vec<u8> = client_key.as_ref().iter().zip(sig.as_ref()).map(|(a, b)| a ^ b).collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    fn users_with(user: &str, password: &str) -> (tempfile::TempDir, Users) {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::open(dir.path()).unwrap();
        users
            .update(|e| {
                for m in Mechanism::SCRAM {
                    e.set(user, m, ScramCredential::from_password(m, password, 4096).unwrap()).unwrap();
                }
            })
            .unwrap();
        (dir, users)
    }

    #[test]
    fn scram_accepts_the_password_and_refuses_others() {
        let (_dir, users) = users_with("alice", "s3cret");
        for mech in Mechanism::SCRAM {
            for (password, ok) in [("s3cret", true), ("wrong", false)] {
                let mut s = SaslServer::new(mech);
                let bare = "n=alice,r=fyko+d2lbbFgONRv9qkxdawL";
                let SaslStep::Continue(first) = s.step(&users, format!("n,,{bare}").as_bytes()).unwrap() else {
                    panic!("server-first expected")
                };
                let first = String::from_utf8(first).unwrap();
                let fin = client_final(mech, password, bare, &first);
                match s.step(&users, fin.as_bytes()) {
                    Ok(SaslStep::Done { user, response }) => {
                        assert!(ok, "{mech} accepted a wrong password");
                        assert_eq!(user, "alice");
                        assert!(response.starts_with(b"v="));
                    }
                    Err(AuthError::InvalidCredentials) => assert!(!ok, "{mech} refused the password"),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn plain_is_checked_against_the_scram_credential() {
        let (_dir, users) = users_with("bob", "pw");
        let step = |m: &[u8]| SaslServer::new(Mechanism::Plain).step(&users, m);
        assert!(matches!(step(b"\0bob\0pw"), Ok(SaslStep::Done { .. })));
        assert!(matches!(step(b"bob\0bob\0pw"), Ok(SaslStep::Done { .. })));
        assert!(matches!(step(b"\0bob\0pwx"), Err(AuthError::InvalidCredentials)));
        assert!(matches!(step(b"\0nobody\0pw"), Err(AuthError::InvalidCredentials)));
        assert!(matches!(step(b"\0bob"), Err(AuthError::Malformed(..))));
    }

    #[test]
    fn unknown_users_and_garbage_are_refused_without_panicking() {
        let (_dir, users) = users_with("carol", "pw");
        let mut s = SaslServer::new(Mechanism::ScramSha256);
        assert!(matches!(s.step(&users, b"n,,n=nobody,r=abc"), Err(AuthError::InvalidCredentials)));
        for junk in [&b""[..], b"n", b"n,,", b"x,,n=carol,r=a", b"n,,n=ca=rol,r=a", b"\xff\xfe", b"p=tls,,n=carol,r=a"]
        {
            let mut s = SaslServer::new(Mechanism::ScramSha512);
            assert!(s.step(&users, junk).is_err(), "{junk:?}");
        }
        // A final message that is not the one expected.
        let mut s = SaslServer::new(Mechanism::ScramSha256);
        s.step(&users, b"n,,n=carol,r=abc").unwrap();
        assert!(s.step(&users, b"c=biws,r=abc,p=AAAA").is_err());
        assert!(s.step(&users, b"anything").is_err(), "a finished exchange takes nothing more");
    }

    #[test]
    fn the_file_survives_a_reopen_and_removals() {
        let (dir, users) = users_with("dave", "pw");
        let again = Users::open(dir.path()).unwrap();
        assert_eq!(
            again.list(),
            vec![("dave".into(), vec![(Mechanism::ScramSha256, 4096), (Mechanism::ScramSha512, 4096)])]
        );
        assert!(again.update(|e| e.remove("dave", Some(Mechanism::ScramSha256))).unwrap());
        assert!(!again.update(|e| e.remove("dave", Some(Mechanism::ScramSha256))).unwrap());
        users.reload_if_changed();
        assert!(users.credential("dave", Mechanism::ScramSha256).is_none());
        assert!(users.credential("dave", Mechanism::ScramSha512).is_some());
        let bad = ScramCredential { iterations: 10, ..users.credential("dave", Mechanism::ScramSha512).unwrap() };
        assert!(matches!(
            users.update(|e| e.set("dave", Mechanism::ScramSha512, bad)).unwrap(),
            Err(UsersError::Iterations(10))
        ));
    }
}
