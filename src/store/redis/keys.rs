//! How a room lives in Redis: its keys, what is stored in them, the commit script that changes
//! them atomically, and the decoding of what Redis answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use redis::Value;

use crate::engine::{Ban, Remembered, Reply};
use crate::error::Error;
use crate::pb;
use crate::store::LoggedEvent;

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
    #[prost(oneof = "StoredReply", tags = "2, 3, 4, 5, 6")]
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
        }
    }

    /// Every key of the room, in the order the commit script takes them.
    pub(super) fn room(&self) -> [&String; 10] {
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

/// The commit of a batch. Returns 0, changing nothing, unless the room is still at the `seq` and
/// `epoch` the batch ran on, every member id and answer key the batch assumed absent is absent,
/// every identity it assumed unbanned has no ban in force, and every client it times out still
/// has a lapsed lease (none came back meanwhile). Then it appends the events (trimming the log to
/// `--history` events and `--history-bytes` of them, and keeping in `meta` its `oldest` seq and
/// what it weighs as `log_bytes`), applies membership
/// changes (with presence on, a joined client gets a lease in its grace period, a departed one
/// loses its lease), the lock, the bans (purging ended ones), remembers the new answers
/// (forgetting expired ones and, past the byte budget, the oldest; what they weigh is kept in
/// `meta` as `answers_bytes`), sets or clears the empty-room expiry,
/// publishes (unless the publish command is empty: with `--redis-wait-replicas`, [`CONFIRM`]
/// publishes once replicas hold the commit), and returns 1, or, when the room is left empty, the
/// time (ms) its keys expire. Each commit records the Redis process that made it (`run`, its
/// replication id `replid`, and on a cluster its node id `node`); a commit made by another
/// process that may lack the log's tail starts a new epoch and returns -1 (see the script). With
/// replicas to wait for, a master with fewer online replicas than that changes nothing and
/// returns -2 minus how many it has.
///
/// An empty room's keys expire together once it has been empty for the TTL and no ban has been
/// in force for as long: at the latest of its first empty commit, the end of its longest ban,
/// and its last unban, plus the TTL. A room created anew first deletes whatever a forgotten
/// room of the same id left behind: answers, like the log, belong to their epoch.
///
/// `ARGV`: expected seq (empty: the room must not exist), epoch, history, TTL (ms), channel,
/// notice, now (ms), the answers' budget (bytes), presence timeout (ms, 0: off), lock ('' unchanged, '1', '0'),
/// the publish command (`PUBLISH`, or `SPUBLISH` on a cluster; empty: do not publish), the epoch
/// to start if one must be, the replicas commits wait for (0: none), history bytes; then
/// counted lists:
/// assumed-absent member ids; assumed-absent answer keys; clients timed out; assumed-unbanned
/// identities; events (seq, bytes); joins (id, member); departures (id, identity, end seq);
/// answers (key, bytes, expiry); bans set and lifted, in order (identity, end, bytes; end 0 lifts
/// the ban).
pub(super) const COMMIT: &str = r#"
local meta, members, departed, owners, log, answers, answered, leases, bans, banned =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local expected, epoch, history, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now, answer_budget, presence = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local lock, publish, fresh, needed = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
local waiting = needed > 0
local history_bytes = tonumber(ARGV[14])
local info = redis.call('INFO', 'server', 'replication', 'cluster')
-- A plain find, not a pattern: matching patterns over INFO's text cost more than the rest of
-- the commit. Run and replication ids are 40 hex characters.
local function field(name)
  local _, at = string.find(info, name, 1, true)
  return at and string.sub(info, at + 1, at + 40)
end
if waiting then
  -- A master with fewer online replicas than the commit must wait for could never confirm
  -- it: refuse it before anything changes, so its callers get a definite answer (as Redis's
  -- own min-replicas-to-write refuses writes).
  local online, at = 0, 1
  repeat
    local found = string.find(info, 'state=online', at, true)
    if found then online, at = online + 1, found + 12 end
  until not found
  if online < needed then return -2 - online end
end
local run = field('run_id:')
local replid = field('master_replid:')
local clustered = string.find(info, 'cluster_enabled:1', 1, true) ~= nil
local node = run
if clustered then node = redis.call('CLUSTER', 'MYID') end
local current = redis.call('HMGET', meta, 'epoch', 'seq', 'run', 'replid', 'confirmed', 'node',
  'oldest', 'log_bytes')
if current[1] and current[3] ~= run then
  -- Another Redis process made the room's last commit. If this one restarted (from an AOF or
  -- RDB that may lack the log's tail) or was promoted from a replica (which may lack it too),
  -- seqs clients have seen could be reused: the log starts anew under a new epoch, so their
  -- cursors get OUT_OF_RANGE. A promoted replica keeps the epoch when every visible event was
  -- confirmed by replicas; so does a cluster master the room's slot migrated to (whole).
  local promoted = current[4] == field('master_replid2:')
  local migrated = clustered and current[6] ~= node and not promoted
  if not migrated and not (waiting and promoted) then
    redis.call('DEL', log)
    redis.call('HDEL', meta, 'oldest', 'log_bytes')
    redis.call('HSET', meta, 'epoch', fresh, 'run', run, 'replid', replid, 'node', node)
    if waiting then redis.call('HSET', meta, 'confirmed', current[2]) end
    return -1
  end
end
if expected == '' then
  if current[1] then return 0 end
elseif current[1] ~= epoch or current[2] ~= expected then
  return 0
end
local i = 15
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
  if lease and tonumber(lease) > now then return 0 end
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  local ban = redis.call('ZSCORE', banned, ARGV[i])
  if ban and tonumber(ban) > now then return 0 end
end
local room = {meta, members, departed, owners, log, answers, answered, leases, bans, banned}
if expected == '' then
  redis.call('DEL', unpack(room))
  redis.call('HSET', meta, 'epoch', epoch, 'seq', '0')
  current[5], current[7], current[8] = false, false, false
end
if not waiting then
  -- Left by nodes that waited for replicas before: it would hide what this commit shows.
  if current[5] then redis.call('HDEL', meta, 'confirmed') end
elseif not current[5] then
  -- Newly created, or first written since waiting was turned on.
  redis.call('HSET', meta, 'confirmed', expected == '' and '0' or expected)
end
i = i + 1
local last = nil
local log_bytes = tonumber(current[8] or '0')
for _ = 1, tonumber(ARGV[i]) do
  redis.call('XADD', log, '0-' .. ARGV[i + 1], 'e', ARGV[i + 2])
  log_bytes = log_bytes + #ARGV[i + 2]
  last = ARGV[i + 1]
  i = i + 2
end
i = i + 1
-- The log holds the last `history` events and at most `history_bytes` of them (their encoding),
-- the newest always: walk the oldest entries, weighing each, until both bounds hold. A room
-- logged before the bounds were kept in meta learns its oldest from the stream's length.
local oldest = tonumber(current[7] or '0')
if oldest == 0 then oldest = tonumber(last) - redis.call('XLEN', log) + 1 end
local length = tonumber(last) - oldest + 1
local must = length - history
if must > 0 or log_bytes > history_bytes then
  local from, gone, kept = '-', 0, nil
  repeat
    local entries = redis.call('XRANGE', log, from, '+', 'COUNT', math.max(must - gone, 0) + 1)
    for _, entry in ipairs(entries) do
      if (gone >= must and log_bytes <= history_bytes) or length - gone <= 1 then
        kept = entry[1]
        break
      end
      log_bytes = log_bytes - #entry[2][2]
      gone = gone + 1
      from = '(' .. entry[1]
    end
  until kept or #entries == 0
  if gone > 0 then
    oldest = oldest + gone
    redis.call('XTRIM', log, 'MINID', kept or ('0-' .. oldest))
  end
end
redis.call('HSET', meta, 'seq', last, 'run', run, 'replid', replid, 'node', node,
  'oldest', oldest, 'log_bytes', math.max(log_bytes, 0))
if lock == '1' then
  redis.call('HSET', meta, 'locked', '1')
elseif lock == '0' then
  redis.call('HDEL', meta, 'locked')
end
for _ = 1, tonumber(ARGV[i]) do
  redis.call('HSET', members, ARGV[i + 1], ARGV[i + 2])
  if presence > 0 then
    -- In its grace period (the .5) until it opens a stream.
    redis.call('ZADD', leases, now + presence + 0.5, ARGV[i + 1])
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
if added > 0 then
  -- What the answers weigh (keys and values), kept in meta: expired ones and, past the budget,
  -- the oldest are forgotten.
  local weight = tonumber(redis.call('HGET', meta, 'answers_bytes') or '0')
  local function forget(key)
    local held = redis.call('HSTRLEN', answers, key)
    if held > 0 then weight = weight - #key - held end
    redis.call('HDEL', answers, key)
  end
  for _ = 1, added do
    forget(ARGV[i + 1])
    redis.call('HSET', answers, ARGV[i + 1], ARGV[i + 2])
    redis.call('ZADD', answered, ARGV[i + 3], ARGV[i + 1])
    weight = weight + #ARGV[i + 1] + #ARGV[i + 2]
    i = i + 3
  end
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', answered, '-inf', now)) do forget(key) end
  redis.call('ZREMRANGEBYSCORE', answered, '-inf', now)
  while weight > answer_budget do
    local oldest = redis.call('ZPOPMIN', answered)
    if not oldest[1] then break end
    forget(oldest[1])
  end
  redis.call('HSET', meta, 'answers_bytes', math.max(weight, 0))
end
i = i + 1
local banning, unbanned = tonumber(ARGV[i]), 0
for _ = 1, banning do
  if ARGV[i + 2] == '0' then
    redis.call('HDEL', bans, ARGV[i + 1])
    redis.call('ZREM', banned, ARGV[i + 1])
    unbanned = unbanned + 1
  else
    redis.call('HSET', bans, ARGV[i + 1], ARGV[i + 3])
    redis.call('ZADD', banned, ARGV[i + 2], ARGV[i + 1])
  end
  i = i + 3
end
if banning > 0 then
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', banned, '-inf', now)) do
    redis.call('HDEL', bans, gone)
  end
  redis.call('ZREMRANGEBYSCORE', banned, '-inf', now)
end
if oldest > 1 then
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', departed, '-inf', '(' .. oldest)) do
    redis.call('HDEL', owners, gone)
  end
  redis.call('ZREMRANGEBYSCORE', departed, '-inf', '(' .. oldest)
end
local result = 1
if redis.call('HLEN', members) == 0 then
  local at = redis.call('PEXPIRETIME', meta)
  if at < 0 then at = now + ttl end
  local longest = redis.call('ZRANGE', banned, -1, -1, 'WITHSCORES')
  if longest[2] then at = math.max(at, tonumber(longest[2]) + ttl) end
  if unbanned > 0 then at = math.max(at, now + ttl) end
  at = string.format('%.0f', at)
  for _, key in ipairs(room) do redis.call('PEXPIREAT', key, at) end
  result = tonumber(at)
elseif redis.call('PTTL', meta) ~= -1 then
  for _, key in ipairs(room) do redis.call('PERSIST', key) end
end
if publish ~= '' then redis.call(publish, ARGV[5], ARGV[6]) end
return result
"#;

/// Makes a commit visible once replicas confirmed it (`--redis-wait-replicas`): raises the
/// room's `confirmed` seq to the commit's and publishes its notice, unless the room has moved
/// to another epoch since. Returns 1 if it did.
///
/// `KEYS`: the room's meta. `ARGV`: epoch, the commit's newest seq, the publish command,
/// channel, notice.
pub(super) const CONFIRM: &str = r#"
local current = redis.call('HMGET', KEYS[1], 'epoch', 'confirmed')
if current[1] ~= ARGV[1] then return 0 end
if tonumber(current[2] or '0') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'confirmed', ARGV[2])
end
redis.call(ARGV[3], ARGV[4], ARGV[5])
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
            LoggedEvent::decode(raw)
                .map(Arc::new)
                .map_err(|_| corrupt("log entry"))
        })
        .collect()
}
