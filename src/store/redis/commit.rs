//! The commit of a batch as the Redis scripts see it: `commit.lua` (the compare-and-set that
//! applies a batch atomically) and `confirm.lua` (which shows it once replicas hold it), the
//! one typed pair that packs a commit's arguments ([`Commit::invoke`]) and reads its reply
//! ([`Committed::of`]), and the [`Committer`] that sends them and waits for replicas (and, with
//! `reconfirm.lua`, confirms on demand what a commit left hidden). The
//! scripts' argument order lives here and at the top of each script, nowhere else; what a batch
//! commits is decided by the writer, never here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;

use super::connection::{recorded, unavailable, Conn, OP_TIMEOUT};
use super::feeds::Notice;
use super::keys::{channel, entries, millis, Keys, StoredAnswer, StoredMember};
use super::RedisConfig;
use crate::engine::{Applied, Ban, Change, Reply, ANSWER_OVERHEAD};
use crate::error::Error;
use crate::pb;
use crate::telemetry::Telemetry;

/// `commit.lua`, after the `quorum.lua` it calls.
pub(super) const COMMIT: &str = concat!(include_str!("quorum.lua"), include_str!("commit.lua"));
/// `confirm.lua`.
pub(super) const CONFIRM: &str = include_str!("confirm.lua");
/// `reconfirm.lua`, after the `quorum.lua` it calls.
const RECONFIRM: &str = concat!(include_str!("quorum.lua"), include_str!("reconfirm.lua"));
/// What commit.lua answers when its master is out of touch with most of the cluster's masters.
const OUT_OF_TOUCH: i64 = -1_000_000;
/// What commit.lua answers, minus the cluster's current epoch, when an election is under way.
const ELECTING: i64 = -1_000_000_000_000;

/// Where commits go and what they wait for. Commits go to the room's master; with
/// `--redis-wait-replicas` each is followed by its `WAIT` on a connection of their own.
pub(super) struct Committer {
    conn: Conn,
    /// With `--redis-wait-replicas`, the connection commits and their `WAIT`s go through: a
    /// `WAIT` holds its connection until the replicas answer (up to a second when they do not),
    /// and reads and the health ping must not queue behind it.
    waiting: Option<Conn>,
    /// Replicas each commit waits for (`--redis-wait-replicas`).
    wait_replicas: usize,
    /// The cluster's node timeout in ms, within which a master must have heard from most
    /// masters to write what waits for replicas (quorum.lua; 0: no such check).
    quorum_ms: u64,
    /// The cluster epochs quorum.lua takes for no election under way.
    epochs: Mutex<Epochs>,
    /// The warnings about commits refused or left unconfirmed, one of each kind per
    /// [`WARN_EVERY`].
    warnings: Warnings,
    /// Whether the last commit found its master with fewer replicas than it waits for (or no
    /// commit has shown it yet): then commits go without their `WAIT` in the same round trip,
    /// which would wait out its timeout after a refusal (a hint: a cluster's masters may
    /// differ; both ways are correct).
    short_of_replicas: AtomicBool,
    commit: redis::Script,
    confirm: redis::Script,
    reconfirm: redis::Script,
    telemetry: Telemetry,
}

impl Committer {
    /// Commits through `conn`, or, when `config` waits for replicas, through `waiting` with
    /// their `WAIT`s.
    pub(super) fn new(
        conn: Conn,
        waiting: Option<Conn>,
        config: &RedisConfig,
        telemetry: Telemetry,
    ) -> Self {
        Self {
            conn,
            waiting,
            wait_replicas: config.wait_replicas,
            quorum_ms: config.quorum_ms(),
            epochs: Mutex::new(Epochs::default()),
            warnings: Warnings::default(),
            // Until a commit shows the replicas are there: a node started on a master without
            // them answers its very first commit at once too.
            short_of_replicas: AtomicBool::new(true),
            commit: redis::Script::new(COMMIT),
            confirm: redis::Script::new(CONFIRM),
            reconfirm: redis::Script::new(RECONFIRM),
            telemetry,
        }
    }

