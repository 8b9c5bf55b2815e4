//! Writing: one writer per busy room on a node, taking queued commands in batches, running the
//! engine on what it knows or reads, and committing with the compare-and-set script.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::connection::{unavailable, OP_TIMEOUT};
use super::keys::{
    array, ban, bytes, corrupt, member, meta, millis, number, score_of, Keys, Meta, StoredAnswer,
    StoredMember,
};
use super::listener::{channel, Notice};
use super::{RedisConfig, Shared};
use crate::engine::{self, Applied, Ban, Caller, Change, Command, Remembered, Reply, RoomState};
use crate::error::Error;
use crate::pb;

/// Commit attempts before giving up on a room under heavy contention.
pub(super) const MAX_ATTEMPTS: usize = 100;
/// Commands queued per room on this node; callers wait (backpressure) beyond it.
pub(super) const QUEUE: usize = 1024;
/// Most commands one writer applies with one read and one commit.
pub(super) const MAX_BATCH: usize = 64;
/// How long a room's writer outlives its last command.
pub(super) const WRITER_IDLE: Duration = Duration::from_secs(5);
/// How long a writer trusts what it knows of its room before reading it again. Remembered drop
/// answers it holds may outlive their Redis expiry by at most this much.
pub(super) const KNOWN_FOR: Duration = Duration::from_secs(1);
/// Most member ids a writer keeps track of before it reads its room again instead.
pub(super) const KNOWN_IDS: usize = 50_000;

/// What a room's writer knows of its room at the `seq` of its last read or commit: the room's state
/// restricted to what it has seen, and which member ids, answers (by key) and identities' bans it
/// knows to be present or absent there. A batch runs on it without reading Redis; anything else the
/// batch looks at is assumed absent, and the commit script checks those assumptions along with the
/// `seq`, so a stale guess is a conflict, never a wrong answer.
pub(super) struct Known {
    pub(super) state: Option<RoomState>,
    pub(super) ids: HashSet<String>,
    pub(super) answers: HashSet<String>,
    pub(super) bans: HashSet<String>,
    pub(super) read_at: Instant,
}

impl Known {
    pub(super) fn usable(&self) -> bool {
        self.read_at.elapsed() < KNOWN_FOR && self.ids.len() <= KNOWN_IDS
    }
}

/// Those of `wanted` the writer has not seen, which a batch can only assume absent.
fn unseen<'a>(wanted: impl Iterator<Item = &'a str>, seen: &HashSet<String>) -> Vec<&'a str> {
    wanted.filter(|key| !seen.contains(*key)).collect()
}

/// One command waiting for its room's writer on this node.
pub(super) struct Job {
    pub(super) caller: Caller,
    pub(super) cmd: Command,
    pub(super) reply: oneshot::Sender<Result<Applied, Error>>,
}

/// What a batch of commands needs read back before the engine runs.
pub(super) struct Loaded {
    /// Of the clients the batch times out, those whose lease has lapsed or is gone (as the
    /// commit script decides too; a client that came back has a lease in the future).
    pub(super) lapsed: HashSet<String>,
    pub(super) meta: Option<Meta>,
    pub(super) population: usize,
    pub(super) members: Vec<(pb::Participant, u64)>,
    pub(super) answers: Vec<Remembered>,
    /// The bans of the identities the batch looks at (those that have one).
    pub(super) bans: Vec<Ban>,
    /// How many bans are in force (counted only for a batch that bans).
    pub(super) bans_in_force: usize,
}

/// What a batch of commands looks at: member ids, remembered answers (by key) and identities'
/// bans, each once; whether it needs every member; whether it bans.
#[derive(Default)]
pub(super) struct Wanted<'a> {
    pub(super) ids: Vec<&'a str>,
    pub(super) answers: Vec<String>,
    /// For each of `answers`, the fingerprint of the first request looking it up: what an
    /// answer stored without a fingerprint of its own is taken to answer.
    pub(super) fingerprints: Vec<u64>,
    pub(super) identities: Vec<String>,
    pub(super) timing_out: Vec<&'a str>,
    pub(super) every_member: bool,
    pub(super) banning: bool,
}

