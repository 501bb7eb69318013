//! Consumer-group APIs, translated onto [`crate::broker::groups::Coordinator`].

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions, OffsetFetchResponseTopic,
    OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    BrokerId, DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use std::sync::Arc;

use super::acls::{allowed, allowed_on_cluster};
use super::{sb, Ctx, ErrorCode, Outcome, Parked};
use crate::broker::acl::{Operation, ResourceType};
use crate::broker::groups::{Committed, JoinRequest, JoinResult, JoinStep};
use crate::broker::Broker;

const KEY_TYPE_GROUP: i8 = 0;

fn may(ctx: &Ctx<'_>, op: Operation, group: &str) -> bool {
    allowed(ctx, op, ResourceType::Group, group)
}

fn may_topic(ctx: &Ctx<'_>, op: Operation, topic: &str) -> bool {
    allowed(ctx, op, ResourceType::Topic, topic)
}

pub fn find_coordinator(ctx: &Ctx<'_>, req: FindCoordinatorRequest) -> Outcome {
    let v = ctx.version;
    let s = &ctx.broker.settings;
    let mut resp = FindCoordinatorResponse::default();
    let error_for = |key: &str| match req.key_type {
        KEY_TYPE_GROUP if !may(ctx, Operation::Describe, key) => ErrorCode::GroupAuthorizationFailed,
        KEY_TYPE_GROUP => ErrorCode::None,
        _ => ErrorCode::CoordinatorNotAvailable,
    };
    if v >= 4 {
        for key in req.coordinator_keys {
            let error = error_for(&key);
            let mut c = CoordinatorEntry::default();
            c.key = key;
            c.error_code = error.code();
            if error == ErrorCode::None {
                c.node_id = BrokerId(s.node_id);
                c.host = sb(&ctx.endpoint.host);
                c.port = ctx.endpoint.port;
            } else {
                c.node_id = BrokerId(-1);
                c.port = -1;
            }
            resp.coordinators.push(c);
        }
    } else {
        let error = error_for(&req.key);
        resp.error_code = error.code();
        if error == ErrorCode::None {
            resp.node_id = BrokerId(s.node_id);
            resp.host = sb(&ctx.endpoint.host);
            resp.port = ctx.endpoint.port;
        } else {
            resp.node_id = BrokerId(-1);
            resp.port = -1;
        }
    }
    Outcome::respond(resp)
}

/// A JoinGroup waiting for its rebalance.
pub struct ParkedJoin {
    pub version: i16,
    pub group: String,
    pub member_id: String,
}

/// A follower's SyncGroup waiting for the leader's assignment.
pub struct ParkedSync {
    pub version: i16,
    pub group: String,
    pub member_id: String,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
}

fn join_response(v: i16, member_id: &str, r: Result<JoinResult, ErrorCode>) -> JoinGroupResponse {
    let mut resp = JoinGroupResponse::default();
    resp.member_id = sb(member_id);
    match r {
        Ok(j) => {
            resp.generation_id = j.generation;
            resp.leader = sb(&j.leader);
            resp.protocol_name = Some(sb(j.protocol.as_deref().unwrap_or("")));
            if v >= 7 {
                resp.protocol_type = j.protocol_type.as_deref().map(sb);
            }
            resp.members = j
                .members
                .into_iter()
                .map(|(id, instance, meta)| {
                    let mut m = JoinGroupResponseMember::default();
                    m.member_id = sb(&id);
                    if v >= 5 {
                        m.group_instance_id = instance.as_deref().map(sb);
                    }
                    m.metadata = meta;
                    m
                })
                .collect();
        }
        Err(code) => {
            resp.error_code = code.code();
            resp.generation_id = -1;
            resp.protocol_name = if v >= 7 { None } else { Some(sb("")) };
        }
    }
    resp
}