    /// The refusal of a commit quorum.lua fenced off, `why`, warned of under `warning`.
    fn fence(warning: &Warning, why: String) -> Error {
        if let Some(refused_since_last_line) = warning.due(Instant::now()) {
            tracing::warn!(
                refused_since_last_line,
                "{why}: commits are refused (UNAVAILABLE, nothing applied) until it is safe \
                 to write there again"
            );
        }
        Error::StoreUnavailable(format!("{why}; nothing was applied, retry later"))
    }

    /// Takes `epoch`, the cluster's current epoch when the node connected, for settled: no
    /// election can be told from the cluster's state alone then.
    pub(super) fn settle(&self, epoch: u64) {
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        epochs.settled = epochs.settled.max(epoch);
    }

    /// Notes that commits found an election under way at `epoch`.
    fn saw_election(&self, epoch: u64) {
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        if epochs.electing.is_none_or(|(known, _)| known != epoch) {
            epochs.electing = Some((epoch, Instant::now()));
        }
    }

    /// The newest cluster epoch known to be settled, for quorum.lua: the one the node started
    /// from, or one seen for longer than an election can last (Redis gives up on one after
    /// twice the node timeout, at least 2 s), which therefore failed.
    fn settled_epoch(&self) -> u64 {
        if self.quorum_ms == 0 {
            return 0;
        }
        let longest = 2 * self.quorum_ms.max(1000) + 1000;
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((epoch, since)) = epochs.electing {
            if since.elapsed().as_millis() as u64 > longest {
                epochs.settled = epochs.settled.max(epoch);
                epochs.electing = None;
            }
        }
        epochs.settled
    }

    /// How a commit's `notice` goes out: with the commit (the publish command and the notice),
    /// or, when commits wait for replicas, held back for [`Committer::confirm`] to publish once
    /// they hold it.
    pub(super) fn publishing(&self, notice: Vec<u8>) -> (Publish, Option<Vec<u8>>) {
        match self.waiting {
            Some(_) => (None, Some(notice)),
            None => (Some((self.conn.publish_command(), notice)), None),
        }
    }

    /// Runs `commit` on the room's master (with its `WAIT`, when commits wait for replicas).
    /// Answers Conflict or NewEpoch when nothing was applied and the batch must run again;
    /// refuses with NOT_ENOUGH_REPLICAS a master short of replicas. A commit sent whose answer
    /// never came is `OutcomeUnknown`: it may have been applied, and its callers must be told so.
    pub(super) async fn commit(
        &self,
        keys: &Keys,
        room_id: &str,
        commit: &Commit<'_>,
    ) -> Result<Committed, Error> {
        let call = commit.invoke(&self.commit, keys, self.settled_epoch());
        let started = Instant::now();
        let replicas = self.wait_replicas;
        let committing = async {
            match self.waiting.clone() {
                Some(mut conn) => {
                    let pipelined = !self.short_of_replicas.load(Ordering::Relaxed);
                    conn.commit_and_wait(&call, &keys.meta, replicas, pipelined)
                        .await
                }
                None => call
                    .invoke_async(&mut self.conn.clone())
                    .await
                    .map(|done| (done, 0)),
            }
        };
        let answer = tokio::time::timeout(OP_TIMEOUT, committing).await;
        let ok = matches!(answer, Ok(Ok(_)));
        self.telemetry.store_op("commit", ok, started.elapsed());
        let (committed, acked) = match answer {
            Ok(Ok((reply, acked))) => (Committed::of(reply), acked),
            // Refused before anything was sent, or refused by Redis: nothing was applied. Not
            // so on a cluster, whose client resends once by itself: its refusal may follow a
            // first send that applied (a master killed mid-commit, its replica holding the
            // commit), which the fault harness caught answered STORE_UNAVAILABLE.
            Ok(Err(err))
                if !self.conn.resends() && (err.is_connection_refusal() || !err.is_io_error()) =>
            {
                return Err(unavailable(err))
            }
            Ok(Err(_)) | Err(_) => return Err(Error::OutcomeUnknown { request_id: None }),
        };
        let short = matches!(committed, Committed::ShortOfReplicas { .. });
        self.short_of_replicas.store(short, Ordering::Relaxed);
        let warnings = &self.warnings;
        match committed {
            Committed::Conflict => self.telemetry.commit_conflict(),
            Committed::OutOfTouch => {
                let why = format!(
                    "the Redis master of room {room_id} has not heard from most of the cluster's \
                     masters within --redis-cluster-node-timeout ({} ms), so it may have been \
                     replaced",
                    self.quorum_ms
                );
                return Err(Self::fence(&warnings.out_of_touch, why));
            }
            Committed::Electing { epoch } => {
                self.saw_election(epoch);
                let why = format!(
                    "the Redis master of room {room_id} sees an election under way in the \
                     cluster (epoch {epoch}), whose winner may lack what it takes now"
                );
                return Err(Self::fence(&warnings.electing, why));
            }
            Committed::ShortOfReplicas { online } => {
                if let Some(refused_since_last_line) =
                    warnings.short_of_replicas.due(Instant::now())
                {
                    tracing::warn!(
                        room_id,
                        online,
                        replicas,
                        refused_since_last_line,
                        "the Redis master of this room has fewer online replicas than \
                         --redis-wait-replicas: its commits are refused (UNAVAILABLE, not \
                         applied) until it has them"
                    );
                }
                return Err(Error::NotEnoughReplicas {
                    online,
                    needed: replicas,
                });
            }
            Committed::NewEpoch => {
                tracing::warn!(
                    room_id,
                    "the Redis holding this room restarted or failed over since its last commit, \
                     so its log may have lost its newest events: the room continues under a new \
                     epoch, and older cursors get OUT_OF_RANGE"
                );
                self.telemetry.commit_conflict();
            }
            Committed::Applied { .. } => {
                self.telemetry.events_appended(commit.changes.events.len());
                if self.waiting.is_some() && acked < replicas as i64 {
                    if let Some(unconfirmed_since_last_line) =
                        warnings.unconfirmed.due(Instant::now())
                    {
                        tracing::warn!(
                            room_id,
                            acked,
                            replicas,
                            unconfirmed_since_last_line,
                            "a commit was not confirmed by enough replicas in time: its callers \
                             are answered OUTCOME_UNKNOWN, and its events stay hidden until its \
                             replicas confirm it (a later commit, or a retry or snapshot of the \
                             room asking for it)"
                        );
                    }
                    return Err(Error::OutcomeUnknown { request_id: None });
                }
            }
        }
        Ok(committed)
    }

