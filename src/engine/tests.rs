//! The engine's rules, one scenario at a time: every rule of the contract that a room
//! decides, checked on `apply` without a runtime.

use std::time::{Duration, SystemTime};

use super::*;
use crate::error::{Error, Limit, LOCK_UNAUTHORIZED_CODE, UNAUTHORIZED_ACCESS_CODE};
use crate::pb::{self, event::Payload, DropOutcome, Role};
use crate::subscription::Audience;

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

/// The engine's `apply` as a store's caller sees it: a remembered refusal is its error.
fn apply(
    state: &mut RoomState,
    caller: &Caller,
    cmd: Command,
    now: SystemTime,
) -> Result<Applied, Error> {
    super::apply(state, caller, cmd, now).and_then(Applied::answer)
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
            fingerprint: drop_cmd(&["a"], "q").fingerprint(&caller("alice", TokenRole::Moderator)),
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
fn refusals_the_room_decides_are_remembered_under_their_request_id() {
    let mut state = RoomState::new("r", "ep");
    let alice = caller("alice", TokenRole::Moderator);
    let bob = caller("bob", TokenRole::Participant);
    join_as(&mut state, &alice, "a1");
    apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
    let refused = super::apply(&mut state, &bob, join_cmd("b1", Some("q")), now()).unwrap();
    assert!(refused.events.is_empty() && refused.changes.is_empty());
    let remembered = refused.remembered.expect("remembered under its request id");
    assert_eq!(remembered.key, answer_key("bob", "q"));
    let locked = Error::RoomLocked {
        room_id: "r".into(),
    };
    assert_eq!(remembered.reply, Reply::Refused(locked.clone()));
    apply(&mut state, &alice, unlock_cmd("u1"), now()).unwrap();
    // The same request later (another attempt, delayed) gets the refusal; a new one joins.
    assert_eq!(
        apply(&mut state, &bob, join_cmd("b2", Some("q")), now()),
        Err(locked)
    );
    assert_eq!(state.population(), 1);
    join_as(&mut state, &bob, "b3");
    // Who may call is checked before any answer is looked up, and its refusal not remembered.
    let denied = super::apply(&mut state, &bob, lock_cmd("l2"), now());
    assert!(matches!(denied, Err(Error::UnauthorizedAccess { .. })));
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
    assert!(state.answers.held().0 <= budget);
    // Past the budget, the oldest go first; memory stays within it.
    for i in fits..fits * 3 {
        apply(&mut state, &alice, drop_cmd(&ids, &format!("q{i}")), now()).unwrap();
    }
    let (bytes, held) = state.answers.held();
    assert!(bytes <= budget, "{bytes}");
    assert!(held <= fits);
    let again = apply(&mut state, &alice, drop_cmd(&ids, "q0"), now()).unwrap();
    assert_eq!(again.events.len(), 1, "forgotten early, applied anew");
}

#[test]
fn past_the_budget_refusals_are_forgotten_before_answers() {
    let budget = 4 * 1024;
    let mut state = RoomState::new("r", "ep").with_limits(RoomLimits {
        answer_bytes: budget,
        ..RoomLimits::default()
    });
    let alice = caller("alice", TokenRole::Moderator);
    let bob = caller("bob", TokenRole::Participant);
    join_as(&mut state, &alice, "a1");
    let locked = apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
    // Far more refusals than the budget holds, each under a new request id.
    for i in 0..1_000 {
        let refused = apply(
            &mut state,
            &bob,
            join_cmd("b", Some(&format!("q{i}"))),
            now(),
        );
        assert!(matches!(refused, Err(Error::RoomLocked { .. })));
    }
    let (bytes, held) = state.answers.held();
    assert!(bytes <= budget);
    // Nor does their trail grow: the queues stay near what is held.
    let queued = state.answers.queued();
    assert!(queued <= 4 * held + 128, "{queued} queued for {held} held");
    let retry = apply(&mut state, &alice, lock_cmd("l1"), now()).unwrap();
    assert_eq!(retry.reply, locked.reply, "the lock's answer outlived them");
    assert!(retry.events.is_empty());
    // The newest refusals are still remembered.
    apply(&mut state, &alice, unlock_cmd("u1"), now()).unwrap();
    let again = apply(&mut state, &bob, join_cmd("b", Some("q999")), now());
    assert!(matches!(again, Err(Error::RoomLocked { .. })), "{again:?}");
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
    let bob = caller("bob", TokenRole::Participant);
    let svc = caller("gw", TokenRole::Service);
    let alice = caller("alice", TokenRole::Moderator);
    assert_eq!(
        bob.join_grant(Role::Unspecified, "").unwrap(),
        (Role::Participant, "bob".into())
    );
    assert_eq!(
        bob.join_grant(Role::Participant, "bob").unwrap().0,
        Role::Participant
    );
    assert!(matches!(
        bob.join_grant(Role::Moderator, ""),
        Err(Error::Forbidden(_))
    ));
    assert!(matches!(
        bob.join_grant(Role::Unspecified, "eve"),
        Err(Error::Forbidden(_))
    ));
    assert_eq!(
        alice.join_grant(Role::Unspecified, "").unwrap().0,
        Role::Moderator
    );
    assert_eq!(
        svc.join_grant(Role::Unspecified, "").unwrap(),
        (Role::Participant, "gw".into())
    );
    assert_eq!(
        svc.join_grant(Role::Moderator, "ann").unwrap(),
        (Role::Moderator, "ann".into())
    );
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
