//! The Redis store: many roomctl nodes sharing one Redis behave as one control plane.
//!
//! **Layout** (`keys`). Every key of a room carries the hash tag `{room_id}`, so a room lives
//! in one Redis Cluster slot: `meta` (hash: `epoch`, `seq`, `locked`, the Redis process that
//! made the last commit as `run`, `replid` and `node`, and with `--redis-wait-replicas` the
//! `confirmed` seq), `members` (hash: client id to [`StoredMember`]), `departed` (sorted set of
//! departed client ids by the seq that ended them) with `owners` (hash: their identities), `log`
//! (a stream whose entry ids are `0-<seq>`, trimmed to at most `--history` entries and
//! `--history-bytes`; the commit that begins it copies it into place through `log-copy`, so its
//! first block holds only its events' bytes), the remembered answers: `answers` (hash: answer
//! key to [`StoredAnswer`]) with `answered` (sorted set of the same keys by expiry, within a
//! budget of bytes kept in `meta` as `answers_bytes`) and `refused` (the refusals among them by
//! expiry, forgotten first past the budget), the presence `leases` (sorted set of client id by
//! lease end), and the bans: `bans` (hash: identity to an encoded `Ban`) with `banned` (sorted
//! set of the same identities by ban end; ended bans are purged by the next commit), and the
//! webhook cursors: `hooks` (hash: endpoint to `EPOCH:SEQ`, `hooks`). An empty room's keys
//! expire together after `--empty-room-ttl` counted from when it emptied or from its longest
//! ban's end, whichever is later; a room created anew deletes what an old one of the same id
//! left. Five keys span the
//! fleet: `roomctl:history` and `roomctl:wait-replicas` (`connection`), `roomctl:presence`
//! (`presence`), and `roomctl:rooms` with `roomctl:rooms:expiring` (`rooms`, the index behind
//! `ListRooms`); with webhooks, each endpoint's `roomctl:webhooks:ID:due` (`hooks`).
//!
//! **Atomicity** (`writer`, `commit`). Commands for a room queue to that room's writer on the
//! node, which takes them in batches: it reads what the batch needs (one MULTI), runs the room
//! engine in Rust over the batch, and commits with a Lua script (`commit.lua`) that applies the
//! membership changes and appends the events only if the room's `seq` and `epoch` are still the
//! ones read: a compare-and-set, retried on conflict. Two nodes racing on a room therefore never
//! lose an update nor reuse a `seq`, and one node never races itself. A writer keeps what it last
//! read or wrote (`Known`) for a second and runs the next batch on it without a read: what it has
//! not seen is assumed absent, and the commit script checks those assumptions too, so a busy room
//! costs one round trip per batch.
//!
//! **Live delivery** (`pubsub`, `feeds`). The commit script also publishes the new events on the
//! room's own channel. Each node runs a single listener, subscribed to the channels of the rooms
//! it has local subscribers in (and no others): it keeps a small cache of recent events per such
//! room (a `Feed`) and wakes them; subscribers read from that cache, and only a subscriber behind
//! the cache (replaying an old cursor) reads the stream itself. No connection or poll loop per
//! subscriber.
//!
//! **Faults** (`connection`). Every Redis operation has a deadline and fails with
//! `STORE_UNAVAILABLE`. The listener pings Redis; while it cannot, health is NOT_SERVING and every
//! feed is dropped, so open streams re-check the store and end `UNAVAILABLE`. When Redis answers
//! again the node serves again. A flushed or restarted Redis loses the room's `epoch` with its log,
//! so old cursors get `OUT_OF_RANGE`, never events of another log. Every node must trim logs alike:
//! the first node records its `--history` in Redis and a node with another one refuses to start;
//! and a read that finds the log shorter than expected answers `OUT_OF_RANGE` rather than skip the
//! gap.
//!
//! **Durability** (`keys`, `commit`). Redis can lose a log's tail (a restart from an AOF synced
//! every second, a promoted replica that had not received it) after clients saw it; new events
//! must then never reuse those seqs under the same epoch. Each commit records the Redis process
//! that made it, and the first commit made by another one (restarted, or promoted) starts a new
//! epoch, unless it continues its master's replication history and every shown event was
//! confirmed by replicas: with `--redis-wait-replicas N`, a commit is followed by `WAIT N` on the
//! same connection, and only then is it published and the room's `confirmed` seq raised; reads
//! never go past `confirmed`. A slot migrated whole to another cluster master keeps its epoch.
//!
//! **Parts.** `Shared` holds what every part uses (the connection, the settings, telemetry,
//! health) and the parts that own the rest, each keeping its fields to itself: `Writers` (the
//! room writers of this node), `Committer` (the scripts and the connection that waits for
//! replicas), `Feeds` (the rooms this node has subscribers in), `Presence` (this node's open
//! streams). `rooms` keeps the index behind `ListRooms` and `schedule` the due-time sets that
//! presence and the index share; neither holds state of its own. `hooks` is the store's side of
//! webhooks (`RedisOutbox`).

