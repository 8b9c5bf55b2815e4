//! The one error type of roomctl, and its mapping to gRPC statuses.
//!
//! Every layer (auth, validation, engine, store) reports a domain cause from this closed enum; the
//! service turns it into a [`Status`] with a `google.rpc.ErrorInfo` (domain `roomcontrol.v1`) and,
//! for invalid arguments, a `google.rpc.BadRequest`, following docs/api.md's error table. Internal
//! causes (a store fault) are logged with their detail and reach clients only as a reason code.
//!
//! Every layer uses it, so it may use none of them: of roomctl it may depend on the generated
//! types only.

use std::collections::HashMap;

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// A limit on what a node, a connection or a room holds, named as its flag is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-streams`.
    Streams,
    /// `--max-streams-per-connection`.
    StreamsPerConnection,
    /// `--max-room-members`.
    RoomMembers,
    /// Bans in force in one room ([`crate::engine::MAX_BANS`]).
    RoomBans,
    /// `--moderator-rate`.
    ModeratorRate,
    /// `--service-rate`.
    ServiceRate,
}

impl Limit {
    /// The limit's name in ErrorInfo metadata: its flag without dashes.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Streams => "max_streams",
            Limit::StreamsPerConnection => "max_streams_per_connection",
            Limit::RoomMembers => "max_room_members",
            Limit::RoomBans => "max_room_bans",
            Limit::ModeratorRate => "moderator_rate",
            Limit::ServiceRate => "service_rate",
        }
    }
}

/// The `ErrorInfo.domain` of every error roomctl raises.
pub const DOMAIN: &str = "roomcontrol.v1";

/// The vendor's error code for a participant calling a moderator-only operation (drops, session
/// and ban control).
pub const UNAUTHORIZED_ACCESS_CODE: &str = "5116";
/// The vendor's error code for a participant locking or unlocking a room.
pub const LOCK_UNAUTHORIZED_CODE: &str = "5115";
/// The vendor's error code for locking a room that is locked.
pub const ROOM_ALREADY_LOCKED_CODE: &str = "5117";
/// The vendor's error code for unlocking a room that is not locked.
pub const ROOM_NOT_LOCKED_CODE: &str = "5118";

/// One invalid field of a request: its path (`client_ids[3]`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field in the request message.
    pub field: String,
    /// What is wrong, for a human.
    pub description: String,
}

