//! The in-memory store: every room of one process, each behind its own lock.
//!
//! Rooms live in a sharded map, so looking a room up never contends on one global lock, and each
//! room has its own `std::sync::Mutex`: the engine's work under it is short and synchronous and
//! never crosses an `.await`, which a std mutex makes impossible to get wrong. Rooms that stay
//! empty past `empty_room_ttl` are forgotten, lazily on access and by a sweeper task that stops
//! when the store is dropped.
//!
//! A node holds up to a million rooms, most of them quiet, so a room is kept small: its log is a
//! ring of the last `history` events in their wire form (what a catching-up stream sends; the
//! events of a commit reach the streams already waiting with the wake-up, decoded), its id is one
//! allocation shared by the map, the index and its state, and its wake-up channel exists only
//! while someone watches it.
//!
//! It persists what the engine decides and decides nothing itself; it knows nothing of tonic or
//! of the service and subscriptions that call it.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use prost::bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    batch_of, Cursor, DueRooms, Head, Lease, LogWindow, LoggedEvent, Opening, Outbox,
    OutboxEndpoint, Position, RoomSettings, RoomStore, Snapshot,
};
use crate::clock::Clock;
use crate::engine::{self, Applied, Ban, Caller, Change, ClientStatus, Command, Reply, RoomState};
use crate::error::Error;
use crate::pb;
use crate::telemetry::Telemetry;

const SHARDS: usize = 64;

struct Room {
    inner: Mutex<Inner>,
}

struct Inner {
    state: RoomState,
    /// The newest events, encoded, their seqs in a row up to the state's.
    log: VecDeque<Box<[u8]>>,
    /// What the events of `log` weigh, held to `--history-bytes`.
    log_bytes: usize,
    /// The newest seq and the commit that made it, for subscribers to wait on instead of
    /// polling; None while nobody waits (the first to subscribe makes it).
    head: Option<watch::Sender<Head>>,
    empty_since: Option<Instant>,
    /// Set when the room is forgotten, so a caller that looked it up just before sees it.
    gone: bool,
    /// Each present client's open streams and, when it has none, until when it may stay.
    presence: HashMap<String, Presence>,
    /// With webhooks: the last seq each endpoint received (the room's epoch never changes).
    delivered: Option<Box<[u64]>>,
}

/// A client's liveness: its open streams, and the end of its grace when it has none.
struct Presence {
    streams: u32,
    until: Instant,
}

/// Ends one stream's share in its client's presence.
struct Release {
    room: Arc<Room>,
    client_id: String,
    timeout: Duration,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut inner = lock(&self.room);
        if let Some(presence) = inner.presence.get_mut(&self.client_id) {
            presence.streams = presence.streams.saturating_sub(1);
            if presence.streams == 0 {
                presence.until = Instant::now() + self.timeout;
            }
        }
    }
}

impl Inner {
    /// The seq of the oldest event the log holds (the next one's when it holds none).
    fn oldest_seq(&self) -> u64 {
        self.state.seq() + 1 - self.log.len() as u64
    }

    /// A receiver of the room's head, making its channel if nobody watched it.
    fn watch(&mut self) -> watch::Receiver<Head> {
        let seq = self.state.seq();
        self.head
            .get_or_insert_with(|| watch::Sender::new(Head { seq, commit: None }))
            .subscribe()
    }

    /// Whether every webhook endpoint has received every event: a room is not forgotten
    /// before (its history bounds what that holds).
    fn delivered_all(&self) -> bool {
        let seq = self.state.seq();
        self.delivered
            .as_ref()
            .is_none_or(|delivered| delivered.iter().all(|&at| at >= seq))
    }

