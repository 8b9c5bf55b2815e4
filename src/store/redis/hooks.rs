//! Webhook delivery on Redis: each endpoint's cursor in each room, kept in the room's `hooks`
//! hash (in its hash tag, so it lives and expires with the room), and each endpoint's sorted set
//! of due rooms, `roomctl:webhooks:<endpoint>:due`, which is also who holds a room's turn.
//!
//! A room's entry in an endpoint's due set is scored by when any node may take its turn: 0 for
//! a room a commit made due (added only if absent, after the commit, so a turn that has just
//! settled never hides it: see [`RedisOutbox::settle`]), a retry time, or the end of the turn a
//! node holds. A node takes due rooms by moving their entries to the end of its turn in one
//! script (no two nodes take the same room), renews its turn while it works (a compare-and-set
//! on the score it wrote), and, when a turn ends, removes the entry or moves it to the retry
//! time. A node that dies holding a turn loses it when the turn's time runs out: another node
//! takes the room and goes on from its cursor, so only the event in flight is sent twice.
//! Scores are Redis's own time (`TIME`), so nodes' clocks need not agree.
//!
//! With webhooks on, a commit that leaves a room empty sets no expiry on its keys: the delivery
//! that gives the last endpoint the room's last event sets it (`--empty-room-ttl` from then, or
//! after its longest ban), so a room with undelivered events is not forgotten however long its
//! endpoints are away. Every node must configure the same endpoints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::Value;
use sha2::{Digest, Sha256};

use super::keys::{array, meta, number, text, Keys};
use super::Shared;
use crate::error::Error;
use crate::store::{Cursor, Outbox, OutboxEndpoint, Position};

/// How often a node looks for due rooms when it found none.
const POLL: Duration = Duration::from_millis(50);

/// Takes up to `ARGV[2]` due rooms, holding each for `ARGV[1]` ms; answers the end of the
/// turn and the rooms.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[2])
local ends = now + tonumber(ARGV[1])
for _, room in ipairs(due) do redis.call('ZADD', KEYS[1], ends, room) end
return {ends, due}
"#;

/// Moves room `ARGV[1]`'s entry, if it is still `ARGV[2]` (the turn this node holds): to
/// `ARGV[3]` ms from now, or, with `ARGV[3]` empty, out of the set. Answers the new score, 0
/// when removed, -1 when the turn was not this node's any more.
const MOVE: &str = r#"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return -1 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], at, ARGV[1])
return at
"#;

/// For each room `ARGV[i]`: 1 if it is out of the due set (delivered) or its score is ahead
/// of Redis's time (a turn held), 0 if it is due.
const ELSEWHERE: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local taken = {}
for i, room in ipairs(ARGV) do
  local score = redis.call('ZSCORE', KEYS[1], room)
  taken[i] = (not score or tonumber(score) > now) and 1 or 0
end
return taken
"#;

/// The room's epoch, visible seq and the endpoint's cursor (field `ARGV[1]`; absent: the
/// room's epoch, 0), or nil when the room is gone (`KEYS`: meta, hooks).
const POSITION: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'confirmed')
if not m[1] then return false end
local visible = tonumber(m[2])
if m[3] then visible = math.min(visible, tonumber(m[3])) end
local epoch, seq = m[1], 0
local cursor = redis.call('HGET', KEYS[2], ARGV[1])
if cursor then
  local e, s = string.match(cursor, '^(.*):(%d+)$')
  if e then epoch, seq = e, tonumber(s) end
end
return {m[1], visible, epoch, seq}
"#;

/// Sets the endpoint's cursor (field `ARGV[1]`) to epoch `ARGV[2]`, seq `ARGV[3]`, unless the
/// room is another epoch now or the cursor is already there. Then, if the room is empty and
/// kept for its webhooks (no expiry: commit.lua sets none with webhooks on) and every endpoint
/// (fields `ARGV[5..]`) has every event, its keys (`KEYS`, the room's, in `Keys::room`'s order)
/// expire `ARGV[4]` ms from now, or after its longest ban as commit.lua counts it; answers when
/// (ms), or 0.
const ADVANCE: &str = r#"
local meta, members, banned, hooks = KEYS[1], KEYS[2], KEYS[10], KEYS[11]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'confirmed')
if m[1] ~= ARGV[2] then return 0 end
local function at(cursor)
  if not cursor then return nil, 0 end
  local e, s = string.match(cursor, '^(.*):(%d+)$')
  return e, tonumber(s or '0')
end
local e, s = at(redis.call('HGET', hooks, ARGV[1]))
if e ~= ARGV[2] or s < tonumber(ARGV[3]) then
  redis.call('HSET', hooks, ARGV[1], ARGV[2] .. ':' .. ARGV[3])
