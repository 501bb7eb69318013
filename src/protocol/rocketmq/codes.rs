//! Request and response codes (Apache RocketMQ `RequestCode`, `ResponseCode`): the ones
//! slipstream answers; any other request code is answered REQUEST_CODE_NOT_SUPPORTED.

/// Requests slipstream handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    SendMessage,
    PullMessage,
    QueryConsumerOffset,
    UpdateConsumerOffset,
    QueryMessage,
    UpdateAndCreateTopic,
    ViewMessageById,
    ConsumerSendMsgBack,
    EndTransaction,
    LockBatchMq,
    UnlockBatchMq,
    SearchOffsetByTimestamp,
    GetMaxOffset,
    GetMinOffset,
    GetEarliestMsgStoreTime,
    HeartBeat,
    UnregisterClient,
    GetConsumerListByGroup,
    CheckClientConfig,
    GetKvConfig,
    GetRouteInfoByTopic,
    GetBrokerClusterInfo,
    GetAllTopicListFromNameServer,
    GetKvConfigByValue,
    SendMessageV2,
    SendBatchMessage,
}

impl Request {
    /// Every request, in declaration order (`ALL[r as usize] == r`: the metrics' slots).
    pub const ALL: [Request; 26] = [
        Request::SendMessage,
        Request::PullMessage,
        Request::QueryConsumerOffset,
        Request::UpdateConsumerOffset,
        Request::QueryMessage,
        Request::UpdateAndCreateTopic,
        Request::ViewMessageById,
        Request::ConsumerSendMsgBack,
        Request::EndTransaction,
        Request::LockBatchMq,
        Request::UnlockBatchMq,
        Request::SearchOffsetByTimestamp,
        Request::GetMaxOffset,
        Request::GetMinOffset,
        Request::GetEarliestMsgStoreTime,
        Request::HeartBeat,
        Request::UnregisterClient,
        Request::GetConsumerListByGroup,
        Request::CheckClientConfig,
        Request::GetKvConfig,
        Request::GetRouteInfoByTopic,
        Request::GetBrokerClusterInfo,
        Request::GetAllTopicListFromNameServer,
        Request::GetKvConfigByValue,
        Request::SendMessageV2,
        Request::SendBatchMessage,
    ];

    /// The name Apache RocketMQ's `RequestCode` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Request::SendMessage => "SEND_MESSAGE",
            Request::PullMessage => "PULL_MESSAGE",
            Request::QueryConsumerOffset => "QUERY_CONSUMER_OFFSET",
            Request::UpdateConsumerOffset => "UPDATE_CONSUMER_OFFSET",
            Request::QueryMessage => "QUERY_MESSAGE",
            Request::UpdateAndCreateTopic => "UPDATE_AND_CREATE_TOPIC",
            Request::ViewMessageById => "VIEW_MESSAGE_BY_ID",
            Request::ConsumerSendMsgBack => "CONSUMER_SEND_MSG_BACK",
            Request::EndTransaction => "END_TRANSACTION",
            Request::LockBatchMq => "LOCK_BATCH_MQ",
            Request::UnlockBatchMq => "UNLOCK_BATCH_MQ",
            Request::SearchOffsetByTimestamp => "SEARCH_OFFSET_BY_TIMESTAMP",
            Request::GetMaxOffset => "GET_MAX_OFFSET",
            Request::GetMinOffset => "GET_MIN_OFFSET",
            Request::GetEarliestMsgStoreTime => "GET_EARLIEST_MSG_STORETIME",
            Request::HeartBeat => "HEART_BEAT",
            Request::UnregisterClient => "UNREGISTER_CLIENT",
            Request::GetConsumerListByGroup => "GET_CONSUMER_LIST_BY_GROUP",
            Request::CheckClientConfig => "CHECK_CLIENT_CONFIG",
            Request::GetKvConfig => "GET_KV_CONFIG",
            Request::GetRouteInfoByTopic => "GET_ROUTEINFO_BY_TOPIC",
            Request::GetBrokerClusterInfo => "GET_BROKER_CLUSTER_INFO",
            Request::GetAllTopicListFromNameServer => "GET_ALL_TOPIC_LIST_FROM_NAMESERVER",
            Request::GetKvConfigByValue => "GET_KV_CONFIG_BY_VALUE",
            Request::SendMessageV2 => "SEND_MESSAGE_V2",
            Request::SendBatchMessage => "SEND_BATCH_MESSAGE",
        }
    }

    pub fn from_code(code: i32) -> Option<Request> {
        Some(match code {
            10 => Request::SendMessage,
            11 => Request::PullMessage,
            14 => Request::QueryConsumerOffset,
            15 => Request::UpdateConsumerOffset,
            12 => Request::QueryMessage,
            17 => Request::UpdateAndCreateTopic,
            33 => Request::ViewMessageById,
            36 => Request::ConsumerSendMsgBack,
            37 => Request::EndTransaction,
            41 => Request::LockBatchMq,
            42 => Request::UnlockBatchMq,
            29 => Request::SearchOffsetByTimestamp,
            30 => Request::GetMaxOffset,
            31 => Request::GetMinOffset,
            32 => Request::GetEarliestMsgStoreTime,
            34 => Request::HeartBeat,
            35 => Request::UnregisterClient,
            38 => Request::GetConsumerListByGroup,
            46 => Request::CheckClientConfig,
            101 => Request::GetKvConfig,
            105 => Request::GetRouteInfoByTopic,
            106 => Request::GetBrokerClusterInfo,
            206 => Request::GetAllTopicListFromNameServer,
            217 => Request::GetKvConfigByValue,
            310 => Request::SendMessageV2,
            320 => Request::SendBatchMessage,
            // LITE_PULL_MESSAGE: a pull from a lite pull consumer (the same header).
            361 => Request::PullMessage,
            _ => return None,
        })
    }
}