pub fn join(ctx: &Ctx<'_>, req: JoinGroupRequest) -> Outcome {
    let v = ctx.version;
    if !may(ctx, Operation::Read, &req.group_id) {
        return Outcome::respond(join_response(v, &req.member_id, Err(ErrorCode::GroupAuthorizationFailed)));
    }
    let jr = JoinRequest {
        group: req.group_id.to_string(),
        member_id: req.member_id.to_string(),
        instance_id: req.group_instance_id.map(|s| s.to_string()),
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.client_host),
        session_timeout_ms: req.session_timeout_ms,
        rebalance_timeout_ms: if v >= 1 { req.rebalance_timeout_ms } else { req.session_timeout_ms },
        protocol_type: req.protocol_type.to_string(),
        protocols: req.protocols.into_iter().map(|p| (p.name.to_string(), p.metadata)).collect(),
        require_known_member_id: v >= 4,
    };
    let group = jr.group.clone();
    let step = ctx.broker.groups.lock().join(jr, ctx.now);
    ctx.broker.notifier.notify();
    match step {
        Err(e) => Outcome::respond(join_response(v, &req.member_id, Err(e.into()))),
        Ok(JoinStep::MemberIdRequired(id)) => Outcome::respond(join_response(v, &id, Err(ErrorCode::MemberIdRequired))),
        Ok(JoinStep::Pending(member_id)) => {
            let parked = ParkedJoin { version: v, group, member_id };
            poll_join(ctx.broker, &parked, false).unwrap_or(Outcome::Park(Parked::Join(parked)))
        }
    }
}

pub fn poll_join(broker: &Arc<Broker>, p: &ParkedJoin, force: bool) -> Option<Outcome> {
    let r = broker.groups.lock().join_poll(&p.group, &p.member_id);
    match r {
        Some(r) => Some(Outcome::respond(join_response(p.version, &p.member_id, r.map_err(ErrorCode::from)))),
        None if force => {
            Some(Outcome::respond(join_response(p.version, &p.member_id, Err(ErrorCode::RebalanceInProgress))))
        }
        None => None,
    }
}

fn sync_response(p: &ParkedSync, r: Result<Bytes, ErrorCode>) -> SyncGroupResponse {
    let mut resp = SyncGroupResponse::default();
    if p.version >= 5 {
        resp.protocol_type = p.protocol_type.as_deref().map(sb);
        resp.protocol_name = p.protocol_name.as_deref().map(sb);
    }
    match r {
        Ok(a) => resp.assignment = a,
        Err(code) => resp.error_code = code.code(),
    }
    resp
}

pub fn sync(ctx: &Ctx<'_>, req: SyncGroupRequest) -> Outcome {
    let group = req.group_id.to_string();
    let member_id = req.member_id.to_string();
    if !may(ctx, Operation::Read, &group) {
        let p = ParkedSync {
            version: ctx.version,
            group,
            member_id,
            generation: req.generation_id,
            protocol_type: None,
            protocol_name: None,
        };
        return Outcome::respond(sync_response(&p, Err(ErrorCode::GroupAuthorizationFailed)));
    }
    let assignments = req.assignments.into_iter().map(|a| (a.member_id.to_string(), a.assignment)).collect();
    let result = ctx.broker.groups.lock().sync(&group, &member_id, req.generation_id, assignments, ctx.now);
    let (protocol_type, protocol_name) = {
        let groups = ctx.broker.groups.lock();
        let g = groups.group(&group);
        (g.and_then(|g| g.protocol_type.clone()), g.and_then(|g| g.protocol.clone()))
    };
    let parked = ParkedSync {
        version: ctx.version,
        group,
        member_id,
        generation: req.generation_id,
        protocol_type,
        protocol_name,
    };
    match result {
        Ok(Some(assignment)) => {
            ctx.broker.notifier.notify();
            Outcome::respond(sync_response(&parked, Ok(assignment)))
        }
        Ok(None) => Outcome::Park(Parked::Sync(parked)),
        Err(e) => Outcome::respond(sync_response(&parked, Err(e.into()))),
    }
}