impl Violation {
    /// A violation of `field`, described by `description`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No token, or one that is malformed, badly signed, expired or not allowed its claims.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A participant called a moderator-only RPC: the vendor's error `code` (5116, or 5115 for
    /// locks).
    #[error("{code}: Unauthorized Access: {detail}")]
    UnauthorizedAccess {
        /// The vendor code.
        code: &'static str,
        /// What the caller would need.
        detail: String,
    },
    /// The caller is authenticated but may not do this (another room, another's client...).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request breaks the contract's field rules.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<Violation>),
    /// A `request_id` the caller used, within the retry window, for a different request.
    #[error(
        "request_id {request_id:?} was used by this caller in this room for a different request \
         within the retry window: a retry must repeat its request exactly, and a new request \
         needs a new request_id"
    )]
    RequestIdReused {
        /// The reused id.
        request_id: String,
    },
    /// The request body is not valid protobuf for its message (bad UTF-8, truncated, wrong wire
    /// type); the text says where prost found it wrong.
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    /// The request is larger than `--max-message-bytes`.
    #[error("request larger than the {limit}-byte limit")]
    MessageTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A node, connection or room is at one of its limits.
    #[error("{} reached: at most {max}", .limit.name())]
    LimitReached {
        /// Which limit.
        limit: Limit,
        /// Its value.
        max: usize,
    },
    /// The caller sent moderator commands faster than `--moderator-rate` (or, for a service,
    /// `--service-rate`) allows.
    #[error(
        "too many moderator commands from this identity: at most {rate} per second \
         (--{}); retry in {retry_after:?}",
        .limit.name().replace('_', "-")
    )]
    RateLimited {
        /// Which rate: `moderator_rate` or `service_rate`.
        limit: Limit,
        /// When the next command would be accepted.
        retry_after: Duration,
        /// The sustained rate allowed.
        rate: u32,
    },
    /// The node has `--max-concurrent-calls` calls in progress; try again, here or elsewhere.
    #[error("server overloaded: {max} calls in progress; retry with backoff or on another node")]
    Overloaded {
        /// The limit.
        max: usize,
    },
    /// The call outlived its deadline (`--request-timeout` or the client's `grpc-timeout`).
    #[error("deadline of {timeout:?} exceeded")]
    DeadlineExceeded {
        /// The deadline that applied.
        timeout: Duration,
    },
    /// The room has never been joined, or has been forgotten since its last participant left.
    #[error("room {room_id:?} does not exist")]
    RoomNotFound {
        /// The requested room.
        room_id: String,
    },
    /// The room is locked: only moderators may join (the caller would join as participant).
    #[error("room {room_id:?} is locked: only moderators may join until it is unlocked")]
    RoomLocked {
        /// The locked room.
        room_id: String,
    },
    /// LockRoom on a room that is locked (the vendor's 5117).
    #[error("5117: Room Already Locked: room {room_id:?} is locked already")]
    RoomAlreadyLocked {
        /// The room.
        room_id: String,
    },
    /// UnlockRoom on a room that is not locked (the vendor's 5118).
    #[error("5118: Room Not Locked: room {room_id:?} is not locked")]
    RoomNotLocked {
        /// The room.
        room_id: String,
    },
    /// The identity is banned from the room until `until`.
    #[error("{identity:?} is banned from this room until {}", rfc3339(*.until))]
    Banned {
        /// The banned identity.
        identity: String,
        /// When the ban ends.
        until: std::time::SystemTime,
    },
    /// Unban of an identity that has no ban in force.
    #[error("{identity:?} has no ban in force in this room")]
    BanNotFound {
        /// The identity.
        identity: String,
    },
    /// The client is not (or no longer, at that cursor) in the room.
    #[error("client {client_id:?} is not in the room")]
    ClientNotFound {
        /// The requested client.
        client_id: String,
    },
    /// The cursor lies outside the room's retained history, or belongs to another epoch.
    #[error(
        "cursor out of range: the room's log {epoch:?} holds seq {oldest_seq}..={newest_seq}; \
         resync with ListParticipants"
    )]
    CursorOutOfRange {
        /// Oldest retained seq (`after_seq = oldest_seq - 1` is the oldest valid cursor).
        oldest_seq: u64,
        /// Newest seq in the log.
        newest_seq: u64,
        /// The room's current epoch.
        epoch: String,
    },
    /// The stream's token expired; resume from `last_seq` with a fresh token.
    #[error(
        "unauthenticated: the token expired; resubscribe with a new token after seq {last_seq}"
    )]
    TokenExpired {
        /// Every visible event up to this seq was delivered on the stream.
        last_seq: u64,
        /// Epoch of the log the stream followed.
        epoch: String,
    },
    /// The key that verified the stream's token was removed (a key rotation); resume from
    /// `last_seq` with a token of a current key.
    #[error(
        "unauthenticated: the key that signed this stream's token was removed (a key \
         rotation); resubscribe with a token of a current key after seq {last_seq}"
    )]
    TokenRevoked {
        /// Every visible event up to this seq was delivered on the stream.
        last_seq: u64,
        /// Epoch of the log the stream followed.
        epoch: String,
    },
    /// The server is shutting down; resume from `last_seq` on this node or another.
    #[error("server shutting down; resume after seq {last_seq}")]
    ShuttingDown {
        /// Every visible event up to this seq was delivered on the stream.
        last_seq: u64,
        /// Epoch of the log the stream followed.
        epoch: String,
    },
    /// The Redis master holding the room has fewer online replicas than every commit must wait
    /// for (`--redis-wait-replicas`): the command was refused before anything changed.
    #[error(
        "the store cannot confirm changes: its master has {online} online replicas and \
         --redis-wait-replicas needs {needed}; nothing was applied, retry later or elsewhere"
    )]
    NotEnoughReplicas {
        /// The master's online replicas.
        online: usize,
        /// What every commit waits for.
        needed: usize,
    },
    /// The store (Redis) cannot be reached; the detail is logged, not sent. Nothing was
    /// applied, so the call is safe to retry.
    #[error("store unavailable")]
    StoreUnavailable(String),
    /// The command was sent to the store but its answer never came: it may or may not have
    /// been applied. A retry with the same `request_id` returns the first answer if it was.
    #[error(
        "the store did not confirm the change in time: it may or may not have been applied; \
         retry with the same request_id to find out"
    )]
    OutcomeUnknown {
        /// The command's idempotency key, when it has one.
        request_id: Option<String>,
    },
    /// A broken invariant of roomctl itself; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

