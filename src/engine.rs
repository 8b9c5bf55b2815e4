//! The room engine: the pure rules of a room.
//!
//! Given a room's state, who is calling and a validated command, it decides whether the call is
//! allowed, changes the state and returns the events to log, already numbered. It does no I/O and
//! knows no clock but the `now` it is given, so every rule here is unit-tested without a runtime,
//! and every store (memory, Redis) applies exactly the same rules.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use crate::error::Error;
use crate::limits::Limit;
use crate::pb::{self, event::Payload, DisconnectReason, DropOutcome, Role};

/// How long an answer is remembered for retries with the same `request_id`.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(600);

/// How many answers one room remembers at most (all kinds together). Bounds memory against a
/// caller that invents a new `request_id` per call; past it the oldest answers are forgotten
/// early. Answers belong to the room's epoch: a room that is forgotten forgets them too.
pub const MAX_REMEMBERED_ANSWERS: usize = 1024;

/// How many participants a room holds unless told otherwise (`--max-room-members`): enough for
/// any meeting, and a `ListParticipants` answer of that many stays far under the 4 MiB limit.
pub const DEFAULT_MAX_MEMBERS: usize = 10_000;

/// The key a remembered answer is filed under: request ids are scoped to the kind of command
/// (`join`, `drop`) and the caller's identity. Lengths come first, as both are free text.
pub fn answer_key(kind: &str, identity: &str, request_id: &str) -> String {
    format!("{kind}:{}:{identity}:{request_id}", identity.len())
}

/// An answer a room remembers, as a store persists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    /// See [`answer_key`].
    pub key: String,
    /// When the answer is forgotten.
    pub expires_at: SystemTime,
    /// The answer retries get.
    pub reply: Reply,
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
        self.check_room(room_id)?;
        if self.role == TokenRole::Participant {
            return Err(Error::UnauthorizedAccess(
                "participants may not drop users; a moderator or service token is needed".into(),
            ));
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
            Command::Leave { .. } | Command::TimeOut { .. } => None,
        }
    }

    /// The key `caller`'s answer to this command is remembered under, if it is remembered.
    pub fn answer_key(&self, caller: &Caller) -> Option<String> {
        let kind = match self {
            Command::Join { .. } => "join",
            Command::Drop(_) => "drop",
            Command::Leave { .. } | Command::TimeOut { .. } => return None,
        };
        Some(answer_key(kind, &caller.identity, self.request_id()?))
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
}

/// One change of membership a command made, for stores that persist changes rather than the
/// whole state.
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
    /// Recent answers by [`answer_key`], with their expiry, for idempotent retries.
    answers: HashMap<String, (SystemTime, Reply)>,
    /// The same keys in expiry order, so expiring and capping walk from the front.
    answers_order: VecDeque<(SystemTime, String)>,
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
            answers: HashMap::new(),
            answers_order: VecDeque::new(),
        }
    }

    /// The same room, holding at most `max_members` participants.
    pub fn with_max_members(mut self, max_members: usize) -> Self {
        self.max_members = max_members;
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
            state
                .answers_order
                .push_back((answer.expires_at, answer.key.clone()));
            state
                .answers
                .insert(answer.key, (answer.expires_at, answer.reply));
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

    fn forget_expired_answers(&mut self, now: SystemTime) {
        while let Some((expires_at, _)) = self.answers_order.front() {
            if *expires_at > now && self.answers_order.len() <= MAX_REMEMBERED_ANSWERS {
                break;
            }
            if let Some((_, key)) = self.answers_order.pop_front() {
                self.answers.remove(&key);
            }
        }
    }

    /// The answer remembered under `key`, if it has not expired.
    fn recall(&mut self, key: &str, now: SystemTime) -> Option<Reply> {
        self.forget_expired_answers(now);
        self.answers.get(key).map(|(_, reply)| reply.clone())
    }

    /// Remembers `reply` under `key` for [`IDEMPOTENCY_WINDOW`].
    fn remember(&mut self, key: String, reply: &Reply, now: SystemTime) -> Remembered {
        let expires_at = now + IDEMPOTENCY_WINDOW;
        self.answers_order.push_back((expires_at, key.clone()));
        self.answers
            .insert(key.clone(), (expires_at, reply.clone()));
        self.forget_expired_answers(now);
        Remembered {
            key,
            expires_at,
            reply: reply.clone(),
        }
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
    // Who may drop is checked before any remembered answer is looked up: a retry never lets a
    // caller past the rule that would refuse it.
    if let Command::Drop(_) = &cmd {
        caller.check_may_drop(&state.room_id)?;
    }
    let key = cmd.answer_key(caller);
    if let Some(reply) = key.as_deref().and_then(|key| state.recall(key, now)) {
        return Ok(Applied::retry(reply));
    }
    let mut applied = match cmd {
        Command::Join { client_id, cmd } => join(state, caller, client_id, cmd, now),
        Command::Leave { client_id } => leave(state, caller, &client_id, now),
        Command::Drop(cmd) => drop_users(state, caller, cmd, now),
        Command::TimeOut { client_ids } => Ok(time_out(state, client_ids, now)),
    }?;
    applied.remembered = key.map(|key| state.remember(key, &applied.reply, now));
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
            None => false,
        }
    }

    /// Whether the subscription ends (OK) right after delivering `event`: its client was dropped
    /// or left.
    pub fn ends_after(&self, event: &pb::Event) -> bool {
        match &event.payload {
            Some(Payload::RoomDisconnected(rd)) => self.is_own(&rd.client_id),
            Some(Payload::UserDisconnected(ud)) => self.is_own(&ud.client_id),
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
                key: answer_key("drop", "alice", "q"),
                expires_at: now() + Duration::from_secs(5),
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
            Some((answer_key("drop", "alice", "q"), late + IDEMPOTENCY_WINDOW))
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
        let mut state = RoomState::new("r", "ep").with_max_members(2);
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
        let mut partial = RoomState::restore("r", "ep", 9, 2, [], []).with_max_members(2);
        assert!(apply(&mut partial, &bob, join_cmd("d", None), now()).is_err());
    }

    #[test]
    fn a_participant_dropping_gets_5116_and_nothing_changes() {
        let mut state = RoomState::new("r", "ep");
        let bob = caller("bob", TokenRole::Participant);
        join_as(&mut state, &bob, "a");
        let err = apply(&mut state, &bob, drop_cmd(&["a"], "q"), now()).unwrap_err();
        assert!(matches!(err, Error::UnauthorizedAccess(_)));
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
    fn remembered_answers_are_bounded() {
        let mut state = RoomState::new("r", "ep");
        let alice = caller("alice", TokenRole::Moderator);
        for i in 0..MAX_REMEMBERED_ANSWERS + 10 {
            apply(
                &mut state,
                &alice,
                drop_cmd(&["x"], &format!("q{i}")),
                now(),
            )
            .unwrap();
        }
        assert_eq!(state.answers.len(), MAX_REMEMBERED_ANSWERS);
        assert_eq!(state.answers_order.len(), MAX_REMEMBERED_ANSWERS);
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
}
