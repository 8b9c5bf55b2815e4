//! A room's state apart from its log: its members and departed clients, its lock, its bans
//! ([`super::bans::BanList`]) and remembered answers ([`super::answers::AnswerCache`]), and the
//! limits it is held to. The rules ([`super::rules`]) change it; stores persist it. Pure; may
//! depend on the answers, the bans, the commands and the generated types only.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use super::answers::{AnswerCache, Remembered, DEFAULT_ANSWER_BYTES};
use super::bans::{Ban, BanList};
use super::command::Change;
use crate::pb::{self, event::Payload};

/// How many participants a room holds unless told otherwise (`--max-room-members`): enough for
/// any meeting, and a `ListParticipants` answer of that many stays far under the 4 MiB limit.
pub const DEFAULT_MAX_MEMBERS: usize = 10_000;

/// What a room holds at most, whatever its callers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLimits {
    /// Participants (`--max-room-members`).
    pub max_members: usize,
    /// Bytes of remembered answers ([`DEFAULT_ANSWER_BYTES`]).
    pub answer_bytes: usize,
}

impl Default for RoomLimits {
    fn default() -> Self {
        Self {
            max_members: DEFAULT_MAX_MEMBERS,
            answer_bytes: DEFAULT_ANSWER_BYTES,
        }
    }
}

/// Where a client stands in a room, as far as subscribing as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStatus {
    /// In the room, owned by this identity.
    Present {
        /// The owning identity.
        identity: String,
    },
    /// Gone; its own streams end with the event at `end_seq`, still in the history.
    Departed {
        /// The identity that owned it.
        identity: String,
        /// Seq of the event that ends the client's streams.
        end_seq: u64,
    },
    /// Never seen, or its departure has left the history.
    Unknown,
}

/// A member of a room and the seq it joined at, which orders `ListParticipants`.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) participant: pb::Participant,
    pub(super) join_seq: u64,
}

/// A room's members by client id. Each is boxed in a set keyed by its own `client_id`: a map
/// from client id would hold every id twice, and its buckets (four in a room of one) would each
/// be a member's size, most of a small room's memory.
#[derive(Debug, Clone, Default)]
pub(super) struct Members(HashSet<ByClientId>);

/// A member, hashed and compared by its client id.
#[derive(Debug, Clone)]
struct ByClientId(Box<Member>);

impl ByClientId {
    fn client_id(&self) -> &str {
        &self.0.participant.client_id
    }
}

impl PartialEq for ByClientId {
    fn eq(&self, other: &Self) -> bool {
        self.client_id() == other.client_id()
    }
}

impl Eq for ByClientId {}

impl Hash for ByClientId {
    // As `str` hashes, which `Borrow<str>` requires.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.client_id().hash(state);
    }
}

impl Borrow<str> for ByClientId {
    fn borrow(&self) -> &str {
        self.client_id()
    }
}

impl Members {
    pub(super) fn get(&self, client_id: &str) -> Option<&Member> {
        self.0.get(client_id).map(|m| &*m.0)
    }

    /// Adds `member`, replacing the one with its client id.
    pub(super) fn insert(&mut self, member: Member) {
        self.0.replace(ByClientId(Box::new(member)));
    }

    pub(super) fn remove(&mut self, client_id: &str) {
        self.0.remove(client_id);
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.0.iter().map(|m| &*m.0)
    }
}

/// The clients that left a room, as long as their departure is in the history: their late
/// streams end with it rather than out of range.
#[derive(Debug, Clone, Default)]
struct Departed {
    /// Each one's identity and the seq of the event that ended its streams.
    by_client: HashMap<String, (String, u64)>,
    /// The same clients in departure order, so forgetting those older than the history is a
    /// walk from the front instead of a scan.
    order: VecDeque<(u64, String)>,
}

/// Everything a room knows apart from its log. Its fields are the engine's: the rules read and
/// change them; outside the engine a room is read through its methods.
#[derive(Debug, Clone)]
pub struct RoomState {
    /// Shared with the store that keeps the room, which files it under the same id.
    pub(super) room_id: Arc<str>,
    pub(super) epoch: String,
    pub(super) seq: u64,
    /// How many participants the room has; a store that restores only some `members` still
    /// knows the count.
    pub(super) population: usize,
    /// The most participants it may have.
    pub(super) max_members: usize,
    pub(super) members: Members,
    /// None while no departure is in the history: most rooms' members stay.
    departed: Option<Box<Departed>>,
    /// Recent answers, for idempotent retries.
    pub(super) answers: AnswerCache,
    /// Whether joins as participant are refused.
    pub(super) locked: bool,
    /// Its bans; an empty room is kept until its empty-room TTL has passed since the last one
    /// ended too.
    pub(super) bans: BanList,
}

impl RoomState {
    /// A new, empty room whose log is `epoch`.
    pub fn new(room_id: impl Into<Arc<str>>, epoch: impl Into<String>) -> Self {
        Self {
            room_id: room_id.into(),
            epoch: epoch.into(),
            seq: 0,
            population: 0,
            max_members: DEFAULT_MAX_MEMBERS,
            members: Members::default(),
            departed: None,
            answers: AnswerCache::new(DEFAULT_ANSWER_BYTES),
            locked: false,
            bans: BanList::default(),
        }
    }