pub fn poll_sync(broker: &Arc<Broker>, p: &ParkedSync, force: bool) -> Option<Outcome> {
    let r = broker.groups.lock().sync_poll(&p.group, &p.member_id, p.generation);
    match r {
        Some(r) => Some(Outcome::respond(sync_response(p, r.map_err(ErrorCode::from)))),
        None if force => Some(Outcome::respond(sync_response(p, Err(ErrorCode::RebalanceInProgress)))),
        None => None,
    }
}

pub fn heartbeat(ctx: &Ctx<'_>, req: HeartbeatRequest) -> Outcome {
    if !may(ctx, Operation::Read, &req.group_id) {
        let mut resp = HeartbeatResponse::default();
        resp.error_code = ErrorCode::GroupAuthorizationFailed.code();
        return Outcome::respond(resp);
    }
    let r = ctx.broker.groups.lock().heartbeat(&req.group_id, &req.member_id, req.generation_id, ctx.now);
    let mut resp = HeartbeatResponse::default();
    if let Err(e) = r {
        resp.error_code = ErrorCode::from(e).code();
    }
    Outcome::respond(resp)
}

pub fn leave(ctx: &Ctx<'_>, req: LeaveGroupRequest) -> Outcome {
    let v = ctx.version;
    if !may(ctx, Operation::Read, &req.group_id) {
        let mut resp = LeaveGroupResponse::default();
        resp.error_code = ErrorCode::GroupAuthorizationFailed.code();
        return Outcome::respond(resp);
    }
    let ids: Vec<String> = if v >= 3 {
        req.members.iter().map(|m| m.member_id.to_string()).collect()
    } else {
        vec![req.member_id.to_string()]
    };
    let results = ctx.broker.groups.lock().leave(&req.group_id, &ids, ctx.now);
    ctx.broker.notifier.notify();
    let mut resp = LeaveGroupResponse::default();
    if v >= 3 {
        for (m, r) in req.members.into_iter().zip(results) {
            let mut mr = MemberResponse::default();
            mr.member_id = m.member_id;
            mr.group_instance_id = m.group_instance_id;
            if let Err(e) = r {
                mr.error_code = ErrorCode::from(e).code();
            }
            resp.members.push(mr);
        }
    } else if let Some(Err(e)) = results.into_iter().next() {
        resp.error_code = ErrorCode::from(e).code();
    }
    Outcome::respond(resp)
}

