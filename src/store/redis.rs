//! The Redis store: many roomctl nodes sharing one Redis behave as one control plane.
//!
//! **Layout.** Every key of a room carries the hash tag `{room_id}`, so a room lives in one
//! Redis Cluster slot: `meta` (hash: `epoch`, `seq`), `members` (hash: client id to
//! [`StoredMember`]), `departed` (sorted set of departed client ids by the seq that ended them)
//! with `owners` (hash: their identities), `log` (a stream whose entry ids are `0-<seq>`, trimmed
//! to exactly `--history` entries) and one `drop:` key per remembered `DropUser` answer, expiring
//! after 10 minutes. An empty room's keys expire after `--empty-room-ttl`.
//!
//! **Atomicity.** Commands for a room queue to that room's writer on the node, which takes them in
//! batches: it reads what the batch needs (one MULTI), runs the room engine in Rust over the
//! batch, and commits with a Lua script that applies the membership changes and appends the
//! events only if the room's `seq` and `epoch` are still the ones read: a compare-and-set, retried
//! on conflict. Two nodes racing on a room therefore never lose an update nor reuse a `seq`, and
//! one node never races itself. A writer keeps what it last read or wrote (`Known`) for a second
//! and runs the next batch on it without a read: what it has not seen is assumed absent, and the
//! commit script checks those assumptions too, so a busy room costs one round trip per batch.
//!
//! **Live delivery.** The commit script also publishes the new events on one channel. Each node
//! runs a single listener: it keeps a small cache of recent events per room that has local
//! subscribers (a `Feed`) and wakes them; subscribers read from that cache, and only a
//! subscriber behind the cache (replaying an old cursor) reads the stream itself. No connection
//! or poll loop per subscriber.
//!
//! **Faults.** Every Redis operation has a deadline and fails with `STORE_UNAVAILABLE`. The
//! listener pings Redis; while it cannot, health is NOT_SERVING and every feed is dropped, so
//! open streams re-check the store and end `UNAVAILABLE`. When Redis answers again the node serves
//! again. A flushed or restarted Redis loses the room's `epoch` with its log, so old cursors get
//! `OUT_OF_RANGE`, never events of another log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::AbortOnDropHandle;

use super::{Opening, RoomStore, Snapshot, READ_BATCH};
use crate::engine::{
    self, Applied, Caller, Change, ClientStatus, Command, LogWindow, Remembered, Reply, RoomState,
    MAX_REMEMBERED_ANSWERS,
};
use crate::error::Error;
use crate::pb;
use crate::telemetry::Telemetry;

/// The channel every commit publishes its events on.
const CHANNEL: &str = "roomctl:events";
/// Longest any single Redis operation may take before the call fails `STORE_UNAVAILABLE`.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the listener checks that Redis answers (and sweeps feeds).
const PING_PERIOD: Duration = Duration::from_millis(500);
/// Reconnect backoff of the listener.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// Commit attempts before giving up on a room under heavy contention.
const MAX_ATTEMPTS: usize = 100;
/// Commands queued per room on this node; callers wait (backpressure) beyond it.
const QUEUE: usize = 1024;
/// Most commands one writer applies with one read and one commit.
const MAX_BATCH: usize = 64;
/// How long a room's writer outlives its last command.
const WRITER_IDLE: Duration = Duration::from_secs(5);
/// Most recent events cached per room with local subscribers (never more than the history, so
/// a subscriber the history has left behind is not served from the cache).
const CACHE_EVENTS: usize = 1024;

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

