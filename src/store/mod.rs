//! Persistence of rooms behind one object-safe trait, so the service and the subscription logic
//! never know which backend holds the rooms.
//!
//! A store applies a command atomically (the room engine decides; the store persists the new
//! state and the command's events together, or nothing), answers snapshots, reads a room's log
//! from a cursor, and wakes subscribers through a [`watch`] of the room's [`Head`]. Memory
//! serves one process ([`memory::MemoryStore`]); Redis serves a fleet ([`redis::RedisStore`]).
//!
//! Stores persist; they do not decide: every rule is the engine's. A store may depend only on
//! the engine, the errors, the generated types, the id rules, the codec and telemetry: never on
//! the service, subscriptions, auth or limits.

pub mod memory;
mod outbox;
pub mod redis;
mod window;

pub use outbox::{Cursor, DueRooms, Outbox, OutboxEndpoint, Position};
pub use window::LogWindow;

use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use prost::bytes::Bytes;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::codec::EncodedEvent;
use crate::engine::{Applied, Ban, Caller, ClientStatus, Command, RoomLimits};
use crate::error::Error;
use crate::pb;
use crate::telemetry::Telemetry;

/// Default `--history`: events kept per room.
pub const DEFAULT_HISTORY: usize = 10_000;
/// Default `--history-bytes`: bytes of events (as encoded on the wire) kept per room.
pub const DEFAULT_HISTORY_BYTES: usize = 16 * 1024 * 1024;
/// Default `--empty-room-ttl`.
pub const DEFAULT_EMPTY_ROOM_TTL: Duration = Duration::from_secs(300);
/// Default `--presence-timeout`.
pub const DEFAULT_PRESENCE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a store keeps of each room, and for how long: one model for both stores, its defaults
/// written once (here) and read by `serve`'s flags. Every node sharing a Redis must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSettings {
    /// Events kept per room (`--history`).
    pub history: usize,
    /// Bytes of events kept per room, as encoded on the wire (`--history-bytes`): whichever of
    /// the two bounds is reached first trims the history.
    pub history_bytes: usize,
    /// How long a room is kept once empty (`--empty-room-ttl`).
    pub empty_room_ttl: Duration,
    /// How long a client may be without an open `Events` stream before it is removed
    /// (`--presence-timeout`); None: presence is off.
    pub presence_timeout: Option<Duration>,
    /// Participants and remembered answers a room holds at most.
    pub limits: RoomLimits,
}

impl Default for RoomSettings {
    fn default() -> Self {
        Self {
            history: DEFAULT_HISTORY,
            history_bytes: DEFAULT_HISTORY_BYTES,
            empty_room_ttl: DEFAULT_EMPTY_ROOM_TTL,
            presence_timeout: Some(DEFAULT_PRESENCE_TIMEOUT),
            limits: RoomLimits::default(),
        }
    }
}

/// Where rooms live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process: one node.
    Memory,
    /// In the Redis at `url`, shared by every node.
    Redis {
        /// `redis://HOST:PORT[/DB]`, or `rediss://` for TLS.
        url: redis::RedisUrl,
        /// PEM file of the CA that signed Redis's TLS certificate, when it is not in the system
        /// trust store.
        ca_file: Option<std::path::PathBuf>,
        /// Replicas that must hold each commit before it is answered or shown (0: none).
        wait_replicas: usize,
        /// The Redis Cluster's `cluster-node-timeout`, when it cannot be read from the cluster
        /// (used only with replicas to wait for; None: `CONFIG GET` it).
        cluster_node_timeout: Option<std::time::Duration>,
    },
}

impl StoreConfig {
    /// Redis at `url`, trusting the system's certificate authorities for `rediss://`.
    pub fn redis(url: impl Into<String>) -> Self {
        StoreConfig::Redis {
            url: redis::RedisUrl::new(url),
            ca_file: None,
            wait_replicas: 0,
            cluster_node_timeout: None,
        }
    }
}

