//! Arbitrary command sequences from arbitrary callers against one room, checked against the
//! room's invariants after every command. Shared by the property tests (`cargo test`) and the
//! `engine` fuzz target, which both feed it bytes: [`check`] turns any bytes into a scenario,
//! runs it through the engine and panics on the first broken invariant.
//!
//! The invariants: every command either fails and changes nothing, or logs events numbered
//! from the room's `seq + 1` with no gap; the membership replayed from the log is the room's
//! membership; a drop logs each dropped client's `room_disconnected` right before its
//! `user_disconnected` and then one ack with the same results; a time-out logs one
//! `user_disconnected{TIMED_OUT}` per client still present, once each, and nothing for others;
//! participants never drop; a retried request id returns the first answer (a refusal the
//! room's state decided included) and logs nothing while it is remembered, and one reused for a
//! different request is refused.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use roomctl::engine::{
    apply, Caller, Command, DestroyCmd, DropCmd, JoinCmd, Reply, RoomLimits, RoomScope, RoomState,
    TokenRole, IDEMPOTENCY_WINDOW,
};
use roomctl::error::Error;
use roomctl::error::Limit;
use roomctl::pb::{self, event::Payload, DisconnectReason, DropOutcome, Role};

/// Participants the room admits, small so that full rooms happen.
const MAX_MEMBERS: usize = 5;

fn callers() -> Vec<Caller> {
    let one = |identity: &str, role| Caller {
        identity: identity.into(),
        scope: RoomScope::One("r".into()),
        role,
    };
    vec![
        one("alice", TokenRole::Participant),
        one("bob", TokenRole::Participant),
        one("mod", TokenRole::Moderator),
        one("svc", TokenRole::Service),
        Caller {
            identity: "ops".into(),
            scope: RoomScope::All,
            role: TokenRole::Service,
        },
        Caller {
            identity: "mallory".into(),
            scope: RoomScope::One("elsewhere".into()),
            role: TokenRole::Moderator,
        },
    ]
}

/// Reads bytes as a scenario, one byte at a time; running out ends it.
struct Bytes<'a>(std::slice::Iter<'a, u8>);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        self.0.next().copied()
    }
}

/// What the model knows of the room beside its membership: the lock and the bans.
#[derive(Default)]
struct Rules {
    locked: bool,
    bans: HashMap<String, SystemTime>,
}

impl Rules {
    fn banned(&self, identity: &str, now: SystemTime) -> bool {
        self.bans.get(identity).is_some_and(|until| *until > now)
    }
}

/// Reads one command from `input` for `caller`; None when the input ends or the byte only
/// moves the clock.
fn command(
    input: &mut Bytes<'_>,
    op: u8,
    joined: usize,
    now: &mut SystemTime,
) -> Option<Option<Command>> {
    let client = |b: u8| match b as usize % (joined + 2) {
        n if n < joined => format!("c{n}"),
        _ => "ghost".to_owned(),
    };
    let ids = |input: &mut Bytes<'_>| -> Option<Vec<String>> {
        let count = input.next()?;
        (0..=count % 4).map(|_| input.next().map(client)).collect()
    };
    let cmd = match op % 9 {
        0 => {
            let (role, identity, key) = (input.next()?, input.next()?, input.next()?);
            let role = [Role::Unspecified, Role::Participant, Role::Moderator][role as usize % 3];
            let identity = ["", "alice", "ann", "bob"][identity as usize % 4];
            let request_id = (key % 2 == 1).then(|| format!("j{}", key % 4));
            let cmd = JoinCmd {
                name: String::new(),
                role,
                identity: identity.to_owned(),
                request_id,
            };
            let client_id = format!("c{joined}");
            Command::Join { client_id, cmd }
        }
        1 => Command::Leave {
            client_id: client(input.next()?),
        },
        2 => {
            let key = input.next()?;
            let client_ids = ids(input)?;
            let cmd = DropCmd {
                client_ids,
                reason: "why".into(),
                request_id: format!("d{}", key % 4),
                ban: (key % 3 == 0).then(|| Duration::from_secs(60 * (1 + u64::from(key % 5)))),
            };
            Command::Drop(cmd)
        }
        3 => Command::TimeOut {
            client_ids: ids(input)?,
        },
        4 | 5 => {
            let request_id = format!("l{}", input.next()? % 3);
            if op % 9 == 4 {
                Command::Lock { request_id }
            } else {
                Command::Unlock { request_id }
            }
        }
        6 => {
            let request_id = format!("x{}", input.next()? % 3);
            let cmd = DestroyCmd {
                reason: "bye".into(),
                request_id,
            };
            Command::Destroy(cmd)
        }
        7 => {
            let identity = ["alice", "ann", "bob", "nobody"][input.next()? as usize % 4];
            let identity = identity.to_owned();
            Command::Unban { identity }
        }
        _ => {
            *now += Duration::from_secs(u64::from(input.next()?) * 10);
            return Some(None);
        }
    };
    Some(Some(cmd))
}