mod commit;
mod connection;
mod feeds;
mod hooks;
mod keys;
mod presence;
mod pubsub;
mod rooms;
mod schedule;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisResult, Value};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::{
    batch_of, Head, Lease, LogWindow, LoggedEvent, Opening, RoomSettings, RoomStore, Snapshot,
    READ_BATCH,
};
use crate::clock::Clock;
use crate::engine::{Applied, Ban, Caller, ClientStatus, Command};
use crate::error::Error;
use crate::pb;
use crate::telemetry::Telemetry;
use commit::Committer;
pub use connection::RedisUrl;
use connection::{recorded, Conn};
use feeds::Feeds;
pub use feeds::Notice;
use keys::{array, ban, entries, member, meta, millis, number, text, Keys};
pub use keys::{StoredAnswer, StoredMember, StoredRefusal, StoredReply};
use presence::Presence;
use pubsub::{listen, Notifier};
use writer::Writers;

/// How long a snapshot waits for the replicas of a room's newest commit to confirm it: longer
/// than the `WAIT` that asks them.
const UNCONFIRMED_PATIENCE: Duration = Duration::from_millis(1500);

/// Tuning of the Redis store; every node sharing a Redis must use the same values.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`, or `rediss://` for TLS.
    pub url: RedisUrl,
    /// PEM file of the CA to trust for `rediss://` instead of the system's trust store.
    pub ca_file: Option<std::path::PathBuf>,
    /// Replicas that must hold a commit before it is answered and shown to anyone (`WAIT`);
    /// 0: commits are answered and shown at once.
    pub wait_replicas: usize,
    /// The Redis Cluster's `cluster-node-timeout`: with replicas to wait for, a cluster master
    /// that has not heard from most masters within it refuses writes (it may have been
    /// replaced). None: read from the cluster when the store connects.
    pub cluster_node_timeout: Option<Duration>,
    /// What is kept of each room.
    pub rooms: RoomSettings,
}

impl RedisConfig {
    /// The node timeout in ms that commits check their master against (quorum.lua): only on a
    /// cluster, and only when they wait for replicas; 0 otherwise.
    fn quorum_ms(&self) -> u64 {
        match self.url.is_cluster() && self.wait_replicas > 0 {
            true => self
                .cluster_node_timeout
                .map_or(0, |t| t.as_millis() as u64),
            false => 0,
        }
    }
}

/// What every part of the store shares: the connection, the settings, the telemetry and the
/// health, and the parts that own the rest (each keeps its fields to itself).
struct Shared {
    conn: Conn,
    config: RedisConfig,
    telemetry: Telemetry,
    clock: Clock,
    /// Whether Redis answers, as this node's listener last saw.
    healthy: watch::Sender<bool>,
    /// Each busy room's writer on this node.
    writers: Writers,
    /// Sends commits and waits for their replicas.
    committer: Committer,
    /// The rooms this node has subscribers in, with their recent events.
    feeds: Feeds,
    /// This node's open client streams and their closes.
    presence: Arc<Presence>,
    /// Whether commits keep the fleet's room list themselves: one Redis, cluster mode off.
    commits_list_rooms: bool,
    /// With webhooks, each endpoint's set of due rooms, which commits make their room due in.
    webhook_keys: hooks::WebhookKeys,
}

/// The Redis [`RoomStore`].
pub struct RedisStore {
    shared: Arc<Shared>,
    _listener: AbortOnDropHandle<()>,
    _presence: Option<AbortOnDropHandle<()>>,
    _rooms: AbortOnDropHandle<()>,
}

impl RedisStore {
    /// Connects to the Redis at `config.url` and starts this node's listener.
    pub async fn connect(config: RedisConfig) -> Result<Self, Error> {
        Self::connect_with(config, Telemetry::off(), Clock::system()).await
    }