end
if redis.call('HLEN', members) > 0 or redis.call('PTTL', meta) ~= -1 then return 0 end
local visible = tonumber(m[2])
if m[3] then visible = math.min(visible, tonumber(m[3])) end
for k = 5, #ARGV do
  local ce, cs = at(redis.call('HGET', hooks, ARGV[k]))
  if ce ~= m[1] or cs < visible then return 0 end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[4])
local expires = now + ttl
local longest = redis.call('ZRANGE', banned, -1, -1, 'WITHSCORES')
if longest[2] then expires = math.max(expires, tonumber(longest[2]) + ttl) end
for _, key in ipairs(KEYS) do redis.call('PEXPIREAT', key, expires) end
return expires
"#;

/// One endpoint as Redis knows it.
struct Hook {
    /// Its set of due rooms.
    due: String,
    /// Its cursor's field in a room's `hooks` hash.
    field: String,
    /// How long a turn is held before another node may take the room.
    turn: Duration,
}

/// A turn this node holds: the score it wrote, and when it wrote it.
#[derive(Clone, Copy)]
struct Held {
    score: u64,
    at: Instant,
}

/// The Redis store's [`Outbox`].
pub(super) struct RedisOutbox {
    shared: Arc<Shared>,
    hooks: Vec<Hook>,
    held: Mutex<HashMap<(usize, Arc<str>), Held>>,
    take: redis::Script,
    moving: redis::Script,
    position: redis::Script,
    advance: redis::Script,
    elsewhere: redis::Script,
}

/// The endpoints' keys as every part of the store needs them: commits make their room due in
/// the due sets, and the walk over the list of rooms compares the cursors with the logs.
pub(super) struct HookKeys {
    /// Each endpoint's set of due rooms.
    due: Vec<String>,
    /// Each endpoint's cursor field in a room's `hooks` hash, in the same order.
    fields: Vec<String>,
}

/// The endpoints' keys, set once webhooks are on.
pub(super) type WebhookKeys = OnceLock<HookKeys>;

impl RedisOutbox {
    pub(super) fn new(shared: Arc<Shared>, endpoints: &[OutboxEndpoint]) -> Self {
        let hooks: Vec<Hook> = endpoints
            .iter()
            .map(|endpoint| {
                // Endpoint names are URLs: a digest keeps keys short and free of hash tags.
                let digest = Sha256::digest(endpoint.name.as_bytes());
                let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                Hook {
                    due: format!("roomctl:webhooks:{id}:due"),
                    field: format!("c:{id}"),
                    turn: endpoint.turn,
                }
            })
            .collect();
        let _ = shared.webhook_keys.set(HookKeys {
            due: hooks.iter().map(|hook| hook.due.clone()).collect(),
            fields: hooks.iter().map(|hook| hook.field.clone()).collect(),
        });
        Self {
            shared,
            hooks,
            held: Mutex::new(HashMap::new()),
            take: redis::Script::new(TAKE),
            moving: redis::Script::new(MOVE),
            position: redis::Script::new(POSITION),
            advance: redis::Script::new(ADVANCE),
            elsewhere: redis::Script::new(ELSEWHERE),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, Arc<str>), Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hook(&self, endpoint: usize) -> Result<&Hook, Error> {
        self.hooks
            .get(endpoint)
            .ok_or_else(|| Error::Internal(format!("no webhook endpoint {endpoint}")))
    }

    /// Moves this node's entry of `room_id` (see [`MOVE`]): `to` ms from now, or out (None).
    /// False when the turn was not this node's any more.
    async fn move_entry(
        &self,
        endpoint: usize,
        room_id: &str,
        to: Option<Duration>,
    ) -> Result<bool, Error> {
        let hook = self.hook(endpoint)?;
        let key = (endpoint, Arc::<str>::from(room_id));
        let Some(held) = self.held().get(&key).copied() else {
            return Ok(false);
        };
        let mut call = self.moving.prepare_invoke();
        call.key(&hook.due)
            .arg(room_id)
            .arg(held.score)
            .arg(to.map_or(String::new(), |d| d.as_millis().to_string()));
        let moved: i64 = self
            .shared
            .timed("webhooks", call.invoke_async(&mut self.shared.conn()))
            .await?;
        let mut all = self.held();
        match (moved, to) {
            (-1, _) | (_, None) => {
                all.remove(&key);
            }
            (score, Some(_)) => {
                all.insert(
                    key,
                    Held {
                        score: score as u64,
                        at: Instant::now(),
                    },
                );
            }
        }
        Ok(moved >= 0)
    }

    /// Keeps this node's turn of `room_id` when half of it has gone; false if it was lost.
    async fn renew(&self, endpoint: usize, room_id: &str, always: bool) -> Result<bool, Error> {
        let turn = self.hook(endpoint)?.turn;
        let held = self.held().get(&(endpoint, room_id.into())).copied();
        match held {
            None => Ok(false),
            Some(held) if !always && held.at.elapsed() < turn / 2 => Ok(true),
            Some(_) => self.move_entry(endpoint, room_id, Some(turn)).await,
        }
    }

    /// Where `endpoint` stands in `room_id` (None: the room is gone), and whether it is
    /// behind.
    async fn read_position(
        &self,
        endpoint: usize,
        room_id: &str,
    ) -> Result<Option<(Position, bool)>, Error> {
        let hook = self.hook(endpoint)?;
        let keys = Keys::new(room_id);
        let mut call = self.position.prepare_invoke();
        call.key(&keys.meta).key(&keys.hooks).arg(&hook.field);
        let reply: Value = self
            .shared
            .timed("webhooks", call.invoke_async(&mut self.shared.conn()))
            .await?;
        let parts = array(reply);
        let (Some(epoch), Some(newest_seq), Some(at), Some(seq)) = (
            parts.first().and_then(text),
            parts.get(1).and_then(number),
            parts.get(2).and_then(text),
            parts.get(3).and_then(number),
        ) else {
            return Ok(None);
        };
        let behind = epoch != at || seq < newest_seq;
        let position = Position {
            delivered: Cursor { epoch: at, seq },
            newest_seq,
        };
        Ok(Some((position, behind)))
    }
}

impl Shared {
    /// Makes `room_id` due for every webhook endpoint (unless it is already), after a commit
    /// that did not do it itself. A failure leaves the commit's events for the room's next
    /// commit, or the walk over the list of rooms, to make due.
    pub(super) async fn make_due(&self, room_id: &str) {
        let Some(keys) = self.webhook_keys.get() else {
            return;
        };
        for key in &keys.due {
            if let Err(err) = self.make_due_in(key, room_id).await {
                tracing::warn!(room_id, err = %err.detail(), "webhooks: a room's new events could not be made due; they go out with its next commit or when the walk over the rooms finds them");
            }
        }
    }

