//! CreateAcls, DescribeAcls and DeleteAcls, and the authorization checks every handler
//! makes ([`allowed`]). The model and its semantics are `broker::acl`'s.

use kafka_protocol::messages::create_acls_response::AclCreationResult;
use kafka_protocol::messages::delete_acls_response::{DeleteAclsFilterResult, DeleteAclsMatchingAcl};
use kafka_protocol::messages::describe_acls_response::{AclDescription, DescribeAclsResource};
use kafka_protocol::messages::{
    CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse, DescribeAclsRequest,
    DescribeAclsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::{sb, Ctx, ErrorCode, Outcome};
use crate::broker::acl::{AclBinding, AclFilter, Operation, PatternType, Permission, ResourceType, CLUSTER};

/// Whether the connection's principal may do `op` on the resource.
pub fn allowed(ctx: &Ctx<'_>, op: Operation, rt: ResourceType, name: &str) -> bool {
    ctx.broker.acl.authorize(ctx.principal, &ctx.client_host, op, rt, name)
}

/// On the cluster resource.
pub fn allowed_on_cluster(ctx: &Ctx<'_>, op: Operation) -> bool {
    allowed(ctx, op, ResourceType::Cluster, CLUSTER)
}

/// Why the ACL APIs cannot run, if they cannot: no authorizer, or not allowed `op` on
/// the cluster.
fn refusal(ctx: &Ctx<'_>, op: Operation) -> Option<(ErrorCode, &'static str)> {
    if !ctx.broker.acl.enabled() {
        return Some((ErrorCode::SecurityDisabled, "No Authorizer is configured on the broker"));
    }
    (!allowed_on_cluster(ctx, op)).then_some((ErrorCode::ClusterAuthorizationFailed, "Cluster authorization failed"))
}

fn binding(c: &kafka_protocol::messages::create_acls_request::AclCreation) -> Result<AclBinding, String> {
    let rt = ResourceType::from_code(c.resource_type).filter(|r| *r != ResourceType::Any);
    let pattern = PatternType::from_code(c.resource_pattern_type)
        .filter(|p| matches!(p, PatternType::Literal | PatternType::Prefixed));
    let op = Operation::from_code(c.operation).filter(|o| *o != Operation::Any);
    let perm = Permission::from_code(c.permission_type).filter(|p| *p != Permission::Any);
    let (Some(resource_type), Some(pattern), Some(operation), Some(permission)) = (rt, pattern, op, perm) else {
        return Err("unknown or ANY resource type, pattern type, operation or permission in a binding".into());
    };
    if c.resource_name.is_empty() || !c.principal.contains(':') || c.host.is_empty() {
        return Err("a binding needs a resource name, a principal TYPE:NAME and a host".into());
    }
    if resource_type == ResourceType::Cluster && c.resource_name.as_str() != CLUSTER {
        return Err(format!("the cluster resource is named {CLUSTER}"));
    }
    if pattern == PatternType::Prefixed && c.resource_name.as_str() == "*" {
        return Err("a prefixed pattern cannot be the wildcard".into());
    }
    Ok(AclBinding {
        resource_type,
        name: c.resource_name.to_string(),
        pattern,
        principal: c.principal.to_string(),
        host: c.host.to_string(),
        operation,
        permission,
    })
}

/// A request's filter fields, checked.
#[allow(clippy::too_many_arguments)]
fn filter(
    rt: i8,
    name: &Option<StrBytes>,
    pattern: i8,
    principal: &Option<StrBytes>,
    host: &Option<StrBytes>,
    op: i8,
    perm: i8,
) -> Result<AclFilter, String> {
    let (Some(resource_type), Some(pattern), Some(operation), Some(permission)) = (
        ResourceType::from_code(rt),
        PatternType::from_code(pattern),
        Operation::from_code(op),
        Permission::from_code(perm),
    ) else {
        return Err("unknown resource type, pattern type, operation or permission in a filter".into());
    };
    Ok(AclFilter {
        resource_type,
        name: name.as_ref().map(|s| s.to_string()),
        pattern,
        principal: principal.as_ref().map(|s| s.to_string()),
        host: host.as_ref().map(|s| s.to_string()),
        operation,
        permission,
    })
}

/// CreateAcls (on the file worker: it writes acls.json). One result per creation.
pub fn create(ctx: &Ctx<'_>, r: CreateAclsRequest) -> Outcome {
    let mut resp = CreateAclsResponse::default();
    let result = |code: ErrorCode, msg: Option<&str>| {
        let mut x = AclCreationResult::default();
        x.error_code = code.code();
        x.error_message = msg.map(sb);
        x
    };
    if let Some((code, msg)) = refusal(ctx, Operation::Alter) {
        resp.results = r.creations.iter().map(|_| result(code, Some(msg))).collect();
        return Outcome::respond(resp);
    }
    let parsed: Vec<Result<AclBinding, String>> = r.creations.iter().map(binding).collect();
    let valid: Vec<AclBinding> = parsed.iter().filter_map(|b| b.as_ref().ok().cloned()).collect();
    let stored = ctx.broker.acl.create(&valid);
    if let Err(e) = &stored {
        log::error!("CreateAcls: {e}");
    }
    for p in &parsed {
        resp.results.push(match (p, &stored) {
            (Err(why), _) => result(ErrorCode::InvalidRequest, Some(why)),
            (Ok(_), Err(e)) => result(ErrorCode::KafkaStorageError, Some(&e.to_string())),
            (Ok(b), Ok(())) => {
                log::info!(by = ctx.principal, acl:? = b; "ACL created");
                result(ErrorCode::None, None)
            }
        });
    }
    Outcome::respond(resp)
}

/// DescribeAcls: the bindings the filter selects, grouped by resource pattern.
pub fn describe(ctx: &Ctx<'_>, r: DescribeAclsRequest) -> Outcome {
    let mut resp = DescribeAclsResponse::default();
    if let Some((code, msg)) = refusal(ctx, Operation::Describe) {
        resp.error_code = code.code();
        resp.error_message = Some(sb(msg));
        return Outcome::respond(resp);
    }
    let f = match filter(
        r.resource_type_filter,
        &r.resource_name_filter,
        r.pattern_type_filter,
        &r.principal_filter,
        &r.host_filter,
        r.operation,
        r.permission_type,
    ) {
        Ok(f) => f,
        Err(why) => {
            resp.error_code = ErrorCode::InvalidRequest.code();
            resp.error_message = Some(sb(&why));
            return Outcome::respond(resp);
        }
    };
    for b in ctx.broker.acl.describe(&f) {
        let same = |x: &&mut DescribeAclsResource| {
            x.resource_type == b.resource_type.code()
                && x.resource_name.as_str() == b.name
                && x.pattern_type == b.pattern.code()
        };
        let mut d = AclDescription::default();
        d.principal = sb(&b.principal);
        d.host = sb(&b.host);
        d.operation = b.operation.code();
        d.permission_type = b.permission.code();
        match resp.resources.iter_mut().find(same) {
            Some(res) => res.acls.push(d),
            None => {
                let mut res = DescribeAclsResource::default();
                res.resource_type = b.resource_type.code();
                res.resource_name = sb(&b.name);
                res.pattern_type = b.pattern.code();
                res.acls.push(d);
                resp.resources.push(res);
            }
        }
    }
    Outcome::respond(resp)
}

/// DeleteAcls (on the file worker). Per filter, the bindings it removed.
pub fn delete(ctx: &Ctx<'_>, r: DeleteAclsRequest) -> Outcome {
    let mut resp = DeleteAclsResponse::default();
    let failed = |code: ErrorCode, msg: &str| {
        let mut x = DeleteAclsFilterResult::default();
        x.error_code = code.code();
        x.error_message = Some(sb(msg));
        x
    };
    if let Some((code, msg)) = refusal(ctx, Operation::Alter) {
        resp.filter_results = r.filters.iter().map(|_| failed(code, msg)).collect();
        return Outcome::respond(resp);
    }
    let parsed: Vec<Result<AclFilter, String>> = r
        .filters
        .iter()
        .map(|f| {
            filter(
                f.resource_type_filter,
                &f.resource_name_filter,
                f.pattern_type_filter,
                &f.principal_filter,
                &f.host_filter,
                f.operation,
                f.permission_type,
            )
        })
        .collect();
    let valid: Vec<AclFilter> = parsed.iter().filter_map(|f| f.as_ref().ok().cloned()).collect();
    let removed = ctx.broker.acl.delete(&valid);
    let mut removed_each = match &removed {
        Ok(r) => r.clone().into_iter(),
        Err(_) => Vec::new().into_iter(),
    };
    for p in &parsed {
        resp.filter_results.push(match (p, &removed) {
            (Err(why), _) => failed(ErrorCode::InvalidRequest, why),
            (Ok(_), Err(e)) => failed(ErrorCode::KafkaStorageError, &e.to_string()),
            (Ok(_), Ok(_)) => {
                let mut x = DeleteAclsFilterResult::default();
                for b in removed_each.next().unwrap_or_default() {
                    log::info!(by = ctx.principal, acl:? = b; "ACL deleted");
                    let mut m = DeleteAclsMatchingAcl::default();
                    m.resource_type = b.resource_type.code();
                    m.resource_name = sb(&b.name);
                    m.pattern_type = b.pattern.code();
                    m.principal = sb(&b.principal);
                    m.host = sb(&b.host);
                    m.operation = b.operation.code();
                    m.permission_type = b.permission.code();
                    x.matching_acls.push(m);
                }
                x
            }
        });
    }
    Outcome::respond(resp)
}
