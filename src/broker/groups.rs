//! The consumer-group coordinator (Kafka's classic rebalance protocol), with the committed
//! offsets in memory (their file is [`super::offsets`]).
//!
//! A group moves Empty → PreparingRebalance → CompletingRebalance → Stable and back to
//! PreparingRebalance whenever a member joins, leaves or misses its session timeout.
//! JoinGroup and follower SyncGroup calls *park* (the dispatch loop re-polls them) until
//! the rebalance they wait for completes. A commit is checked under the coordinator's
//! lock, stored by [`commit`] outside it, then applied under it again.
//!
//! # Invariants
//! - `generation` only grows; a member's join answer names the generation it completed in.
//! - A member that is parked in JoinGroup is never expired by its session timeout; the
//!   rebalance timeout bounds how long the group waits for it instead.

use bytes::Bytes;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use super::offsets::{CommittedByGroup, OffsetStore};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum GroupError {
    #[error("unknown member id")]
    UnknownMemberId,
    #[error("illegal generation")]
    IllegalGeneration,
    #[error("rebalance in progress")]
    RebalanceInProgress,
    #[error("inconsistent group protocol")]
    InconsistentGroupProtocol,
    #[error("member id required")]
    MemberIdRequired,
    #[error("invalid session timeout")]
    InvalidSessionTimeout,
    #[error("invalid group id")]
    InvalidGroupId,
    #[error("group id not found")]
    GroupIdNotFound,
    #[error("non-empty group")]
    NonEmptyGroup,
    /// The offsets file refused the write (the reason is logged where it happened):
    /// nothing was committed.
    #[error("committed offsets could not be stored")]
    Storage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocols: Vec<(String, Bytes)>,
    pub last_seen: Instant,
    pub awaiting_join: bool,
    pub assignment: Bytes,
}

impl Member {
    pub fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols.iter().find(|(n, _)| n == protocol).map(|(_, m)| m.clone()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Committed {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
}

#[derive(Debug)]
pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: IndexMap<String, Member>,
    pub offsets: HashMap<(String, i32), Committed>,
    /// When the current rebalance must complete, joined or not.
    rebalance_deadline: Option<Instant>,
    /// No earlier than this (initial rebalance delay, so several members join at once).
    rebalance_not_before: Option<Instant>,
    next_member: u64,
}

impl Group {
    fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: IndexMap::new(),
            offsets: HashMap::new(),
            rebalance_deadline: None,
            rebalance_not_before: None,
            next_member: 0,
        }
    }

    fn prepare_rebalance(&mut self, now: Instant, initial_delay: Duration) {
        if self.state != GroupState::PreparingRebalance {
            let was_empty = self.state == GroupState::Empty;
            self.state = GroupState::PreparingRebalance;
            let timeout = self.members.values().map(|m| m.rebalance_timeout).max().unwrap_or(Duration::from_secs(30));
            self.rebalance_deadline = Some(now + timeout);
            self.rebalance_not_before = was_empty.then_some(now + initial_delay);
        }
    }

    /// Completes the rebalance if everyone rejoined (or time is up). Returns true if done.
    fn try_complete(&mut self, now: Instant) -> bool {
        if self.state != GroupState::PreparingRebalance {
            return false;
        }
        let all_joined = self.members.values().all(|m| m.awaiting_join);
        let timed_out = self.rebalance_deadline.is_some_and(|d| now >= d);
        let delayed = self.rebalance_not_before.is_some_and(|d| now < d);
        if !(timed_out || (all_joined && !delayed)) {
            return false;
        }
        self.members.retain(|id, m| {
            if !m.awaiting_join {
                log::info!("group {}: member {id} did not rejoin in time, removed", self.id);
            }
            m.awaiting_join
        });
        self.generation += 1;
        self.rebalance_deadline = None;
        self.rebalance_not_before = None;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol = None;
            self.leader = None;
            return true;
        }
        if !self.leader.as_ref().is_some_and(|l| self.members.contains_key(l)) {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self.leader.as_ref().and_then(|l| self.members.get(l));
        self.protocol = leader.and_then(|l| {
            l.protocols
                .iter()
                .map(|(n, _)| n)
                .find(|n| self.members.values().all(|m| m.protocols.iter().any(|(p, _)| p == *n)))
                .cloned()
        });
        for m in self.members.values_mut() {
            m.awaiting_join = false;
            m.assignment = Bytes::new();
            m.last_seen = now;
        }
        self.state = GroupState::CompletingRebalance;
        log::info!(
            "group {}: generation {} with {} members, leader {:?}",
            self.id,
            self.generation,
            self.members.len(),
            self.leader
        );
        true
    }

    fn check_member(&self, member: &str, generation: i32) -> Result<(), GroupError> {
        if !self.members.contains_key(member) {
            return Err(GroupError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration);
        }
        Ok(())
    }
}

