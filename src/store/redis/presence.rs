//! Presence on Redis: a client stays while an `Events` stream as that client is open on some
//! node, and is timed out when none has been for `--presence-timeout`, even if the node that
//! held its last stream died.
//!
//! Each room keeps a `leases` sorted set: client id to the time (ms) its lease runs out. A join
//! gives the new client a lease of one timeout (its grace for a first stream). A node holding a
//! client's stream renews its lease to now + timeout when the stream opens and then every third
//! of the timeout, in one `ZADD` per room (all the room's clients streaming on that node), for
//! all rooms in one round trip; when the node's last stream of that client closes, it sets the
//! lease to close + timeout. A lease in its grace period ends in `.5` (a join, a close); renewals
//! are whole milliseconds, so `ListParticipants` can tell connected clients from the others. If
//! the node dies, its renewals stop and the leases run out.
//!
//! Which rooms to look at: the global sorted set `roomctl:presence` holds, for every room with
//! leases, a time no later than its earliest lease. A room's first lease puts it there (before
//! the join commits, so a crash can leave a harmless extra entry but never a missing one), and
//! leases only move later, so the entry stays early enough. Every node takes the rooms that are
//! due, times their lapsed clients out through the room's writer (the commit script checks that
//! each lease is still lapsed, so a client that came back in time stays, and the seq check makes
//! the removal happen once whichever node gets there first), then moves the entry to the
//! room's next lease with a compare-and-set that yields to any concurrent change.
//!
//! `Presence` holds this node's share (its open streams and closes) and nothing else; a time-out
//! is a command through the room's writer, never a write of its own to the room's members.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use redis::Value;

use super::keys::{array, millis, score_of, text, Keys};
use super::schedule::{Due, Schedule};
use super::Shared;
use crate::clock::Clock;
use crate::engine::{Applied, Caller, Command, Reply};
use crate::error::Error;

/// The rooms whose presence must be checked, by when.
pub(super) const PRESENCE: Schedule = Schedule {
    key: "roomctl:presence",
    op: "presence",
};
/// Most due rooms one node checks per batch.
const DUE_PER_BATCH: usize = 64;
/// Most batches of due rooms one node checks per round.
const BATCHES_PER_ROUND: usize = 32;

/// This node's share of presence: the client streams open on it, and the closes not yet
/// written to their leases.
pub(super) struct Presence {
    /// `--presence-timeout`; None: presence is off.
    timeout: Option<Duration>,
    clock: Clock,
    local: Mutex<Local>,
}

/// The stream counts and pending closes of this node's clients.
#[derive(Default)]
struct Local {
    /// Streams open on this node, by room and client.
    streams: HashMap<String, HashMap<String, u32>>,
    /// Clients whose last stream on this node closed, and when, not yet written.
    closed: HashMap<(String, String), SystemTime>,
}

/// One stream's share in its client's presence on this node.
pub(super) struct Release {
    presence: Weak<Presence>,
    room_id: String,
    client_id: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let Some(presence) = self.presence.upgrade() else {
            return;
        };
        let mut local = presence.local();
        let Some(clients) = local.streams.get_mut(&self.room_id) else {
            return;
        };
        let Some(count) = clients.get_mut(&self.client_id) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            clients.remove(&self.client_id);
            if clients.is_empty() {
                local.streams.remove(&self.room_id);
            }
            let key = (self.room_id.clone(), self.client_id.clone());
            local.closed.insert(key, presence.clock.now());
        }
    }
}

/// A lease's score: `at + timeout` in milliseconds, `.5` when it starts a grace period.
fn score(at: SystemTime, timeout: Duration, grace: bool) -> String {
    let ms = millis(at) + timeout.as_millis() as u64;
    if grace {
        format!("{ms}.5")
    } else {
        ms.to_string()
    }
}

