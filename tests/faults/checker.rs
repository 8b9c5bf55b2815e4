//! The checker: reads a whole [`History`] and reports every anomaly, with the events around it.
//!
//! It trusts nothing but what the servers said. The room's log (per room and epoch) is the
//! union of what every subscriber saw, and each seq must carry the same event for all of them;
//! each subscriber's view must be contiguous between its resumes; every acknowledged change
//! must be in the log exactly once, a refused one never, an unknown one at most once; the
//! membership, lock and bans replayed from the log must admit every event and match every
//! `ListParticipants` snapshot at its seq; a drop's `room_disconnected` comes before its
//! `user_disconnected` and both before its `ack_drop_user`; and an epoch may change only after
//! a fault that can lose acknowledged data.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use roomctl::pb::{self, event::Payload};

use crate::history::{Answer, Fault, History, Invocation, Op, Outcome, Seen};

/// How long after its answer a change may still be lost with its epoch's tail: the time its
/// events may take to reach the subscribers, who may still be coming back from an earlier
/// fault (a Redis restart is followed by a few seconds of reconnections).
const AT_RISK: std::time::Duration = std::time::Duration::from_secs(5);

/// How soon after a fault that can lose data a room's new epoch must be first seen: each busy
/// room of a run begins it with its next commit, within seconds.
const NEW_EPOCH_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// A room's log in one epoch, as the subscribers saw it together.
type Log = BTreeMap<u64, pb::Event>;

/// What the checker found.
#[derive(Default)]
pub struct Report {
    pub anomalies: Vec<String>,
    pub events: usize,
    pub epochs: usize,
    /// Logs whose state could not be replayed (begun after a rollback, with no snapshot).
    pub unverified: usize,
    /// Changes found wrong, but excused: a fault that can lose data struck while they ran.
    pub rolled_back: usize,
    /// An operation's findings that a lost tail of the log explains (a change or snapshot not
    /// found), excused when such a loss was possible; a loss never explains a change logged
    /// twice, or logged though refused.
    losses: Vec<String>,
}

/// One line for an event.
fn line(event: &pb::Event) -> String {
    let what = match &event.payload {
        Some(Payload::UserConnected(c)) => {
            let p = c.participant.clone().unwrap_or_default();
            format!("user_connected {} {} ({})", p.client_id, p.identity, p.name)
        }
        Some(Payload::UserDisconnected(d)) => {
            format!("user_disconnected {} {:?}", d.client_id, d.reason())
        }
        Some(Payload::RoomDisconnected(d)) => format!("room_disconnected {}", d.client_id),
        Some(Payload::AckDropUser(a)) => format!("ack_drop_user {}", a.request_id),
        Some(Payload::RoomLocked(_)) => "room_locked".into(),
        Some(Payload::RoomUnlocked(_)) => "room_unlocked".into(),
        Some(Payload::SessionDestroyed(_)) => "session_destroyed".into(),
        Some(Payload::UserBanned(b)) => format!("user_banned {}", b.identity),
        Some(Payload::UserUnbanned(u)) => format!("user_unbanned {}", u.identity),
        None => "(empty)".into(),
    };
    format!("{}:{}:{} {what}", event.room_id, event.epoch, event.seq)
}

/// The events of `log` around `seq`, for a report.
fn around(log: &Log, seq: u64) -> String {
    log.range(seq.saturating_sub(3)..=seq + 3)
        .map(|(_, e)| format!("\n      {}", line(e)))
        .collect()
}

/// A room's membership, lock and bans, as its log says.
#[derive(Default, Clone)]
struct Replay {
    members: Vec<String>,
    locked: bool,
    /// Identity -> when its ban ends (seconds since the epoch).
    bans: HashMap<String, i64>,
}