/// `time` as RFC 3339 (UTC, second precision), as ErrorInfo metadata and messages show times.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    prost_types::Timestamp::from(time).to_string()
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A refusal that a room's state decided, in the parts a store keeps when the room remembers it
/// under the request's id (as it remembers answers): its reason as docs/api.md's table names
/// it, what it names (a room, an identity) and a number (a ban's end in ns since 1970, a limit):
/// enough to give a retry the very refusal the first attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// [`Error::reason`].
    pub reason: String,
    /// The room or identity it names ("" for a limit).
    pub subject: String,
    /// A ban's end in ns since 1970, or a limit's value (0 otherwise).
    pub number: u64,
}

impl Error {
    /// The refusal this error is, when it is one a room's state decides (a ban, the lock, a
    /// full room, a lock already in place...) and so one a room remembers under the request's
    /// id; None for every other error, which a retry may not meet again.
    pub fn refusal(&self) -> Option<Refusal> {
        let (subject, number) = match self {
            Error::Banned { identity, until } => {
                let ns = until
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                (identity.clone(), ns)
            }
            Error::RoomLocked { room_id }
            | Error::RoomAlreadyLocked { room_id }
            | Error::RoomNotLocked { room_id } => (room_id.clone(), 0),
            Error::LimitReached {
                limit: Limit::RoomMembers | Limit::RoomBans,
                max,
            } => (String::new(), *max as u64),
            _ => return None,
        };
        Some(Refusal {
            reason: self.reason().to_owned(),
            subject,
            number,
        })
    }

    /// The error a remembered [`Refusal`] stands for; None for one no roomctl remembers.
    pub fn refused(refusal: Refusal) -> Option<Self> {
        let Refusal {
            reason,
            subject,
            number,
        } = refusal;
        let room_id = subject.clone();
        let err = match reason.as_str() {
            "BANNED" => Error::Banned {
                identity: subject,
                until: std::time::UNIX_EPOCH + Duration::from_nanos(number),
            },
            "ROOM_LOCKED" => Error::RoomLocked { room_id },
            "ROOM_ALREADY_LOCKED" => Error::RoomAlreadyLocked { room_id },
            "ROOM_NOT_LOCKED" => Error::RoomNotLocked { room_id },
            "ROOM_FULL" | "TOO_MANY_BANS" => Error::LimitReached {
                limit: if reason == "ROOM_FULL" {
                    Limit::RoomMembers
                } else {
                    Limit::RoomBans
                },
                max: usize::try_from(number).ok()?,
            },
            _ => return None,
        };
        Some(err)
    }

    /// `ROOM_NOT_FOUND` for `room_id`.
    pub fn room_not_found(room_id: &str) -> Self {
        Error::RoomNotFound {
            room_id: room_id.to_owned(),
        }
    }

