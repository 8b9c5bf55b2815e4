//! Writing: one writer per busy room on a node, taking queued commands in batches, running the
//! engine on what it knows or reads, and committing with the compare-and-set script. The writer
//! decides what a batch commits and assumes; how a commit is packed and sent is `commit`'s, and it
//! touches no feed and no presence count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use prost::Message;
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::commit::{Assumed, Bounds, Changes, Commit, Committed};
use super::feeds::Notice;
use super::keys::{
    array, ban, bytes, channel, corrupt, member, meta, millis, number, score_of, Keys, Meta,
    StoredAnswer,
};
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

/// A job as it waits in its writer's queue: boxed, since a queue holds room for 32 of them from
/// the start (tokio allocates a channel's first block when it is made), and an idle writer
/// keeps its queue (a node making rooms fast has tens of thousands of idle writers).
type Queued = Box<Job>;

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

/// Each busy room's writer on this node, with the id that tells a retiring writer whether it
/// was replaced.
#[derive(Default)]
pub(super) struct Writers {
    queues: Mutex<HashMap<String, (u64, mpsc::Sender<Queued>)>>,
    next: AtomicU64,
}

impl Writers {
    fn queues(&self) -> MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<Queued>)>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue of `room_id`'s writer on this node; when it has none, a new queue, whose
    /// receiving end and id go to `start` to run the writer.
    fn queue(
        &self,
        room_id: &str,
        start: impl FnOnce(u64, mpsc::Receiver<Queued>),
    ) -> mpsc::Sender<Queued> {
        let mut queues = self.queues();
        if let Some((_, queue)) = queues.get(room_id).filter(|(_, q)| !q.is_closed()) {
            return queue.clone();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (queue, jobs) = mpsc::channel(QUEUE);
        queues.insert(room_id.to_owned(), (id, queue.clone()));
        start(id, jobs);
        queue
    }

    /// Forgets writer `id` of `room_id`, unless another has replaced it already.
    fn retire(&self, room_id: &str, id: u64) {
        let mut queues = self.queues();
        if queues
            .get(room_id)
            .is_some_and(|(current, _)| *current == id)
        {
            queues.remove(room_id);
        }
    }
}

impl Shared {
    /// Runs `cmd` by `caller` through the room's writer on this node and waits for its answer.
    pub(super) async fn submit(
        self: &Arc<Self>,
        room_id: &str,
        caller: &Caller,
        cmd: Command,
    ) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        let mut job = Box::new(Job {
            caller: caller.clone(),
            cmd,
            reply,
        });
        loop {
            let start = |id, jobs| {
                let shared = Arc::downgrade(self);
                tokio::spawn(write_room(shared, room_id.to_owned(), id, jobs));
            };
            match self.writers.queue(room_id, start).send(job).await {
                Ok(()) => break,
                // That writer retired just now; the next call starts a new one.
                Err(mpsc::error::SendError(returned)) => job = returned,
            }
        }
        answer
            .await
            .map_err(|_| Error::Internal(format!("the writer of room {room_id:?} stopped")))?
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

