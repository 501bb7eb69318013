//! Access control lists in Kafka's model, and the authorizer that checks them.
//!
//! A binding allows or denies a principal (`User:alice`, or `User:*`) from a host (or `*`)
//! an operation on resources of one type whose name matches a literal (or `*`) or
//! prefixed pattern. Kept in `acls.json` under the data dir, written whole on the file
//! worker by CreateAcls and DeleteAcls.
//!
//! As Kafka's `AclAuthorizer`: super users may do anything; a resource with no binding is
//! refused (unless `allow_everyone_if_no_acl_found`); a matching deny wins over any allow;
//! READ, WRITE, DELETE or ALTER imply DESCRIBE, and ALTER_CONFIGS implies
//! DESCRIBE_CONFIGS. With no authorizer configured everything is allowed.
//!
//! # Invariants
//! - `authorize` reads the bindings in memory only (no file access on a dispatch core);
//!   the file is replaced before memory changes, so what is enforced was made durable.

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

macro_rules! kafka_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $code:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($variant),* }

        impl $name {
            /// Kafka's wire code.
            pub fn code(self) -> i8 {
                match self { $($name::$variant => $code),* }
            }

            pub fn from_code(code: i8) -> Option<$name> {
                match code { $($code => Some($name::$variant),)* _ => None }
            }
        }
    };
}

kafka_enum!(
    /// Kafka's `ResourceType` (0 is UNKNOWN; DELEGATION_TOKEN and USER are not served).
    ResourceType { Any = 1, Topic = 2, Group = 3, Cluster = 4, TransactionalId = 5 }
);
kafka_enum!(
    /// Kafka's `PatternType` (0 is UNKNOWN); bindings are `Literal` or `Prefixed`,
    /// `Any` and `Match` are for filters.
    PatternType { Any = 1, Match = 2, Literal = 3, Prefixed = 4 }
);
kafka_enum!(
    /// Kafka's `AclOperation` (0 is UNKNOWN; `Any` is for filters).
    Operation {
        Any = 1, All = 2, Read = 3, Write = 4, Create = 5, Delete = 6, Alter = 7, Describe = 8,
        ClusterAction = 9, DescribeConfigs = 10, AlterConfigs = 11, IdempotentWrite = 12,
        CreateTokens = 13, DescribeTokens = 14,
    }
);
kafka_enum!(
    /// Kafka's `AclPermissionType` (0 is UNKNOWN; `Any` is for filters).
    Permission { Any = 1, Deny = 2, Allow = 3 }
);

/// The name of the one cluster resource.
pub const CLUSTER: &str = "kafka-cluster";
/// Matches every name (literal patterns) or every principal or host.
pub const WILDCARD: &str = "*";

/// One access control entry on a resource pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AclBinding {
    pub resource_type: ResourceType,
    pub name: String,
    pub pattern: PatternType,
    pub principal: String,
    pub host: String,
    pub operation: Operation,
    pub permission: Permission,
}

/// What DescribeAcls and DeleteAcls select by (`None`: any).
#[derive(Debug, Clone)]
pub struct AclFilter {
    pub resource_type: ResourceType,
    pub name: Option<String>,
    pub pattern: PatternType,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: Operation,
    pub permission: Permission,
}

