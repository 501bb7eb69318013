//! Cluster and topic administration: Metadata, CreateTopics, DeleteTopics,
//! CreatePartitions, DescribeConfigs, DescribeCluster, InitProducerId.

use super::acls::{allowed, allowed_on_cluster};
use crate::broker::acl::{Operation, ResourceType};
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{CreatableTopicConfigs, CreatableTopicResult};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_configs_response::{DescribeConfigsResourceResult, DescribeConfigsResult};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeClusterRequest, DescribeClusterResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, InitProducerIdRequest, InitProducerIdResponse, MetadataRequest, MetadataResponse,
    ProducerId, TopicName,
};
use std::collections::HashMap;
use std::sync::Arc;

use super::{sb, Ctx, ErrorCode, Outcome};
use crate::broker::{effective_configs, kafka_topic_name, BrokerError, Topic};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

fn topic_metadata(ctx: &Ctx<'_>, t: &Topic) -> MetadataResponseTopic {
    let v = ctx.version;
    let node = ctx.broker.settings.node_id;
    let mut mt = MetadataResponseTopic::default();
    mt.name = Some(TopicName(sb(t.name())));
    if v >= 10 {
        mt.topic_id = t.meta.id;
    }
    for p in 0..t.meta.partitions {
        let mut mp = MetadataResponsePartition::default();
        mp.partition_index = p;
        mp.leader_id = BrokerId(node);
        if v >= 7 {
            mp.leader_epoch = 0;
        }
        mp.replica_nodes = vec![BrokerId(node)];
        mp.isr_nodes = vec![BrokerId(node)];
        mt.partitions.push(mp);
    }
    mt
}

/// Whether answering `req` may create a topic (auto-creation of a named topic that does
/// not exist): such a Metadata request writes files, so it runs on the file worker.
pub fn may_create_topics(ctx: &Ctx<'_>, req: &MetadataRequest) -> bool {
    let s = &ctx.broker.settings;
    if !s.auto_create_topics || (ctx.version >= 4 && !req.allow_auto_topic_creation) {
        return false;
    }
    req.topics.iter().flatten().any(|t| t.name.as_ref().is_some_and(|n| ctx.broker.topic(n).is_none()))
}

/// CREATE on the cluster, or on the topic.
fn may_create(ctx: &Ctx<'_>, topic: &str) -> bool {
    allowed_on_cluster(ctx, Operation::Create) || allowed(ctx, Operation::Create, ResourceType::Topic, topic)
}