    /// Shows a commit its replicas hold: raises the room's confirmed seq to `newest` and
    /// publishes the commit's notice. A commit whose confirmation fails is durable but hidden
    /// until a later one of the room is confirmed, or [`Committer::reconfirm`] confirms it; its
    /// callers are told the outcome is unknown.
    pub(super) async fn confirm(
        &self,
        keys: &Keys,
        room_id: &str,
        newest: (&str, u64),
        notice: Vec<u8>,
    ) -> Result<(), Error> {
        let call = confirm(
            &self.confirm,
            keys,
            newest,
            (self.conn.publish_command(), &channel(room_id), &notice),
        );
        let mut conn = self.conn.clone();
        recorded(
            &self.telemetry,
            "confirm",
            call.invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
        .map_err(|_| Error::OutcomeUnknown { request_id: None })
    }

    /// Confirms on demand what the room's commits left hidden (their replicas did not confirm
    /// them in time, and no later commit of the room has been confirmed since): a write to the
    /// room's master and its `WAIT` (the replicas' acknowledgement of it covers every earlier
    /// write), then the hidden events read back and confirm.lua run with them, so the room is
    /// shown whole again without waiting for its next change. Only in `epoch`, the one the
    /// caller saw: every step checks the room is still in it (a room forgotten and created
    /// anew meanwhile has its own confirmations). Whether it did: false when nothing was
    /// hidden, commits do not wait for replicas, the room left the epoch, or the replicas still
    /// do not answer.
    pub(super) async fn reconfirm(
        &self,
        keys: &Keys,
        room_id: &str,
        epoch: &str,
    ) -> Result<bool, Error> {
        let Some(seq) = self.replicated(keys, epoch, None).await? else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let mut meta = redis::cmd("HMGET");
        meta.arg(&keys.meta).arg(&["epoch", "confirmed"]);
        let (current, confirmed): (Option<String>, Option<u64>) =
            recorded(&self.telemetry, "reconfirm", meta.query_async(&mut conn)).await?;
        if current.as_deref() != Some(epoch) {
            return Ok(false);
        }
        let confirmed = confirmed.unwrap_or(0);
        let mut range = redis::cmd("XRANGE");
        range
            .arg(&keys.log)
            .arg(format!("0-{}", confirmed + 1))
            .arg(format!("0-{seq}"));
        let range = recorded(&self.telemetry, "reconfirm", range.query_async(&mut conn)).await?;
        let events = entries(range)?;
        let hidden: Vec<&pb::Event> = events.iter().map(|event| &***event).collect();
        let notice = Notice::publish(room_id, &hidden);
        self.confirm(keys, room_id, (epoch, seq), notice).await?;
        Ok(true)
    }

    /// Whether the replicas hold everything the room's master holds now, in `epoch` (always
    /// so when commits do not wait for them): what a remembered refusal needs before it is
    /// answered again, since its commit leaves the seq as it was and so is never counted
    /// hidden; one whose own `WAIT` failed could still be lost in a failover, and the request
    /// then applied after all. A write and its `WAIT`, as for [`Committer::reconfirm`], on a
    /// master that holds every answer key of `held` (the refusals were read on another
    /// connection, which may still reach a master its successor replaced).
    pub(super) async fn vouch(
        &self,
        keys: &Keys,
        epoch: &str,
        held: &[String],
    ) -> Result<bool, Error> {
        if self.waiting.is_none() {
            return Ok(true);
        }
        Ok(self.replicated(keys, epoch, Some(held)).await?.is_some())
    }

    /// A write of the room's seq to its master (in `epoch`; when something is hidden, or when
    /// vouching for the answer keys of `held`, all held there) and its `WAIT`: the seq, once
    /// enough replicas hold it and so every earlier write; None when nothing was written or too
    /// few replicas answered.
    async fn replicated(
        &self,
        keys: &Keys,
        epoch: &str,
        held: Option<&[String]>,
    ) -> Result<Option<u64>, Error> {
        let Some(mut waiting) = self.waiting.clone() else {
            return Ok(None);
        };
        let mut call = self.reconfirm.prepare_invoke();
        call.key(&keys.meta).arg(epoch);
        match held {
            Some(held) => {
                call.key(&keys.answers)
                    .arg("1")
                    .arg(self.quorum_ms)
                    .arg(self.settled_epoch())
                    .arg(held);
            }
            None => {
                call.arg("").arg(self.quorum_ms).arg(self.settled_epoch());
            }
        }
        // Not pipelined: the script may be new to this master (a first use, a failover), and
        // a `WAIT` sent with an unknown script would wait out its timeout for nothing before
        // the one that counts, past the call's own.
        let waited = waiting.commit_and_wait(&call, &keys.meta, self.wait_replicas, false);
        let (seq, acked) = recorded(&self.telemetry, "reconfirm", waited).await?;
        if seq < 1 || acked < self.wait_replicas as i64 {
            return Ok(None);
        }
        Ok(Some(seq as u64))
    }
}

/// The command that publishes a commit's notice, and the notice, for the commit script to
/// publish with the commit (None: not now; confirm.lua publishes it once replicas hold it).
pub(super) type Publish = Option<(&'static str, Vec<u8>)>;

/// What a batch assumed absent without having read it: member ids, answer keys, and identities
/// without a ban in force. The commit script checks each.
#[derive(Debug, Default)]
pub(super) struct Assumed<'a> {
    pub(super) ids: Vec<&'a str>,
    pub(super) answers: Vec<&'a str>,
    pub(super) bans: Vec<&'a str>,
}

impl Assumed<'_> {
    /// Whether the batch assumed nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.answers.is_empty() && self.bans.is_empty()
    }
}

