//! The consumer registry: which clients of each consumer group are alive (heartbeats)
//! and what they subscribe to. RocketMQ consumers rebalance on their side from the
//! group's client list; the broker only keeps that list true.
//!
//! A client leaves the list when it unregisters, when the connection it heartbeated on
//! closes, or after [`EXPIRY`] without a heartbeat (RocketMQ's channel expiry).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::message::TagFilter;

/// A client silent this long is gone.
pub const EXPIRY: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
struct Member {
    conn: u64,
    last_seen: Instant,
    /// topic → tag filter.
    subscriptions: HashMap<String, TagFilter>,
}

#[derive(Default)]
pub struct Clients {
    /// group → client id → member.
    groups: Mutex<HashMap<String, HashMap<String, Member>>>,
}

impl Clients {
    /// Records a heartbeat of `client` in `group`, with its subscriptions.
    pub fn heartbeat(&self, group: &str, client: &str, conn: u64, subs: HashMap<String, TagFilter>, now: Instant) {
        let mut groups = self.groups.lock();
        groups
            .entry(group.to_string())
            .or_default()
            .insert(client.to_string(), Member { conn, last_seen: now, subscriptions: subs });
    }

    pub fn unregister(&self, group: &str, client: &str) {
        let mut groups = self.groups.lock();
        if let Some(g) = groups.get_mut(group) {
            g.remove(client);
            if g.is_empty() {
                groups.remove(group);
            }
        }
    }

    pub fn connection_closed(&self, conn: u64) {
        let mut groups = self.groups.lock();
        for g in groups.values_mut() {
            g.retain(|_, m| m.conn != conn);
        }
        groups.retain(|_, g| !g.is_empty());
    }

    /// The group's live client ids, sorted (every client must see the same order to
    /// share queues out the same way).
    pub fn members(&self, group: &str, now: Instant) -> Vec<String> {
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group) else { return Vec::new() };
        g.retain(|_, m| now.duration_since(m.last_seen) < EXPIRY);
        let mut ids: Vec<String> = g.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The filter a group's members last announced for `topic`, if any did.
    pub fn subscription(&self, group: &str, topic: &str) -> Option<TagFilter> {
        let groups = self.groups.lock();
        groups.get(group)?.values().find_map(|m| m.subscriptions.get(topic).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_and_go() {
        let c = Clients::default();
        let now = Instant::now();
        c.heartbeat("g", "b@1", 1, HashMap::new(), now);
        c.heartbeat("g", "a@2", 2, HashMap::from([("t".to_string(), TagFilter::parse("x"))]), now);
        assert_eq!(c.members("g", now), vec!["a@2", "b@1"]);
        assert_eq!(c.subscription("g", "t"), Some(TagFilter::Tags(vec!["x".into()])));
        c.connection_closed(2);
        assert_eq!(c.members("g", now), vec!["b@1"]);
        assert!(c.members("g", now + EXPIRY).is_empty());
        c.heartbeat("g", "b@1", 1, HashMap::new(), now);
        c.unregister("g", "b@1");
        assert!(c.members("g", now).is_empty());
    }
}