pub fn metadata(ctx: &Ctx<'_>, req: MetadataRequest) -> Outcome {
    let v = ctx.version;
    let s = &ctx.broker.settings;
    let mut resp = MetadataResponse::default();
    let mut b = MetadataResponseBroker::default();
    b.node_id = BrokerId(s.node_id);
    b.host = sb(&ctx.endpoint.host);
    b.port = ctx.endpoint.port;
    resp.brokers.push(b);
    if v >= 2 {
        resp.cluster_id = Some(sb(&s.cluster_id));
    }
    if v >= 1 {
        resp.controller_id = BrokerId(s.node_id);
    }
    // v0 has no "all topics" null: an empty list means all there.
    let wanted = match req.topics {
        None => None,
        Some(list) if list.is_empty() && v == 0 => None,
        Some(list) => Some(list),
    };
    match wanted {
        None => {
            // All topics: those the principal may not describe are left out, as in Kafka.
            for t in ctx.broker.topics() {
                if allowed(ctx, Operation::Describe, ResourceType::Topic, t.name()) {
                    resp.topics.push(topic_metadata(ctx, &t));
                }
            }
        }
        Some(list) => {
            // Before v4 there is no flag and auto-creation is the broker's choice.
            let allow = s.auto_create_topics && (v < 4 || req.allow_auto_topic_creation);
            for rt in list {
                let topic = match &rt.name {
                    Some(n) => ctx.broker.topic(n),
                    None => ctx.broker.topic_by_id(rt.topic_id),
                };
                let may = |op, name: &str| allowed(ctx, op, ResourceType::Topic, name);
                let topic = match (topic, &rt.name) {
                    (Some(t), _) if !may(Operation::Describe, t.name()) => Err(ErrorCode::TopicAuthorizationFailed),
                    (Some(t), _) => Ok(t),
                    (None, Some(n)) if !may(Operation::Describe, n) => Err(ErrorCode::TopicAuthorizationFailed),
                    (None, Some(n)) if !kafka_topic_name(n) => Err(ErrorCode::InvalidTopicException),
                    // Auto-creation needs CREATE on the cluster or on the topic.
                    (None, Some(n)) if allow && !may_create(ctx, n) => Err(ErrorCode::TopicAuthorizationFailed),
                    (None, Some(n)) if allow => match ctx.broker.create_topic(n, -1, HashMap::new(), false) {
                        Ok(t) => Ok(t),
                        Err(BrokerError::TopicExists(_)) => {
                            ctx.broker.topic(n).ok_or(ErrorCode::UnknownTopicOrPartition)
                        }
                        Err(e) => Err(ErrorCode::from(&e)),
                    },
                    (None, Some(_)) => Err(ErrorCode::UnknownTopicOrPartition),
                    (None, None) => Err(ErrorCode::UnknownTopicId),
                };
                match topic {
                    Ok(t) => resp.topics.push(topic_metadata(ctx, &t)),
                    Err(code) => {
                        let mut mt = MetadataResponseTopic::default();
                        mt.error_code = code.code();
                        mt.name = rt.name.clone();
                        if v >= 10 {
                            mt.topic_id = rt.topic_id;
                        }
                        resp.topics.push(mt);
                    }
                }
            }
        }
    }
    Outcome::respond(resp)
}

pub fn create_topics(ctx: &Ctx<'_>, req: CreateTopicsRequest) -> Outcome {
    let v = ctx.version;
    let mut resp = CreateTopicsResponse::default();
    for ct in req.topics {
        let mut r = CreatableTopicResult::default();
        r.name = ct.name.clone();
        let configs: HashMap<String, String> =
            ct.configs.iter().filter_map(|c| Some((c.name.to_string(), c.value.as_ref()?.to_string()))).collect();
        let result = if !may_create(ctx, &ct.name) {
            Err((ErrorCode::TopicAuthorizationFailed, "Authorization failed.".to_string()))
        } else if ct.replication_factor > 1 {
            Err((
                ErrorCode::InvalidReplicationFactor,
                format!("replication factor {} > 1 broker", ct.replication_factor),
            ))
        } else if !kafka_topic_name(&ct.name) {
            Err((ErrorCode::InvalidTopicException, format!("'{}' is not a legal Kafka topic name", ct.name.as_str())))
        } else if !ct.assignments.is_empty() {
            Err((ErrorCode::InvalidRequest, "manual replica assignment is not supported".to_string()))
        } else {
            ctx.broker
                .create_topic(&ct.name, ct.num_partitions, configs, req.validate_only)
                .map_err(|e| (ErrorCode::from(&e), e.to_string()))
        };
        match result {
            Ok(t) => {
                if v >= 5 {
                    r.num_partitions = t.meta.partitions;
                    r.replication_factor = 1;
                    r.configs = Some(
                        effective_configs(&ctx.broker.settings.log, &t.meta.configs)
                            .into_iter()
                            .map(|(k, val, is_default)| {
                                let mut c = CreatableTopicConfigs::default();
                                c.name = sb(&k);
                                c.value = Some(sb(&val));
                                c.config_source = if is_default { SOURCE_DEFAULT } else { SOURCE_DYNAMIC_TOPIC };
                                c
                            })
                            .collect(),
                    );
                }
                if v >= 7 {
                    r.topic_id = t.meta.id;
                }
            }
            Err((code, msg)) => {
                r.error_code = code.code();
                if v >= 1 {
                    r.error_message = Some(sb(&msg));
                }
                if v >= 5 {
                    r.num_partitions = -1;
                    r.replication_factor = -1;
                }
            }
        }
        resp.topics.push(r);
    }
    Outcome::respond(resp)
}

