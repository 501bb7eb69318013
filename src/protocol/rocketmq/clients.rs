//! The client registry: which clients of each consumer and producer group are alive
//! (heartbeats) and on which connection, what consumers subscribe to, the queue locks of
//! ordered consumers, and each connection's outbox for frames the broker initiates.
//!
//! RocketMQ consumers rebalance on their side from the group's client list; the broker
//! keeps that list true and tells the group's clients when it changes
//! (NOTIFY_CONSUMER_IDS_CHANGED), so they rebalance at once rather than at their next
//! timer. A client leaves when it unregisters, when the connection it heartbeated on
//! closes, or after [`EXPIRY`] without a heartbeat (RocketMQ's channel expiry).
//!
//! # Invariants
//! - A frame put in an outbox is followed by a notifier poke, so the connection's parked
//!   [`Watch`](super::Watch) is re-polled and sends it.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::codes::NOTIFY_CONSUMER_IDS_CHANGED;
use super::frame::Command;
use super::message::TagFilter;
use crate::broker::Notifier;

/// A client silent this long is gone.
pub const EXPIRY: Duration = Duration::from_secs(120);
/// A queue lock not renewed for this long is free (RocketMQ's `rebalance.lockMaxLiveTime`).
pub const LOCK_EXPIRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Member {
    conn: u64,
    last_seen: Instant,
    /// topic → tag filter.
    subscriptions: HashMap<String, TagFilter>,
}

/// Frames for one connection, sent by its watch.
#[derive(Default)]
pub struct Outbox {
    frames: Mutex<Vec<Bytes>>,
    ready: AtomicBool,
}

impl Outbox {
    fn put(&self, frame: Bytes) {
        self.frames.lock().push(frame);
        self.ready.store(true, Ordering::Release);
    }

    /// What is waiting, if anything (cheap when nothing is).
    pub fn take(&self) -> Vec<Bytes> {
        if !self.ready.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.frames.lock())
    }
}

#[derive(Default)]
struct Registry {
    /// consumer group → client id → member.
    consumers: HashMap<String, HashMap<String, Member>>,
    /// producer group → client id → (connection, last heartbeat).
    producers: HashMap<String, HashMap<String, (u64, Instant)>>,
    outboxes: HashMap<u64, Arc<Outbox>>,
    /// (group, topic, queue) → (client id, last lock).
    locks: HashMap<(String, String, i32), (String, Instant)>,
}

pub struct Clients {
    inner: Mutex<Registry>,
    notifier: Arc<Notifier>,
    next_opaque: AtomicI32,
}

impl Clients {
    pub fn new(notifier: Arc<Notifier>) -> Clients {
        Clients { inner: Mutex::default(), notifier, next_opaque: AtomicI32::new(1) }
    }

    /// The outbox of `conn`, made on first use.
    pub fn outbox(&self, conn: u64) -> Arc<Outbox> {
        self.inner.lock().outboxes.entry(conn).or_default().clone()
    }

    /// Puts `cmd` (a broker-initiated request) in `outbox`, with an opaque of its own; the
    /// caller pokes the notifier.
    fn put(&self, outbox: &Outbox, mut cmd: Command) {
        cmd.opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        outbox.put(cmd.encode());
    }

    /// Sends `cmd` (a broker-initiated request) to `conn`'s client.
    pub fn push(&self, conn: u64, cmd: Command) -> bool {
        let Some(outbox) = self.inner.lock().outboxes.get(&conn).cloned() else { return false };
        self.put(&outbox, cmd);
        self.notifier.notify();
        true
    }

    /// Tells every client of `group` that its member list changed.
    fn notify_changed(&self, reg: &Registry, group: &str) {
        let Some(members) = reg.consumers.get(group) else { return };
        let mut pushed = false;
        for o in members.values().filter_map(|m| reg.outboxes.get(&m.conn)) {
            let ext = vec![("consumerGroup".into(), group.into())];
            self.put(o, Command::request(NOTIFY_CONSUMER_IDS_CHANGED, ext, true, 0));
            pushed = true;
        }
        if pushed {
            self.notifier.notify();
        }
    }

    /// Records a heartbeat of `client` in consumer `group`, with its subscriptions.
    pub fn heartbeat(&self, group: &str, client: &str, conn: u64, subs: HashMap<String, TagFilter>, now: Instant) {
        let mut reg = self.inner.lock();
        let members = reg.consumers.entry(group.to_string()).or_default();
        let new = members.insert(client.to_string(), Member { conn, last_seen: now, subscriptions: subs }).is_none();
        if new {
            self.notify_changed(&reg, group);
        }
    }

    /// Records a heartbeat of `client` in producer `group`.
    pub fn producer_heartbeat(&self, group: &str, client: &str, conn: u64, now: Instant) {
        let mut reg = self.inner.lock();
        reg.producers.entry(group.to_string()).or_default().insert(client.to_string(), (conn, now));
    }

    /// A live connection of producer `group` (for transaction check-backs).
    pub fn producer_conn(&self, group: &str, now: Instant) -> Option<u64> {
        let reg = self.inner.lock();
        let live = reg.producers.get(group)?.values().filter(|(_, seen)| now.duration_since(*seen) < EXPIRY);
        live.map(|(c, _)| *c).min()
    }