/// The store `config` names, connected now (so a bad Redis URL fails here), keeping `rooms` as
/// they say; `telemetry` records its work; `clock` tells the time. Needs a tokio runtime: stores
/// run background tasks.
pub async fn open(
    config: &StoreConfig,
    rooms: RoomSettings,
    telemetry: Telemetry,
    clock: Clock,
) -> Result<Arc<dyn RoomStore>, Error> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(memory::MemoryStore::open(rooms, telemetry, clock)),
        StoreConfig::Redis {
            url,
            ca_file,
            wait_replicas,
            cluster_node_timeout,
        } => {
            let config = redis::RedisConfig {
                url: url.clone(),
                ca_file: ca_file.clone(),
                wait_replicas: *wait_replicas,
                cluster_node_timeout: *cluster_node_timeout,
                rooms,
            };
            Arc::new(redis::RedisStore::connect_with(config, telemetry, clock).await?)
        }
    })
}

/// A consistent view of a room at one log position.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Participants in join order.
    pub participants: Vec<pb::Participant>,
    /// The retained log window the snapshot was taken at (`newest_seq` is its position).
    pub window: LogWindow,
    /// Whether the room is locked.
    pub locked: bool,
}

/// What a subscriber needs to start: where the log stands, where its client stands, and the
/// wake-up channel, all read at one instant.
#[derive(Debug)]
pub struct Opening {
    /// The log's retained window.
    pub window: LogWindow,
    /// The requested client's status (`Unknown` for observers).
    pub client: ClientStatus,
    /// Changes whenever the room logs events; closes when the room is forgotten.
    pub head: watch::Receiver<Head>,
    /// Keeps a present client live while the stream is open (with presence on).
    pub lease: Lease,
}

/// Counts one open stream as a client towards that client's presence; dropping it tells the
/// store the stream ended (its grace period starts when it was the client's last stream).
pub struct Lease(Option<Box<dyn Send + Sync>>);

impl Lease {
    /// No lease: an observer's stream, a client not present, or presence off.
    pub fn none() -> Self {
        Self(None)
    }

    /// A lease that runs `release` when the stream ends.
    pub fn new(release: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(release)))
    }

    /// Whether the stream keeps a client live.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_held() {
            "Lease(held)"
        } else {
            "Lease(none)"
        })
    }
}

/// An event of a room's log, as stores hold and read it: the event, for what subscriptions
/// check, and its encoding, made at most once however many streams deliver it.
#[derive(Debug)]
pub struct LoggedEvent {
    event: pb::Event,
    encoded: OnceLock<EncodedEvent>,
    /// The size of its encoding: what it weighs against a room's `--history-bytes` and a
    /// reader's batch.
    size: usize,
}

impl LoggedEvent {
    /// `event`, to be encoded when a stream first delivers it.
    pub fn new(event: pb::Event) -> Self {
        Self {
            size: prost::Message::encoded_len(&event),
            event,
            encoded: OnceLock::new(),
        }
    }

    /// `event`, whose encoding is `encoded`: streams send a copy of those bytes.
    pub fn with_encoding(event: pb::Event, encoded: &[u8]) -> Self {
        Self {
            event,
            encoded: OnceLock::from(EncodedEvent::copy_from(encoded)),
            size: encoded.len(),
        }
    }

    /// An event read in its wire form: streams send those bytes, never encoding it again.
    pub fn decode(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        let size = bytes.len();
        let (event, encoded) = EncodedEvent::decode_event(bytes)?;
        Ok(Self {
            event,
            encoded: OnceLock::from(encoded),
            size,
        })
    }

    /// The size of the event's encoding, in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The event's encoding.
    pub fn encoded(&self) -> EncodedEvent {
        self.encoded
            .get_or_init(|| EncodedEvent::new(&self.event))
            .clone()
    }
}

impl Deref for LoggedEvent {
    type Target = pb::Event;

    fn deref(&self) -> &pb::Event {
        &self.event
    }
}

