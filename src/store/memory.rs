//! The in-memory store: every room of one process, each behind its own lock.
//!
//! Rooms live in a sharded map, so looking a room up never contends on one global lock, and each
//! room has its own `std::sync::Mutex`: the engine's work under it is short and synchronous and
//! never crosses an `.await`, which a std mutex makes impossible to get wrong. The log is a ring of
//! the last `history` events shared by `Arc`, so subscribers hold cursors into it rather than
//! copies of it. Rooms that stay empty past `empty_room_ttl` are forgotten, lazily on access and
//! by a sweeper task that stops when the store is dropped.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Opening, RoomStore, Snapshot, READ_BATCH};
use crate::engine::{self, Applied, Caller, ClientStatus, Command, LogWindow, RoomState};
use crate::error::Error;
use crate::pb;
use crate::telemetry::Telemetry;

const SHARDS: usize = 64;

/// Tuning of the in-memory store.
#[derive(Debug, Clone, Copy)]
pub struct MemoryConfig {
    /// Events kept per room.
    pub history: usize,
    /// How long an empty room is kept before it is forgotten.
    pub empty_room_ttl: Duration,
    /// Most participants per room.
    pub max_room_members: usize,
}

struct Room {
    inner: Mutex<Inner>,
    /// The newest seq; subscribers wait on it instead of polling.
    head: watch::Sender<u64>,
}

struct Inner {
    state: RoomState,
    log: VecDeque<Arc<pb::Event>>,
    empty_since: Option<Instant>,
    /// Set when the room is forgotten, so a caller that looked it up just before sees it.
    gone: bool,
}

impl Inner {
    fn expired(&self, ttl: Duration, now: Instant) -> bool {
        self.state.is_empty()
            && self
                .empty_since
                .is_some_and(|t| now.duration_since(t) >= ttl)
    }
}

type Shard = RwLock<HashMap<String, Arc<Room>>>;

struct Rooms {
    shards: Vec<Shard>,
    hasher: RandomState,
    config: MemoryConfig,
    telemetry: Telemetry,
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

    fn create(&self, room_id: &str) -> Arc<Room> {
        let mut shard = self
            .shard(room_id)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        shard
            .entry(room_id.to_owned())
            .or_insert_with(|| {
                let epoch = uuid::Uuid::new_v4().simple().to_string();
                Arc::new(Room {
                    inner: Mutex::new(Inner {
                        state: RoomState::new(room_id, epoch)
                            .with_max_members(self.config.max_room_members),
                        log: VecDeque::new(),
                        empty_since: Some(Instant::now()),
                        gone: false,
                    }),
                    head: watch::Sender::new(0),
                })
            })
            .clone()
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
        if inner.expired(self.config.empty_room_ttl, Instant::now()) {
            inner.gone = true;
            drop(inner);
            // Dropping the room drops its watch sender, which ends waiting subscribers.
            shard.remove(room_id);
        }
    }

    /// Runs `f` on the live room `room_id` under its lock, creating the room when `create`.
    fn with_room<R>(
        &self,
        room_id: &str,
        create: bool,
        f: impl FnOnce(&mut Inner, &watch::Sender<u64>) -> R,
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
            if !created && inner.expired(self.config.empty_room_ttl, Instant::now()) {
                drop(inner);
                self.reap(room_id);
                continue;
            }
            return Ok(f(&mut inner, &room.head));
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let expired: Vec<String> = shard
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, room)| lock(room).expired(self.config.empty_room_ttl, now))
                .map(|(id, _)| id.clone())
                .collect();
            for room_id in expired {
                self.reap(&room_id);
            }
        }
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

    fn window(&self, inner: &Inner) -> LogWindow {
        LogWindow::of(inner.state.epoch(), inner.state.seq(), self.config.history)
    }
}

impl MemoryStore {
    /// A store with no rooms. Spawns the sweeper of empty rooms on the current tokio runtime;
    /// it ends when the store is dropped.
    pub fn new(config: MemoryConfig) -> Self {
        Self::with_telemetry(config, Telemetry::off())
    }

    /// A store with no rooms whose events and census `telemetry` records.
    pub fn with_telemetry(config: MemoryConfig, telemetry: Telemetry) -> Self {
        let rooms = Arc::new(Rooms {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            config,
            telemetry: telemetry.clone(),
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

async fn sweep_forever(rooms: Weak<Rooms>) {
    let period = match rooms.upgrade() {
        Some(rooms) => (rooms.config.empty_room_ttl / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(30)),
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
        let history = self.rooms.config.history;
        self.rooms
            .with_room(room_id, cmd.creates_room(), |inner, head| {
                let applied = engine::apply(&mut inner.state, caller, cmd, SystemTime::now())?;
                if applied.events.is_empty() {
                    return Ok(applied);
                }
                for event in &applied.events {
                    inner.log.push_back(Arc::new(event.clone()));
                }
                while inner.log.len() > history {
                    inner.log.pop_front();
                }
                let oldest = inner.log.front().map_or(inner.state.seq() + 1, |e| e.seq);
                inner.state.forget_departed_before(oldest);
                inner.empty_since = match (inner.state.is_empty(), inner.empty_since) {
                    (true, Some(since)) => Some(since),
                    (true, None) => Some(Instant::now()),
                    (false, _) => None,
                };
                head.send_replace(inner.state.seq());
                self.rooms.telemetry.events_appended(applied.events.len());
                Ok(applied)
            })?
    }

    async fn snapshot(&self, room_id: &str) -> Result<Snapshot, Error> {
        self.rooms.with_room(room_id, false, |inner, _| Snapshot {
            participants: inner.state.participants(),
            window: self.rooms.window(inner),
        })
    }

    async fn open(&self, room_id: &str, client_id: Option<&str>) -> Result<Opening, Error> {
        self.rooms.with_room(room_id, false, |inner, head| Opening {
            window: self.rooms.window(inner),
            client: client_id.map_or(ClientStatus::Unknown, |id| inner.state.client_status(id)),
            head: head.subscribe(),
        })
    }

    async fn read(
        &self,
        room_id: &str,
        epoch: &str,
        after: u64,
    ) -> Result<Vec<Arc<pb::Event>>, Error> {
        self.rooms.with_room(room_id, false, |inner, _| {
            let window = self.rooms.window(inner);
            if window.epoch != epoch {
                return Err(window.out_of_range());
            }
            window.check_readable(after)?;
            let skip = after.saturating_add(1).saturating_sub(window.oldest_seq) as usize;
            Ok(inner
                .log
                .iter()
                .skip(skip)
                .take(READ_BATCH)
                .cloned()
                .collect())
        })?
    }

    async fn rewatch(&self, room_id: &str) -> Result<watch::Receiver<u64>, Error> {
        self.rooms
            .with_room(room_id, false, |_, head| head.subscribe())
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }
}