    pub fn unregister(&self, consumer_group: Option<&str>, producer_group: Option<&str>, client: &str) {
        let mut reg = self.inner.lock();
        if let Some(g) = producer_group {
            if let Some(p) = reg.producers.get_mut(g) {
                p.remove(client);
            }
        }
        let Some(group) = consumer_group else { return };
        let removed = reg.consumers.get_mut(group).is_some_and(|g| g.remove(client).is_some());
        if removed {
            self.notify_changed(&reg, group);
        }
        if reg.consumers.get(group).is_some_and(HashMap::is_empty) {
            reg.consumers.remove(group);
        }
    }

    pub fn connection_closed(&self, conn: u64) {
        let mut reg = self.inner.lock();
        reg.outboxes.remove(&conn);
        let mut changed = Vec::new();
        for (name, g) in reg.consumers.iter_mut() {
            let before = g.len();
            g.retain(|_, m| m.conn != conn);
            if g.len() != before {
                changed.push(name.clone());
            }
        }
        for p in reg.producers.values_mut() {
            p.retain(|_, (c, _)| *c != conn);
        }
        for group in changed {
            self.notify_changed(&reg, &group);
        }
        reg.consumers.retain(|_, g| !g.is_empty());
        reg.producers.retain(|_, g| !g.is_empty());
    }

    /// The group's live client ids, sorted (every client must see the same order to
    /// share queues out the same way).
    pub fn members(&self, group: &str, now: Instant) -> Vec<String> {
        let mut reg = self.inner.lock();
        let Some(g) = reg.consumers.get_mut(group) else { return Vec::new() };
        g.retain(|_, m| now.duration_since(m.last_seen) < EXPIRY);
        let mut ids: Vec<String> = g.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The filter a group's members last announced for `topic`, if any did.
    pub fn subscription(&self, group: &str, topic: &str) -> Option<TagFilter> {
        let reg = self.inner.lock();
        reg.consumers.get(group)?.values().find_map(|m| m.subscriptions.get(topic).cloned())
    }

    /// LOCK_BATCH_MQ: locks for `client` the queues nobody else holds (or whose lock
    /// expired); returns those it now holds.
    pub fn lock(&self, group: &str, client: &str, queues: &[(String, i32)], now: Instant) -> Vec<(String, i32)> {
        let mut reg = self.inner.lock();
        let mut held = Vec::new();
        for (topic, q) in queues {
            let key = (group.to_string(), topic.clone(), *q);
            let free = match reg.locks.get(&key) {
                Some((owner, at)) => owner == client || now.duration_since(*at) >= LOCK_EXPIRY,
                None => true,
            };
            if free {
                reg.locks.insert(key, (client.to_string(), now));
                held.push((topic.clone(), *q));
            }
        }
        held
    }

    /// UNLOCK_BATCH_MQ: releases what `client` holds of `queues`.
    pub fn unlock(&self, group: &str, client: &str, queues: &[(String, i32)]) {
        let mut reg = self.inner.lock();
        for (topic, q) in queues {
            let key = (group.to_string(), topic.clone(), *q);
            if reg.locks.get(&key).is_some_and(|(owner, _)| owner == client) {
                reg.locks.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_and_go_and_their_group_is_told() {
        let c = Clients::new(Arc::default());
        let now = Instant::now();
        let outbox = c.outbox(1);
        c.heartbeat("g", "b@1", 1, HashMap::new(), now);
        assert_eq!(outbox.take().len(), 1, "the new member is told");
        assert!(outbox.take().is_empty());
        c.heartbeat("g", "b@1", 1, HashMap::new(), now);
        assert!(outbox.take().is_empty(), "a repeated heartbeat changes nothing");
        c.heartbeat("g", "a@2", 2, HashMap::from([("t".to_string(), TagFilter::parse("x"))]), now);
        let frames = outbox.take();
        let cmd = Command::decode(frames[0].slice(4..)).expect("a command");
        assert_eq!((cmd.code, cmd.field("consumerGroup"), cmd.is_oneway()), (40, Some("g"), true));
        assert_eq!(c.members("g", now), vec!["a@2", "b@1"]);
        assert_eq!(c.subscription("g", "t"), Some(TagFilter::Tags(vec!["x".into()])));
        c.connection_closed(2);
        assert_eq!(outbox.take().len(), 1, "told that a@2 left");
        assert_eq!(c.members("g", now), vec!["b@1"]);
        assert!(c.members("g", now + EXPIRY).is_empty());
        c.heartbeat("g", "b@1", 1, HashMap::new(), now);
        c.unregister(Some("g"), None, "b@1");
        assert!(c.members("g", now).is_empty());
    }

    #[test]
    fn queue_locks_are_exclusive_until_released_or_expired() {
        let c = Clients::new(Arc::default());
        let now = Instant::now();
        let qs = vec![("t".to_string(), 0), ("t".to_string(), 1)];
        assert_eq!(c.lock("g", "a", &qs, now), qs);
        assert!(c.lock("g", "b", &qs, now).is_empty());
        assert_eq!(c.lock("g", "a", &qs[..1], now), qs[..1].to_vec(), "renewal");
        c.unlock("g", "a", &qs[1..]);
        assert_eq!(c.lock("g", "b", &qs, now), qs[1..].to_vec());
        assert_eq!(c.lock("g", "b", &qs, now + LOCK_EXPIRY), qs, "a's lock expired");
        c.producer_heartbeat("pg", "p", 7, now);
        assert_eq!(c.producer_conn("pg", now), Some(7));
        c.connection_closed(7);
        assert_eq!(c.producer_conn("pg", now), None);
    }
}
