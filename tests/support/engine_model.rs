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
//! participants never drop; a retried request id returns the first answer and logs nothing
//! while it is remembered.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use roomctl::engine::{
    apply, Caller, Command, DropCmd, JoinCmd, Reply, RoomScope, RoomState, TokenRole,
    IDEMPOTENCY_WINDOW,
};
use roomctl::error::Error;
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

/// Runs the scenario `bytes` describe and checks every invariant; panics on a broken one.
pub fn check(bytes: &[u8]) {
    let callers = callers();
    let mut input = Bytes(bytes.iter());
    let mut state = RoomState::new("r", "ep").with_max_members(MAX_MEMBERS);
    let mut now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut log: Vec<pb::Event> = Vec::new();
    let mut joined = 0usize;
    let mut remembered: HashMap<(&'static str, String, String), (SystemTime, Reply)> =
        HashMap::new();
    while let Some(op) = input.next() {
        let Some(who) = input.next() else { return };
        let caller = &callers[who as usize % callers.len()];
        let client = |b: u8, joined: usize| match b as usize % (joined + 2) {
            n if n < joined => format!("c{n}"),
            _ => "ghost".to_owned(),
        };
        let (kind, cmd) = match op % 5 {
            0 => {
                let (Some(role), Some(identity), Some(key)) =
                    (input.next(), input.next(), input.next())
                else {
                    return;
                };
                let role =
                    [Role::Unspecified, Role::Participant, Role::Moderator][role as usize % 3];
                let identity = ["", caller.identity.as_str(), "ann"][identity as usize % 3];
                let request_id = (key % 2 == 1).then(|| format!("j{}", key % 4));
                let cmd = Command::Join {
                    client_id: format!("c{joined}"),
                    cmd: JoinCmd {
                        name: String::new(),
                        role,
                        identity: identity.to_owned(),
                        request_id,
                    },
                };
                ("join", cmd)
            }
            1 => {
                let Some(target) = input.next() else { return };
                let cmd = Command::Leave {
                    client_id: client(target, joined),
                };
                ("leave", cmd)
            }
            2 => {
                let (Some(count), Some(key)) = (input.next(), input.next()) else {
                    return;
                };
                let mut ids = Vec::new();
                for _ in 0..=count % 4 {
                    let Some(target) = input.next() else { return };
                    ids.push(client(target, joined));
                }
                let cmd = Command::Drop(DropCmd {
                    client_ids: ids,
                    reason: "why".into(),
                    request_id: format!("d{}", key % 4),
                });
                ("drop", cmd)
            }
            3 => {
                let Some(count) = input.next() else { return };
                let mut client_ids = Vec::new();
                for _ in 0..=count % 4 {
                    let Some(target) = input.next() else { return };
                    client_ids.push(client(target, joined));
                }
                ("time-out", Command::TimeOut { client_ids })
            }
            _ => {
                now += Duration::from_secs(u64::from(who) * 10);
                continue;
            }
        };
        let key = cmd
            .request_id()
            .map(|id| (kind, caller.identity.clone(), id.to_owned()));
        let before_seq = state.seq();
        let before: BTreeSet<String> = members(&state);
        // Only the store times clients out, as roomctl itself.
        let system = Caller::system();
        let caller = match cmd {
            Command::TimeOut { .. } => &system,
            _ => caller,
        };
        let outcome = apply(&mut state, caller, cmd.clone(), now);
        let Ok(applied) = outcome else {
            if matches!(cmd, Command::Drop(_)) && caller.role == TokenRole::Participant {
                assert!(
                    matches!(outcome, Err(Error::UnauthorizedAccess(_))),
                    "{outcome:?}"
                );
            }
            if matches!(outcome, Err(Error::LimitReached { .. })) {
                assert_eq!(before.len(), MAX_MEMBERS, "only a full room refuses a join");
            }
            assert_eq!(state.seq(), before_seq, "a failed command logged nothing");
            assert_eq!(members(&state), before, "a failed command changed nobody");
            continue;
        };
        assert!(
            !(matches!(cmd, Command::Drop(_)) && caller.role == TokenRole::Participant),
            "a participant dropped"
        );
        let fresh = key
            .as_ref()
            .and_then(|key| remembered.get(key))
            .filter(|(expires_at, _)| *expires_at > now);
        if let Some((_, first)) = fresh {
            assert_eq!(
                &applied.reply, first,
                "a retry answers what the first call did"
            );
            assert!(applied.events.is_empty(), "a retry logs nothing");
            continue;
        }
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
            (Command::Join { .. }, Reply::Joined(joined_as)) => {
                assert_eq!(joined_as.seq, state.seq());
                joined += 1;
            }
            (Command::Drop(_), Reply::Dropped(response)) => {
                check_drop(&applied.events, response, &before, &caller.identity)
            }
            (Command::Leave { .. }, Reply::Left) => {}
            (Command::TimeOut { client_ids }, Reply::TimedOut(removed)) => {
                check_time_out(&applied.events, client_ids, removed, &before)
            }
            (cmd, reply) => panic!("{cmd:?} answered {reply:?}"),
        }
        if let Some(key) = key {
            remembered.insert(key, (now + IDEMPOTENCY_WINDOW, applied.reply.clone()));
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
    before: &BTreeSet<String>,
    moderator: &str,
) {
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
    assert_eq!(events.len(), expected.len() * 2 + 1);
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
    let Some(Payload::AckDropUser(ack)) = &events.last().unwrap().payload else {
        panic!("{:?}", events.last())
    };
    assert_eq!(
        (ack.moderator.as_str(), &ack.results),
        (moderator, &response.results)
    );
}