pub fn delete_topics(ctx: &Ctx<'_>, req: DeleteTopicsRequest) -> Outcome {
    let v = ctx.version;
    let mut resp = DeleteTopicsResponse::default();
    let targets: Vec<(Option<TopicName>, uuid::Uuid)> = if v >= 6 {
        req.topics.into_iter().map(|t| (t.name, t.topic_id)).collect()
    } else {
        req.topic_names.into_iter().map(|n| (Some(n), uuid::Uuid::nil())).collect()
    };
    for (name, id) in targets {
        let mut r = DeletableTopicResult::default();
        let resolved: Option<Arc<Topic>> = match &name {
            Some(n) => ctx.broker.topic(n),
            None => ctx.broker.topic_by_id(id),
        };
        r.name = name.clone().or_else(|| resolved.as_ref().map(|t| TopicName(sb(t.name()))));
        if v >= 6 {
            r.topic_id = resolved.as_ref().map_or(id, |t| t.meta.id);
        }
        let denied = |n: &str| !allowed(ctx, Operation::Delete, ResourceType::Topic, n);
        let result = match resolved {
            Some(t) if denied(t.name()) => Err((ErrorCode::TopicAuthorizationFailed, "Authorization failed.".into())),
            None if name.as_deref().is_some_and(|n| denied(n)) => {
                Err((ErrorCode::TopicAuthorizationFailed, "Authorization failed.".into()))
            }
            None if name.is_none() => Err((ErrorCode::UnknownTopicId, "unknown topic id".to_string())),
            None => Err((ErrorCode::UnknownTopicOrPartition, "unknown topic".to_string())),
            Some(t) => ctx.broker.delete_topic(t.name()).map(|_| ()).map_err(|e| (ErrorCode::from(&e), e.to_string())),
        };
        if let Err((code, msg)) = result {
            r.error_code = code.code();
            if v >= 5 {
                r.error_message = Some(sb(&msg));
            }
        }
        resp.responses.push(r);
    }
    Outcome::respond(resp)
}

pub fn create_partitions(ctx: &Ctx<'_>, req: CreatePartitionsRequest) -> Outcome {
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
        if !allowed(ctx, Operation::Alter, ResourceType::Topic, &t.name) {
            r.error_code = ErrorCode::TopicAuthorizationFailed.code();
            r.error_message = Some(sb("Authorization failed."));
        } else if let Err(e) = ctx.broker.create_partitions(&t.name, t.count, req.validate_only) {
            r.error_code = ErrorCode::from(&e).code();
            r.error_message = Some(sb(&e.to_string()));
        }
        resp.results.push(r);
    }
    Outcome::respond(resp)
}

