//! The room engine: the pure rules of a room.
//!
//! Given a room's state, who is calling and a validated command, it decides whether the call is
//! allowed, changes the state and returns the events to log, already numbered. It does no I/O and
//! knows no clock but the `now` it is given, so every rule here is unit-tested without a runtime,
//! and every store (memory, Redis) applies exactly the same rules.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::{Error, LOCK_UNAUTHORIZED_CODE, UNAUTHORIZED_ACCESS_CODE};
use crate::limits::Limit;
use crate::pb::{self, event::Payload, DisconnectReason, DropOutcome, Role};

/// How long an answer is remembered for retries with the same `request_id`.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(600);

/// What one room's remembered answers may weigh at most, in bytes of their encoding (all kinds
/// together), unless told otherwise. Bounds memory against a caller that invents a new
/// `request_id` per call: past it the oldest answers are forgotten before their window ends
/// (at 200 to 300 bytes a join's answer, a room remembers some 30,000 joins). Answers belong
/// to the room's epoch: a room that is forgotten forgets them too.
pub const DEFAULT_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// How many bans one room keeps in force at most; a drop that would ban more fails
/// `TOO_MANY_BANS` and drops nobody. Expired bans do not count.
pub const MAX_BANS: usize = 10_000;

/// The longest ban a drop may set (`ban_seconds`): 30 days.
pub const MAX_BAN: Duration = Duration::from_secs(2_592_000);

/// How many participants a room holds unless told otherwise (`--max-room-members`): enough for
/// any meeting, and a `ListParticipants` answer of that many stays far under the 4 MiB limit.
pub const DEFAULT_MAX_MEMBERS: usize = 10_000;

/// The key a remembered answer is filed under: request ids are one space per caller identity
/// (and room), whatever the command, as an idempotency key is one space per account in payment
/// APIs: the same id for another kind of command is another request, refused by its
/// [`Command::fingerprint`]. The identity's length comes first, as it is free text.
pub fn answer_key(identity: &str, request_id: &str) -> String {
    format!("{}:{identity}:{request_id}", identity.len())
}

/// An answer a room remembers, as a store persists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    /// See [`answer_key`].
    pub key: String,
    /// When the answer is forgotten.
    pub expires_at: SystemTime,
    /// The [`Command::fingerprint`] of the request it answered: a retry must repeat it.
    pub fingerprint: u64,
    /// The answer retries get.
    pub reply: Reply,
}

impl Remembered {
    /// What the answer weighs against the room's budget: its key and its reply, encoded.
    pub fn weight(&self) -> usize {
        self.key.len() + self.reply.encoded_len()
    }
}

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

/// A room's remembered answers, for idempotent retries: each kept for [`IDEMPOTENCY_WINDOW`]
/// within a byte budget, past which the oldest go early.
#[derive(Debug, Clone, Default)]
struct AnswerCache {
    /// By [`answer_key`].
    answers: HashMap<String, Remembered>,
    /// The same keys in expiry order, so expiring and capping walk from the front.
    order: VecDeque<(SystemTime, String)>,
    /// The weight of every answer held.
    bytes: usize,
    /// The most that `bytes` may be.
    budget: usize,
}

impl AnswerCache {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// Keeps `answer` (replacing one under its key), then forgets what is expired at `now` or
    /// over the budget, oldest first.
    fn keep(&mut self, answer: Remembered, now: SystemTime) {
        self.order
            .push_back((answer.expires_at, answer.key.clone()));
        self.bytes += answer.weight();
        if let Some(old) = self.answers.insert(answer.key.clone(), answer) {
            self.bytes -= old.weight();
        }
        self.forget_expired(now);
    }

    fn forget_expired(&mut self, now: SystemTime) {
        while let Some((expires_at, key)) = self.order.front() {
            let current = self.answers.get(key);
            // An entry of the order whose answer was replaced since says nothing.
            let stale = current.is_none_or(|answer| answer.expires_at != *expires_at);
            if !stale && *expires_at > now && self.bytes <= self.budget {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                if !stale {
                    if let Some(answer) = self.answers.remove(&key) {
                        self.bytes -= answer.weight();
                    }
                }
            }
        }
    }

    /// The answer to a retry of the request `fingerprint` under `key`, if one is remembered;
    /// `REQUEST_ID_REUSED` if the key answered another request.
    fn recall(
        &mut self,
        key: &str,
        fingerprint: u64,
        request_id: &str,
        now: SystemTime,
    ) -> Result<Option<Reply>, Error> {
        self.forget_expired(now);
        match self.answers.get(key) {
            None => Ok(None),
            Some(answer) if answer.fingerprint == fingerprint => Ok(Some(answer.reply.clone())),
            Some(_) => Err(Error::RequestIdReused {
                request_id: request_id.to_owned(),
            }),
        }
    }
}

/// The role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    /// An end-user in one room.
    Participant,
    /// A moderator of one room.
    Moderator,
    /// A trusted internal service, for one room or all (`*`).
    Service,
}

/// Which rooms a token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomScope {
    /// Exactly this room.
    One(String),
    /// Every room (`room: "*"`, service tokens only).
    All,
}

/// The verified caller of an RPC, as its token describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`.
    pub identity: String,
    /// The token's `room`.
    pub scope: RoomScope,
    /// The token's `role`.
    pub role: TokenRole,
}

impl Caller {
    /// roomctl itself, for what no one calls: removing clients whose presence ran out.
    pub fn system() -> Self {
        Self {
            identity: "roomctl".into(),
            scope: RoomScope::All,
            role: TokenRole::Service,
        }
    }

    /// Whether this caller is a trusted service.
    pub fn is_service(&self) -> bool {
        self.role == TokenRole::Service
    }

    /// Any token for `room_id` may act in it; service tokens for `*` act everywhere.
    pub fn check_room(&self, room_id: &str) -> Result<(), Error> {
        match &self.scope {
            RoomScope::All => Ok(()),
            RoomScope::One(room) if room == room_id => Ok(()),
            RoomScope::One(room) => Err(Error::Forbidden(format!(
                "the token is for room {room:?}, not {room_id:?}"
            ))),
        }
    }

    /// Moderators of the room and services may drop; a participant gets the vendor's 5116.
    pub fn check_may_drop(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, UNAUTHORIZED_ACCESS_CODE, "drop users")
    }

    /// Moderators of the room and services may end its session; a participant gets the
    /// vendor's 5116.
    pub fn check_may_end_session(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, UNAUTHORIZED_ACCESS_CODE, "end sessions")
    }

    /// Moderators of the room and services may list and lift bans; a participant gets the
    /// vendor's 5116.
    pub fn check_may_manage_bans(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, UNAUTHORIZED_ACCESS_CODE, "list or lift bans")
    }

    /// Moderators of the room and services may lock and unlock it; a participant gets the
    /// vendor's 5115.
    pub fn check_may_lock(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, LOCK_UNAUTHORIZED_CODE, "lock or unlock rooms")
    }

    fn check_moderator(&self, room_id: &str, code: &'static str, what: &str) -> Result<(), Error> {
        self.check_room(room_id)?;
        if self.role == TokenRole::Participant {
            return Err(Error::UnauthorizedAccess {
                code,
                detail: format!(
                    "participants may not {what}; a moderator or service token is needed"
                ),
            });
        }
        Ok(())
    }

    /// Who may subscribe how: participants only as their own clients, never as observers.
    pub fn check_may_subscribe(&self, room_id: &str, client_id: Option<&str>) -> Result<(), Error> {
        self.check_room(room_id)?;
        if client_id.is_none() && self.role == TokenRole::Participant {
            return Err(Error::Forbidden(
                "participants subscribe as one of their clients; observing needs a moderator or \
                 service token"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Only service tokens for every room may list rooms.
    pub fn check_may_list_rooms(&self) -> Result<(), Error> {
        if self.is_service() && self.scope == RoomScope::All {
            return Ok(());
        }
        Err(Error::Forbidden(
            "listing rooms needs a service token for every room (room \"*\")".into(),
        ))
    }

    /// Whether this caller may act as a client owned by `owner`.
    fn may_act_for(&self, owner: &str) -> bool {
        self.is_service() || self.identity == owner
    }
}

/// A validated `Join`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinCmd {
    /// Display name.
    pub name: String,
    /// Requested role (unspecified: the caller's default).
    pub role: Role,
    /// Requested identity (empty: the caller's own).
    pub identity: String,
    /// Idempotency key; None: the join is not remembered, and a retry joins again.
    pub request_id: Option<String>,
}

/// A validated `DropUser`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCmd {
    /// The requested ids, as sent (duplicates included).
    pub client_ids: Vec<String>,
    /// Text told to each dropped client.
    pub reason: String,
    /// Idempotency key; always set (the service generates one when the request has none).
    pub request_id: String,
    /// Ban each dropped client's identity for this long (None: no ban).
    pub ban: Option<Duration>,
}

/// A validated `DestroySession`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestroyCmd {
    /// Text told to every subscriber in `session_destroyed.message`.
    pub reason: String,
    /// Idempotency key; always set.
    pub request_id: String,
}