/// What the room's settings say of every commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    /// Events the log keeps (`--history`).
    pub(super) history: usize,
    /// Bytes of events the log keeps (`--history-bytes`).
    pub(super) history_bytes: usize,
    /// How long an empty room's keys live, in ms (`--empty-room-ttl`, at least 1).
    pub(super) empty_room_ttl_ms: u64,
    /// Bytes of remembered answers a room keeps.
    pub(super) answer_bytes: usize,
    /// A joined client's grace to open a stream, in ms (0: presence off).
    pub(super) presence_ms: u64,
    /// Replicas every commit waits for (0: none).
    pub(super) wait_replicas: usize,
    /// The cluster's node timeout in ms when commits wait for replicas (0: not checked).
    pub(super) quorum_ms: u64,
}

impl Bounds {
    /// The bounds `config` sets.
    pub(super) fn of(config: &RedisConfig) -> Self {
        let rooms = &config.rooms;
        Bounds {
            history: rooms.history,
            history_bytes: rooms.history_bytes,
            empty_room_ttl_ms: rooms.empty_room_ttl.as_millis().max(1) as u64,
            answer_bytes: rooms.limits.answer_bytes,
            presence_ms: rooms.presence_timeout.map_or(0, |t| t.as_millis() as u64),
            wait_replicas: config.wait_replicas,
            quorum_ms: config.quorum_ms(),
        }
    }
}

