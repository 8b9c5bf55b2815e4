//! The rules of a room: given its state, who calls and a validated command, whether the call is
//! allowed, how the state changes and which events it logs, numbered. The only place a rule
//! lives; every store applies exactly these. Pure: no I/O, and no clock but the `now` given.

use std::collections::HashSet;
use std::time::SystemTime;

use super::answers::Remembered;
use super::caller::{Caller, TokenRole};
use super::command::{Change, Command, DestroyCmd, DropCmd, JoinCmd, Reply};
use super::room::{Member, RoomState};
use crate::error::{Error, Limit};
use crate::pb::{self, event::Payload, DisconnectReason, DropOutcome, Role};

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
    /// What the caller gets: this, or the error of a refusal the room remembered (once the
    /// store holds what the command changed, as for any answer).
    pub fn answer(self) -> Result<Self, Error> {
        match self.reply {
            Reply::Refused(err) => Err(err),
            _ => Ok(self),
        }
    }

    /// The answer to a retry: the remembered reply, nothing logged.
    pub(super) fn retry(reply: Reply) -> Self {
        Self {
            reply,
            events: Vec::new(),
            changes: Vec::new(),
            remembered: None,
        }
    }
}

/// Applies `cmd` by `caller` to `state` at time `now`: checks the room-level rules, changes the
/// state and returns the answer with the events to log. A command with a request id that was
/// answered before gets that answer again, and changes nothing. A command with a request id
/// that the room's state refuses gets [`Reply::Refused`], remembered (and nothing else
/// changed); on any other error the state is unchanged.
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
    let outcome = match cmd {
        Command::Join { client_id, cmd } => join(state, caller, client_id, cmd, now),
        Command::Leave { client_id } => leave(state, caller, &client_id, now),
        Command::Drop(cmd) => drop_users(state, caller, cmd, now),
        Command::TimeOut { client_ids } => Ok(remove_timed_out(state, client_ids, now)),
        Command::Lock { request_id } => lock(state, caller, true, request_id, now),
        Command::Unlock { request_id } => lock(state, caller, false, request_id, now),
        Command::Destroy(cmd) => destroy(state, caller, cmd, now),
        Command::Unban { identity } => unban(state, caller, identity, now),
    };
    let mut applied = match outcome {
        Ok(applied) => applied,
        // A refusal the room's state decided is remembered like an answer: otherwise an
        // earlier attempt of the same request, still on its way to the store, could be applied
        // after a retry was refused (the fault harness's "late commit").
        Err(err) if key.is_some() && err.refusal().is_some() => Applied::retry(Reply::Refused(err)),
        Err(err) => return Err(err),
    };
    applied.remembered = key.map(|key| {
        state
            .answers
            .remember(key, fingerprint, &applied.reply, now)
    });
    Ok(applied)
}

fn join(
    state: &mut RoomState,
    caller: &Caller,
    client_id: String,
    cmd: JoinCmd,
    now: SystemTime,
) -> Result<Applied, Error> {
    let (role, identity) = caller.join_grant(cmd.role, &cmd.identity)?;
    // A ban comes before the lock: a banned identity learns it is banned.
    if let Some(ban) = state.bans.of(&identity, now) {
        return Err(Error::Banned {
            identity,
            until: ban.until,
        });
    }
    if state.locked && role != Role::Moderator {
        return Err(Error::RoomLocked {
            room_id: state.room_id.to_string(),
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
    state.members.insert(Member {
        participant: participant.clone(),
        join_seq: event.seq,
    });
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
    let event = state.event(now, user_disconnected(client_id, DisconnectReason::Left));
    let departed = state.depart(client_id, owner, event.seq);
    Ok(Applied {
        reply: Reply::Left,
        events: vec![event],
        changes: vec![departed],
        remembered: None,
    })
}

/// What every client of the room is told when `client_id` leaves it, for `reason`.
fn user_disconnected(client_id: &str, reason: DisconnectReason) -> Payload {
    Payload::UserDisconnected(pb::UserDisconnected {
        client_id: client_id.to_owned(),
        reason: reason as i32,
    })
}

/// Removes `client_ids` (those still members) as timed out, each with
/// `user_disconnected{TIMED_OUT}`. Which clients timed out is the store's to say.
fn remove_timed_out(state: &mut RoomState, client_ids: Vec<String>, now: SystemTime) -> Applied {
    let (mut events, mut changes, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    for client_id in client_ids {
        let Some(member) = state.members.get(&client_id) else {
            continue;
        };
        let owner = member.participant.identity.clone();
        let event = state.event(
            now,
            user_disconnected(&client_id, DisconnectReason::TimedOut),
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
    let mut answered = HashSet::with_capacity(cmd.client_ids.len());
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
                let dropped = DisconnectReason::DroppedByModerator;
                events.push(state.event(now, user_disconnected(&client_id, dropped)));
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
            let ban = state.bans.ban(identity, until, &caller.identity);
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
    let mut identities: Vec<String> = Vec::new();
    for client_id in client_ids {
        if let Some(member) = state.members.get(client_id) {
            if !identities.contains(&member.participant.identity) {
                identities.push(member.participant.identity.clone());
            }
        }
    }
    state.bans.make_room_for(&identities, now)?;
    Ok(identities)
}

fn lock(
    state: &mut RoomState,
    caller: &Caller,
    locking: bool,
    request_id: String,
    now: SystemTime,
) -> Result<Applied, Error> {
    let room_id = state.room_id.to_string();
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
    state.bans.lift(identity.clone(), now)?;
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
