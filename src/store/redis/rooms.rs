//! The fleet's list of rooms, behind `ListRooms`, without `KEYS` or `SCAN`.
//!
//! `roomctl:rooms` is a sorted set of every room id, all scored 0, so Redis orders it by id and
//! a page is one `ZRANGE ... BYLEX` after the previous page's last id: a room that exists from
//! the first page to the last is listed exactly once. A writer adds a room before the commit
//! that creates it (so a crash cannot leave a room unlisted) and again after (in case a sweep
//! removed the entry in between); on one Redis, where the list shares the rooms' node, the
//! commit itself lists the room it creates and schedules the room it leaves empty, atomically
//! and with no request of its own. Rooms are forgotten by their keys expiring, which nobody is
//! told of, so the commit that leaves a room empty puts it on `roomctl:rooms:expiring` at the
//! time its keys expire; every node works that schedule off, dropping the rooms that are gone
//! from the list and rescheduling the others. Removal re-checks the room afterwards and puts
//! it back if it was created again meanwhile. A slow walk over the whole list, a page per
//! sweep, catches entries that lost their schedule (a node that died right after a commit),
//! and, with webhooks on, rooms whose events an endpoint has not had that nothing made due.
//! It writes only the index, its schedule and the webhooks' due sets, never a room's own keys.

use std::sync::Weak;
use std::time::Duration;

use redis::Value;

use super::commit::Listing;
use super::keys::{meta, number, text, Keys};
use super::schedule::{Due, Schedule};
use super::Shared;
use crate::error::Error;
use crate::pb;

/// Every room id.
pub(super) const ROOMS: &str = "roomctl:rooms";
/// Empty rooms, by when their keys expire.
pub(super) const EXPIRING: Schedule = Schedule {
    key: "roomctl:rooms:expiring",
    op: "rooms",
};
/// Most rooms looked at per sweep batch, and per step of the walk over the whole list.
const SWEEP_BATCH: usize = 100;
/// Most batches of expiring rooms one node works off per sweep.
const BATCHES_PER_SWEEP: usize = 32;

impl Shared {
    /// On one Redis with cluster mode off, what a commit of `room_id` needs to keep the list
    /// itself; None on a cluster (even one of a single node), where the list lives in other
    /// slots than the room and its writer keeps it.
    pub(super) fn listing<'a>(&'a self, room_id: &'a str) -> Option<Listing<'a>> {
        self.commits_list_rooms.then_some(Listing {
            room_id,
            rooms: ROOMS,
            expiring: EXPIRING.key,
            due: self.due_in_commit(),
        })
    }

    /// Lists `room_id`.
    pub(super) async fn index_room(&self, room_id: &str) -> Result<(), Error> {
        self.timed(
            "rooms",
            redis::cmd("ZADD")
                .arg(ROOMS)
                .arg(0)
                .arg(room_id)
                .query_async::<()>(&mut self.conn()),
        )
        .await
    }

    /// Schedules a look at `room_id`, left empty by a commit, for when its keys expire (`at`,
    /// ms). The commit stands whatever happens here: a lost schedule only delays the room's
    /// removal from the list until the walk finds it.
    pub(super) async fn room_emptied(&self, room_id: &str, at: u64) {
        if let Err(err) = EXPIRING.set(self, room_id, at).await {
            tracing::debug!(%room_id, err = %err.detail(), "could not schedule an empty room");
        }
    }

    /// Up to `limit` rooms with ids after `after`, in id order, skipping listed rooms that are
    /// gone.
    pub(super) async fn list_rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<pb::RoomSummary>, Error> {
        crate::store::page_of_rooms(after, limit, |cursor, want| {
            self.summaries_after(cursor, want)
        })
        .await
    }

