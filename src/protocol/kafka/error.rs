//! Kafka error codes, as the protocol numbers them.

use crate::broker::groups::GroupError;
use crate::broker::BrokerError;
use crate::log::LogError;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::ResponseKind;

/// The subset of Kafka's error codes this broker returns.
#[repr(i16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    None = 0,
    OffsetOutOfRange = 1,
    CorruptMessage = 2,
    UnknownTopicOrPartition = 3,
    MessageTooLarge = 10,
    CoordinatorNotAvailable = 15,
    NotCoordinator = 16,
    InvalidTopicException = 17,
    RecordListTooLarge = 18,
    IllegalGeneration = 22,
    InconsistentGroupProtocol = 23,
    InvalidGroupId = 24,
    UnknownMemberId = 25,
    InvalidSessionTimeout = 26,
    RebalanceInProgress = 27,
    UnsupportedVersion = 35,
    TopicAlreadyExists = 36,
    InvalidPartitions = 37,
    InvalidReplicationFactor = 38,
    InvalidRequest = 42,
    OutOfOrderSequenceNumber = 45,
    InvalidProducerEpoch = 47,
    TransactionalIdAuthorizationFailed = 53,
    KafkaStorageError = 56,
    UnknownTopicId = 100,
    GroupIdNotFound = 69,
    NonEmptyGroup = 68,
    MemberIdRequired = 79,
    InvalidConfig = 40,
    UnsupportedSaslMechanism = 33,
    IllegalSaslState = 34,
    TopicAuthorizationFailed = 29,
    GroupAuthorizationFailed = 30,
    ClusterAuthorizationFailed = 31,
    SecurityDisabled = 54,
    SaslAuthenticationFailed = 58,
    ResourceNotFound = 91,
    DuplicateResource = 92,
    UnacceptableCredential = 93,
}

impl ErrorCode {
    pub fn code(self) -> i16 {
        self as i16
    }
}

impl From<&LogError> for ErrorCode {
    fn from(e: &LogError) -> Self {
        match e {
            LogError::Corrupt(_) | LogError::Empty => ErrorCode::CorruptMessage,
            LogError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            LogError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            LogError::ProducerFenced { .. } => ErrorCode::InvalidProducerEpoch,
            LogError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequenceNumber,
            LogError::Io { .. } => ErrorCode::KafkaStorageError,
        }
    }
}

impl From<&BrokerError> for ErrorCode {
    fn from(e: &BrokerError) -> Self {
        match e {
            BrokerError::InvalidTopic(_) => ErrorCode::InvalidTopicException,
            BrokerError::TopicExists(_) => ErrorCode::TopicAlreadyExists,
            BrokerError::UnknownTopic(_) => ErrorCode::UnknownTopicOrPartition,
            BrokerError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
            BrokerError::Log(l) => l.into(),
            BrokerError::Io { .. } | BrokerError::Users(_) | BrokerError::Acl(_) => ErrorCode::KafkaStorageError,
        }
    }
}

impl From<GroupError> for ErrorCode {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::UnknownMemberId => ErrorCode::UnknownMemberId,
            GroupError::IllegalGeneration => ErrorCode::IllegalGeneration,
            GroupError::RebalanceInProgress => ErrorCode::RebalanceInProgress,
            GroupError::InconsistentGroupProtocol => ErrorCode::InconsistentGroupProtocol,
            GroupError::MemberIdRequired => ErrorCode::MemberIdRequired,
            GroupError::InvalidSessionTimeout => ErrorCode::InvalidSessionTimeout,
            GroupError::InvalidGroupId => ErrorCode::InvalidGroupId,
            GroupError::GroupIdNotFound => ErrorCode::GroupIdNotFound,
            GroupError::NonEmptyGroup => ErrorCode::NonEmptyGroup,
            // Retriable, as Kafka answers a commit its offsets log could not take.
            GroupError::Storage => ErrorCode::CoordinatorNotAvailable,
        }
    }
}

