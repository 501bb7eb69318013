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
}

/// Pull request sys flags (`PullSysFlag`).
pub const PULL_COMMIT_OFFSET: i32 = 1;
pub const PULL_SUSPEND: i32 = 1 << 1;
pub const PULL_SUBSCRIPTION: i32 = 1 << 2;

/// Topic permissions (`PermName`): read, write.
pub const PERM_READ: i32 = 1 << 2;
pub const PERM_WRITE: i32 = 1 << 1;
