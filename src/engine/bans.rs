//! The bans of a room: who is kept out until when, how many are in force, and when the last
//! one ends (an empty room with a ban is kept until then). Pure; may depend on errors and the
//! generated types only.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Limit};
use crate::pb;

/// How many bans one room keeps in force at most; a drop that would ban more fails
/// `TOO_MANY_BANS` and drops nobody. Expired bans do not count.
pub const MAX_BANS: usize = 10_000;

/// The longest ban a drop may set (`ban_seconds`): 30 days.
pub const MAX_BAN: Duration = Duration::from_secs(2_592_000);

/// An identity kept out of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The banned identity.
    pub identity: String,
    /// When the ban ends.
    pub until: SystemTime,
    /// Who set it (or last extended it).
    pub moderator: String,
}

impl Ban {
    /// The ban as the API shows it.
    pub fn to_pb(&self) -> pb::Ban {
        pb::Ban {
            identity: self.identity.clone(),
            until: Some(self.until.into()),
            moderator: self.moderator.clone(),
        }
    }
}

/// The bans a room knows: every ban on the memory store, those its commands name on Redis (with
/// the count of all bans in force, which a store reads).
#[derive(Debug, Clone, Default)]
pub(super) struct BanList(
    /// None until the room has a ban, as most rooms never do: a node holds a million rooms.
    Option<Box<Bans>>,
);

#[derive(Debug, Clone, Default)]
struct Bans {
    /// By identity.
    known: HashMap<String, Ban>,
    /// How many bans are in force in the room (known or not).
    in_force: usize,
    /// When the last ban ends or ended (an unban ends its ban then).
    end: Option<SystemTime>,
}

impl BanList {
    /// The bans a store read back (those in force at `now`), of `in_force` in all.
    pub(super) fn restore(
        bans: impl IntoIterator<Item = Ban>,
        in_force: usize,
        now: SystemTime,
    ) -> Self {
        let known: HashMap<String, Ban> = bans
            .into_iter()
            .filter(|ban| ban.until > now)
            .map(|ban| (ban.identity.clone(), ban))
            .collect();
        let in_force = in_force.max(known.len());
        Self((in_force > 0).then(|| {
            Box::new(Bans {
                known,
                in_force,
                end: None,
            })
        }))
    }

    /// The ban keeping `identity` out at `now`, if any.
    pub(super) fn of(&self, identity: &str, now: SystemTime) -> Option<&Ban> {
        let ban = self.0.as_ref()?.known.get(identity);
        ban.filter(|ban| ban.until > now)
    }

    /// The bans in force at `now`, soonest to end first.
    pub(super) fn in_force(&self, now: SystemTime) -> Vec<Ban> {
        let Some(bans) = &self.0 else {
            return Vec::new();
        };
        let mut bans: Vec<Ban> = bans
            .known
            .values()
            .filter(|ban| ban.until > now)
            .cloned()
            .collect();
        bans.sort_by(|a, b| (a.until, &a.identity).cmp(&(b.until, &b.identity)));
        bans
    }

    /// When the last ban ends or ended; None if there never was one.
    pub(super) fn end(&self) -> Option<SystemTime> {
        self.0.as_ref()?.end
    }

    /// Forgets the known bans that have ended by `now`.
    pub(super) fn forget_ended(&mut self, now: SystemTime) {
        let Some(bans) = &mut self.0 else {
            return;
        };
        let before = bans.known.len();
        bans.known.retain(|_, ban| ban.until > now);
        bans.in_force = bans
            .in_force
            .saturating_sub(before - bans.known.len())
            .max(bans.known.len());
    }

    /// Whether `identities` can be banned at `now` without passing [`MAX_BANS`]; else
    /// `TOO_MANY_BANS`. Forgets ended bans first.
    pub(super) fn make_room_for<'a>(
        &mut self,
        identities: impl IntoIterator<Item = &'a String>,
        now: SystemTime,
    ) -> Result<(), Error> {
        self.forget_ended(now);
        let new = identities
            .into_iter()
            .filter(|identity| self.of(identity, now).is_none())
            .count();
        let in_force = self.0.as_ref().map_or(0, |bans| bans.in_force);
        if in_force + new > MAX_BANS {
            return Err(Error::LimitReached {
                limit: Limit::RoomBans,
                max: MAX_BANS,
            });
        }
        Ok(())
    }

    /// Bans `identity` until `until`, or keeps its ban if that ends later; returns the ban.
    pub(super) fn ban(&mut self, identity: String, until: SystemTime, moderator: &str) -> Ban {
        let bans = self.0.get_or_insert_default();
        let ban = match bans.known.get(&identity) {
            Some(ban) if ban.until >= until => ban.clone(),
            existing => {
                if existing.is_none() {
                    bans.in_force += 1;
                }
                Ban {
                    identity: identity.clone(),
                    until,
                    moderator: moderator.to_owned(),
                }
            }
        };
        bans.known.insert(identity, ban.clone());
        bans.end = bans.end.max(Some(ban.until));
        ban
    }

    /// Lifts `identity`'s ban at `now`; `BAN_NOT_FOUND` if it has none in force. No ban is in
    /// force from then on but those left, whatever the lifted one would have done.
    pub(super) fn lift(&mut self, identity: String, now: SystemTime) -> Result<(), Error> {
        self.forget_ended(now);
        let Some(bans) = self.0.as_mut().filter(|b| b.known.contains_key(&identity)) else {
            return Err(Error::BanNotFound { identity });
        };
        bans.known.remove(&identity);
        bans.in_force = bans.in_force.saturating_sub(1);
        let left = bans.known.values().map(|ban| ban.until).max();
        bans.end = Some(left.map_or(now, |until| until.max(now)));
        Ok(())
    }
}