/// A JoinGroup request's fields.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// KIP-394 (JoinGroup v4+): a new member first gets its id with MEMBER_ID_REQUIRED.
    pub require_known_member_id: bool,
}

/// What a completed join tells a member.
#[derive(Debug, Clone)]
pub struct JoinResult {
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Filled for the leader only: (member id, instance id, metadata).
    pub members: Vec<(String, Option<String>, Bytes)>,
}

#[derive(Debug, Clone)]
pub enum JoinStep {
    /// Park, then poll [`Coordinator::join_poll`] with this member id.
    Pending(String),
    MemberIdRequired(String),
}

pub struct Coordinator {
    groups: HashMap<String, Group>,
    initial_delay: Duration,
}

const MIN_SESSION_MS: i32 = 1000;
const MAX_SESSION_MS: i32 = 30 * 60 * 1000;

impl Coordinator {
    /// A coordinator whose groups start with the offsets committed before.
    pub fn new(initial_delay_ms: u64, committed: CommittedByGroup) -> Coordinator {
        let groups = committed
            .into_iter()
            .map(|(id, offsets)| {
                let mut g = Group::new(&id);
                g.offsets = offsets;
                (id, g)
            })
            .collect();
        Coordinator { groups, initial_delay: Duration::from_millis(initial_delay_ms) }
    }

    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.get(id)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    pub fn join(&mut self, req: JoinRequest, now: Instant) -> Result<JoinStep, GroupError> {
        if req.group.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        if !(MIN_SESSION_MS..=MAX_SESSION_MS).contains(&req.session_timeout_ms) {
            return Err(GroupError::InvalidSessionTimeout);
        }
        let delay = self.initial_delay;
        let g = self.groups.entry(req.group.clone()).or_insert_with(|| Group::new(&req.group));
        let compatible = g.protocol_type.as_deref() == Some(req.protocol_type.as_str())
            && req.protocols.iter().any(|(n, _)| g.members.values().all(|m| m.protocols.iter().any(|(p, _)| p == n)));
        if g.state != GroupState::Empty && !compatible {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        let member_id = if req.member_id.is_empty() {
            g.next_member += 1;
            let id = format!("{}-{}-{}", req.client_id, g.generation, uuid::Uuid::new_v4());
            if req.require_known_member_id {
                // The member retries with this id; it is admitted then.
                return Ok(JoinStep::MemberIdRequired(id));
            }
            id
        } else {
            req.member_id.clone()
        };
        if !req.member_id.is_empty() && !g.members.contains_key(&member_id) && !req.require_known_member_id {
            return Err(GroupError::UnknownMemberId);
        }
        let rebalance_timeout_ms =
            if req.rebalance_timeout_ms > 0 { req.rebalance_timeout_ms } else { req.session_timeout_ms };
        let member = Member {
            id: member_id.clone(),
            instance_id: req.instance_id,
            client_id: req.client_id,
            client_host: req.client_host,
            session_timeout: Duration::from_millis(req.session_timeout_ms as u64),
            rebalance_timeout: Duration::from_millis(rebalance_timeout_ms as u64),
            protocols: req.protocols,
            last_seen: now,
            awaiting_join: true,
            assignment: Bytes::new(),
        };
        g.protocol_type = Some(req.protocol_type);
        g.members.insert(member_id.clone(), member);
        // Any join starts (or joins) a rebalance. Kafka answers a known member with unchanged
        // metadata in a stable group at once; rebalancing instead costs a round but keeps
        // one path, and clients handle both.
        g.prepare_rebalance(now, delay);
        g.try_complete(now);
        Ok(JoinStep::Pending(member_id))
    }

    /// The answer to a parked JoinGroup, once its rebalance completed.
    pub fn join_poll(&self, group: &str, member_id: &str) -> Option<Result<JoinResult, GroupError>> {
        let Some(g) = self.groups.get(group) else {
            return Some(Err(GroupError::UnknownMemberId));
        };
        let Some(m) = g.members.get(member_id) else {
            return Some(Err(GroupError::UnknownMemberId));
        };
        if m.awaiting_join || g.state == GroupState::PreparingRebalance {
            return None;
        }
        let leader = g.leader.clone().unwrap_or_default();
        let protocol = g.protocol.clone();
        let members = if leader == member_id {
            let p = protocol.clone().unwrap_or_default();
            g.members.values().map(|m| (m.id.clone(), m.instance_id.clone(), m.metadata_for(&p))).collect()
        } else {
            Vec::new()
        };
        Some(Ok(JoinResult {
            generation: g.generation,
            protocol_type: g.protocol_type.clone(),
            protocol,
            leader,
            member_id: member_id.to_string(),
            members,
        }))
    }

    /// SyncGroup: the leader brings assignments. `Ok(None)`: park and poll [`Self::sync_poll`].
    pub fn sync(
        &mut self,
        group: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> Result<Option<Bytes>, GroupError> {
        let g = self.groups.get_mut(group).ok_or(GroupError::UnknownMemberId)?;
        g.check_member(member_id, generation)?;
        if let Some(m) = g.members.get_mut(member_id) {
            m.last_seen = now;
        }
        match g.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            GroupState::Empty => Err(GroupError::UnknownMemberId),
            GroupState::Stable => Ok(g.members.get(member_id).map(|m| m.assignment.clone())),
            GroupState::CompletingRebalance => {
                if g.leader.as_deref() == Some(member_id) {
                    for (id, a) in assignments {
                        if let Some(m) = g.members.get_mut(&id) {
                            m.assignment = a;
                        }
                    }
                    g.state = GroupState::Stable;
                    Ok(g.members.get(member_id).map(|m| m.assignment.clone()))
                } else {
                    Ok(None)
                }
            }
        }
    }

    pub fn sync_poll(&self, group: &str, member_id: &str, generation: i32) -> Option<Result<Bytes, GroupError>> {
        let Some(g) = self.groups.get(group) else {
            return Some(Err(GroupError::UnknownMemberId));
        };
        if let Err(e) = g.check_member(member_id, generation) {
            return Some(Err(e));
        }
        match g.state {
            GroupState::CompletingRebalance => None,
            GroupState::Stable => Some(Ok(g.members.get(member_id).map(|m| m.assignment.clone()).unwrap_or_default())),
            _ => Some(Err(GroupError::RebalanceInProgress)),
        }
    }

    pub fn heartbeat(&mut self, group: &str, member_id: &str, generation: i32, now: Instant) -> Result<(), GroupError> {
        let g = self.groups.get_mut(group).ok_or(GroupError::UnknownMemberId)?;
        let m = g.members.get_mut(member_id).ok_or(GroupError::UnknownMemberId)?;
        m.last_seen = now;
        match g.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ if generation != g.generation => Err(GroupError::IllegalGeneration),
            _ => Ok(()),
        }
    }