/// What the batch `jobs` looks at.
pub(super) fn wanted(jobs: &[Job]) -> Wanted<'_> {
    let mut wanted = Wanted::default();
    for job in jobs {
        match &job.cmd {
            Command::Leave { client_id } => wanted.ids.push(client_id.as_str()),
            Command::Drop(drop) => {
                wanted
                    .ids
                    .extend(drop.client_ids.iter().map(String::as_str));
                wanted.banning |= drop.ban.is_some();
            }
            Command::TimeOut { client_ids } => {
                wanted.ids.extend(client_ids.iter().map(String::as_str));
                wanted
                    .timing_out
                    .extend(client_ids.iter().map(String::as_str));
            }
            Command::Join { .. }
            | Command::Lock { .. }
            | Command::Unlock { .. }
            | Command::Destroy(_)
            | Command::Unban { .. } => {}
        }
        wanted.every_member |= job.cmd.needs_every_member();
        wanted.identities.extend(job.cmd.ban_identity(&job.caller));
        if let Some(key) = job.cmd.answer_key(&job.caller) {
            if !wanted.answers.contains(&key) {
                wanted.answers.push(key);
                wanted.fingerprints.push(job.cmd.fingerprint(&job.caller));
            }
        }
    }
    let mut seen = HashSet::new();
    wanted.ids.retain(|id| seen.insert(*id));
    let mut seen = HashSet::new();
    wanted.identities.retain(|id| seen.insert(id.clone()));
    wanted
}

impl Wanted<'_> {
    /// Whether what a writer remembers of its room cannot serve this batch: leases change
    /// without the seq, a session's end needs every member, and a ban needs the true count of
    /// bans in force.
    fn needs_fresh_read(&self) -> bool {
        !self.timing_out.is_empty() || self.every_member || self.banning
    }
}