pub fn describe_configs(ctx: &Ctx<'_>, req: DescribeConfigsRequest) -> Outcome {
    let s = &ctx.broker.settings;
    let mut resp = DescribeConfigsResponse::default();
    for res in req.resources {
        let mut r = DescribeConfigsResult::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let entries: Result<Vec<(String, String, i8)>, ErrorCode> = match res.resource_type {
            RESOURCE_TOPIC if !allowed(ctx, Operation::DescribeConfigs, ResourceType::Topic, &res.resource_name) => {
                Err(ErrorCode::TopicAuthorizationFailed)
            }
            RESOURCE_BROKER if !allowed_on_cluster(ctx, Operation::DescribeConfigs) => {
                Err(ErrorCode::ClusterAuthorizationFailed)
            }
            RESOURCE_TOPIC => match ctx.broker.topic(&res.resource_name) {
                Some(t) => Ok(effective_configs(&s.log, &t.meta.configs)
                    .into_iter()
                    .map(|(k, v, d)| (k, v, if d { SOURCE_DEFAULT } else { SOURCE_DYNAMIC_TOPIC }))
                    .collect()),
                None => Err(ErrorCode::UnknownTopicOrPartition),
            },
            RESOURCE_BROKER if res.resource_name.as_str() == s.node_id.to_string() || res.resource_name.is_empty() => {
                Ok(vec![
                    ("broker.id".into(), s.node_id.to_string(), SOURCE_STATIC_BROKER),
                    ("num.partitions".into(), s.default_partitions.to_string(), SOURCE_STATIC_BROKER),
                    ("auto.create.topics.enable".into(), s.auto_create_topics.to_string(), SOURCE_STATIC_BROKER),
                    ("message.max.bytes".into(), s.max_request_bytes.to_string(), SOURCE_STATIC_BROKER),
                    ("log.segment.bytes".into(), s.log.segment_bytes.to_string(), SOURCE_STATIC_BROKER),
                ])
            }
            _ => Err(ErrorCode::InvalidRequest),
        };
        match entries {
            Ok(list) => {
                for (k, v, src) in list {
                    if let Some(keys) = &res.configuration_keys {
                        if !keys.iter().any(|want| want.as_str() == k) {
                            continue;
                        }
                    }
                    let mut c = DescribeConfigsResourceResult::default();
                    c.name = sb(&k);
                    c.value = Some(sb(&v));
                    c.config_source = src;
                    r.configs.push(c);
                }
            }
            Err(code) => {
                r.error_code = code.code();
                r.error_message = Some(sb(match code {
                    ErrorCode::TopicAuthorizationFailed | ErrorCode::ClusterAuthorizationFailed => {
                        "Authorization failed."
                    }
                    _ => "unknown resource",
                }));
            }
        }
        resp.results.push(r);
    }
    Outcome::respond(resp)
}

pub fn describe_cluster(ctx: &Ctx<'_>, _req: DescribeClusterRequest) -> Outcome {
    let s = &ctx.broker.settings;
    let mut resp = DescribeClusterResponse::default();
    if !allowed_on_cluster(ctx, Operation::Describe) {
        resp.error_code = ErrorCode::ClusterAuthorizationFailed.code();
        resp.error_message = Some(sb("Cluster authorization failed."));
        return Outcome::respond(resp);
    }
    resp.cluster_id = sb(&s.cluster_id);
    resp.controller_id = BrokerId(s.node_id);
    let mut b = DescribeClusterBroker::default();
    b.broker_id = BrokerId(s.node_id);
    b.host = sb(&ctx.endpoint.host);
    b.port = ctx.endpoint.port;
    resp.brokers.push(b);
    Outcome::respond(resp)
}

pub fn init_producer_id(ctx: &Ctx<'_>, req: InitProducerIdRequest) -> Outcome {
    let mut resp = InitProducerIdResponse::default();
    if req.transactional_id.is_some() {
        // Transactions are not implemented: say so rather than hand out an id that
        // would pretend to be transactional.
        resp.error_code = ErrorCode::TransactionalIdAuthorizationFailed.code();
        resp.producer_id = ProducerId(-1);
        resp.producer_epoch = -1;
        return Outcome::respond(resp);
    }
    // An idempotent producer needs IDEMPOTENT_WRITE on the cluster, or WRITE on some
    // topic (Kafka 3's rule).
    if !allowed_on_cluster(ctx, Operation::IdempotentWrite)
        && !ctx.broker.topics().iter().any(|t| allowed(ctx, Operation::Write, ResourceType::Topic, t.name()))
    {
        resp.error_code = ErrorCode::ClusterAuthorizationFailed.code();
        resp.producer_id = ProducerId(-1);
        resp.producer_epoch = -1;
        return Outcome::respond(resp);
    }
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 {
        // KIP-360: an idempotent producer bumping its own epoch keeps its id.
        resp.producer_id = req.producer_id;
        resp.producer_epoch = req.producer_epoch.wrapping_add(1).max(0);
        return Outcome::respond(resp);
    }
    match ctx.broker.allocate_producer_id() {
        Ok(id) => {
            resp.producer_id = ProducerId(id);
            resp.producer_epoch = 0;
        }
        Err(e) => {
            log::error!("allocating a producer id: {e}");
            resp.error_code = ErrorCode::from(&e).code();
            resp.producer_id = ProducerId(-1);
            resp.producer_epoch = -1;
        }
    }
    Outcome::respond(resp)
}