pub fn check(history: &History) -> Report {
    let mut report = Report::default();
    let views = history.views.lock().unwrap();
    let invocations = history.invocations.lock().unwrap();
    let faults = history.faults.lock().unwrap();
    let mut logs: BTreeMap<(String, String), Log> = BTreeMap::new();
    let mut first_seen: HashMap<(String, String), std::time::Duration> = HashMap::new();

    // Every subscriber agrees with every other on each seq, and its own view is contiguous.
    for (n, (room, seen)) in views.iter().enumerate() {
        // Where it stands: None before its first event (it asks from the log's start).
        let mut at: Option<(String, u64)> = None;
        for item in seen {
            match item {
                Seen::Resumed {
                    after_seq, epoch, ..
                } => {
                    if let (Some((had, seq)), Some(after)) = (&at, after_seq) {
                        if !epoch.is_empty() && (had != epoch || seq != after) {
                            report.anomalies.push(format!(
                                "subscriber {n} of {room} resumed after {epoch}:{after} having seen {had}:{seq}"
                            ));
                        }
                    }
                }
                Seen::OutOfRange {
                    epoch, oldest_seq, ..
                } => at = Some((epoch.clone(), oldest_seq.saturating_sub(1))),
                Seen::Event { at: when, event } => {
                    let key = (event.room_id.clone(), event.epoch.clone());
                    first_seen.entry(key.clone()).or_insert(*when);
                    let log = logs.entry(key).or_default();
                    match log.get(&event.seq) {
                        Some(known) if known.encode_to_vec() != event.encode_to_vec() => {
                            report.anomalies.push(format!(
                                "two different events at {}:{}:{}: {} and {}",
                                event.room_id,
                                event.epoch,
                                event.seq,
                                line(known),
                                line(event)
                            ));
                        }
                        Some(_) => {}
                        None => {
                            log.insert(event.seq, event.clone());
                        }
                    }
                    let expected = match &at {
                        Some((epoch, seq)) if *epoch == event.epoch => seq + 1,
                        Some((epoch, _)) => {
                            report.anomalies.push(format!(
                                "subscriber {n} of {room} went from epoch {epoch} to {} without OUT_OF_RANGE",
                                line(event)
                            ));
                            event.seq
                        }
                        None => 1,
                    };
                    if event.seq != expected {
                        report.anomalies.push(format!(
                            "subscriber {n} of {room} expected seq {expected}, got {}",
                            line(event)
                        ));
                    }
                    at = Some((event.epoch.clone(), event.seq));
                    report.events += 1;
                }
            }
        }
    }
    report.epochs = logs.len();

    // Each log is whole (seen by some subscriber at every seq from its first) and replays
    // without a breach.
    let mut replays: HashMap<(String, String), Vec<Option<Replay>>> = HashMap::new();
    for ((room, epoch), log) in &logs {
        let first = log.keys().next().copied().unwrap_or(1);
        let newest = log.keys().next_back().copied().unwrap_or(0);
        let missing: Vec<u64> = (first..=newest).filter(|s| !log.contains_key(s)).collect();
        if !missing.is_empty() {
            report.anomalies.push(format!(
                "{room}:{epoch}: no subscriber saw seqs {missing:?}"
            ));
        }
        let base = if first == 1 {
            Some((0, Replay::default()))
        } else {
            // An epoch begun after a rollback carries the state Redis kept, which only a
            // snapshot tells (its bans stay unknown).
            snapshot_at_or_after(&invocations, room, epoch, first - 1)
        };
        if base.is_none() {
            report.unverified += 1;
        }
        let states = base.map_or_else(Vec::new, |base| replay(log, base, &mut report));
        replays.insert((room.clone(), epoch.clone()), states);
    }

    // An epoch changes only after a fault that may lose acknowledged data.
    let mut epochs_of: BTreeMap<&str, Vec<(&String, std::time::Duration)>> = BTreeMap::new();
    for ((room, epoch), when) in &first_seen {
        epochs_of.entry(room).or_default().push((epoch, *when));
    }
    for (room, mut epochs) in epochs_of {
        epochs.sort_by_key(|(_, when)| *when);
        for (epoch, when) in epochs.iter().skip(1) {
            let excused = faults
                .iter()
                .any(|f| f.loses_data && f.at <= *when && *when <= f.healed + NEW_EPOCH_WITHIN);
            if !excused {
                report.anomalies.push(format!(
                    "{room}: a new epoch {epoch} (first seen at {when:?}) with no fault that can lose data before it"
                ));
            }
        }
    }

    for invocation in invocations.iter() {
        let mut found = Report::default();
        check_invocation(invocation, &logs, &replays, &mut found);
        report.anomalies.append(&mut found.anomalies);
        if found.losses.is_empty() {
            continue;
        }
        if at_risk(invocation, &faults) {
            report.rolled_back += 1;
        } else {
            report.anomalies.append(&mut found.losses);
        }
    }
    report
}

/// Whether a fault that can lose data struck while `invocation` ran, or within [`AT_RISK`] of
/// it: what it changed (or, for a snapshot, what it saw) may be in the tail of an epoch that a
/// new one replaced before any subscriber saw it.
fn at_risk(invocation: &Invocation, faults: &[Fault]) -> bool {
    faults.iter().any(|f| {
        f.loses_data
            && f.at <= invocation.completed + AT_RISK
            && f.healed + AT_RISK >= invocation.invoked
    })
}