    /// Connects, with `telemetry` recording store operations, commits and the census, and
    /// `clock` telling the time (leases, bans, remembered answers; Redis's own clock expires
    /// keys).
    pub async fn connect_with(
        mut config: RedisConfig,
        telemetry: Telemetry,
        clock: Clock,
    ) -> Result<Self, Error> {
        let url = config.url.clone();
        let at = |err: Error| Error::StoreUnavailable(format!("{url}: {}", err.detail()));
        let mut conn = Conn::connect(&config).await.map_err(at)?;
        connection::agree_on_settings(&mut conn, &config).await?;
        let settled = connection::cluster_view(&mut conn, &mut config).await?;
        let commits_list_rooms = conn.spans_slots().await;
        let waiting = match config.wait_replicas {
            0 => None,
            _ => Some(Conn::connect(&config).await.map_err(at)?),
        };
        let committer = Committer::new(conn.clone(), waiting, &config, telemetry.clone());
        if let Some(epoch) = settled {
            committer.settle(epoch);
        }
        let (feeds, requests) = Feeds::new(&config.rooms);
        let shared = Arc::new(Shared {
            conn,
            presence: Arc::new(Presence::new(config.rooms.presence_timeout, clock)),
            config,
            telemetry,
            clock,
            healthy: watch::Sender::new(false),
            writers: Writers::default(),
            committer,
            feeds,
            commits_list_rooms,
            webhook_keys: hooks::WebhookKeys::new(),
        });
        // Subscribed before the store is handed out, so it serves (and says so) from the start.
        let notifier = Notifier::open(&shared).await?;
        shared.healthy.send_replace(true);
        let listener = tokio::spawn(listen(shared.clone(), notifier, requests));
        let presence = shared
            .config
            .rooms
            .presence_timeout
            .map(|timeout| tokio::spawn(presence::keep_presence(Arc::downgrade(&shared), timeout)))
            .map(AbortOnDropHandle::new);
        let ttl = shared.config.rooms.empty_room_ttl;
        let rooms = tokio::spawn(rooms::keep_rooms(Arc::downgrade(&shared), ttl));
        Ok(Self {
            shared,
            _listener: AbortOnDropHandle::new(listener),
            _presence: presence,
            _rooms: AbortOnDropHandle::new(rooms),
        })
    }
}

impl Shared {
    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs Redis operation `op` with the store's deadline, and records it.
    async fn timed<T>(
        &self,
        op: &'static str,
        run: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Error> {
        recorded(&self.telemetry, op, run).await
    }
}

impl RedisStore {
    /// The window readers see of the room `meta` describes: up to its visible seq, from the
    /// oldest event its log holds (trimmed by count or by bytes).
    fn window(&self, meta: &keys::Meta) -> LogWindow {
        let mut window = LogWindow::of(
            &meta.epoch,
            meta.visible(),
            self.shared.config.rooms.history,
        );
        if let Some(oldest) = meta.oldest {
            window.oldest_seq = window.oldest_seq.max(oldest.min(window.newest_seq + 1));
        }
        window
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
        self.shared.submit(room_id, caller, cmd).await
    }