    /// What an operator needs to know: the logged detail of store and internal faults (which
    /// clients never see), the message otherwise.
    pub fn detail(&self) -> String {
        match self {
            Error::StoreUnavailable(detail) | Error::Internal(detail) => detail.clone(),
            other => other.to_string(),
        }
    }

    /// The gRPC code of this error, per docs/api.md's table ("Errors").
    pub fn code(&self) -> Code {
        match self {
            Error::Unauthenticated(_) | Error::TokenExpired { .. } | Error::TokenRevoked { .. } => {
                Code::Unauthenticated
            }
            Error::UnauthorizedAccess { .. } | Error::Forbidden(_) => Code::PermissionDenied,
            Error::InvalidArgument(_)
            | Error::MalformedRequest(_)
            | Error::RequestIdReused { .. } => Code::InvalidArgument,
            Error::MessageTooLarge { .. }
            | Error::LimitReached { .. }
            | Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::Overloaded { .. } => Code::Unavailable,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Error::RoomNotFound { .. }
            | Error::ClientNotFound { .. }
            | Error::BanNotFound { .. } => Code::NotFound,
            Error::RoomLocked { .. }
            | Error::RoomAlreadyLocked { .. }
            | Error::RoomNotLocked { .. } => Code::FailedPrecondition,
            Error::Banned { .. } => Code::PermissionDenied,
            Error::CursorOutOfRange { .. } => Code::OutOfRange,
            Error::ShuttingDown { .. }
            | Error::StoreUnavailable(_)
            | Error::NotEnoughReplicas { .. } => Code::Unavailable,
            // gRPC's code for "the deadline passed; the change may have happened".
            Error::OutcomeUnknown { .. } => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The `ErrorInfo.reason` of this error, per docs/api.md's table ("Errors").
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Unauthenticated(_) | Error::TokenExpired { .. } | Error::TokenRevoked { .. } => {
                "UNAUTHENTICATED"
            }
            Error::UnauthorizedAccess { .. } => "UNAUTHORIZED_ACCESS",
            Error::Forbidden(_) => "FORBIDDEN",
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::MalformedRequest(_) => "MALFORMED_REQUEST",
            Error::RequestIdReused { .. } => "REQUEST_ID_REUSED",
            Error::MessageTooLarge { .. } => "MESSAGE_TOO_LARGE",
            Error::LimitReached {
                limit: Limit::RoomMembers,
                ..
            } => "ROOM_FULL",
            Error::LimitReached {
                limit: Limit::RoomBans,
                ..
            } => "TOO_MANY_BANS",
            Error::LimitReached { .. } => "TOO_MANY_STREAMS",
            Error::RateLimited { .. } => "RATE_LIMITED",
            Error::Overloaded { .. } => "OVERLOADED",
            Error::DeadlineExceeded { .. } => "DEADLINE_EXCEEDED",
            Error::RoomNotFound { .. } => "ROOM_NOT_FOUND",
            Error::ClientNotFound { .. } => "CLIENT_NOT_FOUND",
            Error::RoomLocked { .. } => "ROOM_LOCKED",
            Error::RoomAlreadyLocked { .. } => "ROOM_ALREADY_LOCKED",
            Error::RoomNotLocked { .. } => "ROOM_NOT_LOCKED",
            Error::Banned { .. } => "BANNED",
            Error::BanNotFound { .. } => "BAN_NOT_FOUND",
            Error::CursorOutOfRange { .. } => "CURSOR_OUT_OF_RANGE",
            Error::ShuttingDown { .. } => "SHUTTING_DOWN",
            Error::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            Error::NotEnoughReplicas { .. } => "NOT_ENOUGH_REPLICAS",
            Error::OutcomeUnknown { .. } => "OUTCOME_UNKNOWN",
            Error::Internal(_) => "INTERNAL",
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let pairs: Vec<(&str, String)> = match self {
            Error::UnauthorizedAccess { code, .. } => vec![("code", (*code).to_owned())],
            Error::RoomAlreadyLocked { room_id } => vec![
                ("code", ROOM_ALREADY_LOCKED_CODE.to_owned()),
                ("room_id", room_id.clone()),
            ],
            Error::RoomNotLocked { room_id } => vec![
                ("code", ROOM_NOT_LOCKED_CODE.to_owned()),
                ("room_id", room_id.clone()),
            ],
            Error::RoomLocked { room_id } => vec![("room_id", room_id.clone())],
            Error::Banned { identity, until } => {
                vec![("identity", identity.clone()), ("until", rfc3339(*until))]
            }
            Error::BanNotFound { identity } => vec![("identity", identity.clone())],
            Error::RequestIdReused { request_id } => vec![("request_id", request_id.clone())],
            Error::MessageTooLarge { limit } => vec![("limit_bytes", limit.to_string())],
            Error::LimitReached { limit, max } => {
                vec![("limit", limit.name().to_owned()), ("max", max.to_string())]
            }
            Error::RateLimited {
                limit,
                retry_after,
                rate,
            } => vec![
                ("limit", limit.name().to_owned()),
                ("max", rate.to_string()),
                ("retry_after_ms", retry_after.as_millis().max(1).to_string()),
            ],
            Error::Overloaded { max } => vec![
                ("limit", "max_concurrent_calls".to_owned()),
                ("max", max.to_string()),
            ],
            Error::DeadlineExceeded { timeout } => {
                vec![("timeout_ms", timeout.as_millis().to_string())]
            }
            Error::RoomNotFound { room_id } => vec![("room_id", room_id.clone())],
            Error::ClientNotFound { client_id } => vec![("client_id", client_id.clone())],
            Error::CursorOutOfRange {
                oldest_seq,
                newest_seq,
                epoch,
            } => vec![
                ("oldest_seq", oldest_seq.to_string()),
                ("newest_seq", newest_seq.to_string()),
                ("epoch", epoch.clone()),
            ],
            Error::ShuttingDown { last_seq, epoch }
            | Error::TokenExpired { last_seq, epoch }
            | Error::TokenRevoked { last_seq, epoch } => {
                vec![("last_seq", last_seq.to_string()), ("epoch", epoch.clone())]
            }
            Error::NotEnoughReplicas { online, needed } => vec![
                ("replicas", online.to_string()),
                ("needed", needed.to_string()),
            ],
            Error::OutcomeUnknown { request_id } => request_id
                .iter()
                .map(|id| ("request_id", id.clone()))
                .collect(),
            Error::Unauthenticated(_)
            | Error::Forbidden(_)
            | Error::InvalidArgument(_)
            | Error::MalformedRequest(_)
            | Error::StoreUnavailable(_)
            | Error::Internal(_) => Vec::new(),
        };
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match &err {
            Error::StoreUnavailable(detail) => tracing::warn!(%detail, "store unavailable"),
            Error::OutcomeUnknown { .. } => {
                tracing::warn!("store did not confirm a commit in time")
            }
            Error::Internal(detail) => tracing::error!(%detail, "internal error"),
            _ => {}
        }
        let mut details = ErrorDetails::with_error_info(err.reason(), DOMAIN, err.metadata());
        if let Error::RateLimited { retry_after, .. } = &err {
            details.set_retry_info(Some(*retry_after));
        }
        if let Error::RequestIdReused { .. } = &err {
            details.set_bad_request(vec![FieldViolation::new(
                "request_id",
                "already used for a different request",
            )]);
        }
        if let Error::InvalidArgument(violations) = &err {
            details.set_bad_request(
                violations
                    .iter()
                    .map(|v| FieldViolation::new(&v.field, &v.description))
                    .collect::<Vec<_>>(),
            );
        }
        Status::with_error_details(err.code(), err.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(status: &Status) -> (String, HashMap<String, String>) {
        let details = status.get_error_details();
        let info = details.error_info().expect("every error carries ErrorInfo");
        assert_eq!(info.domain, DOMAIN);
        (info.reason.clone(), info.metadata.clone())
    }

    #[test]
    fn every_error_maps_to_its_row_of_the_table() {
        let rows = [
            (
                Error::Unauthenticated("x".into()),
                Code::Unauthenticated,
                "UNAUTHENTICATED",
            ),
            (
                Error::UnauthorizedAccess {
                    code: UNAUTHORIZED_ACCESS_CODE,
                    detail: "x".into(),
                },
                Code::PermissionDenied,
                "UNAUTHORIZED_ACCESS",
            ),
            (
                Error::RoomLocked {
                    room_id: "r".into(),
                },
                Code::FailedPrecondition,
                "ROOM_LOCKED",
            ),
            (
                Error::RoomAlreadyLocked {
                    room_id: "r".into(),
                },
                Code::FailedPrecondition,
                "ROOM_ALREADY_LOCKED",
            ),
            (
                Error::RoomNotLocked {
                    room_id: "r".into(),
                },
                Code::FailedPrecondition,
                "ROOM_NOT_LOCKED",
            ),
            (
                Error::Banned {
                    identity: "bob".into(),
                    until: std::time::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789),
                },
                Code::PermissionDenied,
                "BANNED",
            ),
            (
                Error::BanNotFound {
                    identity: "bob".into(),
                },
                Code::NotFound,
                "BAN_NOT_FOUND",
            ),
            (
                Error::LimitReached {
                    limit: Limit::RoomBans,
                    max: 2,
                },
                Code::ResourceExhausted,
                "TOO_MANY_BANS",
            ),
            (
                Error::Forbidden("x".into()),
                Code::PermissionDenied,
                "FORBIDDEN",
            ),
            (
                Error::InvalidArgument(vec![]),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                Error::MalformedRequest("x".into()),
                Code::InvalidArgument,
                "MALFORMED_REQUEST",
            ),
            (
                Error::MessageTooLarge { limit: 4 },
                Code::ResourceExhausted,
                "MESSAGE_TOO_LARGE",
            ),
            (
                Error::RoomNotFound {
                    room_id: "r".into(),
                },
                Code::NotFound,
                "ROOM_NOT_FOUND",
            ),
            (
                Error::ClientNotFound {
                    client_id: "c".into(),
                },
                Code::NotFound,
                "CLIENT_NOT_FOUND",
            ),
            (
                Error::CursorOutOfRange {
                    oldest_seq: 1,
                    newest_seq: 2,
                    epoch: "e".into(),
                },
                Code::OutOfRange,
                "CURSOR_OUT_OF_RANGE",
            ),
            (
                Error::ShuttingDown {
                    last_seq: 3,
                    epoch: "e".into(),
                },
                Code::Unavailable,
                "SHUTTING_DOWN",
            ),
            (
                Error::StoreUnavailable("down".into()),
                Code::Unavailable,
                "STORE_UNAVAILABLE",
            ),
            (
                Error::OutcomeUnknown {
                    request_id: Some("q".into()),
                },
                Code::DeadlineExceeded,
                "OUTCOME_UNKNOWN",
            ),
            (
                Error::LimitReached {
                    limit: Limit::RoomMembers,
                    max: 2,
                },
                Code::ResourceExhausted,
                "ROOM_FULL",
            ),
            (
                Error::LimitReached {
                    limit: Limit::StreamsPerConnection,
                    max: 2,
                },
                Code::ResourceExhausted,
                "TOO_MANY_STREAMS",
            ),
            (
                Error::RateLimited {
                    limit: Limit::ModeratorRate,
                    retry_after: Duration::from_millis(20),
                    rate: 5,
                },
                Code::ResourceExhausted,
                "RATE_LIMITED",
            ),
            (
                Error::Overloaded { max: 9 },
                Code::Unavailable,
                "OVERLOADED",
            ),
            (
                Error::DeadlineExceeded {
                    timeout: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
            ),
            (
                Error::RequestIdReused {
                    request_id: "k".into(),
                },
                Code::InvalidArgument,
                "REQUEST_ID_REUSED",
            ),
            (
                Error::NotEnoughReplicas {
                    online: 0,
                    needed: 1,
                },
                Code::Unavailable,
                "NOT_ENOUGH_REPLICAS",
            ),
            (Error::Internal("bug".into()), Code::Internal, "INTERNAL"),
        ];
        let mut remembered = Vec::new();
        for (err, code, reason) in rows {
            // A refusal a room remembers comes back from its stored parts as it was.
            if let Some(refusal) = err.refusal() {
                assert_eq!(refusal.reason, reason);
                assert_eq!(Error::refused(refusal), Some(err.clone()));
                remembered.push(reason);
            }
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(info(&status).0, reason);
        }
        remembered.sort_unstable();
        assert_eq!(
            remembered,
            [
                "BANNED",
                "ROOM_ALREADY_LOCKED",
                "ROOM_FULL",
                "ROOM_LOCKED",
                "ROOM_NOT_LOCKED",
                "TOO_MANY_BANS"
            ]
        );
    }

    #[test]
    fn vendor_codes_lead_the_message_and_fill_the_metadata() {
        let room_id = || "r".to_owned();
        let cases = [
            (
                Error::UnauthorizedAccess {
                    code: UNAUTHORIZED_ACCESS_CODE,
                    detail: "participants may not drop".into(),
                },
                "5116: Unauthorized Access",
            ),
            (
                Error::UnauthorizedAccess {
                    code: LOCK_UNAUTHORIZED_CODE,
                    detail: "participants may not lock".into(),
                },
                "5115: Unauthorized Access",
            ),
            (Error::RoomAlreadyLocked { room_id: room_id() }, "5117: "),
            (Error::RoomNotLocked { room_id: room_id() }, "5118: "),
        ];
        for (err, start) in cases {
            let status = Status::from(err);
            assert!(status.message().starts_with(start), "{}", status.message());
            assert_eq!(info(&status).1["code"], start[..4]);
        }
    }

    #[test]
    fn a_ban_says_who_and_until_when() {
        let until = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let status = Status::from(Error::Banned {
            identity: "bob".into(),
            until,
        });
        let metadata = info(&status).1;
        assert_eq!(metadata["identity"], "bob");
        assert_eq!(metadata["until"], "2027-01-15T08:00:00Z");
        assert!(status.message().contains("2027-01-15T08:00:00Z"));
    }

    #[test]
    fn cursor_and_shutdown_errors_carry_their_positions() {
        let status = Status::from(Error::CursorOutOfRange {
            oldest_seq: 7,
            newest_seq: 11,
            epoch: "ep".into(),
        });
        let meta = info(&status).1;
        assert_eq!(
            (meta["oldest_seq"].as_str(), meta["newest_seq"].as_str()),
            ("7", "11")
        );
        assert_eq!(meta["epoch"], "ep");
        let meta = info(&Status::from(Error::ShuttingDown {
            last_seq: 9,
            epoch: "ep".into(),
        }))
        .1;
        assert_eq!(
            (meta["last_seq"].as_str(), meta["epoch"].as_str()),
            ("9", "ep")
        );
    }

    #[test]
    fn invalid_arguments_carry_field_violations() {
        let status = Status::from(Error::InvalidArgument(vec![
            Violation::new("room_id", "must not be empty"),
            Violation::new("client_ids[2]", "longer than 128 characters"),
        ]));
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .expect("BadRequest detail")
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["room_id", "client_ids[2]"]);
    }

    #[test]
    fn store_detail_does_not_reach_the_client() {
        let status = Status::from(Error::StoreUnavailable("redis at 10.0.0.1 refused".into()));
        assert!(!status.message().contains("10.0.0.1"));
    }
}