/// A remembered answer as stored in the `answers` hash, under its [`engine::answer_key`].
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

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl StoredAnswer {
    /// The stored form of `answer`; None for replies that are never remembered.
    fn of(answer: &Remembered) -> Option<Self> {
        let reply = match &answer.reply {
            Reply::Joined(joined) => StoredReply::Joined(joined.clone()),
            Reply::Dropped(dropped) => StoredReply::Dropped(dropped.clone()),
            Reply::Left => return None,
        };
        Some(Self {
            expires_at_ms: millis(answer.expires_at),
            reply: Some(reply),
        })
    }

    fn into_remembered(self, key: String) -> Result<Remembered, Error> {
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

/// The events a commit publishes, after `<room_id>\n` (room ids hold no newline), so a node
/// without subscribers of that room skips the message without decoding it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Notice {
    /// The events, in seq order.
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<pb::Event>,
}

impl Notice {
    fn publish(room_id: &str, events: &[&pb::Event]) -> Vec<u8> {
        let notice = Notice {
            events: events.iter().map(|e| (*e).clone()).collect(),
        };
        let mut payload = Vec::with_capacity(room_id.len() + 1 + notice.encoded_len());
        payload.extend_from_slice(room_id.as_bytes());
        payload.push(b'\n');
        notice
            .encode(&mut payload)
            .expect("a Vec grows to fit any message");
        payload
    }
}

/// The commit of a batch. Returns 0, changing nothing, unless the room is still at the `seq` and
/// `epoch` the batch ran on, and every member id and answer key the batch assumed absent is
/// absent. Then it appends the events, applies membership changes, remembers the new answers
/// (forgetting expired ones and the oldest past the cap), sets or clears the empty-room expiry,
/// publishes, and returns 1. A room created anew first deletes whatever a forgotten room of the
/// same id left behind: answers, like the log, belong to their epoch.
const COMMIT: &str = r#"
local meta, members, departed, owners, log, answers, answered =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local expected, epoch, history, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now, max_answers = ARGV[7], tonumber(ARGV[8])
local current = redis.call('HMGET', meta, 'epoch', 'seq')
if expected == '' then
  if current[1] then return 0 end
elseif current[1] ~= epoch or current[2] ~= expected then
  return 0
end
local i = 9
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  if redis.call('HEXISTS', members, ARGV[i]) == 1 then return 0 end
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  if redis.call('HEXISTS', answers, ARGV[i]) == 1 then return 0 end
end
if expected == '' then
  redis.call('DEL', members, departed, owners, log, answers, answered)
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
  i = i + 2
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  redis.call('HDEL', members, ARGV[i + 1])
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
local room = {meta, members, departed, owners, log, answers, answered}
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

/// A Redis URL whose password never reaches an error or a log: `Display` and `Debug` show it
/// as `***` (an unreadable URL is not shown at all, since its password cannot be found).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps `url`, which may carry a password (`redis://:PASSWORD@host`).
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    // Fails only for URLs that cannot have a password, which this one has.
                    let _ = url.set_password(Some("***"));
                }
                f.write_str(url.as_str())
            }
            Err(_) => f.write_str("<unreadable redis URL>"),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

/// Tuning of the Redis store; every node sharing a Redis must use the same values.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`, or `rediss://` for TLS.
    pub url: RedisUrl,
    /// PEM file of the CA to trust for `rediss://` instead of the system's trust store.
    pub ca_file: Option<std::path::PathBuf>,
    /// Events kept per room.
    pub history: usize,
    /// How long an empty room is kept.
    pub empty_room_ttl: Duration,
    /// Most participants per room.
    pub max_room_members: usize,
}

/// The keys of one room.
struct Keys {
    meta: String,
    members: String,
    departed: String,
    owners: String,
    log: String,
    answers: String,
    answered: String,
}

impl Keys {
    fn new(room_id: &str) -> Self {
        let tag = format!("roomctl:{{{room_id}}}");
        Self {
            meta: format!("{tag}:meta"),
            members: format!("{tag}:members"),
            departed: format!("{tag}:departed"),
            owners: format!("{tag}:owners"),
            log: format!("{tag}:log"),
            answers: format!("{tag}:answers"),
            answered: format!("{tag}:answered"),
        }
    }

    /// An atomic pipeline (MULTI) whose first reply is the room's `HMGET meta epoch seq`, so
    /// whatever follows is read at the same log position.
    fn read_meta(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(&self.meta)
            .arg("epoch")
            .arg("seq");
        pipe
    }
}

/// Recent events of a room with local subscribers, and their wake-up channel.
struct Feed {
    head: watch::Sender<u64>,
    cache: Mutex<VecDeque<Arc<pb::Event>>>,
    capacity: usize,
}

impl Feed {
    fn cache(&self) -> MutexGuard<'_, VecDeque<Arc<pb::Event>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends published events; a gap or another epoch restarts the cache from them, so the
    /// cache is always one contiguous run of one log.
    fn append(&self, events: Vec<pb::Event>) {
        let Some(first) = events.first() else { return };
        let mut cache = self.cache();
        match cache.back() {
            Some(last) if last.epoch == first.epoch && last.seq >= first.seq => return,
            Some(last)
                if last.epoch == first.epoch && last.seq.checked_add(1) == Some(first.seq) => {}
            _ => cache.clear(),
        }
        let newest = events.last().map_or(first.seq, |e| e.seq);
        cache.extend(events.into_iter().map(Arc::new));
        while cache.len() > self.capacity {
            cache.pop_front();
        }
        drop(cache);
        self.head.send_replace(newest);
    }

    /// Events after `after` from the cache, when it can answer: `Some(empty)` means the
    /// subscriber is caught up with everything published.
    fn read(&self, epoch: &str, after: u64) -> Option<Vec<Arc<pb::Event>>> {
        let cache = self.cache();
        let (first, last) = (cache.front()?, cache.back()?);
        // The oldest cursor the cache serves (saturating: notices come from outside the process).
        let oldest_cursor = first.seq.saturating_sub(1);
        if first.epoch != epoch || after < oldest_cursor || after > last.seq {
            return None;
        }
        let skip = (after - oldest_cursor) as usize;
        Some(cache.iter().skip(skip).take(READ_BATCH).cloned().collect())
    }
}