    async fn snapshot(&self, room_id: &str) -> Result<Snapshot, Error> {
        let keys = Keys::new(room_id);
        let mut pipe = keys.read_meta();
        pipe.cmd("HVALS")
            .arg(&keys.members)
            .cmd("ZRANGE")
            .arg(&keys.leases)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        // A commit waiting for its replicas has changed the members already but not the seq a
        // snapshot is labelled with (the confirmed one): such a snapshot would hold changes
        // that `Events` from its seq delivers again, or that a failover takes back. Read again
        // once the replicas have answered (their `WAIT` gives up within a second).
        let started = tokio::time::Instant::now();
        let mut reconfirmed = false;
        let (meta, members_reply, leases) = loop {
            let (meta_reply, members_reply, leases): (Value, Value, Value) = self
                .shared
                .timed("snapshot", pipe.query_async(&mut self.shared.conn()))
                .await?;
            let Some(meta) = meta(meta_reply)? else {
                return Err(Error::room_not_found(room_id));
            };
            if meta.visible() == meta.seq {
                break (meta, members_reply, leases);
            }
            if !reconfirmed {
                // A commit its replicas did not confirm in time stays hidden until one of the
                // room is: in a quiet room no later commit would come, so ask for it now.
                reconfirmed = true;
                let committer = &self.shared.committer;
                committer.reconfirm(&keys, room_id, &meta.epoch).await?;
                continue;
            }
            if started.elapsed() > UNCONFIRMED_PATIENCE {
                return Err(Error::StoreUnavailable(
                    "the room's newest change is not confirmed by its replicas yet".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut members = Vec::new();
        for value in array(members_reply) {
            members.extend(member(&value)?);
        }
        members.sort_unstable_by_key(|(_, join_seq)| *join_seq);
        let connected = self
            .shared
            .presence
            .connected(leases, self.shared.clock.now());
        Ok(Snapshot {
            participants: members
                .into_iter()
                .map(|(mut p, _)| {
                    p.connected = connected.contains(&p.client_id);
                    p
                })
                .collect(),
            window: self.window(&meta),
            locked: meta.locked,
        })
    }

    async fn bans(&self, room_id: &str) -> Result<Vec<Ban>, Error> {
        let keys = Keys::new(room_id);
        let mut pipe = keys.read_meta();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&keys.banned)
            .arg(format!("({}", millis(self.shared.clock.now())))
            .arg("+inf");
        let (meta_reply, identities): (Value, Vec<String>) = self
            .shared
            .timed("bans", pipe.query_async(&mut self.shared.conn()))
            .await?;
        if meta(meta_reply)?.is_none() {
            return Err(Error::room_not_found(room_id));
        }
        if identities.is_empty() {
            return Ok(Vec::new());
        }
        // Read after the order: a ban lifted in between is skipped, never shown half.
        let values: Vec<Value> = self
            .shared
            .timed(
                "bans",
                redis::cmd("HMGET")
                    .arg(&keys.bans)
                    .arg(&identities)
                    .query_async(&mut self.shared.conn()),
            )
            .await?;
        let mut bans = Vec::with_capacity(values.len());
        for value in &values {
            bans.extend(ban(value)?);
        }
        Ok(bans)
    }

    async fn list_rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::RoomSummary>, Error> {
        self.shared.list_rooms(after, limit).await
    }

    async fn open(&self, room_id: &str, client_id: Option<&str>) -> Result<Opening, Error> {
        let head = self.shared.feeds.subscribe(room_id).await?;
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
            // A client that comes back renews its lease at once, before a round could miss it.
            self.shared.presence.renew(&mut pipe, &keys, client_id);
        }
        let replies: Vec<Value> = self
            .shared
            .timed("open", pipe.query_async(&mut self.shared.conn()))
            .await?;
        let mut replies = replies.into_iter();
        let Some(meta) = meta(replies.next().unwrap_or(Value::Nil))? else {
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
        let lease = match (
            &client,
            client_id,
            self.shared.config.rooms.presence_timeout,
        ) {
            (ClientStatus::Present { .. }, Some(client_id), Some(_)) => {
                Lease::new(self.shared.presence.hold(room_id, client_id))
            }
            _ => Lease::none(),
        };
        Ok(Opening {
            window: self.window(&meta),
            client,
            head,
            lease,
        })
    }

    async fn read(
        &self,
        room_id: &str,
        epoch: &str,
        after: u64,
    ) -> Result<Vec<Arc<LoggedEvent>>, Error> {
        if let Some(cached) = self
            .shared
            .feeds
            .get(room_id)
            .and_then(|f| f.read(epoch, after))
        {
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
        let Some(meta) = meta(meta_reply)? else {
            return Err(Error::room_not_found(room_id));
        };
        let window = self.window(&meta);
        if meta.epoch != epoch {
            return Err(window.out_of_range());
        }
        window.check_readable(after)?;
        // Events past the confirmed seq are still waiting for their replicas.
        let visible = window.newest_seq;
        let mut events = entries(range)?;
        events.retain(|event| event.seq <= visible);
        let events = batch_of(events, |event| event.size());
        // The log may hold less than this node's history says (a tail lost by Redis, a log
        // trimmed by hand): a read that does not start right after the cursor is a gap, never
        // passed off as complete.
        let first = events.first().map_or(visible.saturating_add(1), |e| e.seq);
        if after < visible && first != after + 1 {
            let held = LogWindow {
                oldest_seq: first,
                ..window
            };
            return Err(held.out_of_range());
        }
        Ok(events)
    }

    async fn rewatch(&self, room_id: &str) -> Result<watch::Receiver<Head>, Error> {
        let head = self.shared.feeds.subscribe(room_id).await?;
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

    fn outbox(&self, endpoints: &[super::OutboxEndpoint]) -> Arc<dyn super::Outbox> {
        Arc::new(hooks::RedisOutbox::new(self.shared.clone(), endpoints))
    }
}