/// Runs the scenario `bytes` describe and checks every invariant; panics on a broken one.
pub fn check(bytes: &[u8]) {
    let callers = callers();
    let mut input = Bytes(bytes.iter());
    let mut state = RoomState::new("r", "ep").with_limits(RoomLimits {
        max_members: MAX_MEMBERS,
        ..RoomLimits::default()
    });
    let mut now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut log: Vec<pb::Event> = Vec::new();
    let mut joined = 0usize;
    let mut rules = Rules::default();
    // Request ids are one space per identity, whatever the command.
    let mut remembered: HashMap<(String, String), (SystemTime, Command, Reply)> = HashMap::new();
    while let Some(op) = input.next() {
        let Some(who) = input.next() else { return };
        let Some(next) = command(&mut input, op, joined, &mut now) else {
            return;
        };
        let Some(cmd) = next else { continue };
        // Only the store times clients out, as roomctl itself.
        let system = Caller::system();
        let caller = match cmd {
            Command::TimeOut { .. } => &system,
            _ => &callers[who as usize % callers.len()],
        };
        let key = cmd
            .request_id()
            .map(|id| (caller.identity.clone(), id.to_owned()));
        let before_seq = state.seq();
        let before: BTreeSet<String> = members(&state);
        let owners: HashMap<String, String> = state
            .participants()
            .into_iter()
            .map(|p| (p.client_id, p.identity))
            .collect();
        let fresh = key
            .as_ref()
            .and_then(|key| remembered.get(key))
            .filter(|(expires_at, _, _)| *expires_at > now);
        let reused = fresh.is_some_and(|(_, first, _)| !same_request(caller, first, &cmd));
        let outcome = apply(&mut state, caller, cmd.clone(), now);
        if let (Ok(applied), Some((_, _, first))) = (&outcome, fresh) {
            assert!(
                !reused,
                "a request id reused for another request passed: {cmd:?}"
            );
            assert_eq!(
                &applied.reply, first,
                "a retry answers what the first call did"
            );
            assert!(applied.events.is_empty(), "a retry logs nothing");
            continue;
        }
        // A refusal the room's state decided is remembered under the request id; any other
        // is not.
        let outcome = outcome.and_then(|applied| match applied.reply {
            Reply::Refused(err) => {
                assert!(err.refusal().is_some(), "{err:?} remembered");
                assert!(applied.events.is_empty(), "a refusal logs nothing");
                let key = key.clone().expect("only a request id remembers");
                let first = (
                    now + IDEMPOTENCY_WINDOW,
                    cmd.clone(),
                    Reply::Refused(err.clone()),
                );
                remembered.insert(key, first);
                Err(err)
            }
            _ => Ok(applied),
        });
        if let (Err(err), Some(_)) = (&outcome, &key) {
            let decided_before = err.refusal().is_none();
            assert!(decided_before || remembered.contains_key(key.as_ref().unwrap()));
        }
        let Ok(applied) = outcome else {
            check_refusal(&cmd, caller, &outcome, &rules, &before, reused, now);
            assert_eq!(state.seq(), before_seq, "a failed command logged nothing");
            assert_eq!(members(&state), before, "a failed command changed nobody");
            assert_eq!(
                state.locked(),
                rules.locked,
                "a failed command kept the lock"
            );
            continue;
        };
        assert!(
            caller.role != TokenRole::Participant
                || matches!(cmd, Command::Join { .. } | Command::Leave { .. }),
            "a participant moderated: {cmd:?}"
        );
        assert!(
            !reused,
            "a request id reused for another request passed: {cmd:?}"
        );
        for (i, event) in applied.events.iter().enumerate() {
            assert_eq!(
                event.seq,
                before_seq + 1 + i as u64,
                "seqs follow with no gap"
            );
            assert_eq!((event.epoch.as_str(), event.room_id.as_str()), ("ep", "r"));
        }
        assert_eq!(state.seq(), before_seq + applied.events.len() as u64);
        match (&cmd, &applied.reply) {
            (Command::Join { cmd, .. }, Reply::Joined(joined_as)) => {
                assert_eq!(joined_as.seq, state.seq());
                let participant = joined_as.participant.as_ref().unwrap();
                assert!(!rules.banned(&participant.identity, now), "a banned join");
                assert!(
                    !rules.locked || participant.role() == Role::Moderator,
                    "a participant joined a locked room ({cmd:?})"
                );
                joined += 1;
            }
            (Command::Drop(drop), Reply::Dropped(response)) => {
                let banned = check_drop(
                    &applied.events,
                    response,
                    &owners,
                    &caller.identity,
                    drop.ban,
                );
                for identity in banned {
                    let until = now + drop.ban.expect("only a banning drop bans");
                    let end = rules.bans.entry(identity).or_insert(until);
                    *end = (*end).max(until);
                }
            }
            (Command::Leave { .. }, Reply::Left) => {}
            (Command::TimeOut { client_ids }, Reply::TimedOut(removed)) => {
                check_time_out(&applied.events, client_ids, removed, &before)
            }
            (Command::Lock { .. }, Reply::Locked(_)) => {
                assert!(!rules.locked, "locked twice");
                rules.locked = true;
            }
            (Command::Unlock { .. }, Reply::Unlocked(_)) => {
                assert!(rules.locked, "unlocked an unlocked room");
                rules.locked = false;
            }
            (Command::Destroy(_), Reply::Destroyed(response)) => {
                let ended: BTreeSet<String> = response.client_ids.iter().cloned().collect();
                assert_eq!(ended, before, "everyone present is named");
                assert_eq!(applied.events.len(), 1);
                assert!(state.is_empty() && !state.locked());
                rules.locked = false;
            }
            (Command::Unban { identity }, Reply::Unbanned(_)) => {
                assert!(rules.banned(identity, now), "unbanned without a ban");
                rules.bans.remove(identity);
            }
            (cmd, reply) => panic!("{cmd:?} answered {reply:?}"),
        }
        assert_eq!(state.locked(), rules.locked);
        let in_force: BTreeSet<String> = rules
            .bans
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(identity, _)| identity.clone())
            .collect();
        let bans: BTreeSet<String> = state.bans(now).into_iter().map(|b| b.identity).collect();
        assert_eq!(bans, in_force, "the bans in force are the model's");
        if let Some(key) = key {
            let first = (now + IDEMPOTENCY_WINDOW, cmd.clone(), applied.reply.clone());
            remembered.insert(key, first);
        }
        log.extend(applied.events);
        assert_eq!(
            replay(&log),
            members(&state),
            "membership is the log's replay"
        );
        assert_eq!(state.is_empty(), members(&state).is_empty());
    }
}