struct Shared {
    conn: ConnectionManager,
    config: RedisConfig,
    commit: redis::Script,
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
    /// Each busy room's writer on this node, with the id that tells a retiring writer whether
    /// it was replaced.
    writers: Mutex<HashMap<String, (u64, mpsc::Sender<Job>)>>,
    next_writer: AtomicU64,
    healthy: watch::Sender<bool>,
    telemetry: Telemetry,
}

/// The Redis [`RoomStore`].
pub struct RedisStore {
    shared: Arc<Shared>,
    _listener: AbortOnDropHandle<()>,
}

fn unavailable(err: redis::RedisError) -> Error {
    Error::StoreUnavailable(format!("redis: {err}"))
}

/// Runs one Redis operation with the store's deadline.
async fn timed<T>(op: impl Future<Output = RedisResult<T>>) -> Result<T, Error> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(Error::StoreUnavailable(format!(
            "redis did not answer within {OP_TIMEOUT:?}"
        ))),
    }
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("unreadable {what} in redis"))
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    bytes(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Double(d) => Some(*d as u64),
        other => text(other)?.parse().ok(),
    }
}

fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// `HMGET meta epoch seq` as (epoch, seq), or None when the room does not exist.
fn meta(value: Value) -> Result<Option<(String, u64)>, Error> {
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

fn member(value: &Value) -> Result<Option<(pb::Participant, u64)>, Error> {
    let Some(raw) = bytes(value) else {
        return Ok(None);
    };
    let stored = StoredMember::decode(raw).map_err(|_| corrupt("member"))?;
    let participant = stored.participant.ok_or_else(|| corrupt("member"))?;
    Ok(Some((participant, stored.join_seq)))
}

/// The entries of an `XRANGE` reply, decoded.
fn entries(value: Value) -> Result<Vec<Arc<pb::Event>>, Error> {
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

/// A Redis client for `config`, with TLS settings for `rediss://`.
fn client(config: &RedisConfig) -> Result<redis::Client, Error> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::StoreUnavailable(format!("redis url {}: {e}", config.url))
    };
    // rustls needs one process-wide crypto provider; ring builds without C toolchains beyond cc.
    // Installing fails harmlessly when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match &config.ca_file {
        None => redis::Client::open(config.url.expose()).map_err(|e| bad(&e)),
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|e| {
                Error::StoreUnavailable(format!("cannot read {}: {e}", path.display()))
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(config.url.expose(), certificates).map_err(|e| bad(&e))
        }
    }
}

impl RedisStore {
    /// Connects to the Redis at `config.url` and starts this node's listener.
    pub async fn connect(config: RedisConfig) -> Result<Self, Error> {
        Self::connect_with(config, Telemetry::off()).await
    }

    /// Connects, with `telemetry` recording store operations, commits and the census.
    pub async fn connect_with(config: RedisConfig, telemetry: Telemetry) -> Result<Self, Error> {
        let client = client(&config)?;
        // Fail fast instead of queueing calls behind long reconnect attempts: a call that cannot
        // reach Redis within OP_TIMEOUT answers STORE_UNAVAILABLE.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let at = |err: Error| Error::StoreUnavailable(format!("{}: {}", config.url, err.detail()));
        let conn = timed(client.get_connection_manager_with_config(manager_config))
            .await
            .map_err(at)?;
        let shared = Arc::new(Shared {
            conn,
            config,
            commit: redis::Script::new(COMMIT),
            feeds: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            next_writer: AtomicU64::new(0),
            healthy: watch::Sender::new(false),
            telemetry,
        });
        // Subscribed before the store is handed out, so it serves (and says so) from the start.
        let pubsub = subscribe(&client, &shared).await?;
        shared.healthy.send_replace(true);
        let listener = tokio::spawn(listen(shared.clone(), client, pubsub));
        Ok(Self {
            shared,
            _listener: AbortOnDropHandle::new(listener),
        })
    }
}

impl Shared {
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs Redis operation `op` with the store's deadline, and records it.
    async fn timed<T>(
        &self,
        op: &'static str,
        run: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let result = timed(run).await;
        self.telemetry
            .store_op(op, result.is_ok(), started.elapsed());
        result
    }