    /// Whether the room has been empty for `ttl`, and has had no ban in force for as long, at
    /// `now` (on the monotonic clock) and `wall` (the same instant on the wall clock).
    fn expired(&self, ttl: Duration, now: Instant, wall: SystemTime) -> bool {
        self.state.is_empty()
            && self.delivered_all()
            && self
                .empty_since
                .is_some_and(|t| now.duration_since(t) >= ttl)
            && self.state.bans_end().is_none_or(|end| wall >= end + ttl)
    }
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Room>>>;

struct Rooms {
    shards: Vec<Shard>,
    /// Every room id, in order, for `ListRooms` (lock order: shard, then index).
    index: Mutex<BTreeSet<Arc<str>>>,
    hasher: RandomState,
    config: RoomSettings,
    telemetry: Telemetry,
    clock: Clock,
    /// With webhooks: per endpoint, the rooms due for delivery.
    due: OnceLock<Box<[DueRooms]>>,
}

/// The in-memory [`RoomStore`].
pub struct MemoryStore {
    rooms: Arc<Rooms>,
    /// Memory is always there: health stays SERVING.
    healthy: watch::Sender<bool>,
}

fn lock(room: &Room) -> MutexGuard<'_, Inner> {
    // A panic under the lock cannot leave a half-applied command: the engine mutates only after
    // every check passed. Keep serving rather than poisoning the room forever.
    room.inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Rooms {
    fn shard(&self, room_id: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(room_id) as usize % SHARDS]
    }

    fn lookup(&self, room_id: &str) -> Option<Arc<Room>> {
        let shard = self
            .shard(room_id)
            .read()
            .unwrap_or_else(|p| p.into_inner());
        shard.get(room_id).cloned()
    }

    fn index(&self) -> MutexGuard<'_, BTreeSet<Arc<str>>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next (at most `want`) room ids after `after` in the index, and the summaries of
    /// those still live.
    fn summaries_after(
        &self,
        after: Option<String>,
        want: usize,
    ) -> (Vec<String>, Vec<pb::RoomSummary>) {
        let ids: Vec<String> = {
            let index = self.index();
            let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            index
                .range::<str, _>((from, Bound::Unbounded))
                .take(want)
                .map(|id| id.to_string())
                .collect()
        };
        let rooms = ids
            .iter()
            .filter_map(|room_id| {
                self.with_room(room_id, false, |inner, _| pb::RoomSummary {
                    room_id: room_id.clone(),
                    participants: inner.state.population() as u32,
                    locked: inner.state.locked(),
                    seq: inner.state.seq(),
                    epoch: inner.state.epoch().to_owned(),
                })
                .ok()
            })
            .collect();
        (ids, rooms)
    }

    fn create(&self, room_id: &str) -> Arc<Room> {
        let mut shard = self
            .shard(room_id)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(room) = shard.get(room_id) {
            return room.clone();
        }
        let room_id: Arc<str> = room_id.into();
        self.index().insert(room_id.clone());
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        let room = Arc::new(Room {
            inner: Mutex::new(Inner {
                state: RoomState::new(room_id.clone(), epoch).with_limits(self.config.limits),
                log: VecDeque::new(),
                log_bytes: 0,
                head: None,
                empty_since: Some(Instant::now()),
                gone: false,
                presence: HashMap::new(),
                delivered: self
                    .due
                    .get()
                    .map(|endpoints| vec![0; endpoints.len()].into_boxed_slice()),
            }),
        });
        shard.insert(room_id, room.clone());
        room
    }

    /// Forgets `room_id` if it is still expired (lock order: shard, then room).
    fn reap(&self, room_id: &str) {
        let mut shard = self
            .shard(room_id)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let Some(room) = shard.get(room_id) else {
            return;
        };
        let mut inner = lock(room);
        if inner.expired(self.config.empty_room_ttl, Instant::now(), self.clock.now()) {
            inner.gone = true;
            drop(inner);
            // Its wake-up channel closes with the room's last reference: a client's stream
            // holding a presence lease keeps it, and takes its own departure from the last
            // commit; observers' streams end as the room goes.
            shard.remove(room_id);
            self.index().remove(room_id);
        }
    }

    /// Runs `f` on the live room `room_id` under its lock, creating the room when `create`.
    fn with_room<R>(
        &self,
        room_id: &str,
        create: bool,
        f: impl FnOnce(&mut Inner, &Arc<Room>) -> R,
    ) -> Result<R, Error> {
        loop {
            let (room, created) = match self.lookup(room_id) {
                Some(room) => (room, false),
                None if create => (self.create(room_id), true),
                None => return Err(Error::room_not_found(room_id)),
            };
            let mut inner = lock(&room);
            if inner.gone {
                continue;
            }
            // A room created for this command is empty until the command fills it: reaping it
            // now would loop forever with `--empty-room-ttl 0`.
            if !created
                && inner.expired(self.config.empty_room_ttl, Instant::now(), self.clock.now())
            {
                drop(inner);
                self.reap(room_id);
                continue;
            }
            return Ok(f(&mut inner, &room));
        }
    }