/// One commit of a room's batch: where the room must stand, and every change to make.
#[derive(Debug)]
pub(super) struct Commit<'a> {
    pub(super) bounds: Bounds,
    /// The seq the batch ran on; None: the room must not exist yet.
    pub(super) expected: Option<u64>,
    /// The room's epoch (a new room's, when `expected` is None).
    pub(super) epoch: &'a str,
    /// The epoch to start if the log must begin anew.
    pub(super) fresh_epoch: String,
    /// The room's channel.
    pub(super) channel: String,
    /// The notice of the commit's events and the command that publishes it (None: not now;
    /// confirm.lua publishes it once replicas hold the commit).
    pub(super) publish: Publish,
    pub(super) now: SystemTime,
    pub(super) assumed: Assumed<'a>,
    pub(super) changes: Changes<'a>,
    /// On one Redis, the fleet's room list for the commit to keep; None on a cluster, where the
    /// writer keeps it around the commit.
    pub(super) listing: Option<Listing<'a>>,
    /// Whether webhooks are on: a room left empty then keeps its keys until every endpoint has
    /// its events.
    pub(super) webhooks: bool,
}

/// What a commit needs to keep the fleet's room list itself: the room's id, the list's key and
/// the key of the schedule of rooms left empty; and the webhook endpoints' sets of due rooms to
/// make the room due in (none when the writer does it, after replicas confirmed the commit).
#[derive(Debug, Clone, Copy)]
pub(super) struct Listing<'a> {
    pub(super) room_id: &'a str,
    pub(super) rooms: &'a str,
    pub(super) expiring: &'a str,
    pub(super) due: &'a [String],
}

