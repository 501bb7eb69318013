//! Simple consumption (RocketMQ 5's "pop"): what a consumer group has received from each
//! queue and not yet acknowledged, when each of those messages becomes visible again, and
//! the receipt handles that name them. Sans-IO: the gRPC service reads the log and stores
//! offsets; this decides what to deliver.
//!
//! A queue's state is the next offset never delivered and the *in flight* messages:
//! delivered, invisible until a time, with their delivery attempt. A message leaves the
//! flight when it is acknowledged (or sent to the dead-letter queue); one whose time
//! passes is delivered again, attempt + 1. The group's committed offset is the smallest
//! offset still in flight (or the next offset when none is): what a restart resumes from,
//! so nothing unacknowledged is lost, and what was in flight at a crash is delivered again.
//!
//! FIFO: a message group lives in one queue (producers pick the queue by the group); its
//! next message is not delivered while one of it is in flight ([`Queue::group_busy`]).
//! The reader holds such a message back ([`Queue::held`]) and goes on with the other
//! groups; a held message goes out, oldest of its group first, once its group is free.
//! The committed offset stays below every held message.
//!
//! A receipt handle names (queue, offset, delivery) and carries a MAC keyed per broker
//! run over those and the group and topic: a forged handle fails the MAC, a handle of an
//! earlier delivery (the message was delivered again since) is stale.
//!
//! # Invariants
//! - Every offset in `[committed, next)` that was delivered and not finished is in flight.
//! - A handle is honoured only for the delivery it was made for (`seq`).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// One delivered message awaiting its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    /// When it may be delivered again (ms since the epoch).
    pub visible_at: i64,
    /// 1 on the first delivery.
    pub attempt: i32,
    /// Names this delivery in its receipt handle.
    pub seq: u64,
    /// The client that received it asked for renewal while it lives (push consumers).
    pub renew_for: Option<String>,
    /// Its FIFO message group.
    pub group: Option<String>,
}

/// A delivery to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub attempt: i32,
    pub visible_at: i64,
    pub renew_for: Option<String>,
    pub group: Option<String>,
}

/// One queue of one group.
#[derive(Debug, Default)]
pub struct Queue {
    /// The next offset never looked at; `None` until loaded from the committed offset.
    pub next: Option<i64>,
    pub inflight: BTreeMap<i64, Inflight>,
    /// Looked at but held back: an earlier message of the same FIFO group was in flight.
    pub held: BTreeMap<i64, String>,
}

/// Held-back messages kept per queue before the reader stops moving on (memory bound).
pub const MAX_HELD: usize = 10_000;
/// Unacknowledged messages per queue and group before nothing new is delivered from it
/// (a consumer that receives and never acknowledges must not cost unbounded memory).
pub const MAX_INFLIGHT: usize = 65_536;

impl Queue {
    /// Where a restart would resume: the oldest unfinished offset.
    pub fn committed(&self) -> Option<i64> {
        let next = self.next?;
        let inflight = self.inflight.keys().next().copied().unwrap_or(next);
        let held = self.held.keys().next().copied().unwrap_or(next);
        Some(next.min(inflight).min(held))
    }

    /// Held-back messages whose group is free now, oldest first, one per group, at most
    /// `n`; taken out of the held set.
    pub fn release(&mut self, n: usize) -> Vec<(i64, String)> {
        let mut out: Vec<(i64, String)> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for (&offset, g) in &self.held {
            if out.len() >= n {
                break;
            }
            if seen.contains(&g.as_str()) {
                continue;
            }
            seen.push(g);
            if !self.group_busy(g) {
                out.push((offset, g.clone()));
            }
        }
        for (offset, _) in &out {
            self.held.remove(offset);
        }
        out
    }

    /// In-flight messages visible again by `now`, oldest first, at most `n`.
    pub fn expired(&self, now: i64, n: usize) -> Vec<(i64, Inflight)> {
        self.inflight.iter().filter(|(_, f)| f.visible_at <= now).take(n).map(|(o, f)| (*o, f.clone())).collect()
    }

    /// Whether a message of FIFO group `g` is in flight (the group's next one waits).
    pub fn group_busy(&self, g: &str) -> bool {
        self.inflight.values().any(|f| f.group.as_deref() == Some(g))
    }
}

/// Why a receipt handle is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleError {
    /// Not a handle this broker run made.
    Forged,
    /// The message was acknowledged, or delivered again since this handle was made.
    Stale,
}

/// A parsed, authenticated receipt handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    pub queue: i32,
    pub offset: i64,
    pub seq: u64,
}

/// Every group's queues.
pub struct Pop {
    queues: HashMap<(String, String, i32), Queue>,
    next_seq: u64,
    keys: RandomState,
}

impl Default for Pop {
    fn default() -> Self {
        Pop { queues: HashMap::new(), next_seq: 1, keys: RandomState::new() }
    }
}

impl Pop {
    pub fn queue(&mut self, group: &str, topic: &str, queue: i32) -> &mut Queue {
        self.queues.entry((group.to_string(), topic.to_string(), queue)).or_default()
    }

    /// Puts `offset` in flight (a new delivery); returns its receipt handle.
    pub fn lease(&mut self, group: &str, topic: &str, queue: i32, offset: i64, l: Lease) -> String {
        let seq = self.next_seq;
        self.next_seq += 1;
        let f = Inflight { visible_at: l.visible_at, attempt: l.attempt, seq, renew_for: l.renew_for, group: l.group };
        self.queue(group, topic, queue).inflight.insert(offset, f);
        self.handle(group, topic, Handle { queue, offset, seq })
    }