pub fn offset_commit(ctx: &Ctx<'_>, req: OffsetCommitRequest) -> Outcome {
    let mut resp = OffsetCommitResponse::default();
    let mut valid = Vec::new();
    let mut codes: Vec<Vec<ErrorCode>> = Vec::new();
    let group_denied = !may(ctx, Operation::Read, &req.group_id);
    for t in &req.topics {
        let topic = ctx.broker.topic(&t.name);
        let topic_denied = !may_topic(ctx, Operation::Read, &t.name);
        let mut tc = Vec::new();
        for p in &t.partitions {
            if group_denied {
                tc.push(ErrorCode::GroupAuthorizationFailed);
            } else if topic_denied {
                tc.push(ErrorCode::TopicAuthorizationFailed);
            } else if topic.as_ref().and_then(|tp| tp.key(p.partition_index)).is_none() {
                tc.push(ErrorCode::UnknownTopicOrPartition);
            } else {
                tc.push(ErrorCode::None);
                valid.push((
                    t.name.to_string(),
                    p.partition_index,
                    Committed {
                        offset: p.committed_offset,
                        leader_epoch: if ctx.version >= 6 { p.committed_leader_epoch } else { -1 },
                        metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                    },
                ));
            }
        }
        codes.push(tc);
    }
    let r = if group_denied {
        Ok(())
    } else {
        ctx.broker.commit_offsets(&req.group_id, &req.member_id, req.generation_id_or_member_epoch, valid, ctx.now)
    };
    for (t, tc) in req.topics.into_iter().zip(codes) {
        let mut tr = OffsetCommitResponseTopic::default();
        tr.name = t.name;
        for (p, code) in t.partitions.into_iter().zip(tc) {
            let mut pr = OffsetCommitResponsePartition::default();
            pr.partition_index = p.partition_index;
            let code = match (&r, code) {
                (Err(e), ErrorCode::None) => ErrorCode::from(*e),
                (_, c) => c,
            };
            pr.error_code = code.code();
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    Outcome::respond(resp)
}

/// Committed offsets of `group` for the requested (or all) topics/partitions.
/// Committed offsets per topic: (partition, committed if any).
type CommittedByTopic = Vec<(TopicName, Vec<(i32, Option<Committed>)>)>;

fn committed_for(broker: &Broker, group: &str, topics: Option<Vec<(TopicName, Vec<i32>)>>) -> CommittedByTopic {
    let groups = broker.groups.lock();
    match topics {
        Some(list) => list
            .into_iter()
            .map(|(t, parts)| {
                let ps = parts.into_iter().map(|p| (p, groups.committed(group, &t, p).cloned())).collect();
                (t, ps)
            })
            .collect(),
        None => {
            let mut out: CommittedByTopic = Vec::new();
            for (t, p, c) in groups.committed_all(group) {
                let name = TopicName(sb(&t));
                match out.last_mut() {
                    Some((n, ps)) if *n == name => ps.push((p, Some(c))),
                    _ => out.push((name, vec![(p, Some(c))])),
                }
            }
            out
        }
    }
}

pub fn offset_fetch(ctx: &Ctx<'_>, req: OffsetFetchRequest) -> Outcome {
    let v = ctx.version;
    let mut resp = OffsetFetchResponse::default();
    let fill = |c: &Option<Committed>| -> (i64, i32, String) {
        match c {
            Some(c) => (c.offset, c.leader_epoch, c.metadata.clone().unwrap_or_default()),
            None => (-1, -1, String::new()),
        }
    };
    if v >= 8 {
        for g in req.groups {
            let topics = g.topics.map(|ts| ts.into_iter().map(|t| (t.name, t.partition_indexes)).collect());
            let mut gr = OffsetFetchResponseGroup::default();
            gr.group_id = g.group_id.clone();
            if !may(ctx, Operation::Describe, &g.group_id) {
                gr.error_code = ErrorCode::GroupAuthorizationFailed.code();
                resp.groups.push(gr);
                continue;
            }
            let asked = topics.is_some();
            for (t, parts) in committed_for(ctx.broker, &g.group_id, topics) {
                let denied = !may_topic(ctx, Operation::Describe, &t);
                if denied && !asked {
                    continue;
                }
                let mut tr = OffsetFetchResponseTopics::default();
                tr.name = t;
                for (p, c) in parts {
                    let (offset, epoch, meta) = if denied { (-1, -1, String::new()) } else { fill(&c) };
                    let mut pr = OffsetFetchResponsePartitions::default();
                    pr.partition_index = p;
                    if denied {
                        pr.error_code = ErrorCode::TopicAuthorizationFailed.code();
                    }
                    pr.committed_offset = offset;
                    pr.committed_leader_epoch = epoch;
                    pr.metadata = Some(sb(&meta));
                    tr.partitions.push(pr);
                }
                gr.topics.push(tr);
            }
            resp.groups.push(gr);
        }
    } else {
        if !may(ctx, Operation::Describe, &req.group_id) {
            // v2+ carries a top-level error; before it, each partition does.
            if v >= 2 {
                resp.error_code = ErrorCode::GroupAuthorizationFailed.code();
            } else {
                for t in req.topics.into_iter().flatten() {
                    let mut tr = OffsetFetchResponseTopic::default();
                    tr.name = t.name;
                    for p in t.partition_indexes {
                        let mut pr = OffsetFetchResponsePartition::default();
                        pr.partition_index = p;
                        pr.committed_offset = -1;
                        pr.error_code = ErrorCode::GroupAuthorizationFailed.code();
                        tr.partitions.push(pr);
                    }
                    resp.topics.push(tr);
                }
            }
            return Outcome::respond(resp);
        }
        let topics = req.topics.map(|ts| ts.into_iter().map(|t| (t.name, t.partition_indexes)).collect());
        let asked = topics.is_some();
        for (t, parts) in committed_for(ctx.broker, &req.group_id, topics) {
            let denied = !may_topic(ctx, Operation::Describe, &t);
            if denied && !asked {
                continue;
            }
            let mut tr = OffsetFetchResponseTopic::default();
            tr.name = t;
            for (p, c) in parts {
                let (offset, epoch, meta) = if denied { (-1, -1, String::new()) } else { fill(&c) };
                let mut pr = OffsetFetchResponsePartition::default();
                pr.partition_index = p;
                if denied {
                    pr.error_code = ErrorCode::TopicAuthorizationFailed.code();
                }
                pr.committed_offset = offset;
                if v >= 5 {
                    pr.committed_leader_epoch = epoch;
                }
                pr.metadata = Some(sb(&meta));
                tr.partitions.push(pr);
            }
            resp.topics.push(tr);
        }
    }
    Outcome::respond(resp)
}

pub fn list_groups(ctx: &Ctx<'_>, req: ListGroupsRequest) -> Outcome {
    let v = ctx.version;
    let mut resp = ListGroupsResponse::default();
    let whole_cluster = allowed_on_cluster(ctx, Operation::Describe);
    let groups = ctx.broker.groups.lock();
    for g in groups.groups() {
        if !whole_cluster && !may(ctx, Operation::Describe, &g.id) {
            continue;
        }
        let state = g.state.name();
        if v >= 4 && !req.states_filter.is_empty() && !req.states_filter.iter().any(|s| s.as_str() == state) {
            continue;
        }
        let mut lg = ListedGroup::default();
        lg.group_id = GroupId(sb(&g.id));
        lg.protocol_type = sb(g.protocol_type.as_deref().unwrap_or("consumer"));
        if v >= 4 {
            lg.group_state = sb(state);
        }
        resp.groups.push(lg);
    }
    Outcome::respond(resp)
}

pub fn describe_groups(ctx: &Ctx<'_>, req: DescribeGroupsRequest) -> Outcome {
    let mut resp = DescribeGroupsResponse::default();
    let groups = ctx.broker.groups.lock();
    for id in req.groups {
        let mut dg = DescribedGroup::default();
        dg.group_id = id.clone();
        if !may(ctx, Operation::Describe, &id) {
            dg.error_code = ErrorCode::GroupAuthorizationFailed.code();
            resp.groups.push(dg);
            continue;
        }
        match groups.group(&id) {
            None => {
                dg.group_state = sb("Dead");
            }
            Some(g) => {
                dg.group_state = sb(g.state.name());
                dg.protocol_type = sb(g.protocol_type.as_deref().unwrap_or(""));
                let proto = g.protocol.clone().unwrap_or_default();
                dg.protocol_data = sb(&proto);
                for m in g.members.values() {
                    let mut dm = DescribedGroupMember::default();
                    dm.member_id = sb(&m.id);
                    if ctx.version >= 4 {
                        dm.group_instance_id = m.instance_id.as_deref().map(sb);
                    }
                    dm.client_id = sb(&m.client_id);
                    dm.client_host = sb(&m.client_host);
                    dm.member_metadata = m.metadata_for(&proto);
                    dm.member_assignment = m.assignment.clone();
                    dg.members.push(dm);
                }
            }
        }
        resp.groups.push(dg);
    }
    Outcome::respond(resp)
}