    fn feeds(&self) -> MutexGuard<'_, HashMap<String, Arc<Feed>>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feed(&self, room_id: &str) -> Option<Arc<Feed>> {
        self.feeds().get(room_id).cloned()
    }

    /// This node's feed of `room_id`, created on first use; subscribing registers interest
    /// before the caller reads Redis, so no published event can fall between the two.
    fn subscribe_feed(&self, room_id: &str) -> watch::Receiver<u64> {
        self.feeds()
            .entry(room_id.to_owned())
            .or_insert_with(|| {
                Arc::new(Feed {
                    head: watch::Sender::new(0),
                    cache: Mutex::new(VecDeque::new()),
                    capacity: self.config.history.min(CACHE_EVENTS),
                })
            })
            .head
            .subscribe()
    }

    fn dispatch(&self, payload: &[u8]) {
        let Some(split) = payload.iter().position(|b| *b == b'\n') else {
            tracing::warn!("ignoring an unreadable notice on {CHANNEL}");
            return;
        };
        let room_id = String::from_utf8_lossy(&payload[..split]);
        let Some(feed) = self.feed(&room_id) else {
            return;
        };
        match Notice::decode(&payload[split + 1..]) {
            Ok(notice) => feed.append(notice.events),
            Err(_) => tracing::warn!(%room_id, "ignoring an unreadable notice on {CHANNEL}"),
        }
    }

    /// Drops every feed: their subscribers wake, find the channel closed and ask the store
    /// again, which answers with the store's state (serving, or unavailable).
    fn reset_feeds(&self) {
        self.feeds().clear();
    }

    /// Forgets feeds nobody listens to, and feeds of rooms Redis has forgotten (expired empty
    /// rooms), which ends their observers' streams with `ROOM_NOT_FOUND`.
    /// Also takes the census of the rooms this node has subscribers in.
    async fn sweep_feeds(&self) -> Result<(), Error> {
        let rooms: Vec<String> = {
            let mut feeds = self.feeds();
            feeds.retain(|_, feed| feed.head.receiver_count() > 0);
            feeds.keys().cloned().collect()
        };
        if rooms.is_empty() {
            self.telemetry.census(0, 0);
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for room_id in &rooms {
            let keys = Keys::new(room_id);
            pipe.cmd("EXISTS").arg(&keys.meta);
            pipe.cmd("HLEN").arg(&keys.members);
        }
        let replies: Vec<u64> = self
            .timed("sweep", pipe.query_async(&mut self.conn()))
            .await?;
        let (mut live, mut participants) = (0, 0);
        let mut feeds = self.feeds();
        for (room_id, reply) in rooms.iter().zip(replies.chunks(2)) {
            if reply[0] == 0 {
                feeds.remove(room_id);
            } else {
                live += 1;
                participants += reply[1] as usize;
            }
        }
        drop(feeds);
        self.telemetry.census(live, participants);
        Ok(())
    }

    async fn ping(&self) -> Result<(), Error> {
        self.timed(
            "ping",
            redis::cmd("PING").query_async::<()>(&mut self.conn()),
        )
        .await
    }
}

/// The notification connection, subscribed, once Redis answers.
async fn subscribe(client: &redis::Client, shared: &Shared) -> Result<redis::aio::PubSub, Error> {
    let mut pubsub = timed(client.get_async_pubsub()).await?;
    timed(pubsub.subscribe(CHANNEL)).await?;
    shared.ping().await?;
    Ok(pubsub)
}

/// This node's single listener: receives every commit's events, feeds local subscribers, and
/// watches Redis's health. Reconnects with backoff for as long as the store lives.
async fn listen(shared: Arc<Shared>, client: redis::Client, first: redis::aio::PubSub) {
    let mut backoff = BACKOFF.0;
    let mut first = Some(first);
    loop {
        let connected = match first.take() {
            Some(pubsub) => Ok(pubsub),
            None => {
                shared.telemetry.listener_reconnected();
                subscribe(&client, &shared).await
            }
        };
        match connected {
            Ok(pubsub) => {
                backoff = BACKOFF.0;
                // Events committed while we were not listening were never announced: wake every
                // subscriber to read them from Redis.
                shared.reset_feeds();
                shared.healthy.send_replace(true);
                tracing::info!("redis store serving");
                let mut messages = pubsub.into_on_message();
                let mut ping = tokio::time::interval(PING_PERIOD);
                let fault = loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => shared.dispatch(message.get_payload_bytes()),
                            None => break "the notification connection closed".to_owned(),
                        },
                        _ = ping.tick() => {
                            let check = async {
                                shared.ping().await?;
                                shared.sweep_feeds().await
                            };
                            if let Err(err) = check.await {
                                break err.detail();
                            }
                        }
                    }
                };
                tracing::warn!(%fault, "redis store unavailable; streams end, health NOT_SERVING");
            }
            Err(err) => {
                tracing::warn!(err = %err.detail(), ?backoff, "cannot reach redis; retrying")
            }
        }
        shared.healthy.send_replace(false);
        shared.reset_feeds();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// How long a writer trusts what it knows of its room before reading it again. Remembered drop
/// answers it holds may outlive their Redis expiry by at most this much.
const KNOWN_FOR: Duration = Duration::from_secs(1);
/// Most member ids a writer keeps track of before it reads its room again instead.
const KNOWN_IDS: usize = 50_000;

/// What a room's writer knows of its room at the `seq` of its last read or commit: the room's
/// state restricted to what it has seen, and which member ids and drop answers (by key) it knows
/// to be present or absent there. A batch runs on it without reading Redis; anything else the
/// batch looks at is assumed absent, and the commit script checks those assumptions along with
/// the `seq`, so a stale guess is a conflict, never a wrong answer.
struct Known {
    state: RoomState,
    ids: HashSet<String>,
    answers: HashSet<String>,
    read_at: Instant,
}