/// Whether `retry` repeats the request `first` (with its request id) of `caller`: the same
/// fields the caller chose, whatever the server chose (a join's client id), a join's role and
/// identity as they are granted (unset means the caller's own).
fn same_request(caller: &Caller, first: &Command, retry: &Command) -> bool {
    let granted = |cmd: &JoinCmd| {
        let own = match caller.role {
            TokenRole::Participant => Role::Participant,
            TokenRole::Moderator => Role::Moderator,
            TokenRole::Service => Role::Participant,
        };
        let role = if cmd.role == Role::Unspecified {
            own
        } else {
            cmd.role
        };
        let identity = if cmd.identity.is_empty() {
            caller.identity.clone()
        } else {
            cmd.identity.clone()
        };
        (cmd.name.clone(), role, identity)
    };
    match (first, retry) {
        (Command::Join { cmd: a, .. }, Command::Join { cmd: b, .. }) => granted(a) == granted(b),
        (Command::Drop(a), Command::Drop(b)) => {
            (&a.client_ids, &a.reason, a.ban) == (&b.client_ids, &b.reason, b.ban)
        }
        (Command::Destroy(a), Command::Destroy(b)) => a.reason == b.reason,
        (Command::Lock { .. }, Command::Lock { .. })
        | (Command::Unlock { .. }, Command::Unlock { .. }) => true,
        _ => false,
    }
}

/// A refusal must be the rule's: participants never moderate (5115 for locks, 5116 else), a
/// request id reused for another request is refused, a full room refuses joins, a locked room
/// refuses participants' joins, a ban refuses its identity, a lock or unlock must change
/// something, an unban needs a ban.
fn check_refusal(
    cmd: &Command,
    caller: &Caller,
    outcome: &Result<roomctl::engine::Applied, Error>,
    rules: &Rules,
    before: &BTreeSet<String>,
    reused: bool,
    now: SystemTime,
) {
    let Err(err) = outcome else { return };
    if caller.role == TokenRole::Participant {
        let code = match cmd {
            Command::Lock { .. } | Command::Unlock { .. } => Some("5115"),
            Command::Drop(_) | Command::Destroy(_) | Command::Unban { .. } => Some("5116"),
            _ => None,
        };
        if let Some(expected) = code {
            assert!(
                matches!(err, Error::UnauthorizedAccess { code, .. } if *code == expected),
                "{cmd:?}: {err:?}"
            );
            return;
        }
    }
    if reused {
        assert!(
            matches!(err, Error::RequestIdReused { .. }),
            "{cmd:?} reused its request id: {err:?}"
        );
        return;
    }
    match err {
        Error::LimitReached {
            limit: Limit::RoomMembers,
            ..
        } => assert_eq!(before.len(), MAX_MEMBERS, "only a full room refuses a join"),
        Error::RoomLocked { .. } => assert!(rules.locked, "refused by a lock not there"),
        Error::Banned { identity, .. } => {
            assert!(rules.banned(identity, now), "refused by a ban not there")
        }
        Error::RoomAlreadyLocked { .. } => assert!(rules.locked),
        Error::RoomNotLocked { .. } => assert!(!rules.locked),
        Error::BanNotFound { identity } => assert!(!rules.banned(identity, now)),
        Error::Forbidden(_) | Error::ClientNotFound { .. } => {}
        other => panic!("{cmd:?} refused with {other:?}"),
    }
}

