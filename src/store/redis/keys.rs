//! How a room lives in Redis: its keys and channel, what is stored in them, and the decoding of
//! what Redis answers. Layout only: nothing here talks to Redis.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::bytes::Bytes;
use prost::Message;
use redis::Value;

use crate::engine::{Ban, Remembered, Reply};
use crate::error::{Error, Refusal};
use crate::pb;
use crate::store::LoggedEvent;

/// The channel a room's commits publish their events on; in the room's hash tag, so it shares
/// the room's Redis Cluster slot.
pub(super) fn channel(room_id: &str) -> String {
    format!("roomctl:{{{room_id}}}:events")
}

/// The room whose channel is `channel`.
pub(super) fn room_of(channel: &str) -> Option<String> {
    let room_id = channel
        .strip_prefix("roomctl:{")?
        .strip_suffix("}:events")?;
    Some(room_id.to_owned())
}

/// A member as stored in the `members` hash: the participant and the seq it joined at, which
/// orders `ListParticipants`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMember {
    /// Seq of the member's `user_connected`.
    #[prost(uint64, tag = "1")]
    pub join_seq: u64,
    /// The participant.
    #[prost(message, optional, tag = "2")]
    pub participant: Option<pb::Participant>,
}

/// A remembered answer as stored in the `answers` hash, under its [`crate::engine::answer_key`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredAnswer {
    /// When the answer is forgotten, in milliseconds since the Unix epoch (also its score in
    /// the `answered` sorted set).
    #[prost(uint64, tag = "1")]
    pub expires_at_ms: u64,
    /// The answer.
    #[prost(oneof = "StoredReply", tags = "2, 3, 4, 5, 6, 8")]
    pub reply: Option<StoredReply>,
    /// The [`crate::engine::Command::fingerprint`] of the request it answered (0 in answers
    /// stored before fingerprints were: any retry matches those).
    #[prost(fixed64, tag = "7")]
    pub fingerprint: u64,
}

/// The kinds of answer a room remembers.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum StoredReply {
    /// A `Join`'s answer.
    #[prost(message, tag = "2")]
    Joined(pb::JoinResponse),
    /// A `DropUser`'s answer.
    #[prost(message, tag = "3")]
    Dropped(pb::DropUserResponse),
    /// A `LockRoom`'s answer.
    #[prost(message, tag = "4")]
    Locked(pb::LockRoomResponse),
    /// An `UnlockRoom`'s answer.
    #[prost(message, tag = "5")]
    Unlocked(pb::UnlockRoomResponse),
    /// A `DestroySession`'s answer.
    #[prost(message, tag = "6")]
    Destroyed(pb::DestroySessionResponse),
    /// A refusal the room's state decided ([`crate::error::Error::refusal`]).
    #[prost(message, tag = "8")]
    Refused(StoredRefusal),
}

/// A remembered refusal, as [`crate::error::Refusal`] has it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredRefusal {
    /// Its reason, as docs/api.md's error table names it.
    #[prost(string, tag = "1")]
    pub reason: String,
    /// The room or identity it names.
    #[prost(string, tag = "2")]
    pub subject: String,
    /// A ban's end (ns since 1970) or a limit.
    #[prost(uint64, tag = "3")]
    pub number: u64,
}