    /// Removes the clients whose presence ran out, then forgets rooms empty past their TTL.
    fn sweep(&self) {
        let (now, wall) = (Instant::now(), self.clock.now());
        for shard in &self.shards {
            let rooms: Vec<(Arc<str>, Arc<Room>)> = shard
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(id, room)| (id.clone(), room.clone()))
                .collect();
            for (room_id, room) in rooms {
                let mut inner = lock(&room);
                // A quiet room whose watchers have gone keeps no channel until one comes back.
                inner.head.take_if(|head| head.receiver_count() == 0);
                if self.config.presence_timeout.is_some() {
                    self.expire_absent_clients(&mut inner, now);
                }
                let expired = inner.expired(self.config.empty_room_ttl, now, wall);
                drop(inner);
                if expired {
                    self.reap(&room_id);
                }
            }
        }
    }

    /// Removes (with `user_disconnected{TIMED_OUT}`) the clients of a room that have had no
    /// open stream since their grace ended.
    fn expire_absent_clients(&self, inner: &mut Inner, now: Instant) {
        let expired: Vec<String> = inner
            .presence
            .iter()
            .filter(|(_, p)| p.streams == 0 && p.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        let cmd = Command::TimeOut {
            client_ids: expired,
        };
        match engine::apply(&mut inner.state, &Caller::system(), cmd, self.clock.now()) {
            Ok(applied) => {
                if let Reply::TimedOut(removed) = &applied.reply {
                    tracing::info!(room_id = %inner.state.room_id(), clients = ?removed, "presence timed out");
                }
                self.record(inner, &applied);
            }
            Err(err) => tracing::error!(%err, "timing out clients failed"),
        }
    }

    /// Keeps what a command changed: its events in the log (trimmed to the history), the
    /// presence of clients that joined or went, the room's emptiness; then wakes subscribers.
    fn record(&self, inner: &mut Inner, applied: &Applied) {
        if applied.events.is_empty() {
            return;
        }
        // The commit travels with the wake-up only when someone is woken (checked under the
        // room's lock, as subscribing is): a subscriber that comes later starts from the log.
        // Nobody waiting, nobody to wake: the channel goes until someone subscribes again.
        inner.head.take_if(|head| head.receiver_count() == 0);
        let watched = inner.head.is_some();
        let mut commit = Vec::with_capacity(if watched { applied.events.len() } else { 0 });
        for event in &applied.events {
            let encoded = prost::Message::encode_to_vec(event).into_boxed_slice();
            inner.log_bytes += encoded.len();
            if watched {
                commit.push(Arc::new(LoggedEvent::with_encoding(
                    event.clone(),
                    &encoded,
                )));
            }
            inner.log.push_back(encoded);
        }
        // Trimmed to both bounds, the newest event always kept.
        while inner.log.len() > self.config.history
            || (inner.log_bytes > self.config.history_bytes && inner.log.len() > 1)
        {
            if let Some(gone) = inner.log.pop_front() {
                inner.log_bytes -= gone.len();
            }
        }
        let oldest = inner.oldest_seq();
        inner.state.forget_departed_before(oldest);
        if let Some(timeout) = self.config.presence_timeout {
            for change in &applied.changes {
                match change {
                    Change::Joined { participant, .. } => {
                        // A new client has the timeout to open its first stream.
                        let until = Instant::now() + timeout;
                        let presence = Presence { streams: 0, until };
                        inner
                            .presence
                            .insert(participant.client_id.clone(), presence);
                    }
                    Change::Departed { client_id, .. } => {
                        inner.presence.remove(client_id);
                    }
                    Change::Locked(_) | Change::Banned(_) | Change::Unbanned { .. } => {}
                }
            }
        }
        inner.empty_since = match (inner.state.is_empty(), inner.empty_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
        if let Some(head) = &inner.head {
            head.send_replace(Head::committed(inner.state.seq(), commit.into()));
        }
        for endpoint in self.due.get().into_iter().flatten() {
            endpoint.mark(inner.state.room_id());
        }
        self.telemetry.events_appended(applied.events.len());
    }

    /// How many rooms there are, and participants in them.
    fn census(&self) -> (usize, usize) {
        let (mut rooms, mut participants) = (0, 0);
        for shard in &self.shards {
            for room in shard.read().unwrap_or_else(|p| p.into_inner()).values() {
                rooms += 1;
                participants += lock(room).state.population();
            }
        }
        (rooms, participants)
    }

    /// The log's window: what it holds, trimmed by count or by bytes.
    fn window(&self, inner: &Inner) -> LogWindow {
        let newest_seq = inner.state.seq();
        LogWindow {
            epoch: inner.state.epoch().to_owned(),
            oldest_seq: inner.oldest_seq(),
            newest_seq,
        }
    }
}

impl MemoryStore {
    /// A store with no rooms. Spawns the sweeper of empty rooms on the current tokio runtime;
    /// it ends when the store is dropped.
    pub fn new(config: RoomSettings) -> Self {
        Self::open(config, Telemetry::off(), Clock::system())
    }

    /// A store with no rooms whose events and census `telemetry` records, reading the time
    /// from `clock` (its timers are tokio's).
    pub fn open(config: RoomSettings, telemetry: Telemetry, clock: Clock) -> Self {
        let rooms = Arc::new(Rooms {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            index: Mutex::default(),
            hasher: RandomState::new(),
            config,
            telemetry: telemetry.clone(),
            clock,
            due: OnceLock::new(),
        });
        let census = Arc::downgrade(&rooms);
        telemetry.on_scrape(move |telemetry| {
            if let Some(rooms) = census.upgrade() {
                let (rooms, participants) = rooms.census();
                telemetry.census(rooms, participants);
            }
        });
        tokio::spawn(sweep_forever(Arc::downgrade(&rooms)));
        Self {
            rooms,
            healthy: watch::Sender::new(true),
        }
    }
}

/// How often rooms are swept: often enough that an empty room is forgotten within a quarter of
/// its TTL, and a client whose presence ran out is removed within a tenth of the timeout (at
/// most a second late).
fn sweep_period(config: &RoomSettings) -> Duration {
    let rooms = (config.empty_room_ttl / 4).min(Duration::from_secs(30));
    let presence = config
        .presence_timeout
        .map_or(Duration::MAX, |t| (t / 10).min(Duration::from_secs(1)));
    rooms.min(presence).max(Duration::from_millis(10))
}

async fn sweep_forever(rooms: Weak<Rooms>) {
    let period = match rooms.upgrade() {
        Some(rooms) => sweep_period(&rooms.config),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match rooms.upgrade() {
            Some(rooms) => rooms.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl RoomStore for MemoryStore {
    async fn execute(
        &self,
        room_id: &str,
        caller: &Caller,
        cmd: Command,
    ) -> Result<Applied, Error> {
        self.rooms
            .with_room(room_id, cmd.creates_room(), |inner, _| {
                let applied = engine::apply(&mut inner.state, caller, cmd, self.rooms.clock.now())?;
                self.rooms.record(inner, &applied);
                applied.answer()
            })?
    }

    async fn snapshot(&self, room_id: &str) -> Result<Snapshot, Error> {
        self.rooms.with_room(room_id, false, |inner, _| {
            let mut participants = inner.state.participants();
            for participant in &mut participants {
                participant.connected = inner
                    .presence
                    .get(&participant.client_id)
                    .is_some_and(|p| p.streams > 0);
            }
            Snapshot {
                participants,
                window: self.rooms.window(inner),
                locked: inner.state.locked(),
            }
        })
    }

    async fn bans(&self, room_id: &str) -> Result<Vec<Ban>, Error> {
        self.rooms.with_room(room_id, false, |inner, _| {
            inner.state.bans(self.rooms.clock.now())
        })
    }

    async fn list_rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::RoomSummary>, Error> {
        super::page_of_rooms(after, limit, |cursor, want| {
            std::future::ready(Ok(self.rooms.summaries_after(cursor, want)))
        })
        .await
    }

    async fn open(&self, room_id: &str, client_id: Option<&str>) -> Result<Opening, Error> {
        let timeout = self.rooms.config.presence_timeout;
        self.rooms.with_room(room_id, false, |inner, room| {
            let client =
                client_id.map_or(ClientStatus::Unknown, |id| inner.state.client_status(id));
            let presence = client_id.and_then(|id| Some((id, inner.presence.get_mut(id)?)));
            let lease = match (presence, timeout) {
                (Some((client_id, presence)), Some(timeout)) => {
                    presence.streams += 1;
                    Lease::new(Release {
                        room: room.clone(),
                        client_id: client_id.to_owned(),
                        timeout,
                    })
                }
                _ => Lease::none(),
            };
            Opening {
                window: self.rooms.window(inner),
                client,
                head: inner.watch(),
                lease,
            }
        })
    }

    async fn read(
        &self,
        room_id: &str,
        epoch: &str,
        after: u64,
    ) -> Result<Vec<Arc<LoggedEvent>>, Error> {
        let batch = self.rooms.with_room(room_id, false, |inner, _| {
            let window = self.rooms.window(inner);
            if window.epoch != epoch {
                return Err(window.out_of_range());
            }
            window.check_readable(after)?;
            let skip = after.saturating_add(1).saturating_sub(window.oldest_seq) as usize;
            // Copied under the room's lock, decoded after it: decoding takes longer.
            let batch = batch_of(inner.log.iter().skip(skip), |bytes| bytes.len());
            Ok(batch
                .into_iter()
                .map(|b| Bytes::copy_from_slice(b))
                .collect::<Vec<_>>())
        })??;
        batch
            .into_iter()
            .map(|bytes| {
                // The store encoded it: failing to decode it is a bug, not the caller's fault.
                let event = LoggedEvent::decode(bytes)
                    .map_err(|err| Error::Internal(format!("a logged event: {err}")))?;
                Ok(Arc::new(event))
            })
            .collect()
    }

    async fn rewatch(&self, room_id: &str) -> Result<watch::Receiver<Head>, Error> {
        self.rooms
            .with_room(room_id, false, |inner, _| inner.watch())
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    fn outbox(&self, endpoints: &[OutboxEndpoint]) -> Arc<dyn Outbox> {
        let due = endpoints.iter().map(|_| DueRooms::default()).collect();
        // Set before any room exists (serve calls this first), so every room tracks its
        // deliveries; a second call keeps the first's endpoints.
        let _ = self.rooms.due.set(due);
        Arc::new(MemoryOutbox(self.rooms.clone()))
    }
}

/// The memory store's delivery positions: in each room's state, under its lock.
struct MemoryOutbox(Arc<Rooms>);

#[async_trait]
impl Outbox for MemoryOutbox {
    async fn due(&self, endpoint: usize, _want: usize) -> Result<Vec<Arc<str>>, Error> {
        match self.endpoint(endpoint) {
            Some(due) => Ok(due.take().await),
            None => std::future::pending().await,
        }
    }

    async fn position(&self, endpoint: usize, room_id: &str) -> Result<Option<Position>, Error> {
        let found = self.0.with_room(room_id, false, |inner, _| Position {
            delivered: Cursor {
                epoch: inner.state.epoch().to_owned(),
                seq: inner
                    .delivered
                    .as_ref()
                    .and_then(|delivered| delivered.get(endpoint).copied())
                    .unwrap_or_else(|| inner.state.seq()),
            },
            newest_seq: inner.state.seq(),
        });
        match found {
            Ok(position) => Ok(Some(position)),
            Err(Error::RoomNotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn keep_turn(&self, _endpoint: usize, _room_id: &str) -> Result<bool, Error> {
        // One process: its turns are never taken over.
        Ok(true)
    }

    async fn advance(&self, endpoint: usize, room_id: &str, to: &Cursor) -> Result<bool, Error> {
        let found = self.0.with_room(room_id, false, |inner, _| {
            if inner.state.epoch() != to.epoch {
                return;
            }
            let at = inner
                .delivered
                .as_mut()
                .and_then(|delivered| delivered.get_mut(endpoint));
            if let Some(at) = at {
                *at = (*at).max(to.seq);
            }
        });
        match found {
            Ok(()) | Err(Error::RoomNotFound { .. }) => Ok(true),
            Err(err) => Err(err),
        }
    }

    async fn settle(&self, _endpoint: usize, _room_id: &str) -> Result<(), Error> {
        // Marks made during the turn made the room due again already.
        Ok(())
    }

    async fn retry(&self, endpoint: usize, room_id: &str, delay: Duration) -> Result<(), Error> {
        if let Some(due) = self.endpoint(endpoint) {
            due.retry(room_id, delay);
        }
        Ok(())
    }
}

impl MemoryOutbox {
    fn endpoint(&self, endpoint: usize) -> Option<&DueRooms> {
        self.0.due.get().and_then(|all| all.get(endpoint))
    }
}