impl Known {
    fn usable(&self) -> bool {
        self.read_at.elapsed() < KNOWN_FOR && self.ids.len() <= KNOWN_IDS
    }
}

/// One command waiting for its room's writer on this node.
struct Job {
    caller: Caller,
    cmd: Command,
    reply: oneshot::Sender<Result<Applied, Error>>,
}

/// What a batch of commands needs read back before the engine runs.
struct Loaded {
    meta: Option<(String, u64)>,
    population: usize,
    members: Vec<(pb::Participant, u64)>,
    answers: Vec<Remembered>,
}

/// The member ids and remembered answers (by key) a batch of commands looks at, each once.
fn wanted(jobs: &[Job]) -> (Vec<&str>, Vec<String>) {
    let mut ids = Vec::new();
    for job in jobs {
        match &job.cmd {
            Command::Join { .. } => {}
            Command::Leave { client_id } => ids.push(client_id.as_str()),
            Command::Drop(drop) => ids.extend(drop.client_ids.iter().map(String::as_str)),
        }
    }
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    let mut answers: Vec<String> = jobs
        .iter()
        .filter_map(|job| job.cmd.answer_key(&job.caller))
        .collect();
    let mut seen = HashSet::new();
    answers.retain(|key| seen.insert(key.clone()));
    (ids, answers)
}