pub(super) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl StoredAnswer {
    /// The stored form of `answer`; None for replies that are never remembered.
    pub(super) fn of(answer: &Remembered) -> Option<Self> {
        let reply = match &answer.reply {
            Reply::Joined(joined) => StoredReply::Joined(joined.clone()),
            Reply::Dropped(dropped) => StoredReply::Dropped(dropped.clone()),
            Reply::Locked(locked) => StoredReply::Locked(locked.clone()),
            Reply::Unlocked(unlocked) => StoredReply::Unlocked(unlocked.clone()),
            Reply::Destroyed(destroyed) => StoredReply::Destroyed(destroyed.clone()),
            Reply::Refused(err) => {
                let Refusal {
                    reason,
                    subject,
                    number,
                } = err.refusal()?;
                StoredReply::Refused(StoredRefusal {
                    reason,
                    subject,
                    number,
                })
            }
            Reply::Left | Reply::TimedOut(_) | Reply::Unbanned(_) => return None,
        };
        Some(Self {
            expires_at_ms: millis(answer.expires_at),
            reply: Some(reply),
            fingerprint: answer.fingerprint,
        })
    }

    /// The answer as the engine remembers it; `request` is the fingerprint of the request
    /// looking it up, which an answer stored without one is taken to match.
    pub(super) fn into_remembered(self, key: String, request: u64) -> Result<Remembered, Error> {
        let reply = match self.reply.ok_or_else(|| corrupt("answer"))? {
            StoredReply::Joined(joined) => Reply::Joined(joined),
            StoredReply::Dropped(dropped) => Reply::Dropped(dropped),
            StoredReply::Locked(locked) => Reply::Locked(locked),
            StoredReply::Unlocked(unlocked) => Reply::Unlocked(unlocked),
            StoredReply::Destroyed(destroyed) => Reply::Destroyed(destroyed),
            StoredReply::Refused(StoredRefusal {
                reason,
                subject,
                number,
            }) => {
                let refusal = Refusal {
                    reason,
                    subject,
                    number,
                };
                Reply::Refused(Error::refused(refusal).ok_or_else(|| corrupt("answer"))?)
            }
        };
        Ok(Remembered {
            key,
            expires_at: UNIX_EPOCH + Duration::from_millis(self.expires_at_ms),
            fingerprint: if self.fingerprint == 0 {
                request
            } else {
                self.fingerprint
            },
            reply,
        })
    }
}

/// The keys of one room.
pub(super) struct Keys {
    pub(super) meta: String,
    pub(super) members: String,
    pub(super) departed: String,
    pub(super) owners: String,
    pub(super) log: String,
    pub(super) answers: String,
    pub(super) answered: String,
    pub(super) leases: String,
    pub(super) bans: String,
    pub(super) banned: String,
    /// Webhook cursors (`c:ENDPOINT` to `EPOCH:SEQ`).
    pub(super) hooks: String,
    /// The remembered refusals among `answers`, by expiry: past the budget they go first.
    pub(super) refused: String,
    /// Where the commit script copies a log it has just begun, to store it compactly (see
    /// commit.lua); it exists only while the script runs.
    pub(super) log_copy: String,
}

impl Keys {
    pub(super) fn new(room_id: &str) -> Self {
        let tag = format!("roomctl:{{{room_id}}}");
        Self {
            meta: format!("{tag}:meta"),
            members: format!("{tag}:members"),
            departed: format!("{tag}:departed"),
            owners: format!("{tag}:owners"),
            log: format!("{tag}:log"),
            answers: format!("{tag}:answers"),
            answered: format!("{tag}:answered"),
            leases: format!("{tag}:leases"),
            bans: format!("{tag}:bans"),
            banned: format!("{tag}:banned"),
            hooks: format!("{tag}:hooks"),
            refused: format!("{tag}:refused"),
            log_copy: format!("{tag}:log-copy"),
        }
    }

    /// Every key of the room, in the order the commit script takes them.
    pub(super) fn room(&self) -> [&String; 12] {
        [
            &self.meta,
            &self.members,
            &self.departed,
            &self.owners,
            &self.log,
            &self.answers,
            &self.answered,
            &self.leases,
            &self.bans,
            &self.banned,
            &self.hooks,
            &self.refused,
        ]
    }

    /// An atomic pipeline (MULTI) whose first reply is the room's [`Meta`], so whatever
    /// follows is read at the same log position.
    pub(super) fn read_meta(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_meta(&mut pipe);
        pipe
    }

    /// Adds the read of the room's [`Meta`] to `pipe`.
    pub(super) fn add_meta(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("HMGET").arg(&self.meta).arg(&META_FIELDS[..]);
    }
}