impl Shared {
    pub(super) fn writers(&self) -> MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<Job>)>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue of `room_id`'s writer on this node, starting one if it has none.
    pub(super) fn writer(self: &Arc<Self>, room_id: &str) -> mpsc::Sender<Job> {
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
    pub(super) fn retire(&self, room_id: &str, id: u64) {
        let mut writers = self.writers();
        if writers
            .get(room_id)
            .is_some_and(|(current, _)| *current == id)
        {
            writers.remove(room_id);
        }
    }

    pub(super) async fn load(
        &self,
        keys: &Keys,
        wanted: &Wanted<'_>,
        drops: &[&[String]],
        now: SystemTime,
    ) -> Result<Loaded, Error> {
        let mut pipe = keys.read_meta();
        pipe.cmd("HLEN").arg(&keys.members);
        if wanted.every_member {
            pipe.cmd("HVALS").arg(&keys.members);
        } else if !wanted.ids.is_empty() {
            pipe.cmd("HMGET").arg(&keys.members).arg(&wanted.ids);
        }
        if !wanted.answers.is_empty() {
            pipe.cmd("HMGET").arg(&keys.answers).arg(&wanted.answers);
        }
        if !wanted.timing_out.is_empty() {
            pipe.cmd("ZMSCORE")
                .arg(&keys.leases)
                .arg(&wanted.timing_out);
        }
        if !wanted.identities.is_empty() {
            pipe.cmd("HMGET").arg(&keys.bans).arg(&wanted.identities);
        }
        if wanted.banning {
            pipe.cmd("ZCOUNT")
                .arg(&keys.banned)
                .arg(format!("({}", millis(now)))
                .arg("+inf");
        }
        let mut replies = self
            .timed("load", pipe.query_async::<Vec<Value>>(&mut self.conn()))
            .await?
            .into_iter();
        let meta = meta(replies.next().unwrap_or(Value::Nil))?;
        let population = replies.next().as_ref().and_then(number).unwrap_or(0) as usize;
        let mut members = Vec::new();
        if wanted.every_member || !wanted.ids.is_empty() {
            for value in array(replies.next().unwrap_or(Value::Nil)) {
                members.extend(member(&value)?);
            }
        }
        let mut remembered = Vec::new();
        if !wanted.answers.is_empty() {
            let values = array(replies.next().unwrap_or(Value::Nil));
            let looked_up = wanted.answers.iter().zip(&wanted.fingerprints);
            for ((key, fingerprint), value) in looked_up.zip(values) {
                if let Some(raw) = bytes(&value) {
                    let stored = StoredAnswer::decode(raw).map_err(|_| corrupt("answer"))?;
                    remembered.push(stored.into_remembered(key.clone(), *fingerprint)?);
                }
            }
        }
        let mut lapsed = HashSet::new();
        if !wanted.timing_out.is_empty() {
            let scores = array(replies.next().unwrap_or(Value::Nil));
            let now = millis(now) as f64;
            for (id, score) in wanted.timing_out.iter().zip(scores) {
                if score_of(&score).is_none_or(|lease| lease <= now) {
                    lapsed.insert((*id).to_owned());
                }
            }
        }
        let mut bans = Vec::new();
        if !wanted.identities.is_empty() {
            for value in array(replies.next().unwrap_or(Value::Nil)) {
                bans.extend(ban(&value)?);
            }
        }
        let bans_in_force = replies.next().as_ref().and_then(number).unwrap_or(0) as usize;
        if wanted.banning {
            // Whom a drop bans is known once its clients are: read their identities' bans.
            let targets: HashSet<&str> = drops
                .iter()
                .flat_map(|ids| ids.iter())
                .map(String::as_str)
                .collect();
            let mut identities: Vec<&str> = members
                .iter()
                .filter(|(p, _)| targets.contains(p.client_id.as_str()))
                .map(|(p, _)| p.identity.as_str())
                .filter(|identity| !wanted.identities.iter().any(|i| i == identity))
                .collect();
            identities.sort_unstable();
            identities.dedup();
            if !identities.is_empty() {
                let values: Vec<Value> = self
                    .timed(
                        "load",
                        redis::cmd("HMGET")
                            .arg(&keys.bans)
                            .arg(&identities)
                            .query_async(&mut self.conn()),
                    )
                    .await?;
                for value in values {
                    bans.extend(ban(&value)?);
                }
            }
        }
        Ok(Loaded {
            lapsed,
            meta,
            population,
            members,
            answers: remembered,
            bans,
            bans_in_force,
        })
    }

    /// Runs every job of the batch through the engine, on what the writer knows of the room or
    /// else on a fresh read, then commits all their events at once; on a conflict (another node
    /// wrote, or an assumption was wrong) reads the room and runs them again. Returns the error
    /// that failed the whole batch (Redis unreachable), if one did.
    pub(super) async fn apply_batch(
        &self,
        room_id: &str,
        jobs: Vec<Job>,
        known: &mut Option<Known>,
    ) -> Option<Error> {
        let keys = Keys::new(room_id);
        let wanted = wanted(&jobs);
        let drops: Vec<&[String]> = jobs
            .iter()
            .filter_map(|job| match &job.cmd {
                Command::Drop(drop) if drop.ban.is_some() => Some(drop.client_ids.as_slice()),
                _ => None,
            })
            .collect();
        self.telemetry.batch(jobs.len());
        let outcome = async {
            for _ in 0..MAX_ATTEMPTS {
                let now = SystemTime::now();
                let known_view = known
                    .take()
                    .filter(|k| k.usable() && !wanted.needs_fresh_read());
                let fresh = known_view.is_none();
                let mut lapsed = HashSet::new();
                let mut seen = match known_view {
                    Some(k) => k,
                    None => {
                        let loaded = self.load(&keys, &wanted, &drops, now).await?;
                        lapsed = loaded.lapsed;
                        let state = loaded.meta.map(|meta| {
                            RoomState::restore(
                                room_id,
                                meta.epoch,
                                meta.seq,
                                loaded.population,
                                loaded.members,
                                loaded.answers,
                            )
                            .with_limits(self.config.rooms.limits)
                            .with_lock(meta.locked)
                            .with_bans(
                                loaded.bans.iter().cloned(),
                                loaded.bans_in_force,
                                now,
                            )
                        });
                        let mut bans: HashSet<String> = wanted.identities.iter().cloned().collect();
                        bans.extend(loaded.bans.into_iter().map(|ban| ban.identity));
                        Known {
                            state,
                            ids: wanted.ids.iter().map(|id| id.to_string()).collect(),
                            answers: wanted.answers.iter().cloned().collect(),
                            bans,
                            read_at: Instant::now(),
                        }
                    }
                };
                let assumed_ids = unseen(wanted.ids.iter().copied(), &seen.ids);
                let assumed_answers =
                    unseen(wanted.answers.iter().map(String::as_str), &seen.answers);
                let assumed_bans = unseen(wanted.identities.iter().map(String::as_str), &seen.bans);
                let expected = seen.state.as_ref().map(RoomState::seq);
                let was_empty = seen.state.as_ref().is_none_or(RoomState::is_empty);
                let results: Vec<Result<Applied, Error>> = jobs
                    .iter()
                    .map(|job| {
                        // Only the clients whose leases have lapsed by now are timed out.
                        let cmd = match &job.cmd {
                            Command::TimeOut { client_ids } => Command::TimeOut {
                                client_ids: client_ids
                                    .iter()
                                    .filter(|id| lapsed.contains(*id))
                                    .cloned()
                                    .collect(),
                            },
                            cmd => cmd.clone(),
                        };
                        run(
                            &mut seen.state,
                            room_id,
                            &job.caller,
                            cmd,
                            &self.config,
                            now,
                        )
                    })
                    .collect();
                let writes = results.iter().flatten().any(|a| !a.events.is_empty());
                let Some(state) = seen.state.as_mut() else {
                    return Ok(results);
                };
                if !writes {
                    let guessed = !(assumed_ids.is_empty()
                        && assumed_answers.is_empty()
                        && assumed_bans.is_empty());
                    // A refusal on a remembered view (a full room another node has since
                    // emptied) is as unchecked as a guess: no commit will vouch for either.
                    let refused_on_memory = !fresh && results.iter().any(Result::is_err);
                    if guessed || refused_on_memory {
                        continue;
                    }
                    *known = Some(seen);
                    return Ok(results);
                }
                let joined = results
                    .iter()
                    .flatten()
                    .any(|a| a.changes.iter().any(|c| matches!(c, Change::Joined { .. })));
                if joined && was_empty {
                    // The room's first lease: its time-out must be checked from now on.
                    self.watch_presence(room_id, now).await?;
                }
                if expected.is_none() {
                    // Listed before it exists, so that a crash cannot leave it unlisted.
                    self.index_room(room_id).await?;
                }
                let assumed = Assumed {
                    ids: &assumed_ids,
                    answers: &assumed_answers,
                    bans: &assumed_bans,
                };
                let Some(empty_until) = self
                    .commit(&keys, room_id, state, expected, &results, assumed, now)
                    .await?
                else {
                    // Another node changed the room, or a guess was wrong: read again and redo.
                    tokio::task::yield_now().await;
                    continue;
                };
                if expected.is_none() {
                    self.index_room(room_id).await?;
                }
                if let Some(at) = empty_until {
                    self.room_emptied(room_id, at).await;
                }
                // Everything the batch looked at, joined or banned is known now (the answers
                // it remembered are among the keys it looked at).
                seen.ids.extend(wanted.ids.iter().map(|id| id.to_string()));
                for change in results.iter().flatten().flat_map(|a| &a.changes) {
                    match change {
                        Change::Joined { participant, .. } => {
                            seen.ids.insert(participant.client_id.clone());
                        }
                        Change::Banned(ban) => {
                            seen.bans.insert(ban.identity.clone());
                        }
                        _ => {}
                    }
                }
                seen.answers.extend(wanted.answers.iter().cloned());
                seen.bans.extend(wanted.identities.iter().cloned());
                let oldest = state.seq().saturating_sub(self.config.rooms.history as u64) + 1;
                state.forget_departed_before(oldest);
                *known = Some(seen);
                return Ok(results);
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
    /// room must not exist yet) and its assumptions hold. None on a conflict; else when the
    /// room's keys expire if the commit left it empty. A commit sent whose answer never came is
    /// `OutcomeUnknown`: it may have been applied, and its callers must be told so.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit(
        &self,
        keys: &Keys,
        room_id: &str,
        state: &RoomState,
        expected: Option<u64>,
        results: &[Result<Applied, Error>],
        assumed: Assumed<'_>,
        now: SystemTime,
    ) -> Result<Option<Option<u64>>, Error> {
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
        let changes = Changes::of(&applied);
        let notice = Notice::publish(room_id, &events);
        // With replicas to wait for, the notice goes out once they hold the commit.
        let waiting = self.waiting.is_some();
        let mut call = self.commit.prepare_invoke();
        for key in keys.room() {
            call.key(key);
        }
        call.arg(expected.map_or(String::new(), |seq| seq.to_string()))
            .arg(state.epoch())
            .arg(self.config.rooms.history)
            .arg(self.config.rooms.empty_room_ttl.as_millis().max(1) as u64)
            .arg(channel(room_id))
            .arg(if waiting { &[][..] } else { &notice[..] })
            .arg(millis(now))
            .arg(self.config.rooms.limits.answer_bytes)
            .arg(
                self.config
                    .rooms
                    .presence_timeout
                    .map_or(0, |t| t.as_millis() as u64),
            )
            .arg(match changes.locked {
                None => "",
                Some(true) => "1",
                Some(false) => "0",
            })
            .arg(if waiting {
                ""
            } else {
                self.conn.publish_command()
            })
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .arg(self.config.wait_replicas)
            .arg(self.config.rooms.history_bytes);
        let timed_out: Vec<&String> = applied
            .iter()
            .filter_map(|a| match &a.reply {
                Reply::TimedOut(removed) => Some(removed),
                _ => None,
            })
            .flatten()
            .collect();
        for list in [assumed.ids, assumed.answers] {
            call.arg(list.len());
            for item in list {
                call.arg(*item);
            }
        }
        call.arg(timed_out.len());
        for id in timed_out {
            call.arg(id);
        }
        call.arg(assumed.bans.len());
        for identity in assumed.bans {
            call.arg(*identity);
        }
        call.arg(events.len());
        for event in &events {
            call.arg(event.seq).arg(event.encode_to_vec());
        }
        call.arg(changes.joins.len());
        for (participant, join_seq) in changes.joins {
            let stored = StoredMember {
                join_seq,
                participant: Some(participant.clone()),
            };
            call.arg(&participant.client_id).arg(stored.encode_to_vec());
        }
        call.arg(changes.departures.len());
        for (client_id, identity, end_seq) in changes.departures {
            call.arg(client_id).arg(identity).arg(end_seq);
        }
        call.arg(remembered.len());
        for (key, value, expires_at_ms) in &remembered {
            call.arg(*key).arg(value).arg(*expires_at_ms);
        }
        call.arg(changes.bans.len());
        for (identity, ban) in changes.bans {
            match ban {
                Some(ban) => call
                    .arg(identity)
                    .arg(millis(ban.until))
                    .arg(ban.to_pb().encode_to_vec()),
                // An unban: no end, no ban.
                None => call.arg(identity).arg(0).arg(""),
            };
        }
        let started = Instant::now();
        let replicas = self.config.wait_replicas;
        let committing = async {
            match self.waiting.clone() {
                Some(mut conn) => {
                    let pipelined = !self.short_of_replicas.load(Ordering::Relaxed);
                    conn.commit_and_wait(&call, &keys.meta, replicas, pipelined)
                        .await
                }
                None => call
                    .invoke_async(&mut self.conn())
                    .await
                    .map(|done| (done, 0)),
            }
        };
        let answer = tokio::time::timeout(OP_TIMEOUT, committing).await;
        let ok = matches!(answer, Ok(Ok(_)));
        self.telemetry.store_op("commit", ok, started.elapsed());
        let answer = answer.map(|reply| reply.map(|(done, acked)| (Committed::of(done), acked)));
        if let Ok(Ok((committed, _))) = &answer {
            let short = matches!(committed, Committed::ShortOfReplicas { .. });
            self.short_of_replicas.store(short, Ordering::Relaxed);
        }
        match answer {
            Ok(Ok((Committed::Conflict, _))) => {
                self.telemetry.commit_conflict();
                Ok(None)
            }
            Ok(Ok((Committed::ShortOfReplicas { online }, _))) => {
                tracing::warn!(
                    room_id,
                    online,
                    replicas,
                    "the Redis master of this room has fewer online replicas than \
                     --redis-wait-replicas: its commits are refused (UNAVAILABLE, not applied) \
                     until it has them"
                );
                Err(Error::NotEnoughReplicas {
                    online,
                    needed: replicas,
                })
            }
            Ok(Ok((Committed::NewEpoch, _))) => {
                tracing::warn!(
                    room_id,
                    "the Redis holding this room restarted or failed over since its last commit, \
                     so its log may have lost its newest events: the room continues under a new \
                     epoch, and older cursors get OUT_OF_RANGE"
                );
                self.telemetry.commit_conflict();
                Ok(None)
            }
            Ok(Ok((Committed::Applied { empty_until }, acked))) => {
                self.telemetry.events_appended(events.len());
                if waiting {
                    if acked < replicas as i64 {
                        tracing::warn!(
                            room_id,
                            acked,
                            replicas,
                            "a commit was not confirmed by enough replicas in time: its callers \
                             are answered OUTCOME_UNKNOWN, and its events stay hidden until a \
                             later commit of the room is confirmed"
                        );
                        return Err(Error::OutcomeUnknown { request_id: None });
                    }
                    self.confirm(keys, room_id, state, notice).await?;
                }
                Ok(Some(empty_until))
            }
            // Refused before anything was sent, or refused by Redis: nothing was applied.
            Ok(Err(err)) if err.is_connection_refusal() || !err.is_io_error() => {
                Err(unavailable(err))
            }
            Ok(Err(_)) | Err(_) => Err(Error::OutcomeUnknown { request_id: None }),
        }
    }

    /// Shows a commit its replicas hold: raises the room's confirmed seq to `state`'s and
    /// publishes the commit's notice. A commit whose confirmation fails is durable but hidden
    /// until a later one of the room is confirmed; its callers are told the outcome is unknown.
    async fn confirm(
        &self,
        keys: &Keys,
        room_id: &str,
        state: &RoomState,
        notice: Vec<u8>,
    ) -> Result<(), Error> {
        let mut call = self.confirm.prepare_invoke();
        call.key(&keys.meta)
            .arg(state.epoch())
            .arg(state.seq())
            .arg(self.conn.publish_command())
            .arg(channel(room_id))
            .arg(notice);
        self.timed("confirm", call.invoke_async::<i64>(&mut self.conn()))
            .await
            .map(drop)
            .map_err(|_| Error::OutcomeUnknown { request_id: None })
    }
}

/// What the commit script answered (see [`super::keys::COMMIT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Committed {
    /// Nothing changed: the room moved on since the batch read it, or an assumption failed.
    Conflict,
    /// Nothing of the batch changed: the room's log began anew under a new epoch (the Redis
    /// holding it restarted or failed over), and the batch must run again on it.
    NewEpoch,
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
    /// The script's integer reply: 0, -1, -2 minus the online replicas, 1, or an expiry.
    fn of(reply: i64) -> Self {
        match reply {
            0 => Committed::Conflict,
            -1 => Committed::NewEpoch,
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

/// What a batch assumed absent without having read it: member ids, answer keys, and identities
/// without a ban in force. The commit script checks each.
pub(super) struct Assumed<'a> {
    pub(super) ids: &'a [&'a str],
    pub(super) answers: &'a [&'a str],
    pub(super) bans: &'a [&'a str],
}