/// Broker-initiated requests (to clients).
pub const HEART_BEAT: i32 = 34;
pub const CHECK_TRANSACTION_STATE: i32 = 39;
pub const NOTIFY_CONSUMER_IDS_CHANGED: i32 = 40;

/// Response codes slipstream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Response {
    Success = 0,
    SystemError = 1,
    RequestCodeNotSupported = 3,
    MessageIllegal = 13,
    NoPermission = 16,
    ServiceNotAvailable = 14,
    TopicNotExist = 17,
    PullNotFound = 19,
    PullRetryImmediately = 20,
    PullOffsetMoved = 21,
    QueryNotFound = 22,
    SubscriptionParseFailed = 23,
}

impl Response {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// A response code's name as Apache RocketMQ's `ResponseCode` spells it (the number
    /// for codes slipstream never sends).
    pub fn name(code: i32) -> String {
        let known = match code {
            0 => "SUCCESS",
            1 => "SYSTEM_ERROR",
            3 => "REQUEST_CODE_NOT_SUPPORTED",
            13 => "MESSAGE_ILLEGAL",
            14 => "SERVICE_NOT_AVAILABLE",
            16 => "NO_PERMISSION",
            17 => "TOPIC_NOT_EXIST",
            19 => "PULL_NOT_FOUND",
            20 => "PULL_RETRY_IMMEDIATELY",
            21 => "PULL_OFFSET_MOVED",
            22 => "QUERY_NOT_FOUND",
            23 => "SUBSCRIPTION_PARSE_FAILED",
            _ => return code.to_string(),
        };
        known.to_string()
    }
}

/// Pull request sys flags (`PullSysFlag`).
pub const PULL_COMMIT_OFFSET: i32 = 1;
pub const PULL_SUSPEND: i32 = 1 << 1;
pub const PULL_SUBSCRIPTION: i32 = 1 << 2;

/// Topic permissions (`PermName`): read, write.
pub const PERM_READ: i32 = 1 << 2;
pub const PERM_WRITE: i32 = 1 << 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_is_in_its_slot_and_has_a_code() {
        for (i, r) in Request::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
            assert!((0..1000).any(|c| Request::from_code(c) == Some(*r)), "{r:?} has no code");
        }
        let names: std::collections::HashSet<_> = Request::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Request::ALL.len());
    }
}