impl Presence {
    /// No streams yet; `timeout` None: presence is off.
    pub(super) fn new(timeout: Option<Duration>, clock: Clock) -> Self {
        Self {
            timeout,
            clock,
            local: Mutex::default(),
        }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a stream as `client_id` of `room_id` on this node until the returned guard is
    /// dropped. The caller renews the lease as it opens the stream.
    pub(super) fn hold(self: &Arc<Self>, room_id: &str, client_id: &str) -> Release {
        let mut local = self.local();
        *local
            .streams
            .entry(room_id.to_owned())
            .or_default()
            .entry(client_id.to_owned())
            .or_default() += 1;
        local
            .closed
            .remove(&(room_id.to_owned(), client_id.to_owned()));
        Release {
            presence: Arc::downgrade(self),
            room_id: room_id.to_owned(),
            client_id: client_id.to_owned(),
        }
    }

    /// Adds to `pipe` the renewal of `client_id`'s lease in `keys`'s room (an existing lease
    /// only, and only later).
    pub(super) fn renew(&self, pipe: &mut redis::Pipeline, keys: &Keys, client_id: &str) {
        if let Some(timeout) = self.timeout {
            pipe.cmd("ZADD")
                .arg(&keys.leases)
                .arg("XX")
                .arg("GT")
                .arg(score(self.clock.now(), timeout, false))
                .arg(client_id)
                .ignore();
        }
    }

    /// The clients of a `ZRANGE leases 0 -1 WITHSCORES` reply that have a stream open now: a
    /// lease renewed (whole milliseconds, not a `.5` grace) within the last two renewal rounds,
    /// so a client whose node died shows as not connected after two thirds of the timeout.
    pub(super) fn connected(&self, leases: Value, now: SystemTime) -> HashSet<String> {
        let Some(timeout) = self.timeout else {
            return HashSet::new();
        };
        let recent = (millis(now) + timeout.as_millis() as u64 / 3) as f64;
        array(leases)
            .chunks(2)
            .filter_map(|pair| Some((text(pair.first()?)?, score_of(pair.get(1)?)?)))
            .filter(|(_, lease)| lease.fract() == 0.0 && *lease > recent)
            .map(|(client_id, _)| client_id)
            .collect()
    }

    /// Adds to `pipe` what this node owes the leases at `now`: the renewal of every client with
    /// a stream open here (one `ZADD` per room), and the grace of every client whose last stream
    /// here closed since the last call. Answers whether `pipe` has anything to send.
    fn write_leases(&self, pipe: &mut redis::Pipeline, timeout: Duration, now: SystemTime) -> bool {
        let renewed = score(now, timeout, false);
        let mut local = self.local();
        for (room_id, clients) in &local.streams {
            let cmd = pipe
                .cmd("ZADD")
                .arg(Keys::new(room_id).leases)
                .arg("XX")
                .arg("GT");
            for client_id in clients.keys() {
                cmd.arg(&renewed).arg(client_id);
            }
            cmd.ignore();
        }
        let anything = !local.streams.is_empty() || !local.closed.is_empty();
        for ((room_id, client_id), at) in std::mem::take(&mut local.closed) {
            pipe.cmd("ZADD")
                .arg(Keys::new(&room_id).leases)
                .arg("XX")
                .arg("GT")
                .arg(score(at, timeout, true))
                .arg(client_id)
                .ignore();
        }
        anything
    }
}

impl Shared {
    /// Puts `room_id` in the index of rooms to check, at its first lease's end: called before
    /// the commit that gives an empty room its first lease. Overwrites (rather than lowers) a
    /// stale entry, so a concurrent reschedule that read it yields.
    pub(super) async fn watch_presence(&self, room_id: &str, now: SystemTime) -> Result<(), Error> {
        let Some(timeout) = self.config.rooms.presence_timeout else {
            return Ok(());
        };
        let first = millis(now) + timeout.as_millis() as u64;
        PRESENCE.set(self, room_id, first).await
    }