    /// Removes members; returns per-member results.
    pub fn leave(&mut self, group: &str, members: &[String], now: Instant) -> Vec<Result<(), GroupError>> {
        let delay = self.initial_delay;
        let Some(g) = self.groups.get_mut(group) else {
            return members.iter().map(|_| Err(GroupError::UnknownMemberId)).collect();
        };
        let out: Vec<_> = members
            .iter()
            .map(|id| g.members.shift_remove(id).map(|_| ()).ok_or(GroupError::UnknownMemberId))
            .collect();
        if out.iter().any(Result::is_ok) {
            log::info!("group {group}: {} member(s) left", out.iter().filter(|r| r.is_ok()).count());
            if g.members.is_empty() && g.state != GroupState::PreparingRebalance {
                g.state = GroupState::Empty;
                g.generation += 1;
                g.leader = None;
                g.protocol = None;
            } else {
                g.prepare_rebalance(now, delay);
                g.try_complete(now);
            }
        }
        out
    }

    /// Expires members and completes rebalances whose time has come. Returns true if any
    /// group changed (parked requests should be re-polled).
    pub fn tick(&mut self, now: Instant) -> bool {
        let delay = self.initial_delay;
        let mut changed = false;
        for g in self.groups.values_mut() {
            let expired: Vec<String> = g
                .members
                .values()
                .filter(|m| !m.awaiting_join && now.duration_since(m.last_seen) > m.session_timeout)
                .map(|m| m.id.clone())
                .collect();
            for id in &expired {
                log::info!("group {}: member {id} missed its session timeout, removed", g.id);
                g.members.shift_remove(id);
            }
            if !expired.is_empty() {
                changed = true;
                if g.members.is_empty() && g.state != GroupState::PreparingRebalance {
                    g.state = GroupState::Empty;
                    g.generation += 1;
                    g.leader = None;
                } else {
                    g.prepare_rebalance(now, delay);
                }
            }
            changed |= g.try_complete(now);
        }
        changed
    }