/// A state-changing command on one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Add a client (creates the room if needed); the new client's id is chosen by the caller of
    /// the engine so that retries of a store's atomic step keep it.
    Join {
        /// The new client's id.
        client_id: String,
        /// The validated request.
        cmd: JoinCmd,
    },
    /// Remove a client of its own accord.
    Leave {
        /// The client to remove.
        client_id: String,
    },
    /// Force-disconnect clients.
    Drop(DropCmd),
    /// Remove clients whose presence ran out (no open stream for the presence timeout). Only
    /// stores issue it, having seen the leases expire; clients no longer present are skipped.
    TimeOut {
        /// The clients whose leases expired.
        client_ids: Vec<String>,
    },
    /// Refuse joins as participant from now on.
    Lock {
        /// Idempotency key; always set.
        request_id: String,
    },
    /// Admit participants again.
    Unlock {
        /// Idempotency key; always set.
        request_id: String,
    },
    /// Remove everyone at once and unlock: the end of the session.
    Destroy(DestroyCmd),
    /// Lift an identity's ban.
    Unban {
        /// The banned identity.
        identity: String,
    },
}

impl Command {
    /// Only a join brings a room into existence; every other command needs the room to exist.
    pub fn creates_room(&self) -> bool {
        matches!(self, Command::Join { .. })
    }

    /// The command's idempotency key, if it has one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Command::Join { cmd, .. } => cmd.request_id.as_deref(),
            Command::Drop(cmd) => Some(&cmd.request_id),
            Command::Destroy(cmd) => Some(&cmd.request_id),
            Command::Lock { request_id } | Command::Unlock { request_id } => Some(request_id),
            Command::Leave { .. } | Command::TimeOut { .. } | Command::Unban { .. } => None,
        }
    }

    /// What a retry by `caller` must repeat to be the same request: a stable hash (SHA-256, the
    /// same on every node and build) of the command's kind and what the caller asked for,
    /// without the request id and without what the server chose (a join's client id). A join is
    /// taken by the role and identity it grants, so spelling out one's own (or leaving them
    /// unset) asks the same. Never 0.
    pub fn fingerprint(&self, caller: &Caller) -> u64 {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        match self {
            Command::Join { cmd, .. } => {
                field(b"join");
                field(cmd.name.as_bytes());
                let (role, identity) =
                    join_grant(caller, cmd).unwrap_or_else(|_| (cmd.role, cmd.identity.clone()));
                field(&(role as i32).to_le_bytes());
                field(identity.as_bytes());
            }
            Command::Drop(cmd) => {
                field(b"drop");
                field(&(cmd.client_ids.len() as u64).to_le_bytes());
                for client_id in &cmd.client_ids {
                    field(client_id.as_bytes());
                }
                field(cmd.reason.as_bytes());
                field(&cmd.ban.map_or(0, |ban| ban.as_secs()).to_le_bytes());
            }
            Command::Destroy(cmd) => {
                field(b"destroy");
                field(cmd.reason.as_bytes());
            }
            Command::Lock { .. } => field(b"lock"),
            Command::Unlock { .. } => field(b"unlock"),
            Command::Leave { .. } => field(b"leave"),
            Command::TimeOut { .. } => field(b"timeout"),
            Command::Unban { .. } => field(b"unban"),
        }
        let digest = hash.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first).max(1)
    }

    /// The key `caller`'s answer to this command is remembered under, if it is remembered.
    pub fn answer_key(&self, caller: &Caller) -> Option<String> {
        Some(answer_key(&caller.identity, self.request_id()?))
    }

    /// Whether the command needs every member of the room, not only those it names.
    pub fn needs_every_member(&self) -> bool {
        matches!(self, Command::Destroy(_))
    }

    /// The identities whose bans the command looks at before it runs: a join's (as
    /// [`join_grant`] decides it) and an unban's. A drop's are known only once its clients are.
    pub fn ban_identity(&self, caller: &Caller) -> Option<String> {
        match self {
            Command::Join { cmd, .. } => join_grant(caller, cmd).ok().map(|(_, id)| id),
            Command::Unban { identity } => Some(identity.clone()),
            _ => None,
        }
    }
}

/// What a command answers its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer to `Join`.
    Joined(pb::JoinResponse),
    /// The answer to `Leave`.
    Left,
    /// The answer to `DropUser` (possibly a remembered one).
    Dropped(pb::DropUserResponse),
    /// The clients a `TimeOut` removed (those still present).
    TimedOut(Vec<String>),
    /// The answer to `LockRoom` (possibly a remembered one).
    Locked(pb::LockRoomResponse),
    /// The answer to `UnlockRoom` (possibly a remembered one).
    Unlocked(pb::UnlockRoomResponse),
    /// The answer to `DestroySession` (possibly a remembered one).
    Destroyed(pb::DestroySessionResponse),
    /// The answer to `Unban`.
    Unbanned(pb::UnbanResponse),
}

impl Reply {
    /// The size of the answer on the wire (0 for those that carry nothing worth counting).
    pub fn encoded_len(&self) -> usize {
        match self {
            Reply::Joined(reply) => reply.encoded_len(),
            Reply::Dropped(reply) => reply.encoded_len(),
            Reply::Locked(reply) => reply.encoded_len(),
            Reply::Unlocked(reply) => reply.encoded_len(),
            Reply::Destroyed(reply) => reply.encoded_len(),
            Reply::Unbanned(reply) => reply.encoded_len(),
            Reply::TimedOut(ids) => ids.iter().map(String::len).sum(),
            Reply::Left => 0,
        }
    }
}

/// One change a command made to a room's members, lock or bans, for stores that persist changes
/// rather than the whole state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A client joined with the event at `join_seq`.
    Joined {
        /// The new participant.
        participant: pb::Participant,
        /// Seq of its `user_connected`.
        join_seq: u64,
    },
    /// A client left or was dropped; its streams end with the event at `end_seq`.
    Departed {
        /// The departed client.
        client_id: String,
        /// The identity that owned it.
        identity: String,
        /// Seq of the event that ends its streams.
        end_seq: u64,
    },
    /// The room was locked (true) or unlocked.
    Locked(bool),
    /// An identity was banned, or its ban extended, until `ban.until`.
    Banned(Ban),
    /// An identity's ban was lifted.
    Unbanned {
        /// The identity.
        identity: String,
    },
}

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

/// A command's outcome: the answer, the events it logged, the membership changes behind them
/// and the answer to remember (all empty for an idempotent retry).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The answer for the caller.
    pub reply: Reply,
    /// The new events, numbered from the room's previous `seq + 1`.
    pub events: Vec<pb::Event>,
    /// The membership changes, in order.
    pub changes: Vec<Change>,
    /// The answer the room now remembers for retries, if the command has a request id.
    pub remembered: Option<Remembered>,
}