/// What a room's wake-up channel holds: the newest `seq` and, when the store has them at hand,
/// the events of the commit that made it. A room's observers, woken together by a commit, take
/// its events from here rather than each reading the log for them.
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// The newest `seq` the store knows of.
    pub seq: u64,
    /// The events of the commit that ends at `seq`, oldest first (`seq`s in a row, one epoch).
    pub commit: Option<Arc<[Arc<LoggedEvent>]>>,
}

impl Head {
    /// A head moved by the commit of `events` (not empty), ending at `seq`. A commit heavier
    /// than a reader's batch ([`READ_BATCH_BYTES`]) does not travel with the wake-up: its
    /// subscribers read it from the log in batches, so a stalled one never holds more.
    pub fn committed(seq: u64, events: Arc<[Arc<LoggedEvent>]>) -> Self {
        let light = events.iter().map(|e| e.size()).sum::<usize>() <= READ_BATCH_BYTES;
        Self {
            seq,
            commit: light.then_some(events),
        }
    }

    /// The head's commit and the index in it of the first event after `cursor` of log `epoch`
    /// (the commit's length when there is none), when the commit holds every event after
    /// `cursor`: a subscriber at `cursor` needs nothing else.
    pub fn continuing(&self, epoch: &str, cursor: u64) -> Option<(Arc<[Arc<LoggedEvent>]>, usize)> {
        let commit = self.commit.as_ref()?;
        let (first, last) = (commit.first()?, commit.last()?);
        let in_a_row = last.seq.checked_sub(first.seq)? + 1 == commit.len() as u64;
        if !in_a_row || last.epoch != epoch || cursor > last.seq {
            return None;
        }
        let at = cursor.checked_add(1)?.checked_sub(first.seq)?;
        Some((commit.clone(), usize::try_from(at).ok()?))
    }
}

/// How many events one [`RoomStore::read`] returns at most: few enough that a read of the
/// largest events (about 140 KB each, an ack of 1,000 long ids) is a few MiB before
/// [`READ_BATCH_BYTES`] cuts it, many enough that a replay of small events takes few reads.
pub const READ_BATCH: usize = 64;

/// How many bytes of events (encoded) one [`RoomStore::read`] returns: once a batch reaches
/// this it ends, so it holds at most this plus one event. A subscriber that stops reading holds
/// one batch beyond the room's history, and no more.
pub const READ_BATCH_BYTES: usize = 256 * 1024;