/// The earliest `ListParticipants` answer in `room`'s log `epoch` at `seq` or later, as a
/// replay's starting point.
fn snapshot_at_or_after(
    invocations: &[Invocation],
    room: &str,
    epoch: &str,
    seq: u64,
) -> Option<(u64, Replay)> {
    invocations
        .iter()
        .filter(|i| i.room == room)
        .filter_map(|i| match &i.outcome {
            Outcome::Ok(Answer::Listed(list)) if list.epoch == epoch && list.seq >= seq => {
                Some(list)
            }
            _ => None,
        })
        .min_by_key(|list| list.seq)
        .map(|list| {
            let state = Replay {
                members: list
                    .participants
                    .iter()
                    .map(|p| p.client_id.clone())
                    .collect(),
                locked: list.locked,
                bans: HashMap::new(),
            };
            (list.seq, state)
        })
}

/// Replays `log` from `base` (a seq and the state after it): the state after each seq
/// (index = seq; None before the base), noting every event the state before it should not
/// have allowed.
fn replay(log: &Log, base: (u64, Replay), report: &mut Report) -> Vec<Option<Replay>> {
    let (from, mut state) = base;
    let mut states = vec![None; from as usize];
    states.push(Some(state.clone()));
    for (seq, event) in log.range(from + 1..) {
        let time = event.time.map_or(0, |t| t.seconds);
        let mut breach = |what: &str| {
            report
                .anomalies
                .push(format!("{what}:{}", around(log, *seq)));
        };
        match &event.payload {
            Some(Payload::UserConnected(c)) => {
                let p = c.participant.clone().unwrap_or_default();
                if state.members.contains(&p.client_id) {
                    breach("a client joined twice");
                }
                if state.locked && p.role() == pb::Role::Participant {
                    breach("a participant joined a locked room");
                }
                if state
                    .bans
                    .get(&p.identity)
                    .is_some_and(|until| *until > time)
                {
                    breach("a banned identity joined");
                }
                state.members.push(p.client_id);
            }
            Some(Payload::UserDisconnected(d)) => {
                if !state.members.contains(&d.client_id) {
                    breach("a client left that was not in the room");
                }
                state.members.retain(|m| *m != d.client_id);
            }
            Some(Payload::RoomLocked(_)) => state.locked = true,
            Some(Payload::RoomUnlocked(_)) => state.locked = false,
            Some(Payload::SessionDestroyed(_)) => {
                state.members.clear();
                state.locked = false;
            }
            Some(Payload::UserBanned(b)) => {
                let until = b.until.map_or(0, |t| t.seconds);
                let end = state.bans.entry(b.identity.clone()).or_default();
                *end = (*end).max(until);
            }
            Some(Payload::UserUnbanned(u)) => {
                state.bans.remove(&u.identity);
            }
            Some(Payload::RoomDisconnected(_)) | Some(Payload::AckDropUser(_)) | None => {}
        }
        states.resize(*seq as usize, states.last().cloned().flatten());
        states.push(Some(state.clone()));
    }
    states
}

/// The events (over every epoch of the room, with their epoch) that `matches`.
fn find<'a>(
    logs: &'a BTreeMap<(String, String), Log>,
    room: &str,
    matches: impl Fn(&pb::Event) -> bool,
) -> Vec<(&'a str, &'a pb::Event)> {
    logs.iter()
        .filter(|((r, _), _)| r == room)
        .flat_map(|((_, epoch), log)| log.values().map(move |e| (epoch.as_str(), e)))
        .filter(|(_, e)| matches(e))
        .collect()
}