    /// Runs every job of the batch through the engine and commits all their events at once
    /// (see [`Shared::settle`]), then answers each job. Returns the error that failed the whole
    /// batch (Redis unreachable), if one did.
    pub(super) async fn apply_batch(
        &self,
        room_id: &str,
        mut jobs: Vec<Job>,
        known: &mut Option<Known>,
    ) -> Option<Error> {
        let results = loop {
            // A caller that gave up (its deadline passed while the job waited behind a stall)
            // was told the outcome is unknown, and its retry may have been answered already:
            // running the job now would change the room after that answer. Only jobs someone
            // waits for run; `settle` starts again without a caller that leaves meanwhile.
            jobs.retain(|job| !job.reply.is_closed());
            if jobs.is_empty() {
                return None;
            }
            self.telemetry.batch(jobs.len());
            match self.settle(room_id, &jobs, known).await {
                Ok(Some(results)) => break Ok(results),
                Ok(None) => continue,
                Err(err) => break Err(err),
            }
        };
        match results {
            Ok(results) => {
                for (job, result) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(result.and_then(Applied::answer));
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

    /// The batch's results, once they hold in Redis: each attempt takes a view of the room
    /// (what the writer knows of it, or a fresh read), runs the jobs on it, and commits; a
    /// conflict (another node wrote, or an assumption was wrong) starts the next attempt. None
    /// when a caller gave up before the commit was sent (while the room was read, or other
    /// slots' masters were): nothing was committed, and the batch must run again without that
    /// job.
    async fn settle(
        &self,
        room_id: &str,
        jobs: &[Job],
        known: &mut Option<Known>,
    ) -> Result<Option<Vec<Result<Applied, Error>>>, Error> {
        let batch = Batch {
            room_id,
            keys: Keys::new(room_id),
            jobs,
            wanted: wanted(jobs),
        };
        let mut reconfirmed = false;
        for _ in 0..MAX_ATTEMPTS {
            let now = self.clock.now();
            let mut view = self.view(&batch, known, now).await?;
            if jobs.iter().any(|job| job.reply.is_closed()) {
                // The read stalled (Redis paused, a partition) past a caller's deadline: its
                // job must not commit now, for the reason `apply_batch` gives. The fault
                // harness saw such a join land after its retry elsewhere was refused BANNED.
                return Ok(None);
            }
            let results = self.run_jobs(&batch, &mut view.known.state, &view.lapsed, now);
            match self
                .commit_or_retry(&batch, view, &results, known, now)
                .await?
            {
                Attempt::Done => return Ok(Some(results)),
                Attempt::Unconfirmed { epoch } => {
                    // Confirmed now, the hidden commits' remembered answers stand: read the
                    // room again (once: the replicas may still be away).
                    if !reconfirmed {
                        reconfirmed = true;
                        let keys = &batch.keys;
                        if self.committer.reconfirm(keys, room_id, &epoch).await? {
                            continue;
                        }
                    }
                    return Ok(Some(unconfirmed(results, jobs)));
                }
                Attempt::Unvouched => return Ok(Some(unvouched(results, jobs))),
                // Another node changed the room, or a guess was wrong: read again and redo.
                Attempt::Retry => tokio::task::yield_now().await,
                Attempt::Abandoned => return Ok(None),
            }
        }
        Err(Error::StoreUnavailable(format!(
            "room {room_id:?} changed under {MAX_ATTEMPTS} attempts in a row"
        )))
    }

    /// The view of the room a batch runs on: what the writer knows of it, if that is recent and
    /// enough for the batch, or else a fresh read of what the batch looks at.
    async fn view(
        &self,
        batch: &Batch<'_>,
        known: &mut Option<Known>,
        now: SystemTime,
    ) -> Result<View, Error> {
        let Batch {
            room_id,
            keys,
            jobs,
            wanted,
        } = batch;
        if let Some(known) = known
            .take()
            .filter(|k| k.usable() && !wanted.needs_fresh_read())
        {
            return Ok(View::of(known, false, HashSet::new(), false));
        }
        // Whom a drop bans is known once its clients are: their identities' bans are read too.
        let banning: Vec<&[String]> = jobs
            .iter()
            .filter_map(|job| match &job.cmd {
                Command::Drop(drop) if drop.ban.is_some() => Some(drop.client_ids.as_slice()),
                _ => None,
            })
            .collect();
        let loaded = self.load(keys, wanted, &banning, now).await?;
        let hidden = loaded
            .meta
            .as_ref()
            .is_some_and(|meta| meta.visible() < meta.seq);
        let state = loaded.meta.map(|meta| {
            RoomState::restore(
                *room_id,
                meta.epoch,
                meta.seq,
                loaded.population,
                loaded.members,
                loaded.answers,
            )
            .with_limits(self.config.rooms.limits)
            .with_lock(meta.locked)
            .with_bans(loaded.bans.iter().cloned(), loaded.bans_in_force, now)
        });
        let mut bans: HashSet<String> = wanted.identities.iter().cloned().collect();
        bans.extend(loaded.bans.into_iter().map(|ban| ban.identity));
        let known = Known {
            state,
            ids: wanted.ids.iter().map(|id| id.to_string()).collect(),
            answers: wanted.answers.iter().cloned().collect(),
            bans,
            read_at: Instant::now(),
        };
        Ok(View::of(known, true, loaded.lapsed, hidden))
    }

    /// Runs each job on `state` in turn, as of `now`; a time-out removes only the clients whose
    /// lease had `lapsed` when the room was read.
    fn run_jobs(
        &self,
        batch: &Batch<'_>,
        state: &mut Option<RoomState>,
        lapsed: &HashSet<String>,
        now: SystemTime,
    ) -> Vec<Result<Applied, Error>> {
        batch
            .jobs
            .iter()
            .map(|job| {
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
                run(state, batch.room_id, &job.caller, cmd, &self.config, now)
            })
            .collect()
    }

    /// Commits what the jobs did to the view, unless that needs nothing or the view cannot vouch
    /// for it: Done, leaving in `known` what the writer knows of the room afterwards, or Retry
    /// when the room changed under the batch or a guess of the view was wrong.
    async fn commit_or_retry(
        &self,
        batch: &Batch<'_>,
        view: View,
        results: &[Result<Applied, Error>],
        known: &mut Option<Known>,
        now: SystemTime,
    ) -> Result<Attempt, Error> {
        let Batch {
            room_id,
            keys,
            wanted,
            ..
        } = batch;
        let View {
            known: mut seen,
            fresh,
            expected,
            hidden,
            was_empty,
            ..
        } = view;
        let assumed = Assumed {
            ids: unseen(wanted.ids.iter().copied(), &seen.ids),
            answers: unseen(wanted.answers.iter().map(String::as_str), &seen.answers),
            bans: unseen(wanted.identities.iter().map(String::as_str), &seen.bans),
        };
        // What the commit carries: events, and refusals the room remembers (so that an earlier
        // attempt of the same request still on its way cannot land after this answer).
        let applied: Vec<&Applied> = results
            .iter()
            .flatten()
            .filter(|applied| {
                !applied.events.is_empty()
                    || (applied.remembered.is_some() && matches!(applied.reply, Reply::Refused(_)))
            })
            .collect();
        let Some(state) = seen.state.as_ref() else {
            return Ok(Attempt::Done);
        };
        if applied.is_empty() {
            // A refusal on a remembered view (a full room another node has since emptied) is as
            // unchecked as a guess: no commit will vouch for either.
            let refused_on_memory = !fresh && results.iter().any(Result::is_err);
            if !assumed.is_empty() || refused_on_memory {
                return Ok(Attempt::Retry);
            }
            if hidden && results.iter().any(Result::is_ok) {
                // An answer remembered by a commit its replicas never confirmed (a master that
                // resumed after its replica took over still serves it for a moment) would
                // acknowledge a change a failover may take back: the outcome stays unknown.
                return Ok(Attempt::Unconfirmed {
                    epoch: state.epoch().to_owned(),
                });
            }
            let recalled: Vec<String> = results
                .iter()
                .zip(batch.jobs)
                .filter(|(result, _)| is_refusal(result))
                .filter_map(|(_, job)| job.cmd.answer_key(&job.caller))
                .collect();
            let committer = &self.committer;
            let vouched =
                recalled.is_empty() || committer.vouch(keys, state.epoch(), &recalled).await?;
            if !vouched {
                // A refusal's commit leaves the seq as it was, so `hidden` cannot say whether
                // its replicas hold it; if they do not, a failover could lose it and the
                // request be applied after all (found by an attack on remembered refusals).
                return Ok(Attempt::Unvouched);
            }
            *known = Some(seen);
            return Ok(Attempt::Done);
        }
        // No answer may be in force where the commit remembers one: the seq alone does not
        // say, since another attempt of the same request may have committed a refusal, which
        // leaves the seq as it was. Whichever attempt commits first decides.
        let mut assumed = assumed;
        for answer in applied
            .iter()
            .filter_map(|applied| applied.remembered.as_ref())
        {
            if !assumed.answers.contains(&answer.key.as_str()) {
                assumed.answers.push(&answer.key);
            }
        }
        let logs = applied.iter().any(|applied| !applied.events.is_empty());
        let joined = applied
            .iter()
            .any(|a| a.changes.iter().any(|c| matches!(c, Change::Joined { .. })));
        if joined && was_empty {
            // The room's first lease: its time-out must be checked from now on.
            self.watch_presence(room_id, now).await?;
        }
        let listing = self.listing(room_id);
        if expected.is_none() && listing.is_none() {
            // Listed before it exists, so that a crash cannot leave it unlisted.
            self.index_room(room_id).await?;
        }
        let due_in_commit = listing.is_some_and(|listing| !listing.due.is_empty());
        if logs && !due_in_commit {
            // Made due before the commit too, so that a node dying between its commit and the
            // making due after it leaves the room due all the same (unless a turn settled in
            // between: then the walk over the list of rooms finds it, see `make_behind_due`).
            self.make_due(room_id).await;
        }
        let changes = Changes::of(&applied);
        let (publish, held) = match logs {
            true => self
                .committer
                .publishing(Notice::publish(room_id, &changes.events)),
            // Refusals only: nothing to announce or confirm, though the commit still waits for
            // its replicas.
            false => (None, None),
        };
        let commit = Commit {
            bounds: Bounds::of(&self.config),
            expected,
            epoch: state.epoch(),
            fresh_epoch: uuid::Uuid::new_v4().simple().to_string(),
            channel: channel(room_id),
            publish,
            now,
            assumed,
            changes,
            listing,
            webhooks: self.webhooks_on(),
        };
        if batch.jobs.iter().any(|job| job.reply.is_closed()) {
            // As after the read: a caller left while the batch waited on other slots' masters
            // (the presence schedule, the room list, webhooks' due rooms).
            return Ok(Attempt::Abandoned);
        }
        let committing = self.committer.commit(keys, room_id, &commit);
        let Committed::Applied { empty_until } = committing.await? else {
            return Ok(Attempt::Retry);
        };
        if let Some(notice) = held {
            let newest = (state.epoch(), state.seq());
            self.committer
                .confirm(keys, room_id, newest, notice)
                .await?;
        }
        if listing.is_none() {
            if expected.is_none() {
                self.index_room(room_id).await?;
            }
            if let Some(at) = empty_until {
                self.room_emptied(room_id, at).await;
            }
        }
        if logs && !due_in_commit {
            self.make_due(room_id).await;
        }
        // Everything the batch looked at, joined or banned is known now (the answers it
        // remembered are among the keys it looked at).
        seen.ids.extend(wanted.ids.iter().map(|id| id.to_string()));
        for change in applied.iter().flat_map(|a| &a.changes) {
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
        if let Some(state) = seen.state.as_mut() {
            let oldest = state.seq().saturating_sub(self.config.rooms.history as u64) + 1;
            state.forget_departed_before(oldest);
        }
        *known = Some(seen);
        Ok(Attempt::Done)
    }
}

/// A batch of jobs for one room, and what they look at.
struct Batch<'a> {
    room_id: &'a str,
    keys: Keys,
    jobs: &'a [Job],
    wanted: Wanted<'a>,
}

/// The view of its room a batch runs on.
struct View {
    known: Known,
    /// Read from Redis for this batch, not remembered.
    fresh: bool,
    /// Of the clients the batch times out, those whose lease had lapsed when it was read.
    lapsed: HashSet<String>,
    /// The seq the batch runs on (None: the room does not exist).
    expected: Option<u64>,
    /// Whether the room holds commits its replicas have not confirmed (a fresh read found its
    /// seq past the confirmed one): their changes, and the answers they remembered, may still
    /// vanish in a failover.
    hidden: bool,
    /// Whether the room had no member before the batch.
    was_empty: bool,
}

impl View {
    fn of(known: Known, fresh: bool, lapsed: HashSet<String>, hidden: bool) -> Self {
        let expected = known.state.as_ref().map(RoomState::seq);
        let was_empty = known.state.as_ref().is_none_or(RoomState::is_empty);
        View {
            known,
            fresh,
            lapsed,
            expected,
            hidden,
            was_empty,
        }
    }
}

/// How an attempt at a batch ended.
enum Attempt {
    /// The results hold.
    Done,
    /// Nothing was committed: the batch runs again on a fresh read.
    Retry,
    /// Nothing was committed, and the room's newest commits wait for their replicas: the
    /// batch's answers (remembered ones included) cannot be vouched for.
    Unconfirmed {
        /// The epoch of the room's log the batch ran on.
        epoch: String,
    },
    /// Nothing was committed: a caller gave up before the commit was sent, and the batch runs
    /// again without its job.
    Abandoned,
    /// Nothing was committed, and the replicas did not confirm they hold the refusals the
    /// batch recalled: those cannot be vouched for.
    Unvouched,
}

/// Whether `result` is a refusal the room remembered (read back, not decided now).
fn is_refusal(result: &Result<Applied, Error>) -> bool {
    matches!(
        result,
        Ok(Applied {
            reply: Reply::Refused(_),
            ..
        })
    )
}

/// The results of a batch whose view the replicas could not vouch for: refusals decided now
/// stand (nothing was applied either way); answers, remembered refusals among them, do not.
fn unconfirmed(results: Vec<Result<Applied, Error>>, jobs: &[Job]) -> Vec<Result<Applied, Error>> {
    unknown_where(results, jobs, Result::is_ok)
}

/// The results of a batch whose remembered refusals the replicas could not vouch for: those are
/// unknown; the rest stand (nothing hidden: the room's seq is confirmed).
fn unvouched(results: Vec<Result<Applied, Error>>, jobs: &[Job]) -> Vec<Result<Applied, Error>> {
    unknown_where(results, jobs, is_refusal)
}

/// `results`, with those `unknown` picks answered `OUTCOME_UNKNOWN`.
fn unknown_where(
    results: Vec<Result<Applied, Error>>,
    jobs: &[Job],
    unknown: impl Fn(&Result<Applied, Error>) -> bool,
) -> Vec<Result<Applied, Error>> {
    results
        .into_iter()
        .zip(jobs)
        .map(|(result, job)| match unknown(&result) {
            true => Err(Error::OutcomeUnknown {
                request_id: job.cmd.request_id().map(str::to_owned),
            }),
            false => result,
        })
        .collect()
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
            if let Reply::Refused(err) = applied.reply {
                // No room is created to remember a refusal (a new room refuses no join).
                return Err(err);
            }
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
    mut jobs: mpsc::Receiver<Queued>,
) {
    let mut known = None;
    loop {
        let first = match tokio::time::timeout(WRITER_IDLE, jobs.recv()).await {
            Ok(Some(job)) => *job,
            Ok(None) => return,
            Err(_idle) => {
                if let Some(shared) = shared.upgrade() {
                    shared.writers.retire(&room_id, id);
                }
                jobs.close();
                // Whatever was queued before the close is still done.
                let mut rest = Vec::new();
                while let Some(job) = jobs.recv().await {
                    rest.push(*job);
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
                Ok(job) => batch.push(*job),
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
        // Boxed: a batch's future (its read, commit and confirmation) is several KiB, and held
        // inline it would size every writer's task so, idle ones included, which a node
        // creating rooms fast has by the ten thousand (each outlives its last command by
        // WRITER_IDLE).
        (Some(shared), false) => Box::pin(shared.apply_batch(room_id, batch, known)).await,
        _ => None,
    }
}