    /// Makes `room_id` due now in the due set `key`, unless it has an entry there.
    async fn make_due_in(&self, key: &str, room_id: &str) -> Result<(), Error> {
        let mut adding = redis::cmd("ZADD");
        adding.arg(key).arg("NX").arg(0).arg(room_id);
        let mut conn = self.conn();
        self.timed("webhooks", adding.query_async::<()>(&mut conn))
            .await
    }

    /// Makes due, for each endpoint, those of `room_ids` whose cursor is behind their log. This
    /// is the walk over the list of rooms catching what the commits could not make due: a
    /// node that died between its commit and making the room due after it while a turn settled
    /// in between (a cluster, or commits waiting for replicas), Redis refusing the making due,
    /// or an endpoint added to a fleet whose rooms already hold events.
    pub(super) async fn make_behind_due(&self, room_ids: &[String]) -> Result<(), Error> {
        let Some(hooks) = self.webhook_keys.get() else {
            return Ok(());
        };
        if room_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for room_id in room_ids {
            let keys = Keys::new(room_id);
            keys.add_meta(&mut pipe);
            pipe.cmd("HMGET").arg(&keys.hooks).arg(&hooks.fields);
        }
        let replies: Vec<Value> = self
            .timed("webhooks", pipe.query_async(&mut self.conn()))
            .await?;
        let mut making = redis::pipe();
        for (room_id, reply) in room_ids.iter().zip(replies.chunks(2)) {
            let Some(meta) = meta(reply[0].clone())? else {
                continue;
            };
            let cursors = array(reply[1].clone());
            for (n, due) in hooks.due.iter().enumerate() {
                let cursor = cursors.get(n).and_then(text);
                let at = cursor.as_deref().and_then(|c| c.rsplit_once(':'));
                let behind = match at {
                    Some((epoch, seq)) => {
                        epoch != meta.epoch
                            || seq.parse::<u64>().map_or(true, |s| s < meta.visible())
                    }
                    None => meta.visible() > 0,
                };
                if behind {
                    making
                        .cmd("ZADD")
                        .arg(due)
                        .arg("NX")
                        .arg(0)
                        .arg(room_id)
                        .ignore();
                }
            }
        }
        if making.is_empty() {
            return Ok(());
        }
        self.timed("webhooks", making.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Whether webhooks are on (a commit then keeps a room it leaves empty).
    pub(super) fn webhooks_on(&self) -> bool {
        self.webhook_keys.get().is_some()
    }

    /// The due sets a commit on one Redis makes its room due in itself (none when commits
    /// wait for replicas: the writer does it once they confirm).
    pub(super) fn due_in_commit(&self) -> &[String] {
        match self.webhook_keys.get() {
            Some(keys) if self.config.wait_replicas == 0 => &keys.due,
            _ => &[],
        }
    }
}

#[async_trait::async_trait]
impl Outbox for RedisOutbox {
    async fn due(&self, endpoint: usize, want: usize) -> Result<Vec<Arc<str>>, Error> {
        let hook = self.hook(endpoint)?;
        loop {
            if want > 0 {
                let mut call = self.take.prepare_invoke();
                call.key(&hook.due)
                    .arg(hook.turn.as_millis() as u64)
                    .arg(want);
                let reply: Value = self
                    .shared
                    .timed("webhooks", call.invoke_async(&mut self.shared.conn()))
                    .await?;
                let mut reply = array(reply).into_iter();
                let score = reply.next().as_ref().and_then(number).unwrap_or(0);
                let rooms: Vec<Arc<str>> = reply
                    .next()
                    .map(array)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(text)
                    .map(Arc::from)
                    .collect();
                if !rooms.is_empty() {
                    let mut held = self.held();
                    let at = Instant::now();
                    for room in &rooms {
                        held.insert((endpoint, room.clone()), Held { score, at });
                    }
                    return Ok(rooms);
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn position(&self, endpoint: usize, room_id: &str) -> Result<Option<Position>, Error> {
        if !self.renew(endpoint, room_id, true).await? {
            return Ok(None);
        }
        match self.read_position(endpoint, room_id).await? {
            Some((position, _)) => Ok(Some(position)),
            None => {
                // The room is gone: so is its turn.
                self.move_entry(endpoint, room_id, None).await?;
                Ok(None)
            }
        }
    }

    async fn keep_turn(&self, endpoint: usize, room_id: &str) -> Result<bool, Error> {
        self.renew(endpoint, room_id, false).await
    }

    async fn advance(&self, endpoint: usize, room_id: &str, to: &Cursor) -> Result<bool, Error> {
        if !self.renew(endpoint, room_id, false).await? {
            return Ok(false);
        }
        let keys = Keys::new(room_id);
        let mut call = self.advance.prepare_invoke();
        for key in keys.room() {
            call.key(key);
        }
        call.arg(&self.hook(endpoint)?.field)
            .arg(&to.epoch)
            .arg(to.seq)
            .arg(self.shared.config.rooms.empty_room_ttl.as_millis() as u64);
        for hook in &self.hooks {
            call.arg(&hook.field);
        }
        let expires: i64 = self
            .shared
            .timed("webhooks", call.invoke_async(&mut self.shared.conn()))
            .await?;
        if expires > 0 {
            // Every endpoint has the empty room's events: it is forgotten as any empty room.
            self.shared.room_emptied(room_id, expires as u64).await;
        }
        Ok(true)
    }

    async fn settle(&self, endpoint: usize, room_id: &str) -> Result<(), Error> {
        if !self.move_entry(endpoint, room_id, None).await? {
            return Ok(());
        }
        // A commit made after the turn's last read found the room's entry there and left it:
        // now that it is gone, look again, and make the room due if anything is new.
        let behind = self
            .read_position(endpoint, room_id)
            .await?
            .is_some_and(|(_, behind)| behind);
        let hook = self.hook(endpoint)?;
        if behind {
            self.shared.make_due_in(&hook.due, room_id).await?;
        }
        Ok(())
    }

    async fn retry(&self, endpoint: usize, room_id: &str, delay: Duration) -> Result<(), Error> {
        self.move_entry(endpoint, room_id, Some(delay)).await?;
        // The room is due for every node at its retry time, this one included.
        self.held().remove(&(endpoint, room_id.into()));
        Ok(())
    }

    async fn elsewhere(&self, endpoint: usize, room_ids: &[Arc<str>]) -> Result<Vec<bool>, Error> {
        if room_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.elsewhere.prepare_invoke();
        call.key(&self.hook(endpoint)?.due);
        for room_id in room_ids {
            call.arg(room_id.as_ref());
        }
        let taken: Vec<i64> = self
            .shared
            .timed("webhooks", call.invoke_async(&mut self.shared.conn()))
            .await?;
        Ok(taken.into_iter().map(|t| t == 1).collect())
    }
}
