//! How a room lives in Redis: its keys, what is stored in them, the commit script that changes
//! them atomically, and the decoding of what Redis answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use redis::Value;

use crate::engine::{Remembered, Reply};
use crate::error::Error;
use crate::pb;

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
    #[prost(oneof = "StoredReply", tags = "2, 3")]
    pub reply: Option<StoredReply>,
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
            Reply::Left | Reply::TimedOut(_) => return None,
        };
        Some(Self {
            expires_at_ms: millis(answer.expires_at),
            reply: Some(reply),
        })
    }

    pub(super) fn into_remembered(self, key: String) -> Result<Remembered, Error> {
        let reply = match self.reply.ok_or_else(|| corrupt("answer"))? {
            StoredReply::Joined(joined) => Reply::Joined(joined),
            StoredReply::Dropped(dropped) => Reply::Dropped(dropped),
        };
        Ok(Remembered {
            key,
            expires_at: UNIX_EPOCH + Duration::from_millis(self.expires_at_ms),
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
        }
    }

    /// An atomic pipeline (MULTI) whose first reply is the room's `HMGET meta epoch seq`, so
    /// whatever follows is read at the same log position.
    pub(super) fn read_meta(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(&self.meta)
            .arg("epoch")
            .arg("seq");
        pipe
    }
}

/// The commit of a batch. Returns 0, changing nothing, unless the room is still at the `seq` and
/// `epoch` the batch ran on, every member id and answer key the batch assumed absent is absent,
/// and every client it times out still has a lapsed lease (none came back meanwhile). Then it
/// appends the events, applies membership changes (with presence on, a joined client gets a
/// lease in its grace period, a departed one loses its lease), remembers the new answers
/// (forgetting expired ones and the oldest past the cap), sets or clears the empty-room expiry,
/// publishes, and returns 1. A room created anew first deletes whatever a forgotten room of the
/// same id left behind: answers, like the log, belong to their epoch.
pub(super) const COMMIT: &str = r#"
local meta, members, departed, owners, log, answers, answered, leases =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local expected, epoch, history, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now, max_answers, presence = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local current = redis.call('HMGET', meta, 'epoch', 'seq')
if expected == '' then
  if current[1] then return 0 end
elseif current[1] ~= epoch or current[2] ~= expected then
  return 0
end
local i = 10
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  if redis.call('HEXISTS', members, ARGV[i]) == 1 then return 0 end
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  if redis.call('HEXISTS', answers, ARGV[i]) == 1 then return 0 end
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  local lease = redis.call('ZSCORE', leases, ARGV[i])
  if lease and tonumber(lease) > tonumber(now) then return 0 end
end
if expected == '' then
  redis.call('DEL', members, departed, owners, log, answers, answered, leases)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', '0')
end
i = i + 1
local last = nil
for _ = 1, tonumber(ARGV[i]) do
  redis.call('XADD', log, 'MAXLEN', history, '0-' .. ARGV[i + 1], 'e', ARGV[i + 2])
  last = ARGV[i + 1]
  i = i + 2
end
i = i + 1
redis.call('HSET', meta, 'seq', last)
for _ = 1, tonumber(ARGV[i]) do
  redis.call('HSET', members, ARGV[i + 1], ARGV[i + 2])
  if presence > 0 then
    -- In its grace period (the .5) until it opens a stream.
    redis.call('ZADD', leases, tonumber(now) + presence + 0.5, ARGV[i + 1])
  end
  i = i + 2
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  redis.call('HDEL', members, ARGV[i + 1])
  redis.call('ZREM', leases, ARGV[i + 1])
  redis.call('ZADD', departed, ARGV[i + 3], ARGV[i + 1])
  redis.call('HSET', owners, ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
i = i + 1
local added = tonumber(ARGV[i])
for _ = 1, added do
  redis.call('HSET', answers, ARGV[i + 1], ARGV[i + 2])
  redis.call('ZADD', answered, ARGV[i + 3], ARGV[i + 1])
  i = i + 3
end
if added > 0 then
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', answered, '-inf', now)) do
    redis.call('HDEL', answers, key)
  end
  redis.call('ZREMRANGEBYSCORE', answered, '-inf', now)
  local excess = redis.call('ZCARD', answered) - max_answers
  if excess > 0 then
    local oldest = redis.call('ZPOPMIN', answered, excess)
    for n = 1, #oldest, 2 do redis.call('HDEL', answers, oldest[n]) end
  end
end
local oldest = tonumber(last) - history + 1
if oldest > 1 then
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', departed, '-inf', '(' .. oldest)) do
    redis.call('HDEL', owners, gone)
  end
  redis.call('ZREMRANGEBYSCORE', departed, '-inf', '(' .. oldest)
end
local room = {meta, members, departed, owners, log, answers, answered, leases}
if redis.call('HLEN', members) == 0 then
  for _, key in ipairs(room) do
    if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ttl) end
  end
elseif redis.call('PTTL', meta) ~= -1 then
  for _, key in ipairs(room) do redis.call('PERSIST', key) end
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"#;

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

/// `HMGET meta epoch seq` as (epoch, seq), or None when the room does not exist.
pub(super) fn meta(value: Value) -> Result<Option<(String, u64)>, Error> {
    let fields = array(value);
    match (
        fields.first().and_then(text),
        fields.get(1).and_then(number),
    ) {
        (Some(epoch), Some(seq)) => Ok(Some((epoch, seq))),
        (None, None) => Ok(None),
        _ => Err(corrupt("room meta")),
    }
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
pub(super) fn entries(value: Value) -> Result<Vec<Arc<pb::Event>>, Error> {
    array(value)
        .into_iter()
        .map(|entry| {
            let mut parts = array(entry).into_iter();
            let fields = array(parts.nth(1).unwrap_or(Value::Nil));
            let raw = fields
                .get(1)
                .and_then(bytes)
                .ok_or_else(|| corrupt("log entry"))?;
            pb::Event::decode(raw)
                .map(Arc::new)
                .map_err(|_| corrupt("log entry"))
        })
        .collect()
}
