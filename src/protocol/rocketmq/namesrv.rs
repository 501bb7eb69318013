//! The built-in name server: routes name this broker's RocketMQ listener, with one queue
//! per partition.
//!
//! An unknown topic is TOPIC_NOT_EXIST, unless the broker auto-creates topics: then the
//! route query creates it (as a Kafka Metadata request does), so producers and consumers
//! of a new topic need no admin step. `TBW102`, the default topic RocketMQ producers fall
//! back to, always has a route.

use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

use super::codes::{Request, Response, PERM_READ, PERM_WRITE};
use super::frame::Command;
use super::{error, ok, Conn, Reply, RocketMqState};
use crate::broker::{Broker, BrokerError, Topic};
use crate::dispatch::session::Cx;

/// The default topic producers use to learn where they may auto-create one.
pub const DEFAULT_TOPIC: &str = "TBW102";
/// `PermName.PERM_INHERIT`: TBW102's routes carry it.
const PERM_INHERIT: i32 = 1;

pub fn handle(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    match Request::from_code(req.code) {
        Some(Request::GetRouteInfoByTopic) => route(cx, conn, req),
        Some(Request::GetBrokerClusterInfo) => cluster_info(conn.state, req),
        Some(Request::GetAllTopicListFromNameServer) => {
            let topics: Vec<String> = cx.broker.topics().iter().map(|t| t.name().to_string()).collect();
            let mut resp = ok(req);
            resp.body = serde_json::to_vec(&json!({ "topicList": topics })).unwrap_or_default().into();
            Reply::Done(resp)
        }
        // No KV configuration is kept: what a client asks for is not there (clients treat
        // this as "no project group", the name server's own answer for an empty table).
        Some(Request::GetKvConfig) | Some(Request::GetKvConfigByValue) => {
            error(req, Response::QueryNotFound, "no such KV config")
        }
        _ => error(
            req,
            Response::RequestCodeNotSupported,
            format!("request code {} is not supported by slipstream's name server", req.code),
        ),
    }
}

fn route(cx: &Cx<'_>, conn: &Conn<'_>, req: &Command) -> Reply {
    let Some(name) = req.field("topic").map(str::to_string) else {
        return error(req, Response::SystemError, "topic missing");
    };
    if name == DEFAULT_TOPIC {
        let queues = cx.broker.settings.default_partitions;
        return Reply::Done(route_response(req, conn.state, queues, PERM_READ | PERM_WRITE | PERM_INHERIT));
    }
    if let Some(t) = cx.broker.topic(&name) {
        return Reply::Done(route_response(req, conn.state, t.meta.partitions, PERM_READ | PERM_WRITE));
    }
    if !cx.broker.settings.auto_create_topics {
        return error(
            req,
            Response::TopicNotExist,
            format!("No topic route info in name server for the topic: {name}"),
        );
    }
    let (broker, state, req2) = (cx.broker.clone(), conn.state.clone(), req.clone());
    Reply::Blocking(cx.broker.files.run(move || match ensure_topic(&broker, &name) {
        Ok(t) => route_response(&req2, &state, t.meta.partitions, PERM_READ | PERM_WRITE),
        Err(e) => Command::response_to(&req2, Response::SystemError.code(), Some(e.to_string())),
    }))
}

/// The topic, created if missing (for the file worker: it writes the topic's files).
/// Retry and dead-letter topics get one queue, as RocketMQ gives them.
pub fn ensure_topic(broker: &Arc<Broker>, name: &str) -> Result<Arc<Topic>, BrokerError> {
    if let Some(t) = broker.topic(name) {
        return Ok(t);
    }
    let queues = if name.starts_with("%RETRY%") || name.starts_with("%DLQ%") { 1 } else { -1 };
    match broker.create_topic(name, queues, HashMap::new(), false) {
        Err(BrokerError::TopicExists(_)) => broker.topic(name).ok_or_else(|| BrokerError::UnknownTopic(name.into())),
        other => other,
    }
}

fn route_response(req: &Command, state: &RocketMqState, queues: i32, perm: i32) -> Command {
    let body = json!({
        "orderTopicConf": null,
        "queueDatas": [{
            "brokerName": state.broker_name,
            "readQueueNums": queues,
            "writeQueueNums": queues,
            "perm": perm,
            "topicSysFlag": 0,
        }],
        "brokerDatas": [broker_data(state)],
        "filterServerTable": {},
    });
    let mut resp = ok(req);
    resp.body = serde_json::to_vec(&body).unwrap_or_default().into();
    resp
}

/// This broker as a route's `BrokerData` (broker id 0: the master; no zone; 5.x clients
/// require `enableActingMaster`).
fn broker_data(state: &RocketMqState) -> serde_json::Value {
    json!({
        "cluster": state.cluster,
        "brokerName": state.broker_name,
        "brokerAddrs": { "0": state.broker_addr },
        "zoneName": null,
        "enableActingMaster": false,
    })
}

fn cluster_info(state: &RocketMqState, req: &Command) -> Reply {
    let body = json!({
        "brokerAddrTable": {
            state.broker_name.clone(): broker_data(state)
        },
        "clusterAddrTable": { state.cluster.clone(): [state.broker_name] },
    });
    let mut resp = ok(req);
    resp.body = serde_json::to_vec(&body).unwrap_or_default().into();
    Reply::Done(resp)
}