    /// The earliest instant at which [`Self::tick`] may change something.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut consider = |t: Instant| best = Some(best.map_or(t, |b| b.min(t)));
        for g in self.groups.values() {
            if let Some(d) = g.rebalance_deadline {
                consider(d);
            }
            if let Some(d) = g.rebalance_not_before {
                consider(d);
            }
            for m in g.members.values() {
                if !m.awaiting_join {
                    consider(m.last_seen + m.session_timeout);
                }
            }
        }
        best
    }

    /// Whether `member_id` of `generation` may commit offsets for `group` now (validated
    /// unless generation < 0: a standalone consumer committing without a membership).
    pub fn check_commit(
        &mut self,
        group: &str,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), GroupError> {
        if group.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        let g = self.groups.entry(group.to_string()).or_insert_with(|| Group::new(group));
        if generation >= 0 || !member_id.is_empty() {
            if !g.members.contains_key(member_id) {
                return Err(GroupError::UnknownMemberId);
            }
            if generation != g.generation {
                return Err(GroupError::IllegalGeneration);
            }
            // As Kafka: a member of the current generation may commit while a rebalance is
            // being prepared (that is how consumers commit on revocation); between the join
            // and sync answers the assignment is in flux, so not then.
            if g.state == GroupState::CompletingRebalance {
                return Err(GroupError::RebalanceInProgress);
            }
            if let Some(m) = g.members.get_mut(member_id) {
                m.last_seen = now;
            }
        }
        Ok(())
    }

    /// Applies offsets that have been stored.
    fn apply_commit(&mut self, group: &str, offsets: Vec<(String, i32, Committed)>) {
        let g = self.groups.entry(group.to_string()).or_insert_with(|| Group::new(group));
        for (t, p, c) in offsets {
            g.offsets.insert((t, p), c);
        }
    }

    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<&Committed> {
        self.groups.get(group)?.offsets.get(&(topic.to_string(), partition))
    }

    /// All committed (topic, partition) of a group.
    pub fn committed_all(&self, group: &str) -> Vec<(String, i32, Committed)> {
        let Some(g) = self.groups.get(group) else {
            return Vec::new();
        };
        let mut v: Vec<_> = g.offsets.iter().map(|((t, p), c)| (t.clone(), *p, c.clone())).collect();
        v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        v
    }

    /// Drops the offsets of a deleted topic; returns the (group, partition) pairs dropped.
    pub fn forget_topic(&mut self, topic: &str) -> Vec<(String, i32)> {
        let mut dropped = Vec::new();
        for g in self.groups.values_mut() {
            g.offsets.retain(|(t, p), _| {
                let keep = t != topic;
                if !keep {
                    dropped.push((g.id.clone(), *p));
                }
                keep
            });
        }
        dropped
    }
}