impl Shared {
    fn writers(&self) -> MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<Job>)>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue of `room_id`'s writer on this node, starting one if it has none.
    fn writer(self: &Arc<Self>, room_id: &str) -> mpsc::Sender<Job> {
        let mut writers = self.writers();
        if let Some((_, queue)) = writers.get(room_id).filter(|(_, q)| !q.is_closed()) {
            return queue.clone();
        }
        let id = self.next_writer.fetch_add(1, Ordering::Relaxed);
        let (queue, jobs) = mpsc::channel(QUEUE);
        writers.insert(room_id.to_owned(), (id, queue.clone()));
        tokio::spawn(write_room(
            Arc::downgrade(self),
            room_id.to_owned(),
            id,
            jobs,
        ));
        queue
    }

    /// Forgets writer `id` of `room_id`, unless another has replaced it already.
    fn retire(&self, room_id: &str, id: u64) {
        let mut writers = self.writers();
        if writers
            .get(room_id)
            .is_some_and(|(current, _)| *current == id)
        {
            writers.remove(room_id);
        }
    }

    async fn load(&self, keys: &Keys, ids: &[&str], answers: &[String]) -> Result<Loaded, Error> {
        let mut pipe = keys.read_meta();
        pipe.cmd("HLEN").arg(&keys.members);
        if !ids.is_empty() {
            pipe.cmd("HMGET").arg(&keys.members).arg(ids);
        }
        if !answers.is_empty() {
            pipe.cmd("HMGET").arg(&keys.answers).arg(answers);
        }
        let mut replies = self
            .timed("load", pipe.query_async::<Vec<Value>>(&mut self.conn()))
            .await?
            .into_iter();
        let meta = meta(replies.next().unwrap_or(Value::Nil))?;
        let population = replies.next().as_ref().and_then(number).unwrap_or(0) as usize;
        let mut members = Vec::new();
        if !ids.is_empty() {
            for value in array(replies.next().unwrap_or(Value::Nil)) {
                members.extend(member(&value)?);
            }
        }
        let mut remembered = Vec::new();
        if !answers.is_empty() {
            let values = array(replies.next().unwrap_or(Value::Nil));
            for (key, value) in answers.iter().zip(values) {
                if let Some(raw) = bytes(&value) {
                    let stored = StoredAnswer::decode(raw).map_err(|_| corrupt("answer"))?;
                    remembered.push(stored.into_remembered(key.clone())?);
                }
            }
        }
        Ok(Loaded {
            meta,
            population,
            members,
            answers: remembered,
        })
    }

    /// Runs every job of the batch through the engine, on what the writer knows of the room or
    /// else on a fresh read, then commits all their events at once; on a conflict (another node
    /// wrote, or an assumption was wrong) reads the room and runs them again. Returns the error
    /// that failed the whole batch (Redis unreachable), if one did.
    async fn apply_batch(
        &self,
        room_id: &str,
        jobs: Vec<Job>,
        known: &mut Option<Known>,
    ) -> Option<Error> {
        let keys = Keys::new(room_id);
        let (ids, answer_keys) = wanted(&jobs);
        self.telemetry.batch(jobs.len());
        let outcome = async {
            for _ in 0..MAX_ATTEMPTS {
                let now = SystemTime::now();
                let known_view = known.take().filter(Known::usable);
                let fresh = known_view.is_none();
                let (mut state, mut seen_ids, mut seen_answers, read_at) = match known_view {
                    Some(k) => (Some(k.state), k.ids, k.answers, k.read_at),
                    None => {
                        let loaded = self.load(&keys, &ids, &answer_keys).await?;
                        let state = loaded.meta.map(|(epoch, seq)| {
                            let (members, answers) = (loaded.members, loaded.answers);
                            let population = loaded.population;
                            RoomState::restore(room_id, epoch, seq, population, members, answers)
                                .with_max_members(self.config.max_room_members)
                        });
                        let ids = ids.iter().map(|id| id.to_string()).collect();
                        let answers = answer_keys.iter().cloned().collect();
                        (state, ids, answers, Instant::now())
                    }
                };
                let assumed_ids: Vec<&str> = ids
                    .iter()
                    .copied()
                    .filter(|id| !seen_ids.contains(*id))
                    .collect();
                let assumed_answers: Vec<&str> = answer_keys
                    .iter()
                    .map(String::as_str)
                    .filter(|key| !seen_answers.contains(*key))
                    .collect();
                let expected = state.as_ref().map(RoomState::seq);
                let results: Vec<Result<Applied, Error>> = jobs
                    .iter()
                    .map(|job| run(&mut state, room_id, job, &self.config, now))
                    .collect();
                let writes = results.iter().flatten().any(|a| !a.events.is_empty());
                let Some(mut state) = state else {
                    return Ok(results);
                };
                if !writes {
                    let guessed = !(assumed_ids.is_empty() && assumed_answers.is_empty());
                    // A refusal on a remembered view (a full room another node has since
                    // emptied) is as unchecked as a guess: no commit will vouch for either.
                    let refused_on_memory = !fresh && results.iter().any(Result::is_err);
                    if guessed || refused_on_memory {
                        continue;
                    }
                    *known = Some(Known {
                        state,
                        ids: seen_ids,
                        answers: seen_answers,
                        read_at,
                    });
                    return Ok(results);
                }
                let assumed = (assumed_ids.as_slice(), assumed_answers.as_slice());
                if self
                    .commit(&keys, room_id, &state, expected, &results, assumed, now)
                    .await?
                {
                    // Everything the batch looked at or joined is known now (the answers it
                    // remembered are among the keys it looked at).
                    seen_ids.extend(ids.iter().map(|id| id.to_string()));
                    for applied in results.iter().flatten() {
                        for change in &applied.changes {
                            if let Change::Joined { participant, .. } = change {
                                seen_ids.insert(participant.client_id.clone());
                            }
                        }
                    }
                    seen_answers.extend(answer_keys.iter().cloned());
                    let oldest = state.seq().saturating_sub(self.config.history as u64) + 1;
                    state.forget_departed_before(oldest);
                    *known = Some(Known {
                        state,
                        ids: seen_ids,
                        answers: seen_answers,
                        read_at,
                    });
                    return Ok(results);
                }
                // Another node changed the room, or a guess was wrong: read again and redo.
                tokio::task::yield_now().await;
            }
            Err(Error::StoreUnavailable(format!(
                "room {room_id:?} changed under {MAX_ATTEMPTS} attempts in a row"
            )))
        }
        .await;
        match outcome {
            Ok(results) => {
                for (job, result) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
                None
            }
            Err(err) => {
                for job in jobs {
                    let err = match &err {
                        // Each caller learns the request id its retry can use to find out.
                        Error::OutcomeUnknown { .. } => Error::OutcomeUnknown {
                            request_id: job.cmd.request_id().map(str::to_owned),
                        },
                        other => other.clone(),
                    };
                    let _ = job.reply.send(Err(err));
                }
                Some(err)
            }
        }
    }

    /// Commits the batch's events and changes if the room is still at `expected` (None: the
    /// room must not exist yet). False on a conflict. A commit sent whose answer never came is
    /// `OutcomeUnknown`: it may have been applied, and its callers must be told so.
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        keys: &Keys,
        room_id: &str,
        state: &RoomState,
        expected: Option<u64>,
        results: &[Result<Applied, Error>],
        (assumed_ids, assumed_answers): (&[&str], &[&str]),
        now: SystemTime,
    ) -> Result<bool, Error> {
        let applied: Vec<&Applied> = results
            .iter()
            .flatten()
            .filter(|applied| !applied.events.is_empty())
            .collect();
        let events: Vec<&pb::Event> = applied.iter().flat_map(|a| &a.events).collect();
        let remembered: Vec<(&str, Vec<u8>, u64)> = applied
            .iter()
            .filter_map(|a| a.remembered.as_ref())
            .filter_map(|answer| {
                let stored = StoredAnswer::of(answer)?;
                Some((
                    answer.key.as_str(),
                    stored.encode_to_vec(),
                    stored.expires_at_ms,
                ))
            })
            .collect();
        let notice = Notice::publish(room_id, &events);
        let mut call = self.commit.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.members)
            .key(&keys.departed)
            .key(&keys.owners)
            .key(&keys.log)
            .key(&keys.answers)
            .key(&keys.answered);
        call.arg(expected.map_or(String::new(), |seq| seq.to_string()))
            .arg(state.epoch())
            .arg(self.config.history)
            .arg(self.config.empty_room_ttl.as_millis().max(1) as u64)
            .arg(CHANNEL)
            .arg(notice)
            .arg(millis(now))
            .arg(MAX_REMEMBERED_ANSWERS);
        call.arg(assumed_ids.len());
        for id in assumed_ids {
            call.arg(*id);
        }
        call.arg(assumed_answers.len());
        for key in assumed_answers {
            call.arg(*key);
        }
        call.arg(events.len());
        for event in &events {
            call.arg(event.seq).arg(event.encode_to_vec());
        }
        let (mut joins, mut departures) = (Vec::new(), Vec::new());
        for change in applied.iter().flat_map(|a| &a.changes) {
            match change {
                Change::Joined {
                    participant,
                    join_seq,
                } => joins.push((participant, *join_seq)),
                Change::Departed {
                    client_id,
                    identity,
                    end_seq,
                } => departures.push((client_id, identity, *end_seq)),
            }
        }
        call.arg(joins.len());
        for (participant, join_seq) in joins {
            let stored = StoredMember {
                join_seq,
                participant: Some(participant.clone()),
            };
            call.arg(&participant.client_id).arg(stored.encode_to_vec());
        }
        call.arg(departures.len());
        for (client_id, identity, end_seq) in departures {
            call.arg(client_id).arg(identity).arg(end_seq);
        }
        call.arg(remembered.len());
        for (key, value, expires_at_ms) in &remembered {
            call.arg(*key).arg(value).arg(*expires_at_ms);
        }
        let started = Instant::now();
        let mut conn = self.conn();
        let answer = tokio::time::timeout(OP_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await;
        let ok = matches!(answer, Ok(Ok(_)));
        self.telemetry.store_op("commit", ok, started.elapsed());
        match answer {
            Ok(Ok(1)) => {
                self.telemetry.events_appended(events.len());
                Ok(true)
            }
            Ok(Ok(_)) => {
                self.telemetry.commit_conflict();
                Ok(false)
            }
            // Refused before anything was sent, or refused by Redis: nothing was applied.
            Ok(Err(err)) if err.is_connection_refusal() || !err.is_io_error() => {
                Err(unavailable(err))
            }
            Ok(Err(_)) | Err(_) => Err(Error::OutcomeUnknown { request_id: None }),
        }
    }
}