/// A reader's batch of `events`, oldest first: at most [`READ_BATCH`] of them, ending once it
/// reaches [`READ_BATCH_BYTES`] of their encoding, which `size` tells (always at least one
/// event, however large).
pub fn batch_of<T>(events: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<T> {
    let mut bytes = 0;
    events
        .into_iter()
        .take(READ_BATCH)
        .take_while(|event| {
            let under = bytes < READ_BATCH_BYTES;
            bytes += size(event);
            under
        })
        .collect()
}

/// Whether a batch made by [`batch_of`] holds every event there was to read (it ended neither
/// at its count nor at its bytes).
pub fn is_whole(batch: &[Arc<LoggedEvent>]) -> bool {
    batch.len() < READ_BATCH && batch.iter().map(|e| e.size()).sum::<usize>() < READ_BATCH_BYTES
}

/// A page of up to `limit` rooms with ids after `after`, in id order, read from a store's room
/// index by `read(cursor, want)`: the next (at most `want`) listed ids after the cursor, and the
/// summaries of those that still exist. Rooms forgotten between the index and the lookup are
/// skipped, so reading goes on until the page is full or the index ends.
pub(crate) async fn page_of_rooms<F, Fut>(
    after: Option<&str>,
    limit: usize,
    mut read: F,
) -> Result<Vec<pb::RoomSummary>, Error>
where
    F: FnMut(Option<String>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<String>, Vec<pb::RoomSummary>), Error>>,
{
    let mut rooms = Vec::with_capacity(limit);
    let mut cursor = after.map(str::to_owned);
    while rooms.len() < limit {
        let want = limit - rooms.len();
        let (ids, found) = read(cursor.take(), want).await?;
        rooms.extend(found);
        match ids.last() {
            Some(last) if ids.len() == want => cursor = Some(last.clone()),
            _ => break,
        }
    }
    Ok(rooms)
}

/// The rooms, wherever they live.
#[async_trait]
pub trait RoomStore: Send + Sync + 'static {
    /// Runs `cmd` by `caller` through the engine and commits the state and its events
    /// atomically. Only a join creates a missing room; other commands get `RoomNotFound`.
    async fn execute(&self, room_id: &str, caller: &Caller, cmd: Command)
        -> Result<Applied, Error>;

    /// The room's participants and the log position they were read at.
    async fn snapshot(&self, room_id: &str) -> Result<Snapshot, Error>;

    /// The bans in force in the room, soonest to end first.
    async fn bans(&self, room_id: &str) -> Result<Vec<Ban>, Error>;

    /// Up to `limit` rooms with ids after `after` (None: from the first), in room id order.
    async fn list_rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::RoomSummary>, Error>;

    /// Everything a new subscription of `client_id` (None: observer) needs, read atomically.
    async fn open(&self, room_id: &str, client_id: Option<&str>) -> Result<Opening, Error>;

    /// A batch ([`batch_of`]) of the events of log `epoch` with `seq > after`, oldest first;
    /// empty when there are none yet. `CursorOutOfRange` when `after` fell out of the history or the log is
    /// no longer `epoch`; `RoomNotFound` when the room is gone.
    async fn read(
        &self,
        room_id: &str,
        epoch: &str,
        after: u64,
    ) -> Result<Vec<Arc<LoggedEvent>>, Error>;

    /// A new wake-up channel for a subscription whose previous one closed (the room was
    /// forgotten, or the store lost its notifications and reset them): `RoomNotFound` or
    /// `StoreUnavailable` say why it cannot go on.
    async fn rewatch(&self, room_id: &str) -> Result<watch::Receiver<Head>, Error>;

    /// Whether the store can serve now; health reports it.
    fn health(&self) -> watch::Receiver<bool>;

    /// Starts keeping delivery positions for webhook `endpoints` (called once, before serving;
    /// on a shared store every node must give the same).
    fn outbox(&self, endpoints: &[OutboxEndpoint]) -> Arc<dyn Outbox>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(epoch: &str, seqs: &[u64]) -> Head {
        let events: Arc<[Arc<LoggedEvent>]> = seqs
            .iter()
            .map(|&seq| {
                Arc::new(LoggedEvent::new(pb::Event {
                    seq,
                    epoch: epoch.into(),
                    ..Default::default()
                }))
            })
            .collect();
        Head::committed(*seqs.last().unwrap(), events)
    }

    fn after(head: &Head, epoch: &str, cursor: u64) -> Option<Vec<u64>> {
        let (events, next) = head.continuing(epoch, cursor)?;
        Some(events[next..].iter().map(|e| e.seq).collect())
    }

    #[test]
    fn a_commit_continues_only_the_cursors_it_covers() {
        let head = commit("e", &[4, 5, 6]);
        assert_eq!(after(&head, "e", 3), Some(vec![4, 5, 6]));
        assert_eq!(after(&head, "e", 4), Some(vec![5, 6]));
        // Caught up: nothing is new, and nothing needs reading.
        assert_eq!(after(&head, "e", 6), Some(vec![]));
        // Behind the commit: the events between are in the log only.
        assert_eq!(after(&head, "e", 2), None);
        assert_eq!(after(&head, "e", 7), None);
        // Another log's events never continue a cursor, whatever their seqs.
        assert_eq!(after(&head, "other", 3), None);
        // A head without its commit: only a read tells.
        assert_eq!(after(&Head::default(), "e", 0), None);
    }

    #[test]
    fn a_commit_with_a_gap_continues_nothing() {
        assert_eq!(after(&commit("e", &[4, 6]), "e", 3), None);
    }
}