impl AclFilter {
    pub fn matches(&self, b: &AclBinding) -> bool {
        let rt = self.resource_type == ResourceType::Any || self.resource_type == b.resource_type;
        let pattern = match (self.pattern, &self.name) {
            (PatternType::Any, None) => true,
            (PatternType::Any, Some(n)) => *n == b.name,
            // The bindings that would apply to a resource of this name.
            (PatternType::Match, None) => true,
            (PatternType::Match, Some(n)) => match b.pattern {
                PatternType::Literal => b.name == *n || b.name == WILDCARD,
                PatternType::Prefixed => n.starts_with(&b.name),
                _ => false,
            },
            (p, None) => p == b.pattern,
            (p, Some(n)) => p == b.pattern && *n == b.name,
        };
        let principal = self.principal.as_ref().is_none_or(|p| *p == b.principal);
        let host = self.host.as_ref().is_none_or(|h| *h == b.host);
        let op = self.operation == Operation::Any || self.operation == b.operation;
        let perm = self.permission == Permission::Any || self.permission == b.permission;
        rt && pattern && principal && host && op && perm
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an ACL file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// How the broker authorizes (`--authorizer`, `--super-users`).
#[derive(Debug, Clone, Default)]
pub struct AuthorizerSettings {
    /// ACLs are enforced; otherwise every operation is allowed, as in Kafka without an
    /// authorizer.
    pub enabled: bool,
    /// Principals that may do anything (`User:admin`).
    pub super_users: Vec<String>,
    /// A resource no binding names is open to everyone (Kafka's
    /// `allow.everyone.if.no.acl.found`) instead of closed.
    pub allow_if_no_acl: bool,
}

#[derive(Default, Deserialize)]
struct AclFile {
    acls: Vec<AclBinding>,
}

/// What `acls.json` holds, written from a borrow.
#[derive(Serialize)]
struct AclFileOut<'a> {
    acls: &'a [AclBinding],
}

pub struct Authorizer {
    settings: AuthorizerSettings,
    path: PathBuf,
    acls: RwLock<Vec<AclBinding>>,
}

impl Authorizer {
    pub fn open(data_dir: &Path, settings: AuthorizerSettings) -> Result<Authorizer, AclError> {
        let path = data_dir.join("acls.json");
        let acls = match fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice::<AclFile>(&b)
                    .map_err(|e| AclError::Corrupt { path: path.clone(), reason: e.to_string() })?
                    .acls
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(AclError::Io { path, source }),
        };
        Ok(Authorizer { settings, path, acls: RwLock::new(acls) })
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Whether `principal` connected from `host` may do `op` on the resource.
    pub fn authorize(&self, principal: &str, host: &str, op: Operation, rt: ResourceType, name: &str) -> bool {
        if !self.settings.enabled || self.settings.super_users.iter().any(|s| s == principal) {
            return true;
        }
        let acls = self.acls.read();
        let on_resource = |b: &&AclBinding| {
            b.resource_type == rt
                && match b.pattern {
                    PatternType::Literal => b.name == name || b.name == WILDCARD,
                    PatternType::Prefixed => name.starts_with(&b.name),
                    _ => false,
                }
        };
        let mut applicable = acls.iter().filter(on_resource).peekable();
        if applicable.peek().is_none() {
            return self.settings.allow_if_no_acl;
        }
        let who = |b: &AclBinding| {
            (b.principal == principal || b.principal == "User:*") && (b.host == host || b.host == WILDCARD)
        };
        let implied: &[Operation] = match op {
            Operation::Describe => {
                &[Operation::Describe, Operation::Read, Operation::Write, Operation::Delete, Operation::Alter]
            }
            Operation::DescribeConfigs => &[Operation::DescribeConfigs, Operation::AlterConfigs],
            _ => std::slice::from_ref(&op),
        };
        let mut allowed = false;
        for b in applicable.filter(|b| who(b)) {
            let names_op = b.operation == op || b.operation == Operation::All;
            match b.permission {
                Permission::Deny if names_op => return false,
                Permission::Allow if b.operation == Operation::All || implied.contains(&b.operation) => allowed = true,
                _ => {}
            }
        }
        allowed
    }

    /// The bindings `filter` selects.
    pub fn describe(&self, filter: &AclFilter) -> Vec<AclBinding> {
        self.acls.read().iter().filter(|b| filter.matches(b)).cloned().collect()
    }

    /// Adds bindings (one already there is kept once). File work: the file worker's.
    pub fn create(&self, new: &[AclBinding]) -> Result<(), AclError> {
        let mut next = self.acls.read().clone();
        for b in new {
            if !next.contains(b) {
                next.push(b.clone());
            }
        }
        self.replace(next).map(|_| ())
    }