/// A batch's changes, sorted by what the commit script does with them.
struct Changes<'a> {
    joins: Vec<(&'a pb::Participant, u64)>,
    departures: Vec<(&'a String, &'a String, u64)>,
    /// The room's lock after the batch, if the batch changed it.
    locked: Option<bool>,
    /// Bans set (Some) and lifted (None), in order.
    bans: Vec<(&'a String, Option<&'a Ban>)>,
}

impl<'a> Changes<'a> {
    fn of(applied: &[&'a Applied]) -> Self {
        let mut changes = Self {
            joins: Vec::new(),
            departures: Vec::new(),
            locked: None,
            bans: Vec::new(),
        };
        for change in applied.iter().flat_map(|a| &a.changes) {
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
        changes
    }
}

/// Applies one command to the batch's view of the room; a join may create the room.
pub(super) fn run(
    state: &mut Option<RoomState>,
    room_id: &str,
    caller: &Caller,
    cmd: Command,
    config: &RedisConfig,
    now: SystemTime,
) -> Result<Applied, Error> {
    match state {
        Some(state) => engine::apply(state, caller, cmd, now),
        None if cmd.creates_room() => {
            let epoch = uuid::Uuid::new_v4().simple().to_string();
            let mut fresh = RoomState::new(room_id, epoch).with_limits(config.rooms.limits);
            let applied = engine::apply(&mut fresh, caller, cmd, now)?;
            *state = Some(fresh);
            Ok(applied)
        }
        None => Err(Error::room_not_found(room_id)),
    }
}

/// The writer of one room on this node: takes queued commands in batches, so one node never
/// races itself on a room and a busy room costs one read and one commit per batch, not per
/// command. It ends after a while without work, finishing what was queued.
pub(super) async fn write_room(
    shared: Weak<Shared>,
    room_id: String,
    id: u64,
    mut jobs: mpsc::Receiver<Job>,
) {
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
            // Redis is failing (or its master is short of replicas): answer everything already
            // queued now, instead of letting each batch wait out its own timeout. None of it
            // was sent, so it is safe to retry.
            let err = match err {
                short @ Error::NotEnoughReplicas { .. } => short,
                other => Error::StoreUnavailable(format!("redis is failing: {}", other.detail())),
            };
            while let Ok(job) = jobs.try_recv() {
                let _ = job.reply.send(Err(err.clone()));
            }
        }
    }
}

pub(super) async fn apply(
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