/// A batch's changes, sorted by what the commit script does with them.
#[derive(Debug, Default)]
pub(super) struct Changes<'a> {
    /// The events, in seq order.
    pub(super) events: Vec<&'a pb::Event>,
    /// The clients the batch times out (their leases must still be lapsed).
    timed_out: Vec<&'a str>,
    /// The room's lock after the batch, if the batch changed it.
    locked: Option<bool>,
    joins: Vec<(&'a pb::Participant, u64)>,
    /// Departed clients: id, owning identity, the seq that ends their streams.
    departures: Vec<(&'a str, &'a str, u64)>,
    /// Remembered answers: key, encoding, expiry (ms), whether it is a refusal.
    answers: Vec<(&'a str, Vec<u8>, u64, bool)>,
    /// Bans set (Some) and lifted (None), in order.
    bans: Vec<(&'a str, Option<&'a Ban>)>,
}

impl<'a> Changes<'a> {
    /// The changes of the batch's `applied` commands.
    pub(super) fn of(applied: &[&'a Applied]) -> Self {
        let mut changes = Changes {
            events: applied.iter().flat_map(|a| &a.events).collect(),
            ..Changes::default()
        };
        for applied in applied {
            if let Reply::TimedOut(removed) = &applied.reply {
                changes.timed_out.extend(removed.iter().map(String::as_str));
            }
            if let Some(answer) = &applied.remembered {
                if let Some(stored) = StoredAnswer::of(answer) {
                    let expires_at_ms = stored.expires_at_ms;
                    let refusal = matches!(answer.reply, Reply::Refused(_));
                    let value = stored.encode_to_vec();
                    changes
                        .answers
                        .push((&answer.key, value, expires_at_ms, refusal));
                }
            }
            for change in &applied.changes {
                match change {
                    Change::Joined {
                        participant,
                        join_seq,
                    } => changes.joins.push((participant, *join_seq)),
                    Change::Departed {
                        client_id,
                        identity,
                        end_seq,
                    } => changes.departures.push((client_id, identity, *end_seq)),
                    Change::Locked(locked) => changes.locked = Some(*locked),
                    Change::Banned(ban) => changes.bans.push((&ban.identity, Some(ban))),
                    Change::Unbanned { identity } => changes.bans.push((identity, None)),
                }
            }
        }
        changes
    }
}

impl Commit<'_> {
    /// The invocation of `script` (commit.lua) on the room's `keys` with this commit's
    /// arguments, in the order the script reads them.
    /// `settled`: the newest cluster epoch known to be settled (quorum.lua).
    pub(super) fn invoke<'s>(
        &self,
        script: &'s redis::Script,
        keys: &Keys,
        settled: u64,
    ) -> redis::ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        for key in keys.room() {
            call.key(key);
        }
        call.key(&keys.log_copy);
        if let Some(listing) = &self.listing {
            call.key(listing.rooms).key(listing.expiring);
            for due in listing.due {
                call.key(due);
            }
        }
        let (publish, notice) = match &self.publish {
            Some((command, notice)) => (*command, notice.as_slice()),
            None => ("", &[][..]),
        };
        call.arg(self.expected.map_or(String::new(), |seq| seq.to_string()))
            .arg(self.epoch)
            .arg(self.bounds.history)
            .arg(self.bounds.empty_room_ttl_ms)
            .arg(&self.channel)
            .arg(notice)
            .arg(millis(self.now))
            .arg(self.bounds.answer_bytes)
            .arg(self.bounds.presence_ms)
            .arg(match self.changes.locked {
                None => "",
                Some(true) => "1",
                Some(false) => "0",
            })
            .arg(publish)
            .arg(&self.fresh_epoch)
            .arg(self.bounds.wait_replicas)
            .arg(self.bounds.history_bytes)
            .arg(self.listing.map_or("", |listing| listing.room_id))
            .arg(if self.webhooks { "1" } else { "" })
            .arg(ANSWER_OVERHEAD)
            .arg(self.bounds.quorum_ms)
            .arg(settled);
        for list in [
            &self.assumed.ids,
            &self.assumed.answers,
            &self.changes.timed_out,
        ] {
            call.arg(list.len());
            for item in list {
                call.arg(*item);
            }
        }
        call.arg(self.assumed.bans.len());
        for identity in &self.assumed.bans {
            call.arg(*identity);
        }
        let changes = &self.changes;
        call.arg(changes.events.len());
        for event in &changes.events {
            call.arg(event.seq).arg(event.encode_to_vec());
        }
        call.arg(changes.joins.len());
        for (participant, join_seq) in &changes.joins {
            let stored = StoredMember {
                join_seq: *join_seq,
                participant: Some((*participant).clone()),
            };
            call.arg(&participant.client_id).arg(stored.encode_to_vec());
        }
        call.arg(changes.departures.len());
        for (client_id, identity, end_seq) in &changes.departures {
            call.arg(*client_id).arg(*identity).arg(*end_seq);
        }
        call.arg(changes.answers.len());
        for (key, value, expires_at_ms, refusal) in &changes.answers {
            call.arg(*key)
                .arg(value)
                .arg(*expires_at_ms)
                .arg(if *refusal { "1" } else { "" });
        }
        call.arg(changes.bans.len());
        for (identity, ban) in &changes.bans {
            match ban {
                Some(ban) => call
                    .arg(*identity)
                    .arg(millis(ban.until))
                    .arg(ban.to_pb().encode_to_vec()),
                // A lift: no end, no ban.
                None => call.arg(*identity).arg(0).arg(""),
            };
        }
        call
    }
}