    /// The same room, locked or not, as a store read it back.
    pub fn with_lock(mut self, locked: bool) -> Self {
        self.locked = locked;
        self
    }

    /// The same room with `bans_in_force` bans in force, of which a store read back `bans`
    /// (those its commands name; expired ones are ignored).
    pub fn with_bans(
        mut self,
        bans: impl IntoIterator<Item = Ban>,
        bans_in_force: usize,
        now: SystemTime,
    ) -> Self {
        self.bans = BanList::restore(bans, bans_in_force, now);
        self
    }

    /// The same room, held to `limits`.
    pub fn with_limits(mut self, limits: RoomLimits) -> Self {
        self.max_members = limits.max_members;
        self.answers.set_budget(limits.answer_bytes);
        self
    }

    /// A room as a store read it back: its `population`, `members` with the seq they joined at,
    /// and remembered answers. A store may restore only the members and answers its commands
    /// name; commands look at no others.
    pub fn restore(
        room_id: impl Into<Arc<str>>,
        epoch: impl Into<String>,
        seq: u64,
        population: usize,
        members: impl IntoIterator<Item = (pb::Participant, u64)>,
        answers: impl IntoIterator<Item = Remembered>,
    ) -> Self {
        let mut state = Self::new(room_id, epoch);
        state.seq = seq;
        state.population = population;
        for (participant, join_seq) in members {
            state.members.insert(Member {
                participant,
                join_seq,
            });
        }
        state.answers.restore(answers);
        state
    }

    /// The room's id.
    pub fn room_id(&self) -> &str {
        &self.room_id
    }

    /// The room's id, to file the room under without copying it.
    pub fn shared_room_id(&self) -> &Arc<str> {
        &self.room_id
    }

    /// The id of the room's log.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The seq of the newest event (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether nobody is in the room.
    pub fn is_empty(&self) -> bool {
        self.population == 0
    }

    /// How many participants the room has.
    pub fn population(&self) -> usize {
        self.population
    }

    /// Whether the room is locked.
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// The bans in force at `now`, soonest to end first.
    pub fn bans(&self, now: SystemTime) -> Vec<Ban> {
        self.bans.in_force(now)
    }

    /// When the room's last ban ends or ended (an unban ends its ban); None if it never had
    /// one.
    pub fn bans_end(&self) -> Option<SystemTime> {
        self.bans.end()
    }

    /// Participants in join order.
    pub fn participants(&self) -> Vec<pb::Participant> {
        let mut members: Vec<&Member> = self.members.iter().collect();
        members.sort_unstable_by_key(|m| m.join_seq);
        members.into_iter().map(|m| m.participant.clone()).collect()
    }

    /// Where `client_id` stands.
    pub fn client_status(&self, client_id: &str) -> ClientStatus {
        if let Some(member) = self.members.get(client_id) {
            return ClientStatus::Present {
                identity: member.participant.identity.clone(),
            };
        }
        match self
            .departed
            .as_ref()
            .and_then(|d| d.by_client.get(client_id))
        {
            Some((identity, end_seq)) => ClientStatus::Departed {
                identity: identity.clone(),
                end_seq: *end_seq,
            },
            None => ClientStatus::Unknown,
        }
    }

    /// Forgets departed clients whose departure is older than `oldest_seq`, the oldest event the
    /// history still holds: their late cursors are out of range anyway.
    pub fn forget_departed_before(&mut self, oldest_seq: u64) {
        let Some(departed) = &mut self.departed else {
            return;
        };
        while let Some((end_seq, _)) = departed.order.front() {
            if *end_seq >= oldest_seq {
                break;
            }
            if let Some((_, client_id)) = departed.order.pop_front() {
                departed.by_client.remove(&client_id);
            }
        }
        if departed.order.is_empty() {
            self.departed = None;
        }
    }

    /// The room's next event, numbered.
    pub(super) fn event(&mut self, now: SystemTime, payload: Payload) -> pb::Event {
        self.seq += 1;
        pb::Event {
            seq: self.seq,
            epoch: self.epoch.clone(),
            room_id: self.room_id.to_string(),
            time: Some(now.into()),
            payload: Some(payload),
        }
    }

    /// Removes `client_id`, owned by `identity`, whose streams end with the event at `end_seq`.
    pub(super) fn depart(&mut self, client_id: &str, identity: String, end_seq: u64) -> Change {
        self.members.remove(client_id);
        self.population = self.population.saturating_sub(1);
        let departed = self.departed.get_or_insert_default();
        departed
            .by_client
            .insert(client_id.to_owned(), (identity.clone(), end_seq));
        departed.order.push_back((end_seq, client_id.to_owned()));
        Change::Departed {
            client_id: client_id.to_owned(),
            identity,
            end_seq,
        }
    }
}