fn members(state: &RoomState) -> BTreeSet<String> {
    state
        .participants()
        .into_iter()
        .map(|p| p.client_id)
        .collect()
}

fn replay(log: &[pb::Event]) -> BTreeSet<String> {
    let mut members = BTreeSet::new();
    for event in log {
        match &event.payload {
            Some(Payload::UserConnected(c)) => {
                assert!(members.insert(c.participant.as_ref().unwrap().client_id.clone()));
            }
            Some(Payload::UserDisconnected(d)) => assert!(members.remove(&d.client_id)),
            Some(Payload::SessionDestroyed(_)) => members.clear(),
            _ => {}
        }
    }
    members
}

/// A time-out's events: one `user_disconnected{TIMED_OUT}` for each client present before, in
/// request order, once; the reply names exactly those.
fn check_time_out(
    events: &[pb::Event],
    client_ids: &[String],
    removed: &[String],
    before: &BTreeSet<String>,
) {
    let mut expected: Vec<&String> = Vec::new();
    for id in client_ids {
        if before.contains(id) && !expected.contains(&id) {
            expected.push(id);
        }
    }
    assert_eq!(removed.iter().collect::<Vec<_>>(), expected);
    assert_eq!(events.len(), expected.len());
    for (event, client_id) in events.iter().zip(expected) {
        let Some(Payload::UserDisconnected(gone)) = &event.payload else {
            panic!("{event:?}")
        };
        assert_eq!(&gone.client_id, client_id);
        assert_eq!(gone.reason(), DisconnectReason::TimedOut);
    }
}

/// A drop's events: for each dropped client (those present before, in request order, once),
/// its `room_disconnected` then its `user_disconnected`; then one ack with the answer's results.
fn check_drop(
    events: &[pb::Event],
    response: &pb::DropUserResponse,
    owners: &HashMap<String, String>,
    moderator: &str,
    ban: Option<Duration>,
) -> Vec<String> {
    let before: BTreeSet<String> = owners.keys().cloned().collect();
    let mut expected = Vec::new();
    for result in &response.results {
        let was_there = before.contains(&result.client_id);
        let outcome = if was_there {
            DropOutcome::Dropped
        } else {
            DropOutcome::NotFound
        };
        assert_eq!(result.outcome(), outcome, "{}", result.client_id);
        if was_there {
            expected.push(result.client_id.clone());
        }
    }
    let ids: BTreeSet<&String> = response.results.iter().map(|r| &r.client_id).collect();
    assert_eq!(
        ids.len(),
        response.results.len(),
        "one result per distinct id"
    );
    // Each dropped identity once, in request order, when the drop bans.
    let mut identities: Vec<String> = Vec::new();
    for client_id in &expected {
        let identity = &owners[client_id];
        if ban.is_some() && !identities.contains(identity) {
            identities.push(identity.clone());
        }
    }
    assert_eq!(events.len(), expected.len() * 2 + identities.len() + 1);
    for (pair, client_id) in events.chunks(2).zip(&expected) {
        let Some(Payload::RoomDisconnected(told)) = &pair[0].payload else {
            panic!("{:?}", pair[0])
        };
        assert_eq!(&told.client_id, client_id);
        let Some(Payload::UserDisconnected(gone)) = &pair[1].payload else {
            panic!("{:?}", pair[1])
        };
        assert_eq!(&gone.client_id, client_id);
        assert_eq!(gone.reason(), DisconnectReason::DroppedByModerator);
    }
    let bans = &events[expected.len() * 2..events.len() - 1];
    for (event, identity) in bans.iter().zip(&identities) {
        let Some(Payload::UserBanned(banned)) = &event.payload else {
            panic!("{event:?}")
        };
        assert_eq!(
            (&banned.identity, banned.moderator.as_str()),
            (identity, moderator)
        );
    }
    let Some(Payload::AckDropUser(ack)) = &events.last().unwrap().payload else {
        panic!("{:?}", events.last())
    };
    assert_eq!(
        (ack.moderator.as_str(), &ack.results),
        (moderator, &response.results)
    );
    identities
}
