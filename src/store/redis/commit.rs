//! The commit of a batch as the Redis scripts see it: `commit.lua` (the compare-and-set that
//! applies a batch atomically) and `confirm.lua` (which shows it once replicas hold it), and the
//! one typed pair that packs a commit's arguments ([`Commit::invoke`]) and reads its reply
//! ([`Committed::of`]). The scripts' argument order lives here and at the top of each script,
//! nowhere else.

use std::time::SystemTime;

use prost::Message;

use super::keys::{millis, Keys, StoredAnswer, StoredMember};
use super::RedisConfig;
use crate::engine::{Applied, Ban, Change, Reply};
use crate::pb;

/// `commit.lua`.
pub(super) const COMMIT: &str = include_str!("commit.lua");
/// `confirm.lua`.
pub(super) const CONFIRM: &str = include_str!("confirm.lua");

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
    pub(super) publish: Option<(&'static str, Vec<u8>)>,
    pub(super) now: SystemTime,
    pub(super) assumed: Assumed<'a>,
    pub(super) changes: Changes<'a>,
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
    /// Remembered answers: key, encoding, expiry (ms).
    answers: Vec<(&'a str, Vec<u8>, u64)>,
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
                    changes
                        .answers
                        .push((&answer.key, stored.encode_to_vec(), expires_at_ms));
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
    pub(super) fn invoke<'s>(
        &self,
        script: &'s redis::Script,
        keys: &Keys,
    ) -> redis::ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        for key in keys.room() {
            call.key(key);
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
            .arg(self.bounds.history_bytes);
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
        for (key, value, expires_at_ms) in &changes.answers {
            call.arg(*key).arg(value).arg(*expires_at_ms);
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

/// What the commit script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committed {
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
    pub(super) fn of(reply: i64) -> Self {
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

#[cfg(test)]
#[path = "commit_tests.rs"]
mod tests;