/// Applies one job to the batch's view of the room; a join may create the room.
fn run(
    state: &mut Option<RoomState>,
    room_id: &str,
    job: &Job,
    config: &RedisConfig,
    now: SystemTime,
) -> Result<Applied, Error> {
    match state {
        Some(state) => engine::apply(state, &job.caller, job.cmd.clone(), now),
        None if job.cmd.creates_room() => {
            let epoch = uuid::Uuid::new_v4().simple().to_string();
            let mut fresh =
                RoomState::new(room_id, epoch).with_max_members(config.max_room_members);
            let applied = engine::apply(&mut fresh, &job.caller, job.cmd.clone(), now)?;
            *state = Some(fresh);
            Ok(applied)
        }
        None => Err(Error::room_not_found(room_id)),
    }
}

/// The writer of one room on this node: takes queued commands in batches, so one node never
/// races itself on a room and a busy room costs one read and one commit per batch, not per
/// command. It ends after a while without work, finishing what was queued.
async fn write_room(shared: Weak<Shared>, room_id: String, id: u64, mut jobs: mpsc::Receiver<Job>) {
    let mut known = None;
    loop {
        let first = match tokio::time::timeout(WRITER_IDLE, jobs.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(_idle) => {
                if let Some(shared) = shared.upgrade() {
                    shared.retire(&room_id, id);
                }
                jobs.close();
                // Whatever was queued before the close is still done.
                let mut rest = Vec::new();
                while let Some(job) = jobs.recv().await {
                    rest.push(job);
                    if rest.len() == MAX_BATCH {
                        apply(&shared, &room_id, std::mem::take(&mut rest), &mut known).await;
                    }
                }
                apply(&shared, &room_id, rest, &mut known).await;
                return;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Some(err) = apply(&shared, &room_id, batch, &mut known).await {
            // Redis is failing: answer everything already queued now, instead of letting each
            // batch wait out its own timeout. None of it was sent, so it is safe to retry.
            let err = Error::StoreUnavailable(format!("redis is failing: {}", err.detail()));
            while let Ok(job) = jobs.try_recv() {
                let _ = job.reply.send(Err(err.clone()));
            }
        }
    }
}

async fn apply(
    shared: &Weak<Shared>,
    room_id: &str,
    batch: Vec<Job>,
    known: &mut Option<Known>,
) -> Option<Error> {
    // With the store gone the jobs are dropped, and their callers learn it from the reply.
    match (shared.upgrade(), batch.is_empty()) {
        (Some(shared), false) => shared.apply_batch(room_id, batch, known).await,
        _ => None,
    }
}

impl RedisStore {
    fn window(&self, epoch: &str, seq: u64) -> LogWindow {
        LogWindow::of(epoch, seq, self.shared.config.history)
    }
}

#[async_trait]
impl RoomStore for RedisStore {
    async fn execute(
        &self,
        room_id: &str,
        caller: &Caller,
        cmd: Command,
    ) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        let mut job = Job {
            caller: caller.clone(),
            cmd,
            reply,
        };
        loop {
            match self.shared.writer(room_id).send(job).await {
                Ok(()) => break,
                // That writer retired just now; the next call starts a new one.
                Err(mpsc::error::SendError(returned)) => job = returned,
            }
        }
        answer
            .await
            .map_err(|_| Error::Internal(format!("the writer of room {room_id:?} stopped")))?
    }

    async fn snapshot(&self, room_id: &str) -> Result<Snapshot, Error> {
        let keys = Keys::new(room_id);
        let mut pipe = keys.read_meta();
        pipe.cmd("HVALS").arg(&keys.members);
        let (meta_reply, members_reply): (Value, Value) = self
            .shared
            .timed("snapshot", pipe.query_async(&mut self.shared.conn()))
            .await?;
        let Some((epoch, seq)) = meta(meta_reply)? else {
            return Err(Error::room_not_found(room_id));
        };
        let mut members = Vec::new();
        for value in array(members_reply) {
            members.extend(member(&value)?);
        }
        members.sort_unstable_by_key(|(_, join_seq)| *join_seq);
        Ok(Snapshot {
            participants: members.into_iter().map(|(p, _)| p).collect(),
            window: self.window(&epoch, seq),
        })
    }

    async fn open(&self, room_id: &str, client_id: Option<&str>) -> Result<Opening, Error> {
        let head = self.shared.subscribe_feed(room_id);
        let keys = Keys::new(room_id);
        let mut pipe = keys.read_meta();
        if let Some(client_id) = client_id {
            pipe.cmd("HGET")
                .arg(&keys.members)
                .arg(client_id)
                .cmd("ZSCORE")
                .arg(&keys.departed)
                .arg(client_id)
                .cmd("HGET")
                .arg(&keys.owners)
                .arg(client_id);
        }
        let replies: Vec<Value> = self
            .shared
            .timed("open", pipe.query_async(&mut self.shared.conn()))
            .await?;
        let mut replies = replies.into_iter();
        let Some((epoch, seq)) = meta(replies.next().unwrap_or(Value::Nil))? else {
            return Err(Error::room_not_found(room_id));
        };
        let present = member(&replies.next().unwrap_or(Value::Nil))?;
        let end_seq = replies.next().as_ref().and_then(number);
        let owner = replies.next().as_ref().and_then(text);
        let client = match (present, end_seq, owner) {
            (Some((participant, _)), _, _) => ClientStatus::Present {
                identity: participant.identity,
            },
            (None, Some(end_seq), Some(identity)) => ClientStatus::Departed { identity, end_seq },
            _ => ClientStatus::Unknown,
        };
        Ok(Opening {
            window: self.window(&epoch, seq),
            client,
            head,
        })
    }

    async fn read(
        &self,
        room_id: &str,
        epoch: &str,
        after: u64,
    ) -> Result<Vec<Arc<pb::Event>>, Error> {
        if let Some(cached) = self.shared.feed(room_id).and_then(|f| f.read(epoch, after)) {
            return Ok(cached);
        }
        let keys = Keys::new(room_id);
        let mut pipe = keys.read_meta();
        pipe.cmd("XRANGE")
            .arg(&keys.log)
            .arg(format!("0-{}", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(READ_BATCH);
        let (meta_reply, range): (Value, Value) = self
            .shared
            .timed("read", pipe.query_async(&mut self.shared.conn()))
            .await?;
        let Some((current, seq)) = meta(meta_reply)? else {
            return Err(Error::room_not_found(room_id));
        };
        let window = self.window(&current, seq);
        if current != epoch {
            return Err(window.out_of_range());
        }
        window.check_readable(after)?;
        entries(range)
    }

    async fn rewatch(&self, room_id: &str) -> Result<watch::Receiver<u64>, Error> {
        let head = self.shared.subscribe_feed(room_id);
        let exists: bool = self
            .shared
            .timed(
                "rewatch",
                redis::cmd("EXISTS")
                    .arg(Keys::new(room_id).meta)
                    .query_async(&mut self.shared.conn()),
            )
            .await?;
        if !exists {
            return Err(Error::room_not_found(room_id));
        }
        Ok(head)
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.shared.healthy.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_show_their_password() {
        let shown = |url: &str| RedisUrl::new(url).to_string();
        assert_eq!(
            shown("redis://:hunter2@10.0.0.1:6379/2"),
            "redis://:***@10.0.0.1:6379/2"
        );
        assert_eq!(
            shown("rediss://app:hunter2@redis.internal"),
            "rediss://app:***@redis.internal"
        );
        assert_eq!(shown("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert!(!shown("redis://:hunter2@host:notaport").contains("hunter2"));
        assert!(!format!("{:?}", RedisUrl::new("redis://:hunter2@h")).contains("hunter2"));
    }
}