    /// One round of this node's presence work: write the leases of streams that closed, renew
    /// those of open streams, then time out the lapsed clients of due rooms.
    async fn presence_round(self: &Arc<Self>, timeout: Duration) -> Result<(), Error> {
        let now = self.clock.now();
        let mut pipe = redis::pipe();
        if self.presence.write_leases(&mut pipe, timeout, now) {
            self.timed("presence", pipe.query_async::<()>(&mut self.conn()))
                .await?;
        }
        self.time_out_due(timeout).await
    }

    /// Times out the lapsed clients of the rooms whose check is due, a batch at a time until
    /// none is left or the round has done [`BATCHES_PER_ROUND`] (a burst, such as a node dying
    /// with thousands of clients, is worked off in one round).
    async fn time_out_due(self: &Arc<Self>, timeout: Duration) -> Result<(), Error> {
        for _ in 0..BATCHES_PER_ROUND {
            if self.time_out_batch(timeout).await? < DUE_PER_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Times out the lapsed clients of up to [`DUE_PER_BATCH`] due rooms, and reschedules each;
    /// returns how many rooms were due.
    async fn time_out_batch(self: &Arc<Self>, timeout: Duration) -> Result<usize, Error> {
        let now = self.clock.now();
        let due = PRESENCE.due(self, now, DUE_PER_BATCH).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for Due { room_id, .. } in &due {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(Keys::new(room_id).leases)
                .arg("-inf")
                .arg(millis(now));
        }
        let lapsed: Vec<Value> = self
            .timed("presence", pipe.query_async(&mut self.conn()))
            .await?;
        // Rooms have writers of their own: their time-outs go at once.
        let time_outs = due.iter().zip(lapsed).filter_map(|(due, lapsed)| {
            let client_ids: Vec<String> = array(lapsed).iter().filter_map(text).collect();
            (!client_ids.is_empty()).then(|| self.time_out(&due.room_id, client_ids))
        });
        for outcome in futures_util::future::join_all(time_outs).await {
            outcome?;
        }
        // Each room's next check: its earliest lease, or none when it has no lease left.
        let mut pipe = redis::pipe();
        for Due { room_id, .. } in &due {
            pipe.cmd("ZRANGE")
                .arg(Keys::new(room_id).leases)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
        }
        let next: Vec<Value> = self
            .timed("presence", pipe.query_async(&mut self.conn()))
            .await?;
        let mut pipe = redis::pipe();
        for (due, next) in due.iter().zip(next) {
            let earliest = array(next).get(1).and_then(score_of);
            // A lease written since the read is at least now + timeout: never check later.
            let latest = (millis(now) + timeout.as_millis() as u64) as f64;
            let then = earliest.map(|e| e.min(latest).floor() as u64);
            PRESENCE.reschedule(&mut pipe, due, then);
        }
        self.timed("presence", pipe.query_async::<()>(&mut self.conn()))
            .await?;
        Ok(due.len())
    }

    /// Times out those of `client_ids` whose leases are still lapsed when the commit runs.
    async fn time_out(
        self: &Arc<Self>,
        room_id: &str,
        client_ids: Vec<String>,
    ) -> Result<(), Error> {
        let cmd = Command::TimeOut { client_ids };
        match self.submit(room_id, &Caller::system(), cmd).await {
            Ok(Applied {
                reply: Reply::TimedOut(removed),
                ..
            }) if !removed.is_empty() => {
                tracing::info!(%room_id, clients = ?removed, "presence timed out");
                Ok(())
            }
            Ok(_) | Err(Error::RoomNotFound { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// This node's presence work, every third of the timeout, for as long as the store lives.
pub(super) async fn keep_presence(shared: Weak<Shared>, timeout: Duration) {
    // At least a millisecond: a zero period would panic.
    let mut tick = tokio::time::interval((timeout / 3).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(err) = shared.presence_round(timeout).await {
            // Redis is away: the listener reports it; leases are renewed next round.
            tracing::debug!(err = %err.detail(), "presence round failed");
        }
    }
}