    /// Removes what each filter selects; returns, per filter, what it removed.
    pub fn delete(&self, filters: &[AclFilter]) -> Result<Vec<Vec<AclBinding>>, AclError> {
        let current = self.acls.read().clone();
        let removed: Vec<Vec<AclBinding>> =
            filters.iter().map(|f| current.iter().filter(|b| f.matches(b)).cloned().collect()).collect();
        let next = current.into_iter().filter(|b| !filters.iter().any(|f| f.matches(b))).collect();
        self.replace(next)?;
        Ok(removed)
    }

    fn replace(&self, next: Vec<AclBinding>) -> Result<(), AclError> {
        let io = |source| AclError::Io { path: self.path.clone(), source };
        let text = serde_json::to_vec_pretty(&AclFileOut { acls: &next }).map_err(|e| io(e.into()))?;
        super::replace_durably(&self.path, &text).map_err(io)?;
        *self.acls.write() = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(rt: ResourceType, name: &str, pattern: PatternType, principal: &str, op: Operation) -> AclBinding {
        AclBinding {
            resource_type: rt,
            name: name.into(),
            pattern,
            principal: principal.into(),
            host: WILDCARD.into(),
            operation: op,
            permission: Permission::Allow,
        }
    }

    fn authorizer(acls: &[AclBinding]) -> (tempfile::TempDir, Authorizer) {
        let dir = tempfile::tempdir().unwrap();
        let settings =
            AuthorizerSettings { enabled: true, super_users: vec!["User:admin".into()], allow_if_no_acl: false };
        let a = Authorizer::open(dir.path(), settings).unwrap();
        a.create(acls).unwrap();
        (dir, a)
    }

    #[test]
    fn kafka_semantics() {
        use Operation::*;
        use ResourceType::*;
        let (_d, a) = authorizer(&[
            allow(Topic, "orders", PatternType::Literal, "User:alice", Read),
            allow(Topic, "logs-", PatternType::Prefixed, "User:*", Write),
            allow(Group, "*", PatternType::Literal, "User:alice", All),
            AclBinding {
                permission: Permission::Deny,
                ..allow(Topic, "logs-secret", PatternType::Literal, "User:bob", Write)
            },
        ]);
        let can = |p: &str, op, rt, n: &str| a.authorize(p, "10.0.0.1", op, rt, n);
        assert!(can("User:alice", Read, Topic, "orders"));
        assert!(can("User:alice", Describe, Topic, "orders"), "READ implies DESCRIBE");
        assert!(!can("User:alice", Write, Topic, "orders"));
        assert!(!can("User:bob", Read, Topic, "orders"));
        assert!(can("User:bob", Write, Topic, "logs-app"), "prefixed, any user");
        assert!(!can("User:bob", Write, Topic, "logs-secret"), "deny wins");
        assert!(can("User:carol", Write, Topic, "logs-secret"));
        assert!(!can("User:alice", Read, Topic, "nobody-named-it"), "no ACL: refused");
        assert!(can("User:alice", Read, Group, "any-group"), "wildcard literal, ALL");
        assert!(can("User:admin", Delete, Cluster, CLUSTER), "super user");
        let filter = AclFilter {
            resource_type: Topic,
            name: Some("logs-secret".into()),
            pattern: PatternType::Match,
            principal: None,
            host: None,
            operation: Operation::Any,
            permission: Permission::Any,
        };
        assert_eq!(a.describe(&filter).len(), 2, "the prefixed allow and the literal deny apply");
        let removed = a.delete(&[AclFilter { permission: Permission::Deny, ..filter }]).unwrap();
        assert_eq!(removed[0].len(), 1);
        assert!(can("User:bob", Write, Topic, "logs-secret"), "deny deleted");
        let again = Authorizer::open(_d.path(), AuthorizerSettings { enabled: true, ..Default::default() }).unwrap();
        assert_eq!(again.acls.read().len(), 3, "the file holds what memory holds");
    }

    #[test]
    fn off_allows_everything() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authorizer::open(dir.path(), AuthorizerSettings::default()).unwrap();
        assert!(a.authorize("User:ANONYMOUS", "h", Operation::Delete, ResourceType::Topic, "t"));
    }
}