/// The fields of `meta` that [`meta`] decodes.
const META_FIELDS: [&str; 5] = ["epoch", "seq", "locked", "confirmed", "oldest"];

/// A room's `meta` hash: its log's epoch and newest seq, whether it is locked, and, with
/// `--redis-wait-replicas`, the newest seq its replicas are known to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) epoch: String,
    pub(super) seq: u64,
    pub(super) locked: bool,
    pub(super) confirmed: Option<u64>,
    /// The oldest seq the log holds, once a commit has recorded it (trimmed by count or bytes).
    pub(super) oldest: Option<u64>,
}

impl Meta {
    /// The newest seq readers may see: with `--redis-wait-replicas`, the newest one the
    /// replicas confirmed (events past it may vanish in a failover, so nobody may have seen
    /// them); otherwise the newest.
    pub(super) fn visible(&self) -> u64 {
        self.confirmed
            .map_or(self.seq, |confirmed| confirmed.min(self.seq))
    }
}

pub(super) fn corrupt(what: &str) -> Error {
    Error::Internal(format!("unreadable {what} in redis"))
}

pub(super) fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn text(value: &Value) -> Option<String> {
    bytes(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(super) fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Double(d) => Some(*d as u64),
        other => text(other)?.parse().ok(),
    }
}

/// A sorted-set score (a lease's expiry, in milliseconds, `.5` marking a grace period).
pub(super) fn score_of(value: &Value) -> Option<f64> {
    match value {
        Value::Double(d) => Some(*d),
        Value::Int(n) => Some(*n as f64),
        other => text(other)?.parse().ok(),
    }
}

pub(super) fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// The room's [`Meta`] read by [`Keys::add_meta`], or None when the room does not exist.
pub(super) fn meta(value: Value) -> Result<Option<Meta>, Error> {
    let fields = array(value);
    match (
        fields.first().and_then(text),
        fields.get(1).and_then(number),
    ) {
        (Some(epoch), Some(seq)) => Ok(Some(Meta {
            epoch,
            seq,
            locked: fields.get(2).and_then(number) == Some(1),
            confirmed: fields.get(3).and_then(number),
            oldest: fields.get(4).and_then(number),
        })),
        (None, None) => Ok(None),
        _ => Err(corrupt("room meta")),
    }
}

/// A ban as stored in the `bans` hash (its end is also its score in `banned`).
pub(super) fn ban(value: &Value) -> Result<Option<Ban>, Error> {
    let Some(raw) = bytes(value) else {
        return Ok(None);
    };
    let stored = pb::Ban::decode(raw).map_err(|_| corrupt("ban"))?;
    let until = stored
        .until
        .and_then(|t| SystemTime::try_from(t).ok())
        .ok_or_else(|| corrupt("ban"))?;
    Ok(Some(Ban {
        identity: stored.identity,
        until,
        moderator: stored.moderator,
    }))
}

pub(super) fn member(value: &Value) -> Result<Option<(pb::Participant, u64)>, Error> {
    let Some(raw) = bytes(value) else {
        return Ok(None);
    };
    let stored = StoredMember::decode(raw).map_err(|_| corrupt("member"))?;
    let participant = stored.participant.ok_or_else(|| corrupt("member"))?;
    Ok(Some((participant, stored.join_seq)))
}

/// The entries of an `XRANGE` reply, decoded.
pub(super) fn entries(value: Value) -> Result<Vec<Arc<LoggedEvent>>, Error> {
    array(value)
        .into_iter()
        .map(|entry| {
            let mut parts = array(entry).into_iter();
            let fields = array(parts.nth(1).unwrap_or(Value::Nil));
            let raw = fields
                .get(1)
                .and_then(bytes)
                .ok_or_else(|| corrupt("log entry"))?;
            LoggedEvent::decode(Bytes::copy_from_slice(raw))
                .map(Arc::new)
                .map_err(|_| corrupt("log entry"))
        })
        .collect()
}