fn check_invocation(
    invocation: &Invocation,
    logs: &BTreeMap<(String, String), Log>,
    replays: &HashMap<(String, String), Vec<Option<Replay>>>,
    report: &mut Report,
) {
    let room = invocation.room.as_str();
    // `lost`: what a lost tail of the log would explain.
    let mut anomaly = |what: String, lost: bool| {
        let text = format!(
            "op {} in {room} ({:?}, {} attempts, {:?}..{:?}, {:?}): {what}",
            invocation.id,
            invocation.op,
            invocation.attempts,
            invocation.invoked,
            invocation.completed,
            invocation.outcome
        );
        if lost {
            report.losses.push(text);
        } else {
            report.anomalies.push(text);
        }
    };
    // How many times the change appears in the log, where that can be told.
    let appearances = match &invocation.op {
        Op::Join { name, .. } => Some(find(
            logs,
            room,
            |e| matches!(&e.payload, Some(Payload::UserConnected(c)) if c.participant.as_ref().is_some_and(|p| p.name == *name)),
        )),
        Op::Drop { .. } => Some(find(
            logs,
            room,
            |e| matches!(&e.payload, Some(Payload::AckDropUser(a)) if a.request_id == invocation.request_id),
        )),
        _ => None,
    };
    let count = appearances.as_ref().map(Vec::len);
    // Where it appears, with the events around.
    let context: String = appearances
        .iter()
        .flatten()
        .map(|(epoch, e)| around(&logs[&(room.to_owned(), epoch.to_string())], e.seq))
        .collect();
    match (&invocation.outcome, count) {
        (Outcome::Ok(_), Some(n)) if n != 1 => anomaly(
            format!("acknowledged, in the log {n} times:{context}"),
            n == 0,
        ),
        (Outcome::Refused { .. }, Some(n)) if n != 0 => anomaly(
            format!("refused, yet in the log {n} times:{context}"),
            false,
        ),
        (Outcome::Unknown(_), Some(n)) if n > 1 => {
            anomaly(format!("unknown, in the log {n} times:{context}"), false)
        }
        _ => {}
    }
    let Outcome::Ok(answer) = &invocation.outcome else {
        return;
    };
    match answer {
        Answer::Joined {
            client_id,
            seq,
            epoch,
        } => {
            let at = logs
                .get(&(room.to_owned(), epoch.clone()))
                .and_then(|log| log.get(seq));
            let right = at.is_some_and(|e| {
                matches!(&e.payload, Some(Payload::UserConnected(c)) if c.participant.as_ref().is_some_and(|p| p.client_id == *client_id))
            });
            if !right {
                anomaly(
                    format!(
                        "answered {client_id} at {epoch}:{seq}, the log has {:?}",
                        at.map(line)
                    ),
                    at.is_none(),
                );
            }
        }
        Answer::Left => {
            let Op::Leave { client_id } = &invocation.op else {
                return;
            };
            let left = find(
                logs,
                room,
                |e| matches!(&e.payload, Some(Payload::UserDisconnected(d)) if d.client_id == *client_id && d.reason() == pb::DisconnectReason::Left),
            );
            if left.len() != 1 {
                anomaly(
                    format!(
                        "left, with {} user_disconnected LEFT in the log",
                        left.len()
                    ),
                    left.is_empty(),
                );
            }
        }
        Answer::Dropped {
            request_id,
            dropped,
        } => {
            let acks = find(
                logs,
                room,
                |e| matches!(&e.payload, Some(Payload::AckDropUser(a)) if a.request_id == *request_id),
            );
            let Some((epoch, ack)) = acks.first() else {
                return;
            };
            let log = &logs[&(room.to_owned(), epoch.to_string())];
            for client_id in dropped {
                let told = log.values().find(|e| {
                    matches!(&e.payload, Some(Payload::RoomDisconnected(d)) if d.client_id == *client_id)
                });
                let gone = log.values().find(|e| {
                    matches!(&e.payload, Some(Payload::UserDisconnected(d)) if d.client_id == *client_id)
                });
                match (told, gone) {
                    (Some(t), Some(g)) if t.seq < g.seq && g.seq < ack.seq => {}
                    // A drop's events are one commit: a loss takes all or none.
                    _ => anomaly(
                        format!(
                            "dropped {client_id}: room_disconnected {:?}, user_disconnected {:?}, ack {}",
                            told.map(|e| e.seq),
                            gone.map(|e| e.seq),
                            ack.seq
                        ),
                        false,
                    ),
                }
            }
        }
        Answer::Seq(seq) => {
            let kind = |e: &pb::Event| {
                matches!(
                    (&invocation.op, &e.payload),
                    (Op::Lock, Some(Payload::RoomLocked(_)))
                        | (Op::Unlock, Some(Payload::RoomUnlocked(_)))
                        | (Op::Destroy, Some(Payload::SessionDestroyed(_)))
                )
            };
            let found = find(logs, room, |e| e.seq == *seq && kind(e));
            if found.is_empty() {
                anomaly(
                    format!("answered seq {seq}, no such event there in any epoch"),
                    true,
                );
            }
        }
        Answer::Listed(list) => {
            let Some(states) = replays.get(&(room.to_owned(), list.epoch.clone())) else {
                if list.seq > 0 {
                    anomaly(
                        format!("listed at {}:{}, an epoch nobody saw", list.epoch, list.seq),
                        true,
                    );
                }
                return;
            };
            let Some(state) = states.get(list.seq as usize) else {
                anomaly(
                    format!("listed at seq {}, past the log's end", list.seq),
                    true,
                );
                return;
            };
            let Some(state) = state else {
                // Before the first state the log tells.
                return;
            };
            let listed: Vec<String> = list
                .participants
                .iter()
                .map(|p| p.client_id.clone())
                .collect();
            if listed != state.members || list.locked != state.locked {
                anomaly(
                    format!(
                        "listed {listed:?} locked {} at {}:{}, the log replays to {:?} locked {}",
                        list.locked, list.epoch, list.seq, state.members, state.locked
                    ),
                    false,
                );
            }
        }
    }
}