    /// The next (at most `want`) listed room ids after `after`, and the summaries of those
    /// that still exist, read in one pipeline.
    async fn summaries_after(
        &self,
        after: Option<String>,
        want: usize,
    ) -> Result<(Vec<String>, Vec<pb::RoomSummary>), Error> {
        let ids = self.listed_after(after.as_deref(), want).await?;
        if ids.is_empty() {
            return Ok((ids, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for room_id in &ids {
            let keys = Keys::new(room_id);
            keys.add_meta(&mut pipe);
            pipe.cmd("HLEN").arg(&keys.members);
        }
        let replies: Vec<Value> = self
            .timed("rooms", pipe.query_async(&mut self.conn()))
            .await?;
        let mut rooms = Vec::with_capacity(ids.len());
        for (room_id, reply) in ids.iter().zip(replies.chunks(2)) {
            let Some(meta) = meta(reply[0].clone())? else {
                continue;
            };
            rooms.push(pb::RoomSummary {
                room_id: room_id.clone(),
                participants: number(&reply[1]).unwrap_or(0) as u32,
                locked: meta.locked,
                seq: meta.visible(),
                epoch: meta.epoch,
            });
        }
        Ok((ids, rooms))
    }

    /// Up to `limit` listed room ids after `after` (None: from the first), in id order.
    async fn listed_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, Error> {
        let from = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let ids: Vec<Value> = self
            .timed(
                "rooms",
                redis::cmd("ZRANGE")
                    .arg(ROOMS)
                    .arg(from)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut self.conn()),
            )
            .await?;
        Ok(ids.iter().filter_map(text).collect())
    }

    /// Removes from the list those of `candidates` that no longer exist, then lists again any
    /// of those that a join created meanwhile.
    async fn unlist_gone(&self, candidates: &[String]) -> Result<(), Error> {
        let gone = self.missing(candidates).await?;
        if gone.is_empty() {
            return Ok(());
        }
        self.timed(
            "rooms",
            redis::cmd("ZREM")
                .arg(ROOMS)
                .arg(&gone)
                .query_async::<()>(&mut self.conn()),
        )
        .await?;
        let still_gone = self.missing(&gone).await?;
        for room_id in gone.iter().filter(|id| !still_gone.contains(id)) {
            self.index_room(room_id).await?;
        }
        Ok(())
    }

    /// Those of `room_ids` whose room does not exist.
    async fn missing(&self, room_ids: &[String]) -> Result<Vec<String>, Error> {
        // Redis refuses an empty pipeline ("empty command"), which failed every sweep of a node
        // with nothing to look at.
        if room_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for room_id in room_ids {
            pipe.cmd("EXISTS").arg(Keys::new(room_id).meta);
        }
        let exists: Vec<u64> = self
            .timed("rooms", pipe.query_async(&mut self.conn()))
            .await?;
        Ok(room_ids
            .iter()
            .zip(exists)
            .filter(|(_, exists)| *exists == 0)
            .map(|(id, _)| id.clone())
            .collect())
    }

    /// Works off up to [`SWEEP_BATCH`] expiring rooms that are due: unlists those that are
    /// gone, and reschedules the others to when their keys now expire (or drops their entry if
    /// they are in use again). Returns how many were due.
    async fn sweep_expiring(&self) -> Result<usize, Error> {
        let due = EXPIRING.due(self, self.clock.now(), SWEEP_BATCH).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for Due { room_id, .. } in &due {
            pipe.cmd("PEXPIRETIME").arg(Keys::new(room_id).meta);
        }
        let expiries: Vec<Value> = self
            .timed("rooms", pipe.query_async(&mut self.conn()))
            .await?;
        let expiries: Vec<i64> = expiries
            .iter()
            .map(|v| match v {
                Value::Int(n) => *n,
                _ => -1,
            })
            .collect();
        let gone: Vec<String> = due
            .iter()
            .zip(&expiries)
            .filter(|(_, at)| **at == -2)
            .map(|(due, _)| due.room_id.clone())
            .collect();
        self.unlist_gone(&gone).await?;
        let mut pipe = redis::pipe();
        for (due, at) in due.iter().zip(expiries) {
            // -2: gone; -1: in use again (its next emptying schedules it anew).
            let then = u64::try_from(at).ok();
            EXPIRING.reschedule(&mut pipe, due, then);
        }
        self.timed("rooms", pipe.query_async::<()>(&mut self.conn()))
            .await?;
        Ok(due.len())
    }

    /// One step of the walk over the whole list: the next [`SWEEP_BATCH`] entries after
    /// `cursor`, unlisting those that are gone and making due for webhooks those whose events
    /// an endpoint has not had. Returns where the next step starts (None: over
    /// from the first).
    async fn walk_step(&self, cursor: Option<&str>) -> Result<Option<String>, Error> {
        let ids = self.listed_after(cursor, SWEEP_BATCH).await?;
        self.unlist_gone(&ids).await?;
        self.make_behind_due(&ids).await?;
        Ok(if ids.len() < SWEEP_BATCH {
            None
        } else {
            ids.last().cloned()
        })
    }
}

/// How often a node sweeps the list: a few times per empty-room TTL, at most every 30 s.
fn sweep_period(empty_room_ttl: Duration) -> Duration {
    (empty_room_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// This node's share of keeping the list true, for as long as the store lives.
pub(super) async fn keep_rooms(shared: Weak<Shared>, empty_room_ttl: Duration) {
    let mut tick = tokio::time::interval(sweep_period(empty_room_ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut walk = None;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match sweep(&shared, walk.as_deref()).await {
            Ok(next) => walk = next,
            // Redis is away: the listener reports it; the next sweep catches up.
            Err(err) => tracing::debug!(err = %err.detail(), "rooms sweep failed"),
        }
    }
}

/// Works off the expiring rooms, then takes one step of the walk from `walk`; returns where
/// the walk goes on.
async fn sweep(shared: &Shared, walk: Option<&str>) -> Result<Option<String>, Error> {
    for _ in 0..BATCHES_PER_SWEEP {
        if shared.sweep_expiring().await? < SWEEP_BATCH {
            break;
        }
    }
    shared.walk_step(walk).await
}