/// Commits offsets: checked under the coordinator's lock, stored (file I/O, without that
/// lock: heartbeats and joins on the cores never wait for a disk), then applied. Runs on
/// the file worker, one commit at a time, so commits apply in the order they were
/// stored. Only a stored commit is applied and acknowledged: a client told its offsets
/// are committed must find them after a restart.
pub fn commit(
    groups: &Mutex<Coordinator>,
    store: &Mutex<OffsetStore>,
    group: &str,
    member_id: &str,
    generation: i32,
    offsets: Vec<(String, i32, Committed)>,
    now: Instant,
) -> Result<(), GroupError> {
    groups.lock().check_commit(group, member_id, generation, now)?;
    // One write per commit request, not per message; the page cache keeps it across a
    // process crash, `sync` (shutdown) across power loss.
    let stored = store.lock().append(group, offsets.iter().map(|(t, p, c)| (t.as_str(), *p, Some(c))));
    if let Err(e) = stored {
        log::error!("persisting offsets of group {group}: {e}; the commit is refused");
        return Err(GroupError::Storage);
    }
    groups.lock().apply_commit(group, offsets);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join_req(group: &str, member: &str) -> JoinRequest {
        JoinRequest {
            group: group.into(),
            member_id: member.into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 6000,
            rebalance_timeout_ms: 10000,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"m"))],
            require_known_member_id: false,
        }
    }

    /// A coordinator and its offset store, as the broker opens them.
    fn open(dir: &std::path::Path) -> (Mutex<Coordinator>, Mutex<OffsetStore>) {
        let (store, committed) = OffsetStore::open(dir).unwrap();
        (Mutex::new(Coordinator::new(0, committed)), Mutex::new(store))
    }

    /// A commit the offsets file cannot take is refused, not acknowledged, and leaves
    /// the committed offsets as they were.
    #[test]
    fn a_commit_that_cannot_be_stored_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, store) = open(dir.path());
        let at = |offset| Committed { offset, leader_epoch: -1, metadata: None };
        commit(&c, &store, "g", "", -1, vec![("t".into(), 0, at(5))], Instant::now()).unwrap();
        // Every write to /dev/full fails with ENOSPC, as a full disk's would.
        store.lock().replace_file(std::fs::OpenOptions::new().append(true).open("/dev/full").unwrap());
        let r = commit(&c, &store, "g", "", -1, vec![("t".into(), 0, at(9)), ("t".into(), 1, at(1))], Instant::now());
        assert_eq!(r, Err(GroupError::Storage));
        assert_eq!(c.lock().committed("g", "t", 0).map(|x| x.offset), Some(5));
        assert!(c.lock().committed("g", "t", 1).is_none());
        // What was stored before survives a restart.
        drop((c, store));
        let (c, _) = open(dir.path());
        assert_eq!(c.lock().committed("g", "t", 0).map(|x| x.offset), Some(5));
    }

    #[test]
    fn two_members_rebalance_and_expire() {
        let mut c = Coordinator::new(0, CommittedByGroup::new());
        let t0 = Instant::now();
        let JoinStep::Pending(a) = c.join(join_req("g", ""), t0).unwrap() else { panic!() };
        let ja = c.join_poll("g", &a).unwrap().unwrap();
        assert_eq!(ja.generation, 1);
        assert_eq!(ja.leader, a);
        assert_eq!(c.sync("g", &a, 1, vec![(a.clone(), Bytes::from_static(b"A"))], t0).unwrap().unwrap(), "A");
        // b joins: a learns of the rebalance on its heartbeat and rejoins.
        let JoinStep::Pending(b) = c.join(join_req("g", ""), t0).unwrap() else { panic!() };
        assert!(c.join_poll("g", &b).is_none());
        assert_eq!(c.heartbeat("g", &a, 1, t0), Err(GroupError::RebalanceInProgress));
        c.join(join_req("g", &a), t0).unwrap();
        let jb = c.join_poll("g", &b).unwrap().unwrap();
        assert_eq!(jb.generation, 2);
        assert!(jb.members.is_empty());
        assert_eq!(c.join_poll("g", &a).unwrap().unwrap().members.len(), 2);
        assert!(c.sync("g", &b, 2, vec![], t0).unwrap().is_none());
        c.sync("g", &a, 2, vec![(b.clone(), Bytes::from_static(b"B"))], t0).unwrap();
        assert_eq!(c.sync_poll("g", &b, 2).unwrap().unwrap(), "B");
        // b stops heartbeating; a keeps going; after b's session timeout it is removed.
        let later = t0 + Duration::from_secs(7);
        c.heartbeat("g", &a, 2, t0 + Duration::from_secs(5)).unwrap();
        assert!(c.tick(later));
        assert_eq!(c.heartbeat("g", &a, 2, later), Err(GroupError::RebalanceInProgress));
        c.join(join_req("g", &a), later).unwrap();
        assert_eq!(c.join_poll("g", &a).unwrap().unwrap().generation, 3);
    }

    #[test]
    fn offsets_survive_reopen_and_check_generation() {
        let dir = tempfile::tempdir().unwrap();
        let now = Instant::now();
        {
            let (c, store) = open(dir.path());
            let JoinStep::Pending(a) = c.lock().join(join_req("g", ""), now).unwrap() else { panic!() };
            let off = |o| vec![("t".to_string(), 0, Committed { offset: o, leader_epoch: -1, metadata: None })];
            let commit = |member: &str, generation, offsets| commit(&c, &store, "g", member, generation, offsets, now);
            assert_eq!(commit(&a, 7, off(5)), Err(GroupError::IllegalGeneration));
            // Joined but not synced: the assignment is in flux.
            assert_eq!(commit(&a, 1, off(5)), Err(GroupError::RebalanceInProgress));
            c.lock().sync("g", &a, 1, vec![], now).unwrap();
            commit(&a, 1, off(41)).unwrap();
            // A new member starts a rebalance; the current generation may still commit.
            c.lock().join(join_req("g", ""), now).unwrap();
            assert_eq!(c.lock().group("g").unwrap().state, GroupState::PreparingRebalance);
            commit(&a, 1, off(42)).unwrap();
            super::commit(&c, &store, "", "", -1, off(1), now).unwrap_err();
        }
        let (c, _) = open(dir.path());
        assert_eq!(c.lock().committed("g", "t", 0).unwrap().offset, 42);
    }
}