/// Plants one of each anomaly in a small history and asserts that the checker reports them all,
/// and nothing in the same history without them: a checker that cannot fail proves nothing.
pub fn self_test() {
    let event = |seq: u64, epoch: &str, payload: Payload| pb::Event {
        seq,
        epoch: epoch.into(),
        room_id: "r".into(),
        time: None,
        payload: Some(payload),
    };
    let joined = |client: &str, name: &str| {
        Payload::UserConnected(pb::UserConnected {
            participant: Some(pb::Participant {
                client_id: client.into(),
                identity: client.into(),
                name: name.into(),
                role: pb::Role::Participant as i32,
                ..Default::default()
            }),
        })
    };
    let seen = |events: Vec<pb::Event>| -> Vec<Seen> {
        std::iter::once(Seen::Resumed {
            after_seq: Some(0),
            epoch: String::new(),
        })
        .chain(events.into_iter().map(|event| Seen::Event {
            at: std::time::Duration::ZERO,
            event,
        }))
        .collect()
    };
    let invocation = |id: usize, op: Op, outcome: Outcome| Invocation {
        id,
        room: "r".into(),
        op,
        request_id: format!("req-{id}"),
        invoked: std::time::Duration::ZERO,
        completed: std::time::Duration::ZERO,
        attempts: 1,
        outcome,
    };
    let join = |name: &str| Op::Join {
        identity: "x".into(),
        name: name.into(),
    };
    let clean = |planted: bool| {
        let history = History::new();
        let mut log = vec![
            event(1, "e", joined("a", "op-1")),
            event(2, "e", Payload::RoomLocked(pb::RoomLocked::default())),
        ];
        if planted {
            // A participant admitted to a locked room.
            log.push(event(3, "e", joined("b", "op-2")));
        }
        let mut other = log.clone();
        if planted {
            // Disagreement at seq 2, and a gap (seq 3 of this view skipped).
            other[1] = event(2, "e", Payload::RoomUnlocked(pb::RoomUnlocked::default()));
            other.remove(2);
            other.push(event(
                4,
                "e",
                Payload::RoomUnlocked(pb::RoomUnlocked::default()),
            ));
            // A new epoch with no fault that could lose data.
            other.push(event(
                9,
                "f",
                Payload::RoomLocked(pb::RoomLocked::default()),
            ));
        }
        history
            .views
            .lock()
            .unwrap()
            .extend([("r".to_owned(), seen(log)), ("r".to_owned(), seen(other))]);
        let answered = |client: &str, seq| {
            Outcome::Ok(Answer::Joined {
                client_id: client.into(),
                seq,
                epoch: "e".into(),
            })
        };
        let mut invocations = vec![invocation(1, join("op-1"), answered("a", 1))];
        if planted {
            // Acknowledged, never logged; refused, logged; a snapshot the log contradicts.
            invocations.push(invocation(3, join("op-3"), answered("c", 5)));
            invocations.push(invocation(
                2,
                join("op-2"),
                Outcome::Refused {
                    reason: "ROOM_LOCKED".into(),
                },
            ));
            invocations.push(invocation(
                4,
                Op::List,
                Outcome::Ok(Answer::Listed(pb::ListParticipantsResponse {
                    seq: 1,
                    epoch: "e".into(),
                    locked: true,
                    ..Default::default()
                })),
            ));
        }
        history.invocations.lock().unwrap().extend(invocations);
        check(&history).anomalies
    };
    let none = clean(false);
    assert!(none.is_empty(), "the checker invents anomalies: {none:#?}");
    let found = clean(true).join("\n");
    for expected in [
        "two different events",
        "expected seq",
        "a participant joined a locked room",
        "a new epoch",
        "acknowledged, in the log 0 times",
        "refused, yet in the log 1 times",
        "the log replays to",
    ] {
        assert!(
            found.contains(expected),
            "the checker missed \"{expected}\":\n{found}"
        );
    }
    println!("faults: the checker's self-test found every planted anomaly and invented none");
}