impl Applied {
    /// The answer to a retry: the remembered reply, nothing logged.
    fn retry(reply: Reply) -> Self {
        Self {
            reply,
            events: Vec::new(),
            changes: Vec::new(),
            remembered: None,
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

#[derive(Debug, Clone)]
struct Member {
    participant: pb::Participant,
    join_seq: u64,
}

/// Everything a room knows apart from its log.
#[derive(Debug, Clone)]
pub struct RoomState {
    room_id: String,
    epoch: String,
    seq: u64,
    /// How many participants the room has; a store that restores only some `members` still
    /// knows the count.
    population: usize,
    /// The most participants it may have.
    max_members: usize,
    members: HashMap<String, Member>,
    departed: HashMap<String, (String, u64)>,
    /// Departed clients in departure order, so forgetting those older than the history is a
    /// walk from the front instead of a scan.
    departed_order: VecDeque<(u64, String)>,
    /// Recent answers, for idempotent retries.
    answers: AnswerCache,
    /// Whether joins as participant are refused.
    locked: bool,
    /// Bans by identity: every ban on the memory store, those its commands name on Redis.
    bans: HashMap<String, Ban>,
    /// How many bans are in force in the room (known or not).
    bans_in_force: usize,
    /// When the last ban ends or ended (an unban ends its ban then): an empty room is kept
    /// until its empty-room TTL has passed since then too.
    bans_end: Option<SystemTime>,
}

impl RoomState {
    /// A new, empty room whose log is `epoch`.
    pub fn new(room_id: impl Into<String>, epoch: impl Into<String>) -> Self {
        Self {
            room_id: room_id.into(),
            epoch: epoch.into(),
            seq: 0,
            population: 0,
            max_members: DEFAULT_MAX_MEMBERS,
            members: HashMap::new(),
            departed: HashMap::new(),
            departed_order: VecDeque::new(),
            answers: AnswerCache::new(DEFAULT_ANSWER_BYTES),
            locked: false,
            bans: HashMap::new(),
            bans_in_force: 0,
            bans_end: None,
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
        for ban in bans.into_iter().filter(|ban| ban.until > now) {
            self.bans.insert(ban.identity.clone(), ban);
        }
        self.bans_in_force = bans_in_force.max(self.bans.len());
        self
    }

    /// The same room, held to `limits`.
    pub fn with_limits(mut self, limits: RoomLimits) -> Self {
        self.max_members = limits.max_members;
        self.answers.budget = limits.answer_bytes;
        self
    }

    /// A room as a store read it back: its `population`, `members` with the seq they joined at,
    /// and remembered answers. A store may restore only the members and answers its commands
    /// name; commands look at no others.
    pub fn restore(
        room_id: impl Into<String>,
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
            state.members.insert(
                participant.client_id.clone(),
                Member {
                    participant,
                    join_seq,
                },
            );
        }
        let mut answers: Vec<Remembered> = answers.into_iter().collect();
        answers.sort_by_key(|a| a.expires_at);
        for answer in answers {
            // Not forgotten here however old: the budget is not known yet, and recalling
            // forgets what has expired.
            state
                .answers
                .order
                .push_back((answer.expires_at, answer.key.clone()));
            state.answers.bytes += answer.weight();
            state.answers.answers.insert(answer.key.clone(), answer);
        }
        state
    }

    /// The room's id.
    pub fn room_id(&self) -> &str {
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
        let mut bans: Vec<Ban> = self
            .bans
            .values()
            .filter(|ban| ban.until > now)
            .cloned()
            .collect();
        bans.sort_by(|a, b| (a.until, &a.identity).cmp(&(b.until, &b.identity)));
        bans
    }

    /// When the room's last ban ends or ended (an unban ends its ban); None if it never had
    /// one.
    pub fn bans_end(&self) -> Option<SystemTime> {
        self.bans_end
    }

    /// The ban keeping `identity` out at `now`, if any.
    fn ban_of(&self, identity: &str, now: SystemTime) -> Option<&Ban> {
        self.bans.get(identity).filter(|ban| ban.until > now)
    }

    /// Forgets the known bans that have ended by `now`.
    fn forget_ended_bans(&mut self, now: SystemTime) {
        let before = self.bans.len();
        self.bans.retain(|_, ban| ban.until > now);
        self.bans_in_force = self
            .bans_in_force
            .saturating_sub(before - self.bans.len())
            .max(self.bans.len());
    }

    /// Participants in join order.
    pub fn participants(&self) -> Vec<pb::Participant> {
        let mut members: Vec<&Member> = self.members.values().collect();
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
        match self.departed.get(client_id) {
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
        while let Some((end_seq, _)) = self.departed_order.front() {
            if *end_seq >= oldest_seq {
                break;
            }
            if let Some((_, client_id)) = self.departed_order.pop_front() {
                self.departed.remove(&client_id);
            }
        }
    }

    /// Remembers `reply` to the request `fingerprint` under `key` for [`IDEMPOTENCY_WINDOW`].
    fn remember(
        &mut self,
        key: String,
        fingerprint: u64,
        reply: &Reply,
        now: SystemTime,
    ) -> Remembered {
        let answer = Remembered {
            key,
            expires_at: now + IDEMPOTENCY_WINDOW,
            fingerprint,
            reply: reply.clone(),
        };
        self.answers.keep(answer.clone(), now);
        answer
    }

    fn event(&mut self, now: SystemTime, payload: Payload) -> pb::Event {
        self.seq += 1;
        pb::Event {
            seq: self.seq,
            epoch: self.epoch.clone(),
            room_id: self.room_id.clone(),
            time: Some(now.into()),
            payload: Some(payload),
        }
    }

    fn depart(&mut self, client_id: &str, identity: String, end_seq: u64) -> Change {
        self.members.remove(client_id);
        self.population = self.population.saturating_sub(1);
        self.departed
            .insert(client_id.to_owned(), (identity.clone(), end_seq));
        self.departed_order
            .push_back((end_seq, client_id.to_owned()));
        Change::Departed {
            client_id: client_id.to_owned(),
            identity,
            end_seq,
        }
    }
}

/// Applies `cmd` by `caller` to `state` at time `now`: checks the room-level rules, changes the
/// state and returns the answer with the events to log. A command with a request id that was
/// answered before gets that answer again, and changes nothing. On error the state is unchanged.
pub fn apply(
    state: &mut RoomState,
    caller: &Caller,
    cmd: Command,
    now: SystemTime,
) -> Result<Applied, Error> {
    // Who may moderate is checked before any remembered answer is looked up: a retry never
    // lets a caller past the rule that would refuse it.
    match &cmd {
        Command::Drop(_) => caller.check_may_drop(&state.room_id)?,
        Command::Destroy(_) => caller.check_may_end_session(&state.room_id)?,
        Command::Unban { .. } => caller.check_may_manage_bans(&state.room_id)?,
        Command::Lock { .. } | Command::Unlock { .. } => caller.check_may_lock(&state.room_id)?,
        Command::Join { .. } | Command::Leave { .. } | Command::TimeOut { .. } => {}
    }
    let key = cmd.answer_key(caller);
    let fingerprint = cmd.fingerprint(caller);
    if let (Some(key), Some(request_id)) = (&key, cmd.request_id()) {
        if let Some(reply) = state.answers.recall(key, fingerprint, request_id, now)? {
            return Ok(Applied::retry(reply));
        }
    }
    let mut applied = match cmd {
        Command::Join { client_id, cmd } => join(state, caller, client_id, cmd, now),
        Command::Leave { client_id } => leave(state, caller, &client_id, now),
        Command::Drop(cmd) => drop_users(state, caller, cmd, now),
        Command::TimeOut { client_ids } => Ok(time_out(state, client_ids, now)),
        Command::Lock { request_id } => lock(state, caller, true, request_id, now),
        Command::Unlock { request_id } => lock(state, caller, false, request_id, now),
        Command::Destroy(cmd) => destroy(state, caller, cmd, now),
        Command::Unban { identity } => unban(state, caller, identity, now),
    }?;
    applied.remembered = key.map(|key| state.remember(key, fingerprint, &applied.reply, now));
    Ok(applied)
}

/// Decides the role and identity a join gets: services choose both, others may only repeat their
/// own.
pub fn join_grant(caller: &Caller, cmd: &JoinCmd) -> Result<(Role, String), Error> {
    let own_role = match caller.role {
        TokenRole::Participant => Role::Participant,
        TokenRole::Moderator => Role::Moderator,
        TokenRole::Service => {
            let role = match cmd.role {
                Role::Unspecified => Role::Participant,
                role => role,
            };
            let identity = if cmd.identity.is_empty() {
                caller.identity.clone()
            } else {
                cmd.identity.clone()
            };
            return Ok((role, identity));
        }
    };
    if cmd.role != Role::Unspecified && cmd.role != own_role {
        return Err(Error::Forbidden(format!(
            "a {} token cannot join as {}; only service tokens choose the role",
            own_role.as_str_name(),
            cmd.role.as_str_name()
        )));
    }
    if !cmd.identity.is_empty() && cmd.identity != caller.identity {
        return Err(Error::Forbidden(
            "only service tokens join on behalf of another identity".into(),
        ));
    }
    Ok((own_role, caller.identity.clone()))
}

fn join(
    state: &mut RoomState,
    caller: &Caller,
    client_id: String,
    cmd: JoinCmd,
    now: SystemTime,
) -> Result<Applied, Error> {
    let (role, identity) = join_grant(caller, &cmd)?;
    // A ban comes before the lock: a banned identity learns it is banned.
    if let Some(ban) = state.ban_of(&identity, now) {
        return Err(Error::Banned {
            identity,
            until: ban.until,
        });
    }
    if state.locked && role != Role::Moderator {
        return Err(Error::RoomLocked {
            room_id: state.room_id.clone(),
        });
    }
    if state.population >= state.max_members {
        return Err(Error::LimitReached {
            limit: Limit::RoomMembers,
            max: state.max_members,
        });
    }
    let participant = pb::Participant {
        client_id: client_id.clone(),
        identity,
        name: cmd.name,
        role: role as i32,
        joined_at: Some(now.into()),
        // Nobody streams as a client that does not exist yet; stores fill it in snapshots.
        connected: false,
    };
    let event = state.event(
        now,
        Payload::UserConnected(pb::UserConnected {
            participant: Some(participant.clone()),
        }),
    );
    state.members.insert(
        client_id.clone(),
        Member {
            participant: participant.clone(),
            join_seq: event.seq,
        },
    );
    state.population += 1;
    let participant_for_change = participant.clone();
    let reply = Reply::Joined(pb::JoinResponse {
        client_id,
        seq: event.seq,
        epoch: state.epoch.clone(),
        participant: Some(participant),
    });
    let joined = Change::Joined {
        participant: participant_for_change,
        join_seq: event.seq,
    };
    Ok(Applied {
        reply,
        events: vec![event],
        changes: vec![joined],
        remembered: None,
    })
}

fn leave(
    state: &mut RoomState,
    caller: &Caller,
    client_id: &str,
    now: SystemTime,
) -> Result<Applied, Error> {
    let owner = match state.members.get(client_id) {
        Some(member) => member.participant.identity.clone(),
        None => {
            return Err(Error::ClientNotFound {
                client_id: client_id.to_owned(),
            })
        }
    };
    if caller.role != TokenRole::Moderator && !caller.may_act_for(&owner) {
        return Err(Error::Forbidden(
            "participants may only make their own clients leave".into(),
        ));
    }
    let event = state.event(
        now,
        Payload::UserDisconnected(pb::UserDisconnected {
            client_id: client_id.to_owned(),
            reason: DisconnectReason::Left as i32,
        }),
    );
    let departed = state.depart(client_id, owner, event.seq);
    Ok(Applied {
        reply: Reply::Left,
        events: vec![event],
        changes: vec![departed],
        remembered: None,
    })
}

fn time_out(state: &mut RoomState, client_ids: Vec<String>, now: SystemTime) -> Applied {
    let (mut events, mut changes, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    for client_id in client_ids {
        let Some(member) = state.members.get(&client_id) else {
            continue;
        };
        let owner = member.participant.identity.clone();
        let event = state.event(
            now,
            Payload::UserDisconnected(pb::UserDisconnected {
                client_id: client_id.clone(),
                reason: DisconnectReason::TimedOut as i32,
            }),
        );
        changes.push(state.depart(&client_id, owner, event.seq));
        events.push(event);
        removed.push(client_id);
    }
    Applied {
        reply: Reply::TimedOut(removed),
        events,
        changes,
        remembered: None,
    }
}

fn drop_users(
    state: &mut RoomState,
    caller: &Caller,
    cmd: DropCmd,
    now: SystemTime,
) -> Result<Applied, Error> {
    let banned = match cmd.ban {
        Some(ban) => Some((check_bans(state, &cmd.client_ids, now)?, now + ban)),
        None => None,
    };
    let mut results: Vec<pb::DropResult> = Vec::with_capacity(cmd.client_ids.len());
    let mut events = Vec::new();
    let mut changes = Vec::new();
    let mut answered = std::collections::HashSet::with_capacity(cmd.client_ids.len());
    for client_id in cmd.client_ids {
        if !answered.insert(client_id.clone()) {
            continue;
        }
        let outcome = match state.members.get(&client_id) {
            Some(member) => {
                let owner = member.participant.identity.clone();
                let told = state.event(
                    now,
                    Payload::RoomDisconnected(pb::RoomDisconnected {
                        client_id: client_id.clone(),
                        reason: DisconnectReason::DroppedByModerator as i32,
                        message: cmd.reason.clone(),
                    }),
                );
                changes.push(state.depart(&client_id, owner, told.seq));
                events.push(told);
                events.push(state.event(
                    now,
                    Payload::UserDisconnected(pb::UserDisconnected {
                        client_id: client_id.clone(),
                        reason: DisconnectReason::DroppedByModerator as i32,
                    }),
                ));
                DropOutcome::Dropped
            }
            None => DropOutcome::NotFound,
        };
        results.push(pb::DropResult {
            client_id,
            outcome: outcome as i32,
        });
    }
    if let Some((identities, until)) = banned {
        for identity in identities {
            let ban = state.ban(identity, until, &caller.identity);
            events.push(state.event(
                now,
                Payload::UserBanned(pb::UserBanned {
                    identity: ban.identity.clone(),
                    until: Some(ban.until.into()),
                    moderator: caller.identity.clone(),
                }),
            ));
            changes.push(Change::Banned(ban));
        }
    }
    let response = pb::DropUserResponse {
        request_id: cmd.request_id,
        results,
    };
    events.push(state.event(
        now,
        Payload::AckDropUser(pb::AckDropUser {
            request_id: response.request_id.clone(),
            moderator: caller.identity.clone(),
            results: response.results.clone(),
        }),
    ));
    Ok(Applied {
        reply: Reply::Dropped(response),
        events,
        changes,
        remembered: None,
    })
}

/// The distinct identities a banning drop of `client_ids` bans (of the clients present, in
/// request order), once it is known the room can hold their bans; else `TOO_MANY_BANS`,
/// before anything changed.
fn check_bans(
    state: &mut RoomState,
    client_ids: &[String],
    now: SystemTime,
) -> Result<Vec<String>, Error> {
    state.forget_ended_bans(now);
    let mut identities: Vec<String> = Vec::new();
    for client_id in client_ids {
        if let Some(member) = state.members.get(client_id) {
            if !identities.contains(&member.participant.identity) {
                identities.push(member.participant.identity.clone());
            }
        }
    }
    let new = identities
        .iter()
        .filter(|identity| state.ban_of(identity, now).is_none())
        .count();
    if state.bans_in_force + new > MAX_BANS {
        return Err(Error::LimitReached {
            limit: Limit::RoomBans,
            max: MAX_BANS,
        });
    }
    Ok(identities)
}

impl RoomState {
    /// Bans `identity` until `until`, or keeps its ban if that ends later; returns the ban.
    fn ban(&mut self, identity: String, until: SystemTime, moderator: &str) -> Ban {
        let ban = match self.bans.get(&identity) {
            Some(ban) if ban.until >= until => ban.clone(),
            existing => {
                if existing.is_none() {
                    self.bans_in_force += 1;
                }
                Ban {
                    identity: identity.clone(),
                    until,
                    moderator: moderator.to_owned(),
                }
            }
        };
        self.bans.insert(identity, ban.clone());
        self.bans_end = self.bans_end.max(Some(ban.until));
        ban
    }
}

fn lock(
    state: &mut RoomState,
    caller: &Caller,
    locking: bool,
    request_id: String,
    now: SystemTime,
) -> Result<Applied, Error> {
    let room_id = state.room_id.clone();
    match (locking, state.locked) {
        (true, true) => return Err(Error::RoomAlreadyLocked { room_id }),
        (false, false) => return Err(Error::RoomNotLocked { room_id }),
        _ => {}
    }
    state.locked = locking;
    let moderator = caller.identity.clone();
    let (payload, reply): (Payload, fn(String, u64) -> Reply) = if locking {
        (
            Payload::RoomLocked(pb::RoomLocked { moderator }),
            |request_id, seq| Reply::Locked(pb::LockRoomResponse { request_id, seq }),
        )
    } else {
        (
            Payload::RoomUnlocked(pb::RoomUnlocked { moderator }),
            |request_id, seq| Reply::Unlocked(pb::UnlockRoomResponse { request_id, seq }),
        )
    };
    let event = state.event(now, payload);
    Ok(Applied {
        reply: reply(request_id, event.seq),
        events: vec![event],
        changes: vec![Change::Locked(locking)],
        remembered: None,
    })
}

fn destroy(
    state: &mut RoomState,
    caller: &Caller,
    cmd: DestroyCmd,
    now: SystemTime,
) -> Result<Applied, Error> {
    if state.members.len() != state.population {
        return Err(Error::Internal(
            "ending a session needs every member of the room".into(),
        ));
    }
    let event = state.event(
        now,
        Payload::SessionDestroyed(pb::SessionDestroyed {
            moderator: caller.identity.clone(),
            message: cmd.reason,
        }),
    );
    let client_ids: Vec<String> = state
        .participants()
        .into_iter()
        .map(|p| p.client_id)
        .collect();
    let mut changes = Vec::with_capacity(client_ids.len() + 1);
    for client_id in &client_ids {
        if let Some(member) = state.members.get(client_id) {
            let owner = member.participant.identity.clone();
            changes.push(state.depart(client_id, owner, event.seq));
        }
    }
    if state.locked {
        state.locked = false;
        changes.push(Change::Locked(false));
    }
    Ok(Applied {
        reply: Reply::Destroyed(pb::DestroySessionResponse {
            request_id: cmd.request_id,
            seq: event.seq,
            client_ids,
        }),
        events: vec![event],
        changes,
        remembered: None,
    })
}

fn unban(
    state: &mut RoomState,
    caller: &Caller,
    identity: String,
    now: SystemTime,
) -> Result<Applied, Error> {
    state.forget_ended_bans(now);
    if state.bans.remove(&identity).is_none() {
        return Err(Error::BanNotFound { identity });
    }
    state.bans_in_force = state.bans_in_force.saturating_sub(1);
    // No ban is in force from now on but those left, whatever the lifted one would have done.
    let left = state.bans.values().map(|ban| ban.until).max();
    state.bans_end = Some(left.map_or(now, |until| until.max(now)));
    let event = state.event(
        now,
        Payload::UserUnbanned(pb::UserUnbanned {
            identity: identity.clone(),
            moderator: caller.identity.clone(),
        }),
    );
    Ok(Applied {
        reply: Reply::Unbanned(pb::UnbanResponse { seq: event.seq }),
        events: vec![event],
        changes: vec![Change::Unbanned { identity }],
        remembered: None,
    })
}

/// The retained window of a room's log: events `oldest_seq..=newest_seq` of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogWindow {
    /// The log's id.
    pub epoch: String,
    /// Oldest retained seq (`newest_seq + 1` when the history holds nothing).
    pub oldest_seq: u64,
    /// Newest seq.
    pub newest_seq: u64,
}

impl LogWindow {
    /// The window of a log whose newest event is `newest_seq`, keeping the last `history` events.
    pub fn of(epoch: &str, newest_seq: u64, history: usize) -> Self {
        let kept = newest_seq.min(history as u64);
        Self {
            epoch: epoch.to_owned(),
            oldest_seq: newest_seq - kept + 1,
            newest_seq,
        }
    }

    /// The `CURSOR_OUT_OF_RANGE` error for this window.
    pub fn out_of_range(&self) -> Error {
        Error::CursorOutOfRange {
            oldest_seq: self.oldest_seq,
            newest_seq: self.newest_seq,
            epoch: self.epoch.clone(),
        }
    }

    /// Resolves a subscription's cursor to the seq it starts after. A non-empty `epoch` must be
    /// this log's; `after_seq` must lie in `oldest_seq - 1 ..= newest_seq`; unset means "now".
    /// `after_seq` comes from the wire, so any `u64` is answered, never overflowed.
    pub fn start(&self, after_seq: Option<u64>, epoch: &str) -> Result<u64, Error> {
        if !epoch.is_empty() && epoch != self.epoch {
            return Err(self.out_of_range());
        }
        match after_seq {
            None => Ok(self.newest_seq),
            Some(after) if self.holds_cursor(after) && after <= self.newest_seq => Ok(after),
            Some(_) => Err(self.out_of_range()),
        }
    }

    /// Checks that reading after `cursor` is still possible (the subscriber did not fall out).
    pub fn check_readable(&self, cursor: u64) -> Result<(), Error> {
        if !self.holds_cursor(cursor) {
            return Err(self.out_of_range());
        }
        Ok(())
    }

    /// Whether the event right after `cursor` is still in the history (`oldest_seq` is at least
    /// 1, so `oldest_seq - 1` cannot underflow).
    fn holds_cursor(&self, cursor: u64) -> bool {
        cursor >= self.oldest_seq - 1
    }
}

/// Who a subscription delivers to, which decides what it sees and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    client_id: Option<String>,
    identity: String,
    service_observer: bool,
}

impl Audience {
    /// Admits `caller` as a subscriber of `client_id` (None: an observer) starting after `start`,
    /// given the client's status. A departed client may still replay up to its departure.
    pub fn admit(
        caller: &Caller,
        client_id: Option<&str>,
        status: ClientStatus,
        start: u64,
    ) -> Result<Self, Error> {
        let Some(client_id) = client_id else {
            return Ok(Self {
                client_id: None,
                identity: caller.identity.clone(),
                service_observer: caller.is_service(),
            });
        };
        let not_found = || Error::ClientNotFound {
            client_id: client_id.to_owned(),
        };
        let owner = match status {
            ClientStatus::Present { identity } => identity,
            ClientStatus::Departed { identity, end_seq } if start < end_seq => identity,
            ClientStatus::Departed { .. } | ClientStatus::Unknown => return Err(not_found()),
        };
        if !caller.may_act_for(&owner) {
            return Err(Error::Forbidden(
                "you may only subscribe as your own clients".into(),
            ));
        }
        Ok(Self {
            client_id: Some(client_id.to_owned()),
            identity: caller.identity.clone(),
            service_observer: false,
        })
    }

    fn is_own(&self, client_id: &str) -> bool {
        self.client_id.as_deref() == Some(client_id)
    }

    /// Whether this subscription delivers `event`.
    pub fn sees(&self, event: &pb::Event) -> bool {
        match &event.payload {
            Some(Payload::UserConnected(_)) | Some(Payload::UserDisconnected(_)) => true,
            Some(Payload::RoomDisconnected(rd)) => {
                self.service_observer || self.is_own(&rd.client_id)
            }
            Some(Payload::AckDropUser(ack)) => {
                self.service_observer || self.identity == ack.moderator
            }
            Some(Payload::RoomLocked(_))
            | Some(Payload::RoomUnlocked(_))
            | Some(Payload::SessionDestroyed(_))
            | Some(Payload::UserBanned(_))
            | Some(Payload::UserUnbanned(_)) => true,
            None => false,
        }
    }

    /// Whether the subscription ends (OK) right after delivering `event`: its client was
    /// dropped, left or timed out, or the session ended (which ends every stream).
    pub fn ends_after(&self, event: &pb::Event) -> bool {
        match &event.payload {
            Some(Payload::RoomDisconnected(rd)) => self.is_own(&rd.client_id),
            Some(Payload::UserDisconnected(ud)) => self.is_own(&ud.client_id),
            Some(Payload::SessionDestroyed(_)) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(identity: &str, role: TokenRole) -> Caller {
        Caller {
            identity: identity.into(),
            scope: RoomScope::One("r".into()),
            role,
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn join_cmd(client_id: &str, request_id: Option<&str>) -> Command {
        Command::Join {
            client_id: client_id.into(),
            cmd: JoinCmd {
                name: String::new(),
                role: Role::Unspecified,
                identity: String::new(),
                request_id: request_id.map(str::to_owned),
            },
        }
    }

    fn leave_cmd(client_id: &str) -> Command {
        Command::Leave {
            client_id: client_id.into(),
        }
    }

    fn join_as(state: &mut RoomState, who: &Caller, client_id: &str) -> pb::JoinResponse {
        match apply(state, who, join_cmd(client_id, None), now())
            .unwrap()
            .reply
        {
            Reply::Joined(joined) => joined,
            other => panic!("{other:?}"),
        }
    }

    fn drop_cmd(ids: &[&str], request_id: &str) -> Command {
        Command::Drop(DropCmd {
            client_ids: ids.iter().map(|s| s.to_string()).collect(),
            reason: "spam".into(),
            request_id: request_id.into(),
            ban: None,
        })
    }

    fn kinds(events: &[pb::Event]) -> Vec<(u64, &'static str)> {
        events
            .iter()
            .map(|e| {
                let kind = match e.payload.as_ref().unwrap() {
                    Payload::UserConnected(_) => "connected",
                    Payload::UserDisconnected(_) => "disconnected",
                    Payload::RoomDisconnected(_) => "room_disconnected",
                    Payload::AckDropUser(_) => "ack",
                    Payload::RoomLocked(_) => "locked",
                    Payload::RoomUnlocked(_) => "unlocked",
                    Payload::SessionDestroyed(_) => "destroyed",
                    Payload::UserBanned(_) => "banned",
                    Payload::UserUnbanned(_) => "unbanned",
                };
                (e.seq, kind)
            })
            .collect()
    }

    #[test]
    fn join_numbers_events_and_answers_the_position_after_it() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        assert_eq!(join_as(&mut state, &bob, "c1").seq, 1);
        let second = join_as(&mut state, &bob, "c2");
        assert_eq!((second.seq, second.epoch.as_str()), (2, "ep"));
        assert_eq!(second.participant.unwrap().role, Role::Participant as i32);
        let ids: Vec<_> = state
            .participants()
            .into_iter()
            .map(|p| p.client_id)
            .collect();
        assert_eq!(ids, ["c1", "c2"]);
    }

    #[test]
    fn drop_logs_disconnects_then_one_ack_with_results_in_request_order() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        join_as(&mut state, &bob, "b");
        let alice = caller("alice", TokenRole::Moderator);
        let applied = apply(
            &mut state,
            &alice,
            drop_cmd(&["b", "zz", "a", "b"], "q1"),
            now(),
        )
        .unwrap();
        assert_eq!(
            kinds(&applied.events),
            [
                (3, "room_disconnected"),
                (4, "disconnected"),
                (5, "room_disconnected"),
                (6, "disconnected"),
                (7, "ack")
            ]
        );
        let Reply::Dropped(response) = applied.reply else {
            panic!()
        };
        let outcomes: Vec<_> = response
            .results
            .iter()
            .map(|r| (r.client_id.as_str(), r.outcome()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("b", DropOutcome::Dropped),
                ("zz", DropOutcome::NotFound),
                ("a", DropOutcome::Dropped)
            ]
        );
        let Some(Payload::AckDropUser(ack)) = &applied.events[4].payload else {
            panic!()
        };
        assert_eq!(
            (ack.moderator.as_str(), &ack.results),
            ("alice", &response.results)
        );
        assert!(state.is_empty());
        assert_eq!(
            state.client_status("b"),
            ClientStatus::Departed {
                identity: "bob".into(),
                end_seq: 3
            }
        );
    }

    #[test]
    fn changes_describe_what_events_did_to_membership() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let joined = apply(
            &mut state,
            &bob,
            Command::Join {
                client_id: "a".into(),
                cmd: JoinCmd {
                    name: "Bob".into(),
                    role: Role::Unspecified,
                    identity: String::new(),
                    request_id: None,
                },
            },
            now(),
        )
        .unwrap();
        let [Change::Joined {
            participant,
            join_seq: 1,
        }] = joined.changes.as_slice()
        else {
            panic!("{:?}", joined.changes)
        };
        assert_eq!(participant.identity, "bob");
        let alice = caller("alice", TokenRole::Moderator);
        let dropped = apply(&mut state, &alice, drop_cmd(&["a", "zz"], "q"), now()).unwrap();
        assert_eq!(
            dropped.changes,
            [Change::Departed {
                client_id: "a".into(),
                identity: "bob".into(),
                end_seq: 2
            }]
        );
    }

    #[test]
    fn a_restored_partial_state_applies_the_same_rules() {
        let bob = pb::Participant {
            client_id: "a".into(),
            identity: "bob".into(),
            ..Default::default()
        };
        let remembered = Reply::Dropped(pb::DropUserResponse {
            request_id: "q".into(),
            results: Vec::new(),
        });
        let mut state = RoomState::restore(
            "r",
            "ep",
            41,
            1,
            [(bob, 7)],
            Some(Remembered {
                key: answer_key("alice", "q"),
                expires_at: now() + Duration::from_secs(5),
                fingerprint: drop_cmd(&["a"], "q")
                    .fingerprint(&caller("alice", TokenRole::Moderator)),
                reply: remembered.clone(),
            }),
        );
        let alice = caller("alice", TokenRole::Moderator);
        let retry = apply(&mut state, &alice, drop_cmd(&["a"], "q"), now()).unwrap();
        assert_eq!(retry.reply, remembered);
        // The restored expiry holds, not a fresh window.
        let late = now() + Duration::from_secs(6);
        let fresh = apply(&mut state, &alice, drop_cmd(&["a"], "q"), late).unwrap();
        assert_eq!(
            kinds(&fresh.events),
            [(42, "room_disconnected"), (43, "disconnected"), (44, "ack")]
        );
        assert_eq!(
            fresh.remembered.map(|r| (r.key, r.expires_at)),
            Some((answer_key("alice", "q"), late + IDEMPOTENCY_WINDOW))
        );
    }

    #[test]
    fn a_retried_join_returns_the_first_answer_even_after_the_client_left() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let first = apply(&mut state, &bob, join_cmd("c1", Some("j1")), now()).unwrap();
        assert!(first.remembered.is_some());
        apply(&mut state, &bob, leave_cmd("c1"), now()).unwrap();
        let retry = apply(&mut state, &bob, join_cmd("c2", Some("j1")), now()).unwrap();
        assert_eq!(retry.reply, first.reply);
        assert!(retry.events.is_empty() && retry.remembered.is_none());
        assert!(state.is_empty(), "nobody joined again");
        // The same key from another identity, or for another kind of command, is another request.
        let eve = caller("eve", TokenRole::Participant);
        assert_eq!(
            apply(&mut state, &eve, join_cmd("c3", Some("j1")), now())
                .unwrap()
                .events
                .len(),
            1
        );
        let alice = caller("alice", TokenRole::Moderator);
        assert_eq!(
            apply(&mut state, &alice, drop_cmd(&["c3"], "j1"), now())
                .unwrap()
                .events
                .len(),
            3
        );
        // Without a key, nothing is remembered and a repeat joins again.
        let unkeyed = apply(&mut state, &bob, join_cmd("c4", None), now()).unwrap();
        assert!(unkeyed.remembered.is_none());
    }

    #[test]
    fn a_full_room_refuses_joins_until_someone_leaves() {
        let mut state = RoomState::new("r", "ep").with_limits(RoomLimits {
            max_members: 2,
            ..RoomLimits::default()
        });
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        join_as(&mut state, &bob, "b");
        let full = apply(&mut state, &bob, join_cmd("c", None), now());
        assert!(matches!(
            full,
            Err(Error::LimitReached {
                limit: Limit::RoomMembers,
                max: 2
            })
        ));
        assert_eq!(state.seq(), 2, "nothing logged");
        apply(&mut state, &bob, leave_cmd("a"), now()).unwrap();
        join_as(&mut state, &bob, "c");
        // A restored room counts the members it did not restore.
        let mut partial = RoomState::restore("r", "ep", 9, 2, [], []).with_limits(RoomLimits {
            max_members: 2,
            ..RoomLimits::default()
        });
        assert!(apply(&mut partial, &bob, join_cmd("d", None), now()).is_err());
    }

    #[test]
    fn a_participant_dropping_gets_5116_and_nothing_changes() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        let err = apply(&mut state, &bob, drop_cmd(&["a"], "q"), now()).unwrap_err();
        assert!(matches!(
            err,
            Error::UnauthorizedAccess {
                code: UNAUTHORIZED_ACCESS_CODE,
                ..
            }
        ));
        assert_eq!(state.seq(), 1);
        assert!(!state.is_empty());
    }

    #[test]
    fn a_retried_request_id_returns_the_first_answer_without_events() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        let alice = caller("alice", TokenRole::Moderator);
        let first = apply(&mut state, &alice, drop_cmd(&["a"], "q"), now()).unwrap();
        let retry = apply(&mut state, &alice, drop_cmd(&["a"], "q"), now()).unwrap();
        assert_eq!(retry.reply, first.reply);
        assert!(retry.events.is_empty());
        // Another identity with the same key is another request.
        let carol = caller("carol", TokenRole::Moderator);
        let other = apply(&mut state, &carol, drop_cmd(&["a"], "q"), now()).unwrap();
        assert_eq!(other.events.len(), 1);
        // After the window the key is forgotten.
        let later = now() + IDEMPOTENCY_WINDOW + Duration::from_secs(1);
        let expired = apply(&mut state, &alice, drop_cmd(&["a"], "q"), later).unwrap();
        assert_eq!(expired.events.len(), 1);
    }

    #[test]
    fn remembered_answers_are_bounded_in_bytes_and_kept_for_their_window() {
        let budget = 64 * 1024;
        let mut state = RoomState::new("r", "ep").with_limits(RoomLimits {
            answer_bytes: budget,
            ..RoomLimits::default()
        });
        let alice = caller("alice", TokenRole::Moderator);
        // Far more answers than a count of 1,024 would keep, each small: all are kept.
        let ids: Vec<String> = (0..5).map(|i| format!("x{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let first = apply(&mut state, &alice, drop_cmd(&ids, "q0"), now()).unwrap();
        let weight = first.remembered.unwrap().weight();
        let fits = budget / weight;
        for i in 1..fits {
            apply(&mut state, &alice, drop_cmd(&ids, &format!("q{i}")), now()).unwrap();
        }
        let retry = apply(&mut state, &alice, drop_cmd(&ids, "q0"), now()).unwrap();
        assert_eq!(retry.reply, first.reply, "within the budget and the window");
        assert!(state.answers.bytes <= budget);
        // Past the budget, the oldest go first; memory stays within it.
        for i in fits..fits * 3 {
            apply(&mut state, &alice, drop_cmd(&ids, &format!("q{i}")), now()).unwrap();
        }
        assert!(state.answers.bytes <= budget, "{}", state.answers.bytes);
        assert!(state.answers.answers.len() <= fits);
        let again = apply(&mut state, &alice, drop_cmd(&ids, "q0"), now()).unwrap();
        assert_eq!(again.events.len(), 1, "forgotten early, applied anew");
    }

    #[test]
    fn a_request_id_reused_for_another_request_is_refused() {
        let mut state = RoomState::new("r", "ep");
        let ops = caller("ops", TokenRole::Service);
        let join_as = |name: &str, client_id: &str| Command::Join {
            client_id: client_id.into(),
            cmd: JoinCmd {
                name: name.into(),
                role: Role::Unspecified,
                identity: String::new(),
                request_id: Some("k".into()),
            },
        };
        let first = apply(&mut state, &ops, join_as("x", "c1"), now()).unwrap();
        // The same request again (the server picks a new client id each time): the first answer.
        let retry = apply(&mut state, &ops, join_as("x", "c2"), now()).unwrap();
        assert_eq!(retry.reply, first.reply);
        // The same id for another request: refused, nothing changes.
        let seq = state.seq();
        let reused = apply(&mut state, &ops, join_as("y", "c3"), now()).unwrap_err();
        assert!(matches!(&reused, Error::RequestIdReused { request_id } if request_id == "k"));
        assert_eq!(state.seq(), seq);
        let alice = caller("alice", TokenRole::Moderator);
        apply(&mut state, &alice, drop_cmd(&["a"], "d"), now()).unwrap();
        assert!(matches!(
            apply(&mut state, &alice, drop_cmd(&["b"], "d"), now()),
            Err(Error::RequestIdReused { .. })
        ));
    }

    #[test]
    fn fingerprints_tell_requests_apart_and_ignore_what_the_server_chose() {
        let join = |client_id: &str, name: &str, role: Role, identity: &str| Command::Join {
            client_id: client_id.into(),
            cmd: JoinCmd {
                name: name.into(),
                role,
                identity: identity.into(),
                request_id: Some("k".into()),
            },
        };
        let ops = caller("ops", TokenRole::Service);
        let base = join("c1", "x", Role::Participant, "u").fingerprint(&ops);
        assert_eq!(
            base,
            join("c2", "x", Role::Participant, "u").fingerprint(&ops)
        );
        // What a join grants, not how it is spelled: a participant's own role and identity, or
        // nothing, ask the same.
        let bob = caller("bob", TokenRole::Participant);
        assert_eq!(
            join("c1", "x", Role::Unspecified, "").fingerprint(&bob),
            join("c2", "x", Role::Participant, "bob").fingerprint(&bob)
        );
        for other in [
            join("c1", "y", Role::Participant, "u"),
            join("c1", "x", Role::Moderator, "u"),
            join("c1", "x", Role::Participant, "v"),
            // Field boundaries count: "xu" + "" is not "x" + "u".
            join("c1", "xu", Role::Participant, ""),
        ] {
            assert_ne!(base, other.fingerprint(&ops), "{other:?}");
        }
        assert_ne!(
            drop_cmd(&["a", "b"], "q").fingerprint(&ops),
            drop_cmd(&["ab"], "q").fingerprint(&ops)
        );
    }

    #[test]
    fn leave_is_for_the_owner_moderators_and_services() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let eve = caller("eve", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        join_as(&mut state, &bob, "b");
        join_as(&mut state, &bob, "c");
        assert!(matches!(
            apply(&mut state, &eve, leave_cmd("a"), now()),
            Err(Error::Forbidden(_))
        ));
        assert!(apply(&mut state, &bob, leave_cmd("a"), now()).is_ok());
        assert!(apply(
            &mut state,
            &caller("m", TokenRole::Moderator),
            leave_cmd("b"),
            now()
        )
        .is_ok());
        assert!(apply(
            &mut state,
            &caller("s", TokenRole::Service),
            leave_cmd("c"),
            now()
        )
        .is_ok());
        assert!(matches!(
            apply(&mut state, &bob, leave_cmd("a"), now()),
            Err(Error::ClientNotFound { .. })
        ));
        assert_eq!(
            state.client_status("a"),
            ClientStatus::Departed {
                identity: "bob".into(),
                end_seq: 4
            }
        );
    }

    #[test]
    fn join_roles_are_chosen_by_services_only() {
        let cmd = |role, identity: &str| JoinCmd {
            name: String::new(),
            role,
            identity: identity.into(),
            request_id: None,
        };
        let bob = caller("bob", TokenRole::Participant);
        let svc = caller("gw", TokenRole::Service);
        let alice = caller("alice", TokenRole::Moderator);
        assert_eq!(
            join_grant(&bob, &cmd(Role::Unspecified, "")).unwrap(),
            (Role::Participant, "bob".into())
        );
        assert_eq!(
            join_grant(&bob, &cmd(Role::Participant, "bob")).unwrap().0,
            Role::Participant
        );
        assert!(matches!(
            join_grant(&bob, &cmd(Role::Moderator, "")),
            Err(Error::Forbidden(_))
        ));
        assert!(matches!(
            join_grant(&bob, &cmd(Role::Unspecified, "eve")),
            Err(Error::Forbidden(_))
        ));
        assert_eq!(
            join_grant(&alice, &cmd(Role::Unspecified, "")).unwrap().0,
            Role::Moderator
        );
        assert_eq!(
            join_grant(&svc, &cmd(Role::Unspecified, "")).unwrap(),
            (Role::Participant, "gw".into())
        );
        assert_eq!(
            join_grant(&svc, &cmd(Role::Moderator, "ann")).unwrap(),
            (Role::Moderator, "ann".into())
        );
    }

    #[test]
    fn window_is_exact_and_checks_epoch_first() {
        let w = LogWindow::of("ep", 20, 5);
        assert_eq!((w.oldest_seq, w.newest_seq), (16, 20));
        assert_eq!(w.start(Some(15), ""), Ok(15));
        assert!(w.start(Some(14), "").is_err());
        assert_eq!(w.start(Some(20), "ep"), Ok(20));
        assert!(w.start(Some(21), "").is_err());
        assert!(w.start(Some(u64::MAX), "").is_err());
        assert_eq!(w.start(None, ""), Ok(20));
        assert!(w.start(None, "other").is_err());
        assert!(w.start(Some(18), "other").is_err());
        assert!(w.check_readable(15).is_ok());
        assert!(w.check_readable(14).is_err());
        let young = LogWindow::of("ep", 3, 5);
        assert_eq!((young.oldest_seq, young.start(Some(0), "")), (1, Ok(0)));
    }

    #[test]
    fn departed_clients_are_forgotten_with_their_history() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        apply(&mut state, &bob, leave_cmd("a"), now()).unwrap();
        state.forget_departed_before(2);
        assert!(matches!(
            state.client_status("a"),
            ClientStatus::Departed { .. }
        ));
        state.forget_departed_before(3);
        assert_eq!(state.client_status("a"), ClientStatus::Unknown);
    }

    #[test]
    fn audiences_see_what_the_contract_says() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        join_as(&mut state, &bob, "b");
        let alice = caller("alice", TokenRole::Moderator);
        let events = apply(&mut state, &alice, drop_cmd(&["a"], "q"), now())
            .unwrap()
            .events;
        let (told, gone, ack) = (&events[0], &events[1], &events[2]);

        let dropped = Audience::admit(
            &bob,
            Some("a"),
            ClientStatus::Present {
                identity: "bob".into(),
            },
            2,
        )
        .unwrap();
        assert!(dropped.sees(told) && dropped.ends_after(told));
        let other = Audience::admit(
            &bob,
            Some("b"),
            ClientStatus::Present {
                identity: "bob".into(),
            },
            2,
        )
        .unwrap();
        assert!(
            !other.sees(told) && other.sees(gone) && !other.ends_after(gone) && !other.sees(ack)
        );
        let moderator = Audience::admit(&alice, None, ClientStatus::Unknown, 2).unwrap();
        assert!(!moderator.sees(told) && moderator.sees(gone) && moderator.sees(ack));
        let service = Audience::admit(
            &caller("s", TokenRole::Service),
            None,
            ClientStatus::Unknown,
            2,
        )
        .unwrap();
        assert!(service.sees(told) && service.sees(gone) && service.sees(ack));
    }

    #[test]
    fn a_departed_client_is_admitted_only_with_a_cursor_before_its_departure() {
        let bob = caller("bob", TokenRole::Participant);
        let departed = || ClientStatus::Departed {
            identity: "bob".into(),
            end_seq: 5,
        };
        assert!(Audience::admit(&bob, Some("a"), departed(), 4).is_ok());
        assert!(matches!(
            Audience::admit(&bob, Some("a"), departed(), 5),
            Err(Error::ClientNotFound { .. })
        ));
        assert!(matches!(
            Audience::admit(&bob, Some("a"), ClientStatus::Unknown, 0),
            Err(Error::ClientNotFound { .. })
        ));
        let eve = caller("eve", TokenRole::Participant);
        assert!(matches!(
            Audience::admit(&eve, Some("a"), departed(), 4),
            Err(Error::Forbidden(_))
        ));
        assert!(
            Audience::admit(&caller("s", TokenRole::Service), Some("a"), departed(), 4).is_ok()
        );
    }

    #[test]
    fn participants_may_not_observe_or_act_in_other_rooms() {
        let bob = caller("bob", TokenRole::Participant);
        assert!(matches!(
            bob.check_may_subscribe("r", None),
            Err(Error::Forbidden(_))
        ));
        assert!(bob.check_may_subscribe("r", Some("a")).is_ok());
        assert!(matches!(bob.check_room("other"), Err(Error::Forbidden(_))));
        let all = Caller {
            scope: RoomScope::All,
            ..caller("s", TokenRole::Service)
        };
        assert!(all.check_room("anything").is_ok());
    }

    fn lock_cmd(request_id: &str) -> Command {
        Command::Lock {
            request_id: request_id.into(),
        }
    }

    fn unlock_cmd(request_id: &str) -> Command {
        Command::Unlock {
            request_id: request_id.into(),
        }
    }

    fn banning_drop(ids: &[&str], request_id: &str, ban: Duration) -> Command {
        let Command::Drop(mut cmd) = drop_cmd(ids, request_id) else {
            unreachable!()
        };
        cmd.ban = Some(ban);
        Command::Drop(cmd)
    }

    fn joined_by(
        state: &mut RoomState,
        who: &Caller,
        client_id: &str,
        at: SystemTime,
    ) -> Result<Applied, Error> {
        apply(state, who, join_cmd(client_id, None), at)
    }

    #[test]
    fn a_locked_room_refuses_participants_admits_moderators_and_keeps_its_members() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let alice = caller("alice", TokenRole::Moderator);
        join_as(&mut state, &bob, "b1");
        let locked = apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
        assert_eq!(kinds(&locked.events), [(2, "locked")]);
        assert_eq!(
            locked.reply,
            Reply::Locked(pb::LockRoomResponse {
                request_id: "l1".into(),
                seq: 2
            })
        );
        assert!(state.locked());
        let refused = joined_by(&mut state, &bob, "b2", now()).unwrap_err();
        assert!(matches!(refused, Error::RoomLocked { .. }), "{refused:?}");
        // A service joining someone as participant is refused too; as moderator it is not.
        let svc = caller("svc", TokenRole::Service);
        assert!(joined_by(&mut state, &svc, "s1", now()).is_err());
        let Command::Join { client_id, mut cmd } = join_cmd("s2", None) else {
            unreachable!()
        };
        cmd.role = Role::Moderator;
        assert!(apply(&mut state, &svc, Command::Join { client_id, cmd }, now()).is_ok());
        join_as(&mut state, &alice, "a1");
        assert_eq!(members_of(&state), ["b1", "s2", "a1"]);
        apply(&mut state, &svc, unlock_cmd("u1"), now()).unwrap();
        assert!(!state.locked());
        join_as(&mut state, &bob, "b3");
    }