    fn mac(&self, group: &str, topic: &str, h: Handle) -> u64 {
        self.keys.hash_one((group, topic, h.queue, h.offset, h.seq))
    }

    fn handle(&self, group: &str, topic: &str, h: Handle) -> String {
        format!("{:x}.{:x}.{:x}.{:016x}", h.queue, h.offset, h.seq, self.mac(group, topic, h))
    }

    /// Parses and authenticates `text`, and checks it names the current delivery.
    pub fn check(&self, group: &str, topic: &str, text: &str) -> Result<(Handle, Inflight), HandleError> {
        let parts: Vec<&str> = text.split('.').collect();
        let [q, o, s, m] = parts[..] else { return Err(HandleError::Forged) };
        let num = |x: &str| u64::from_str_radix(x, 16).map_err(|_| HandleError::Forged);
        let h = Handle {
            queue: i32::try_from(num(q)?).map_err(|_| HandleError::Forged)?,
            offset: i64::try_from(num(o)?).map_err(|_| HandleError::Forged)?,
            seq: num(s)?,
        };
        if num(m)? != self.mac(group, topic, h) {
            return Err(HandleError::Forged);
        }
        let key = (group.to_string(), topic.to_string(), h.queue);
        match self.queues.get(&key).and_then(|q| q.inflight.get(&h.offset)) {
            Some(f) if f.seq == h.seq => Ok((h, f.clone())),
            _ => Err(HandleError::Stale),
        }
    }

    /// Ends the delivery `text` names (acknowledged, or moved to the dead-letter queue).
    /// Returns the queue and its new committed offset.
    pub fn finish(&mut self, group: &str, topic: &str, text: &str) -> Result<(i32, Option<i64>), HandleError> {
        let (h, _) = self.check(group, topic, text)?;
        let q = self.queue(group, topic, h.queue);
        q.inflight.remove(&h.offset);
        Ok((h.queue, q.committed()))
    }

    /// Makes the delivery `text` names invisible until `visible_at`, under a new handle,
    /// and no longer renewed for its client.
    pub fn extend(&mut self, group: &str, topic: &str, text: &str, visible_at: i64) -> Result<String, HandleError> {
        let (h, f) = self.check(group, topic, text)?;
        // The client now says when: automatic renewal ends (a push consumer's nack).
        let l = Lease { attempt: f.attempt, visible_at, renew_for: None, group: f.group };
        Ok(self.lease(group, topic, h.queue, h.offset, l))
    }

    /// Forgets a group's state for `topic` (its consumers will reload the committed offset).
    pub fn forget(&mut self, group: &str, topic: &str) {
        self.queues.retain(|(g, t, _), _| g != group || t != topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(visible_at: i64, group: Option<&str>) -> Lease {
        Lease { attempt: 1, visible_at, renew_for: None, group: group.map(str::to_string) }
    }

    #[test]
    fn acknowledgements_move_the_committed_offset_past_the_oldest_in_flight() {
        let mut pop = Pop::default();
        pop.queue("g", "t", 0).next = Some(10);
        let h10 = pop.lease("g", "t", 0, 10, at(100, None));
        let h11 = pop.lease("g", "t", 0, 11, at(100, None));
        pop.queue("g", "t", 0).next = Some(12);
        assert_eq!(pop.finish("g", "t", &h11), Ok((0, Some(10))));
        assert_eq!(pop.finish("g", "t", &h10), Ok((0, Some(12))));
        assert_eq!(pop.finish("g", "t", &h10), Err(HandleError::Stale));
    }

    #[test]
    fn handles_are_authenticated_and_name_one_delivery() {
        let mut pop = Pop::default();
        let h = pop.lease("g", "t", 3, 7, at(100, None));
        assert_eq!(pop.check("g", "other", &h).err(), Some(HandleError::Forged));
        assert_eq!(pop.check("g", "t", "3.7.1.0000000000000000").err(), Some(HandleError::Forged));
        assert_eq!(pop.check("g", "t", "junk").err(), Some(HandleError::Forged));
        let again = pop.extend("g", "t", &h, 200).unwrap();
        assert_eq!(pop.check("g", "t", &h).err(), Some(HandleError::Stale));
        assert_eq!(pop.check("g", "t", &again).unwrap().1.visible_at, 200);
    }

    #[test]
    fn expired_deliveries_come_back_oldest_first_and_groups_wait_for_their_flight() {
        let mut pop = Pop::default();
        pop.queue("g", "t", 0).next = Some(3);
        pop.lease("g", "t", 0, 0, at(50, Some("a")));
        pop.lease("g", "t", 0, 1, at(500, None));
        pop.lease("g", "t", 0, 2, at(50, None));
        let q = pop.queue("g", "t", 0);
        assert!(q.group_busy("a"));
        assert!(!q.group_busy("b"));
        let due: Vec<i64> = q.expired(100, 10).into_iter().map(|(o, _)| o).collect();
        assert_eq!(due, vec![0, 2]);
        assert_eq!(q.expired(100, 1).len(), 1);
        // Group a's next two wait behind its flight; b's goes at once.
        q.held.insert(5, "a".into());
        q.held.insert(6, "a".into());
        q.held.insert(7, "b".into());
        assert_eq!(q.committed(), Some(0));
        assert_eq!(q.release(10), vec![(7, "b".to_string())]);
        // Group a's flight lands.
        q.inflight.remove(&0);
        assert_eq!(q.release(10), vec![(5, "a".to_string())]);
        assert_eq!(q.held.keys().copied().collect::<Vec<_>>(), vec![6]);
    }
}