/// Calls `f` with every error code other than NONE an answer carries, where Kafka's own
/// `errorCounts()` finds them (top level, per topic, per partition, per result), so the
/// metrics endpoint counts errors per API and code as Kafka's `ErrorsPerSec` does.
pub fn for_each_error(body: &ResponseKind, mut f: impl FnMut(i16)) {
    let mut e = |code: i16| {
        if code != 0 {
            f(code)
        }
    };
    match body {
        ResponseKind::Produce(r) => {
            r.responses.iter().flat_map(|t| &t.partition_responses).for_each(|p| e(p.error_code))
        }
        ResponseKind::Fetch(r) => {
            e(r.error_code);
            r.responses.iter().flat_map(|t| &t.partitions).for_each(|p| e(p.error_code));
        }
        ResponseKind::Metadata(r) => {
            e(r.error_code);
            for t in &r.topics {
                e(t.error_code);
                t.partitions.iter().for_each(|p| e(p.error_code));
            }
        }
        ResponseKind::ListOffsets(r) => r.topics.iter().flat_map(|t| &t.partitions).for_each(|p| e(p.error_code)),
        ResponseKind::CreateTopics(r) => r.topics.iter().for_each(|t| e(t.error_code)),
        ResponseKind::DeleteTopics(r) => r.responses.iter().for_each(|t| e(t.error_code)),
        ResponseKind::CreatePartitions(r) => r.results.iter().for_each(|t| e(t.error_code)),
        ResponseKind::DescribeConfigs(r) => r.results.iter().for_each(|t| e(t.error_code)),
        ResponseKind::DescribeCluster(r) => e(r.error_code),
        ResponseKind::ApiVersions(r) => e(r.error_code),
        ResponseKind::FindCoordinator(r) => {
            e(r.error_code);
            r.coordinators.iter().for_each(|c| e(c.error_code));
        }
        ResponseKind::JoinGroup(r) => e(r.error_code),
        ResponseKind::SyncGroup(r) => e(r.error_code),
        ResponseKind::Heartbeat(r) => e(r.error_code),
        ResponseKind::LeaveGroup(r) => {
            e(r.error_code);
            r.members.iter().for_each(|m| e(m.error_code));
        }
        ResponseKind::ListGroups(r) => e(r.error_code),
        ResponseKind::DescribeGroups(r) => r.groups.iter().for_each(|g| e(g.error_code)),
        ResponseKind::OffsetCommit(r) => r.topics.iter().flat_map(|t| &t.partitions).for_each(|p| e(p.error_code)),
        ResponseKind::OffsetFetch(r) => {
            e(r.error_code);
            r.topics.iter().flat_map(|t| &t.partitions).for_each(|p| e(p.error_code));
            for g in &r.groups {
                e(g.error_code);
                g.topics.iter().flat_map(|t| &t.partitions).for_each(|p| e(p.error_code));
            }
        }
        ResponseKind::InitProducerId(r) => e(r.error_code),
        ResponseKind::SaslHandshake(r) => e(r.error_code),
        ResponseKind::SaslAuthenticate(r) => e(r.error_code),
        ResponseKind::CreateAcls(r) => r.results.iter().for_each(|a| e(a.error_code)),
        ResponseKind::DescribeAcls(r) => e(r.error_code),
        ResponseKind::DeleteAcls(r) => {
            for fr in &r.filter_results {
                e(fr.error_code);
                fr.matching_acls.iter().for_each(|m| e(m.error_code));
            }
        }
        ResponseKind::DescribeUserScramCredentials(r) => {
            e(r.error_code);
            r.results.iter().for_each(|u| e(u.error_code));
        }
        ResponseKind::AlterUserScramCredentials(r) => r.results.iter().for_each(|u| e(u.error_code)),
        // Not answered by this broker (its request is refused before an answer is made).
        _ => {}
    }
}

/// An error code's name as Kafka's `Errors` enum spells it (`UNKNOWN_TOPIC_OR_PARTITION`).
pub fn name(code: i32) -> String {
    match i16::try_from(code).ok().and_then(ResponseError::try_from_code) {
        None if code == 0 => "NONE".to_string(),
        Some(ResponseError::Unknown(_)) | None => code.to_string(),
        Some(known) => screaming_snake(&known.to_string()),
    }
}

/// `UnknownTopicOrPartition` → `UNKNOWN_TOPIC_OR_PARTITION`.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
