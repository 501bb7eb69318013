//! Kafka error codes, as the protocol numbers them.

use crate::broker::groups::GroupError;
use crate::broker::BrokerError;
use crate::log::LogError;

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