/// The invocation of `script` (confirm.lua) that shows a commit of the room whose keys are `keys`
/// once replicas hold it: the commit's `epoch` and newest `seq`, and the `notice` to publish
/// with `publish` on `channel`.
pub(super) fn confirm<'s>(
    script: &'s redis::Script,
    keys: &Keys,
    (epoch, seq): (&str, u64),
    (publish, channel, notice): (&str, &str, &[u8]),
) -> redis::ScriptInvocation<'s> {
    let mut call = script.prepare_invoke();
    call.key(&keys.meta)
        .arg(epoch)
        .arg(seq)
        .arg(publish)
        .arg(channel)
        .arg(notice);
    call
}

/// How often each kind of warning about commits is written while it recurs.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The warnings a [`Committer`] writes about commits refused or left unconfirmed, each at most
/// once per [`WARN_EVERY`], counting the commits it stands for. A node's commits go to every
/// master, so one master's refusals interleave with the others' successes: a line per spell of
/// refusals (between two successes) was still thousands in a 25-minute fault run.
#[derive(Default)]
struct Warnings {
    /// The master has not heard from most masters (quorum.lua).
    out_of_touch: Warning,
    /// The master sees an election under way (quorum.lua).
    electing: Warning,
    /// The master has fewer online replicas than commits wait for.
    short_of_replicas: Warning,
    /// A commit's replicas did not confirm it in time.
    unconfirmed: Warning,
}

/// One kind of warning: when its last line was written, and how often it recurred since.
#[derive(Default)]
struct Warning(Mutex<Option<(Instant, u64)>>);

impl Warning {
    /// Counts one more occurrence, at `now`. Answers, when a line is due (the first, or one
    /// [`WARN_EVERY`] or more after the last line), how many occurrences it stands for: this
    /// one and those held back since the last line, however long ago that was.
    fn due(&self, now: Instant) -> Option<u64> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *last {
            Some((at, since)) if now.saturating_duration_since(*at) < WARN_EVERY => {
                *since += 1;
                None
            }
            _ => {
                let count = last.map_or(0, |(_, since)| since) + 1;
                *last = Some((now, 0));
                Some(count)
            }
        }
    }
}

/// The cluster epochs a [`Committer`] knows of (see quorum.lua).
#[derive(Debug, Default)]
struct Epochs {
    /// The newest known to be settled: no election under way at it.
    settled: u64,
    /// One commits found an election under way at, and since when.
    electing: Option<(u64, Instant)>,
}

/// What the commit script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committed {
    /// Nothing changed: the room moved on since the batch read it, or an assumption failed.
    Conflict,
    /// Nothing of the batch changed: the room's log began anew under a new epoch (the Redis
    /// holding it restarted or failed over), and the batch must run again on it.
    NewEpoch,
    /// Nothing changed: the cluster master has not heard from most masters within the node
    /// timeout, so a replica may have replaced it (quorum.lua).
    OutOfTouch,
    /// Nothing changed: the cluster master sees an election under way, at the cluster's
    /// current `epoch`, whose winner may lack what it would take now (quorum.lua).
    Electing {
        /// The cluster's current epoch.
        epoch: u64,
    },
    /// Nothing changed: the master has `online` replicas, fewer than commits wait for.
    ShortOfReplicas {
        /// Its online replicas.
        online: usize,
    },
    /// Applied; when the commit left the room empty, when its keys expire (ms since 1970).
    Applied {
        /// The keys' expiry, for a room left empty.
        empty_until: Option<u64>,
    },
}

impl Committed {
    /// The script's integer reply: 0, -1, -2 minus the online replicas, [`OUT_OF_TOUCH`],
    /// [`ELECTING`] minus an epoch, 1, or an expiry.
    pub(super) fn of(reply: i64) -> Self {
        match reply {
            0 => Committed::Conflict,
            -1 => Committed::NewEpoch,
            OUT_OF_TOUCH => Committed::OutOfTouch,
            n if n <= ELECTING => Committed::Electing {
                epoch: (ELECTING - n) as u64,
            },
            n if n <= -2 => Committed::ShortOfReplicas {
                online: usize::try_from(-2 - n).unwrap_or(0),
            },
            1 => Committed::Applied { empty_until: None },
            at => Committed::Applied {
                empty_until: Some(at as u64),
            },
        }
    }
}

#[cfg(test)]
#[path = "commit_tests.rs"]
mod tests;