    fn members_of(state: &RoomState) -> Vec<String> {
        state
            .participants()
            .into_iter()
            .map(|p| p.client_id)
            .collect()
    }

    #[test]
    fn locking_twice_is_5117_unlocking_twice_5118_and_retries_answer_the_first_call() {
        let mut state = RoomState::new("r", "ep");
        let alice = caller("alice", TokenRole::Moderator);
        join_as(&mut state, &alice, "a1");
        let first = apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
        let again = apply(&mut state, &alice, lock_cmd("l2"), now()).unwrap_err();
        assert!(
            matches!(again, Error::RoomAlreadyLocked { .. }),
            "{again:?}"
        );
        let retry = apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
        assert_eq!((retry.reply, retry.events.len()), (first.reply, 0));
        apply(&mut state, &alice, unlock_cmd("u1"), now()).unwrap();
        let again = apply(&mut state, &alice, unlock_cmd("u2"), now()).unwrap_err();
        assert!(matches!(again, Error::RoomNotLocked { .. }), "{again:?}");
        // The same key for a lock after an unlock is another request under a used key.
        assert!(matches!(
            apply(&mut state, &alice, lock_cmd("u1"), now()),
            Err(Error::RequestIdReused { .. })
        ));
        assert!(apply(&mut state, &alice, lock_cmd("l3"), now()).is_ok());
    }

    #[test]
    fn participants_get_5115_for_locks_and_5116_for_sessions_and_bans() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "b1");
        let code = |cmd: Command, state: &mut RoomState| match apply(state, &bob, cmd, now()) {
            Err(Error::UnauthorizedAccess { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(lock_cmd("l"), &mut state), LOCK_UNAUTHORIZED_CODE);
        assert_eq!(code(unlock_cmd("u"), &mut state), LOCK_UNAUTHORIZED_CODE);
        let destroy = Command::Destroy(DestroyCmd {
            reason: String::new(),
            request_id: "x".into(),
        });
        assert_eq!(code(destroy, &mut state), UNAUTHORIZED_ACCESS_CODE);
        let unban = Command::Unban {
            identity: "bob".into(),
        };
        assert_eq!(code(unban, &mut state), UNAUTHORIZED_ACCESS_CODE);
        assert_eq!(state.seq(), 1);
    }

    #[test]
    fn destroying_the_session_empties_and_unlocks_and_ends_every_stream() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let alice = caller("alice", TokenRole::Moderator);
        join_as(&mut state, &bob, "b1");
        join_as(&mut state, &alice, "a1");
        apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
        let destroy = Command::Destroy(DestroyCmd {
            reason: "meeting over".into(),
            request_id: "x1".into(),
        });
        let ended = apply(&mut state, &alice, destroy.clone(), now()).unwrap();
        assert_eq!(kinds(&ended.events), [(4, "destroyed")]);
        let Reply::Destroyed(response) = &ended.reply else {
            panic!("{:?}", ended.reply)
        };
        assert_eq!(
            (response.seq, response.client_ids.clone()),
            (4, vec!["b1".to_owned(), "a1".to_owned()])
        );
        assert!(state.is_empty() && !state.locked());
        assert!(ended.changes.contains(&Change::Locked(false)));
        assert_eq!(
            state.client_status("b1"),
            ClientStatus::Departed {
                identity: "bob".into(),
                end_seq: 4
            }
        );
        let event = &ended.events[0];
        let observer = Audience::admit(&alice, None, ClientStatus::Unknown, 0).unwrap();
        let own = Audience::admit(&bob, Some("b1"), state.client_status("b1"), 1).unwrap();
        for audience in [observer, own] {
            assert!(audience.sees(event) && audience.ends_after(event));
        }
        // A retry answers the first call; the same log goes on with the next join.
        let retry = apply(&mut state, &alice, destroy, now()).unwrap();
        assert_eq!((&retry.reply, retry.events.len()), (&ended.reply, 0));
        assert_eq!(join_as(&mut state, &bob, "b2").seq, 5);
    }

    #[test]
    fn a_banning_drop_logs_bans_between_the_disconnects_and_the_ack() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let alice = caller("alice", TokenRole::Moderator);
        join_as(&mut state, &bob, "b1");
        join_as(&mut state, &bob, "b2");
        join_as(&mut state, &alice, "a1");
        let hour = Duration::from_secs(3600);
        let dropped = apply(
            &mut state,
            &alice,
            banning_drop(&["b1", "b2", "zz"], "d1", hour),
            now(),
        )
        .unwrap();
        assert_eq!(
            kinds(&dropped.events),
            [
                (4, "room_disconnected"),
                (5, "disconnected"),
                (6, "room_disconnected"),
                (7, "disconnected"),
                (8, "banned"),
                (9, "ack")
            ]
        );
        let Some(Payload::UserBanned(banned)) = &dropped.events[4].payload else {
            panic!()
        };
        assert_eq!(
            (banned.identity.as_str(), banned.moderator.as_str()),
            ("bob", "alice")
        );
        assert_eq!(banned.until, Some((now() + hour).into()));
        let bans = state.bans(now());
        assert_eq!(bans.len(), 1);
        assert_eq!(
            (bans[0].identity.as_str(), bans[0].until),
            ("bob", now() + hour)
        );
    }

    #[test]
    fn a_ban_keeps_its_identity_out_until_it_ends_or_is_lifted() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let alice = caller("alice", TokenRole::Moderator);
        let svc = caller("svc", TokenRole::Service);
        join_as(&mut state, &bob, "b1");
        let minute = Duration::from_secs(60);
        apply(
            &mut state,
            &alice,
            banning_drop(&["b1"], "d1", minute),
            now(),
        )
        .unwrap();
        let refused = joined_by(&mut state, &bob, "b2", now()).unwrap_err();
        assert_eq!(
            refused,
            Error::Banned {
                identity: "bob".into(),
                until: now() + minute
            }
        );
        // On bob's behalf, and before the lock: the ban is what a banned identity learns.
        apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
        let Command::Join { client_id, mut cmd } = join_cmd("s1", None) else {
            unreachable!()
        };
        cmd.identity = "bob".into();
        let on_behalf = apply(&mut state, &svc, Command::Join { client_id, cmd }, now());
        assert!(
            matches!(on_behalf, Err(Error::Banned { .. })),
            "{on_behalf:?}"
        );
        apply(&mut state, &alice, unlock_cmd("u1"), now()).unwrap();
        // Ended: bob joins again, and the ban is gone from the list.
        let later = now() + minute;
        assert!(joined_by(&mut state, &bob, "b3", later).is_ok());
        assert!(state.bans(later).is_empty());
        // A shorter ban after a longer one keeps the longer; an unban lifts it at once.
        apply(
            &mut state,
            &alice,
            banning_drop(&["b3"], "d2", minute * 10),
            later,
        )
        .unwrap();
        join_as(&mut state, &alice, "a1");
        let unban = |identity: &str| Command::Unban {
            identity: identity.into(),
        };
        assert!(matches!(
            apply(&mut state, &alice, unban("nobody"), later),
            Err(Error::BanNotFound { .. })
        ));
        let lifted = apply(&mut state, &alice, unban("bob"), later).unwrap();
        assert_eq!(kinds(&lifted.events), [(state.seq(), "unbanned")]);
        assert!(joined_by(&mut state, &bob, "b4", later).is_ok());
        assert_eq!(
            state.bans_end(),
            Some(later),
            "no ban in force since the unban"
        );
    }

    #[test]
    fn a_repeated_ban_keeps_the_later_end() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        let alice = caller("alice", TokenRole::Moderator);
        let minute = Duration::from_secs(60);
        join_as(&mut state, &bob, "b1");
        join_as(&mut state, &bob, "b2");
        apply(
            &mut state,
            &alice,
            banning_drop(&["b1"], "d1", minute * 10),
            now(),
        )
        .unwrap();
        apply(
            &mut state,
            &alice,
            banning_drop(&["b2"], "d2", minute),
            now(),
        )
        .unwrap();
        assert_eq!(state.bans(now())[0].until, now() + minute * 10);
    }

    #[test]
    fn a_drop_past_the_ban_cap_drops_nobody() {
        let mut state = RoomState::new("r", "ep").with_bans(std::iter::empty(), MAX_BANS, now());
        let bob = caller("bob", TokenRole::Participant);
        let alice = caller("alice", TokenRole::Moderator);
        join_as(&mut state, &bob, "b1");
        let refused = apply(
            &mut state,
            &alice,
            banning_drop(&["b1"], "d1", Duration::from_secs(60)),
            now(),
        )
        .unwrap_err();
        assert_eq!(
            refused,
            Error::LimitReached {
                limit: Limit::RoomBans,
                max: MAX_BANS
            }
        );
        assert_eq!((state.seq(), state.population()), (1, 1));
        // Without a ban the same drop goes through.
        assert!(apply(&mut state, &alice, drop_cmd(&["b1"], "d2"), now()).is_ok());
    }
}
