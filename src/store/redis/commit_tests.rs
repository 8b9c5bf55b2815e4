//! `commit.lua` and `confirm.lua` run against a real `redis-server`, one test per outcome, with
//! arguments packed by [`Commit::invoke`] and replies read by [`Committed::of`]: the only place
//! the scripts' argument order is checked apart from the store's integration tests.

#[allow(dead_code)]
#[path = "../../../tests/common/redis_cluster.rs"]
mod redis_cluster;
#[allow(dead_code)]
#[path = "../../../tests/common/redis_server.rs"]
mod redis_server;
#[path = "../../../tests/common/tools.rs"]
mod tools;

use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use super::*;
use redis_server::{redis_available, RedisServer};

const ROOM: &str = "r1";
/// How long the cluster helper waits for what it waits for.
const PATIENCE: Duration = Duration::from_secs(10);
const EPOCH: &str = "e1";

/// A private redis-server and a connection to it; None (after a loud line) when skipping.
async fn redis() -> Option<(RedisServer, MultiplexedConnection)> {
    if !redis_available() {
        return None;
    }
    let server = RedisServer::start().await;
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    Some((server, conn))
}

fn bounds() -> Bounds {
    Bounds {
        history: 100,
        history_bytes: 1 << 20,
        empty_room_ttl_ms: 60_000,
        answer_bytes: 1 << 20,
        presence_ms: 0,
        wait_replicas: 0,
        quorum_ms: 0,
    }
}

fn event(seq: u64, payload: usize) -> pb::Event {
    pb::Event {
        seq,
        epoch: EPOCH.into(),
        room_id: "x".repeat(payload),
        ..Default::default()
    }
}

fn participant(client_id: &str) -> pb::Participant {
    pb::Participant {
        client_id: client_id.into(),
        identity: format!("id-{client_id}"),
        ..Default::default()
    }
}

/// A commit of `changes` on a room expected at `expected`, publishing nothing.
fn commit(expected: Option<u64>, changes: Changes<'_>) -> Commit<'_> {
    Commit {
        bounds: bounds(),
        expected,
        epoch: EPOCH,
        fresh_epoch: "e2".into(),
        channel: format!("roomctl:{ROOM}"),
        publish: None,
        now: SystemTime::now(),
        assumed: Assumed::default(),
        changes,
        listing: None,
        webhooks: false,
    }
}

async fn run(conn: &mut MultiplexedConnection, commit: &Commit<'_>) -> Committed {
    run_settled(conn, commit, 0).await
}

/// [`run`], with `settled` the newest cluster epoch known to be settled.
async fn run_settled(
    conn: &mut MultiplexedConnection,
    commit: &Commit<'_>,
    settled: u64,
) -> Committed {
    let script = redis::Script::new(COMMIT);
    let reply: i64 = commit
        .invoke(&script, &Keys::new(ROOM), settled)
        .invoke_async(conn)
        .await
        .expect("the commit script runs");
    Committed::of(reply)
}

/// A commit of `events` on a room expected at `expected`, waiting for a replica on a cluster of
/// the test helper's node timeout (1 s), so quorum.lua checks its master.
fn waiting_on_cluster(expected: Option<u64>, events: &[pb::Event]) -> Commit<'_> {
    let changes = Changes {
        events: events.iter().collect(),
        ..Changes::default()
    };
    let mut waiting = commit(expected, changes);
    waiting.bounds.wait_replicas = 1;
    waiting.bounds.quorum_ms = 1000;
    waiting
}

/// A cluster node's `field` of CLUSTER INFO, a number (`cluster_current_epoch`...).
async fn cluster_info(conn: &mut MultiplexedConnection, field: &str) -> u64 {
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(conn)
        .await
        .unwrap();
    let line = info.lines().find_map(|l| l.strip_prefix(field)).unwrap();
    line.trim_start_matches(':').trim().parse().unwrap()
}

async fn meta_field(conn: &mut MultiplexedConnection, field: &str) -> Option<String> {
    conn.hget(&Keys::new(ROOM).meta, field).await.unwrap()
}

/// Creates the room with `events` (seqs 1..) and a member `c1`; answers its seq.
async fn create(conn: &mut MultiplexedConnection, events: &[pb::Event]) -> u64 {
    let joined = participant("c1");
    let changes = Changes {
        events: events.iter().collect(),
        joins: vec![(&joined, 1)],
        ..Changes::default()
    };
    let applied = run(conn, &commit(None, changes)).await;
    assert_eq!(applied, Committed::Applied { empty_until: None });
    events.len() as u64
}

#[test]
fn a_warning_is_written_once_per_period_with_the_occurrences_it_stands_for() {
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    let warning = Warning::default();
    assert_eq!(warning.due(at(0)), Some(1), "the first is written");
    assert_eq!(warning.due(at(5)), None);
    // A period after the last line: it stands for the one held back and itself.
    assert_eq!(warning.due(at(11)), Some(2));
    // The period counts from that line, not from the first.
    assert_eq!(warning.due(at(15)), None);
    assert_eq!(warning.due(at(22)), Some(2));
    // Occurrences that keep coming do not hold the lines back: one a second for 30 s is
    // written three times, standing for all 30.
    let warning = Warning::default();
    let written: Vec<u64> = (0..30).filter_map(|s| warning.due(at(s))).collect();
    assert_eq!(written, [1, 10, 10]);
    assert_eq!(warning.due(at(30)), Some(10));
}

#[tokio::test]
async fn a_new_room_is_created_with_its_events_and_members() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10), event(2, 10)]).await;
    assert_eq!(meta_field(&mut conn, "epoch").await.as_deref(), Some(EPOCH));
    assert_eq!(meta_field(&mut conn, "seq").await, Some(seq.to_string()));
    assert_eq!(meta_field(&mut conn, "oldest").await.as_deref(), Some("1"));
    let keys = Keys::new(ROOM);
    let stored: Vec<u8> = conn.hget(&keys.members, "c1").await.unwrap();
    let member = StoredMember::decode(&stored[..]).unwrap();
    assert_eq!(member.join_seq, 1);
    assert_eq!(member.participant.unwrap().identity, "id-c1");
    let logged: usize = conn.xlen(&keys.log).await.unwrap();
    assert_eq!(logged, 2);
}

#[tokio::test]
async fn a_room_that_moved_on_or_exists_already_is_a_conflict() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let next = [event(seq + 1, 10)];
    let again = Changes {
        events: next.iter().collect(),
        ..Changes::default()
    };
    assert_eq!(
        run(&mut conn, &commit(None, again)).await,
        Committed::Conflict
    );
    let stale = Changes {
        events: next.iter().collect(),
        ..Changes::default()
    };
    let stale = run(&mut conn, &commit(Some(seq + 5), stale)).await;
    assert_eq!(stale, Committed::Conflict);
    let mut other_epoch = commit(Some(seq), Changes::default());
    other_epoch.epoch = "not-the-epoch";
    assert_eq!(run(&mut conn, &other_epoch).await, Committed::Conflict);
    // Nothing of the refused commits was applied.
    assert_eq!(meta_field(&mut conn, "seq").await, Some(seq.to_string()));
}

#[tokio::test]
async fn a_wrong_assumption_is_a_conflict_and_a_right_one_applies() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let now = SystemTime::now();
    let keys = Keys::new(ROOM);
    let until = millis(now + Duration::from_secs(60));
    let _: () = conn.hset(&keys.answers, "a1", "x").await.unwrap();
    let _: () = conn.zadd(&keys.answered, "a1", until).await.unwrap();
    let _: () = conn.zadd(&keys.banned, "banned", until).await.unwrap();
    let _: () = conn.zadd(&keys.leases, "c1", until).await.unwrap();
    let next = [event(seq + 1, 10)];
    let wrong = [
        Assumed {
            ids: vec!["c1"],
            ..Assumed::default()
        },
        Assumed {
            answers: vec!["a1"],
            ..Assumed::default()
        },
        Assumed {
            bans: vec!["banned"],
            ..Assumed::default()
        },
    ];
    for assumed in wrong {
        let mut wrong = commit(
            Some(seq),
            Changes {
                events: next.iter().collect(),
                ..Changes::default()
            },
        );
        wrong.assumed = assumed;
        assert_eq!(
            run(&mut conn, &wrong).await,
            Committed::Conflict,
            "{wrong:?}"
        );
    }
    // A client whose lease is still running cannot be timed out.
    let timing_out = Changes {
        events: next.iter().collect(),
        timed_out: vec!["c1"],
        ..Changes::default()
    };
    let early = run(&mut conn, &commit(Some(seq), timing_out)).await;
    assert_eq!(early, Committed::Conflict);
    let mut right = commit(
        Some(seq),
        Changes {
            events: next.iter().collect(),
            ..Changes::default()
        },
    );
    right.assumed = Assumed {
        ids: vec!["c2"],
        answers: vec!["a2"],
        bans: vec!["not-banned"],
    };
    let applied = run(&mut conn, &right).await;
    assert_eq!(applied, Committed::Applied { empty_until: None });
    assert_eq!(
        meta_field(&mut conn, "seq").await,
        Some((seq + 1).to_string())
    );
}

#[tokio::test]
async fn a_commit_that_empties_the_room_answers_when_its_keys_expire() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let left = [event(seq + 1, 10)];
    let leaving = Changes {
        events: left.iter().collect(),
        departures: vec![("c1", "id-c1", seq + 1)],
        ..Changes::default()
    };
    let commit = commit(Some(seq), leaving);
    let Committed::Applied {
        empty_until: Some(at),
    } = run(&mut conn, &commit).await
    else {
        panic!("an emptied room answers its keys' expiry");
    };
    let now = millis(commit.now);
    assert_eq!(at, now + commit.bounds.empty_room_ttl_ms);
    let keys = Keys::new(ROOM);
    let ttl: i64 = conn.pttl(&keys.meta).await.unwrap();
    assert!(
        ttl > 0 && ttl <= 60_000,
        "meta expires with the room: {ttl}"
    );
    let owner: Option<String> = conn.hget(&keys.owners, "c1").await.unwrap();
    assert_eq!(owner.as_deref(), Some("id-c1"));
}

/// A commit without events (refusals a room remembers) keeps the log, the seq and the room's
/// expiry, and puts its answers' keys under that expiry; an answer in force under a key a
/// commit remembers one under makes it a conflict, whatever the seq says (whichever attempt of
/// a request commits first decides), and an expired one does not.
#[tokio::test]
async fn a_commit_of_refusals_keeps_the_log_and_the_first_answer_decides() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let left = [event(seq + 1, 10)];
    let leaving = Changes {
        events: left.iter().collect(),
        departures: vec![("c1", "id-c1", seq + 1)],
        ..Changes::default()
    };
    let emptied = run(&mut conn, &commit(Some(seq), leaving)).await;
    assert!(matches!(
        emptied,
        Committed::Applied {
            empty_until: Some(_)
        }
    ));
    let seq = seq + 1;
    let keys = Keys::new(ROOM);
    let expires: i64 = redis::cmd("PEXPIRETIME")
        .arg(&keys.meta)
        .query_async(&mut conn)
        .await
        .unwrap();

    let expiry = millis(SystemTime::now() + Duration::from_secs(600));
    let answer = |key, refusal| (key, vec![7u8; 20], expiry, refusal);
    let mut refusing = commit(
        Some(seq),
        Changes {
            answers: vec![answer("q", true)],
            ..Changes::default()
        },
    );
    refusing.assumed.answers = vec!["q"];
    assert_eq!(
        run(&mut conn, &refusing).await,
        Committed::Applied { empty_until: None }
    );
    assert_eq!(meta_field(&mut conn, "seq").await, Some(seq.to_string()));
    let logged: usize = conn.xlen(&keys.log).await.unwrap();
    assert_eq!(logged, 2);
    for key in [&keys.meta, &keys.answers, &keys.answered, &keys.refused] {
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(at, expires, "{key} expires with the room");
    }

    // Another attempt of the same request, accepted on the same seq, comes second.
    let joined = participant("c2");
    let next = [event(seq + 1, 10)];
    let accepting = |key| {
        let mut accepting = commit(
            Some(seq),
            Changes {
                events: next.iter().collect(),
                joins: vec![(&joined, seq + 1)],
                answers: vec![answer(key, false)],
                ..Changes::default()
            },
        );
        accepting.assumed.answers = vec![key];
        accepting
    };
    assert_eq!(run(&mut conn, &accepting("q")).await, Committed::Conflict);
    // An answer past its expiry is absent, though not yet forgotten.
    let _: () = conn.hset(&keys.answers, "old", "x").await.unwrap();
    let past = millis(SystemTime::now()) - 1_000;
    let _: () = conn.zadd(&keys.answered, "old", past).await.unwrap();
    assert_eq!(
        run(&mut conn, &accepting("old")).await,
        Committed::Applied { empty_until: None }
    );
    assert_eq!(
        meta_field(&mut conn, "seq").await,
        Some((seq + 1).to_string())
    );
}

/// reconfirm.lua writes (and so lets its `WAIT` cover the room) only within the caller's epoch:
/// to confirm, when something is hidden; to vouch for remembered refusals, only on a master
/// that holds every one of them (not a successor that lacks them).
#[tokio::test]
async fn reconfirm_writes_only_where_it_can_vouch() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let keys = Keys::new(ROOM);
    let script = redis::Script::new(RECONFIRM);
    let mut scripted = conn.clone();
    let mut run = async |epoch: &str, vouch: Option<&[&str]>| -> i64 {
        let mut call = script.prepare_invoke();
        call.key(&keys.meta).arg(epoch);
        match vouch {
            Some(held) => call.key(&keys.answers).arg("1").arg(0).arg(0).arg(held),
            None => call.arg("").arg(0).arg(0),
        };
        call.invoke_async(&mut scripted).await.unwrap()
    };
    assert_eq!(run(EPOCH, None).await, 0, "nothing hidden");
    assert_eq!(run(EPOCH, Some(&["q"])).await, 0, "q is not held here");
    let _: () = conn.hset(&keys.answers, "q", "x").await.unwrap();
    assert_eq!(run(EPOCH, Some(&["q"])).await, seq as i64);
    assert_eq!(run("another", Some(&["q"])).await, 0, "another epoch");
    let _: () = conn.hset(&keys.meta, "confirmed", 0).await.unwrap();
    assert_eq!(run(EPOCH, None).await, seq as i64, "hidden: confirm it");
}

/// With a listing (one Redis), the commit that creates a room lists it, and the one that leaves
/// it empty schedules it at its keys' expiry; without one (a cluster) it touches neither key,
/// and a refused commit lists nothing.
#[tokio::test]
async fn on_one_redis_a_commit_keeps_the_room_list() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let (rooms, expiring) = ("test:rooms", "test:expiring");
    let listing = Some(Listing {
        room_id: ROOM,
        rooms,
        expiring,
        due: &[],
    });
    let created = [event(1, 10)];
    let joined = participant("c1");
    let mut creating = commit(
        None,
        Changes {
            events: created.iter().collect(),
            joins: vec![(&joined, 1)],
            ..Changes::default()
        },
    );
    creating.listing = listing;
    assert_eq!(
        run(&mut conn, &creating).await,
        Committed::Applied { empty_until: None }
    );
    let listed: Option<f64> = conn.zscore(rooms, ROOM).await.unwrap();
    assert_eq!(listed, Some(0.0));
    // The room exists now: creating it again is refused, and lists nothing more.
    let _: () = conn.zrem(rooms, ROOM).await.unwrap();
    assert_eq!(run(&mut conn, &creating).await, Committed::Conflict);
    let listed: Option<f64> = conn.zscore(rooms, ROOM).await.unwrap();
    assert_eq!(listed, None);

    let left = [event(2, 10)];
    let leaving = Changes {
        events: left.iter().collect(),
        departures: vec![("c1", "id-c1", 2)],
        ..Changes::default()
    };
    let mut emptying = commit(Some(1), leaving);
    emptying.listing = listing;
    let Committed::Applied {
        empty_until: Some(at),
    } = run(&mut conn, &emptying).await
    else {
        panic!("an emptied room answers its keys' expiry");
    };
    let scheduled: Option<f64> = conn.zscore(expiring, ROOM).await.unwrap();
    assert_eq!(scheduled, Some(at as f64));

    // Without a listing, neither key is touched.
    let _: () = conn.del(&[rooms, expiring]).await.unwrap();
    let joined_again = participant("c2");
    let rejoined = [event(3, 10)];
    let rejoining = commit(
        Some(2),
        Changes {
            events: rejoined.iter().collect(),
            joins: vec![(&joined_again, 3)],
            ..Changes::default()
        },
    );
    assert_eq!(
        run(&mut conn, &rejoining).await,
        Committed::Applied { empty_until: None }
    );
    let exists: bool = conn.exists(&[rooms, expiring]).await.unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn the_log_keeps_its_history_in_events_and_in_bytes() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let events: Vec<pb::Event> = (1..=5).map(|seq| event(seq, 100)).collect();
    let seq = create(&mut conn, &events).await;
    let by_count = [event(seq + 1, 100)];
    let mut short = commit(
        Some(seq),
        Changes {
            events: by_count.iter().collect(),
            ..Changes::default()
        },
    );
    short.bounds.history = 3;
    assert!(matches!(
        run(&mut conn, &short).await,
        Committed::Applied { .. }
    ));
    let keys = Keys::new(ROOM);
    let logged: usize = conn.xlen(&keys.log).await.unwrap();
    assert_eq!(logged, 3);
    assert_eq!(meta_field(&mut conn, "oldest").await.as_deref(), Some("4"));
    // Bytes: room for about two events of this size; the newest is always kept.
    let by_bytes = [event(seq + 2, 100)];
    let mut light = commit(
        Some(seq + 1),
        Changes {
            events: by_bytes.iter().collect(),
            ..Changes::default()
        },
    );
    light.bounds.history_bytes = 2 * by_bytes[0].encoded_len() + 10;
    assert!(matches!(
        run(&mut conn, &light).await,
        Committed::Applied { .. }
    ));
    let logged: usize = conn.xlen(&keys.log).await.unwrap();
    assert_eq!(logged, 2);
    assert_eq!(meta_field(&mut conn, "oldest").await.as_deref(), Some("6"));
    let weight: usize = meta_field(&mut conn, "log_bytes")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(weight, 2 * by_bytes[0].encoded_len());
}

/// Creates the room, then commits one event per answer of `answers` (key, whether a refusal),
/// in turn, each 100 bytes, in a budget with room for two; answers the value they hold.
async fn remember_in_turn(conn: &mut MultiplexedConnection, answers: &[(&str, bool)]) -> Vec<u8> {
    let mut seq = create(conn, &[event(1, 10)]).await;
    let expiry = millis(SystemTime::now() + Duration::from_secs(600));
    let value = vec![7u8; 100];
    for (key, refusal) in answers {
        let next = [event(seq + 1, 10)];
        let mut remembering = commit(
            Some(seq),
            Changes {
                events: next.iter().collect(),
                answers: vec![(key, value.clone(), expiry + seq, *refusal)],
                ..Changes::default()
            },
        );
        remembering.bounds.answer_bytes = 2 * (2 + value.len() + ANSWER_OVERHEAD) + 1;
        assert!(matches!(
            run(conn, &remembering).await,
            Committed::Applied { .. }
        ));
        seq += 1;
    }
    value
}

#[tokio::test]
async fn remembered_answers_keep_within_their_budget_oldest_out_first() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let value = remember_in_turn(&mut conn, &[("a1", false), ("a2", false), ("a3", false)]).await;
    let keys = Keys::new(ROOM);
    let kept: Vec<String> = conn.hkeys(&keys.answers).await.unwrap();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, ["a2", "a3"]);
    let weight = meta_field(&mut conn, "answers_bytes").await;
    assert_eq!(
        weight,
        Some((2 * (2 + value.len() + ANSWER_OVERHEAD)).to_string())
    );
}

/// Past the budget, remembered refusals are forgotten before answers, whatever their age: a
/// caller refused at will (a banned identity trying new request ids) pushes out no answer.
#[tokio::test]
async fn past_their_budget_refusals_go_before_answers() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    remember_in_turn(
        &mut conn,
        &[("a1", false), ("r1", true), ("r2", true), ("a2", false)],
    )
    .await;
    let keys = Keys::new(ROOM);
    let mut kept: Vec<String> = conn.hkeys(&keys.answers).await.unwrap();
    kept.sort();
    assert_eq!(kept, ["a1", "a2"]);
    let mut ordered: Vec<String> = conn.zrange(&keys.answered, 0, -1).await.unwrap();
    ordered.sort();
    assert_eq!(ordered, ["a1", "a2"]);
    let refused: Vec<String> = conn.zrange(&keys.refused, 0, -1).await.unwrap();
    assert!(refused.is_empty(), "{refused:?}");
}

#[tokio::test]
async fn bans_set_and_lifted_are_stored_with_their_end() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let ban = Ban {
        identity: "id-c1".into(),
        until: SystemTime::now() + Duration::from_secs(60),
        moderator: "mod".into(),
    };
    let next = [event(seq + 1, 10)];
    let banning = Changes {
        events: next.iter().collect(),
        bans: vec![("id-c1", Some(&ban))],
        locked: Some(true),
        ..Changes::default()
    };
    assert!(matches!(
        run(&mut conn, &commit(Some(seq), banning)).await,
        Committed::Applied { .. }
    ));
    let keys = Keys::new(ROOM);
    let end: Option<f64> = conn.zscore(&keys.banned, "id-c1").await.unwrap();
    assert_eq!(end, Some(millis(ban.until) as f64));
    let stored: Vec<u8> = conn.hget(&keys.bans, "id-c1").await.unwrap();
    assert_eq!(pb::Ban::decode(&stored[..]).unwrap().moderator, "mod");
    assert_eq!(meta_field(&mut conn, "locked").await.as_deref(), Some("1"));
    let later = [event(seq + 2, 10)];
    let lifting = Changes {
        events: later.iter().collect(),
        bans: vec![("id-c1", None)],
        locked: Some(false),
        ..Changes::default()
    };
    assert!(matches!(
        run(&mut conn, &commit(Some(seq + 1), lifting)).await,
        Committed::Applied { .. }
    ));
    let end: Option<f64> = conn.zscore(&keys.banned, "id-c1").await.unwrap();
    assert_eq!(end, None);
    assert_eq!(meta_field(&mut conn, "locked").await, None);
}

#[tokio::test]
async fn a_commit_publishes_its_notice_on_the_room_channel_when_asked() {
    let Some((server, mut conn)) = redis().await else {
        return;
    };
    let client = redis::Client::open(server.url()).unwrap();
    let mut subscriber = client.get_async_pubsub().await.unwrap();
    let channel = format!("roomctl:{ROOM}");
    subscriber.subscribe(&channel).await.unwrap();
    let joined = participant("c1");
    let first = [event(1, 10)];
    let mut published = commit(
        None,
        Changes {
            events: first.iter().collect(),
            joins: vec![(&joined, 1)],
            ..Changes::default()
        },
    );
    published.publish = Some(("PUBLISH", b"notice".to_vec()));
    assert!(matches!(
        run(&mut conn, &published).await,
        Committed::Applied { .. }
    ));
    let message = futures_util::StreamExt::next(&mut subscriber.on_message())
        .await
        .unwrap();
    assert_eq!(message.get_channel_name(), channel);
    assert_eq!(message.get_payload_bytes(), b"notice");
}

#[tokio::test]
async fn a_master_short_of_replicas_changes_nothing() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let first = [event(1, 10)];
    let mut waiting = commit(
        None,
        Changes {
            events: first.iter().collect(),
            ..Changes::default()
        },
    );
    waiting.bounds.wait_replicas = 2;
    let refused = run(&mut conn, &waiting).await;
    assert_eq!(refused, Committed::ShortOfReplicas { online: 0 });
    assert_eq!(meta_field(&mut conn, "epoch").await, None);
}

/// The zombie the fault harness met: a cluster master paused until one of its replicas took its
/// place takes, once it runs again, the commit queued to it meanwhile before it hears of its
/// successor, and with replicas that have not heard either its `WAIT` succeeds; the commit is
/// then lost. Checking that it heard from most masters within the node timeout (quorum.lua), it
/// refuses that commit, while a master in touch with the cluster applies its commits.
#[tokio::test]
async fn a_master_back_from_a_pause_past_its_failover_takes_no_commit() {
    if !redis_available() {
        return;
    }
    let cluster = redis_cluster::RedisCluster::start_with_replicas(3, 2).await;
    let keys = Keys::new(ROOM);
    let slot = cluster.slot_of(&keys.meta).await;
    let (master, _) = cluster.owner_of(slot).await;
    let mut conn = cluster.patient(master).await;
    let first = [event(1, 10)];
    let creating = waiting_on_cluster(None, &first);
    let settled = cluster_info(&mut conn, "cluster_current_epoch").await;
    let in_touch = run_settled(&mut conn, &creating, settled).await;
    assert!(
        matches!(in_touch, Committed::Applied { .. }),
        "{in_touch:?}"
    );

    let next = [event(2, 10)];
    let late = waiting_on_cluster(Some(1), &next);
    cluster.pause(master, true);
    // Sent while the master is paused, so that it is the first thing it reads when it runs
    // again (the script is loaded already: no NOSCRIPT round trip).
    let mut queued = std::pin::pin!(run_settled(&mut conn, &late, settled));
    let sent = tokio::time::timeout(Duration::from_millis(200), &mut queued).await;
    assert!(sent.is_err(), "a paused master answered");
    cluster.until_served_elsewhere(slot, master).await;
    cluster.pause(master, false);
    assert_eq!(queued.await, Committed::OutOfTouch);
}

/// The window the check above leaves, found by an attack: other masters keep a master failed
/// for a while, so they vote for its replica even after it is back and in touch with them, and
/// an election that began while it was paused ends after it took commits. A replica asking for
/// votes raises the cluster's current epoch, its own master's included, past every
/// configuration epoch until a winner takes it: the master refuses commits while it is so.
/// Here the election fails (the other masters are paused until it is over), which leaves the
/// current epoch ahead for good: once the caller passes it as settled, commits go through.
#[tokio::test]
async fn a_master_that_sees_an_election_under_way_takes_no_commit_until_it_is_settled() {
    if !redis_available() {
        return;
    }
    let cluster = redis_cluster::RedisCluster::start_with_replicas(3, 1).await;
    let keys = Keys::new(ROOM);
    let slot = cluster.slot_of(&keys.meta).await;
    let (master, _) = cluster.owner_of(slot).await;
    let others: Vec<u16> = cluster.masters().await;
    let others: Vec<u16> = others.into_iter().filter(|p| *p != master).collect();
    let replica = cluster.replica_of(master).await;
    for other in &others {
        cluster.pause(*other, true);
    }
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .arg("FORCE")
        .query_async(&mut cluster.master(replica).await)
        .await
        .unwrap();
    // Past the election's 2 s and the forced failover's 5 s, so that it is not tried again
    // once the votes can come.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    for other in &others {
        cluster.pause(*other, false);
    }
    let mut conn = cluster.master(master).await;
    redis_server::until_answer(
        &mut conn,
        ["CLUSTER", "INFO"],
        "the master serves again",
        |info| info.contains("cluster_state:ok"),
    )
    .await;
    let current = cluster_info(&mut conn, "cluster_current_epoch").await;

    let first = [event(1, 10)];
    let creating = waiting_on_cluster(None, &first);
    let electing = run_settled(&mut conn, &creating, current - 1).await;
    assert_eq!(electing, Committed::Electing { epoch: current });
    assert_eq!(meta_field(&mut conn, "epoch").await, None);
    let settled = run_settled(&mut conn, &creating, current).await;
    assert!(matches!(settled, Committed::Applied { .. }), "{settled:?}");
}

#[tokio::test]
async fn a_room_last_written_by_another_redis_process_begins_a_new_epoch() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let keys = Keys::new(ROOM);
    // As if the process that made the last commit had restarted.
    let _: () = conn.hset(&keys.meta, "run", "0".repeat(40)).await.unwrap();
    let next = [event(seq + 1, 10)];
    let after_restart = commit(
        Some(seq),
        Changes {
            events: next.iter().collect(),
            ..Changes::default()
        },
    );
    assert_eq!(run(&mut conn, &after_restart).await, Committed::NewEpoch);
    assert_eq!(meta_field(&mut conn, "epoch").await.as_deref(), Some("e2"));
    let logged: usize = conn.xlen(&keys.log).await.unwrap();
    assert_eq!(logged, 0, "the log begins anew");
}

#[tokio::test]
async fn a_confirmation_raises_the_confirmed_seq_and_publishes_within_its_epoch() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let seq = create(&mut conn, &[event(1, 10)]).await;
    let keys = Keys::new(ROOM);
    let script = redis::Script::new(CONFIRM);
    let shown: i64 = confirm(&script, &keys, (EPOCH, seq), ("PUBLISH", "c", b"n"))
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(shown, 1);
    assert_eq!(
        meta_field(&mut conn, "confirmed").await,
        Some(seq.to_string())
    );
    let other: i64 = confirm(&script, &keys, ("old", seq + 1), ("PUBLISH", "c", b"n"))
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(other, 0, "a commit of another epoch is not shown");
    assert_eq!(
        meta_field(&mut conn, "confirmed").await,
        Some(seq.to_string())
    );
}

/// What Redis holds for `key`, by `MEMORY USAGE` (every sample of it).
async fn memory_usage(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_log_begun_by_a_commit_holds_only_its_events_bytes() {
    let Some((_server, mut conn)) = redis().await else {
        return;
    };
    let keys = Keys::new(ROOM);
    // Redis 7 would give this one event's stream a block of 4 KiB (about 4.7 KiB in all).
    let seq = create(&mut conn, &[event(1, 100)]).await;
    let begun = memory_usage(&mut conn, &keys.log).await;
    assert!(begun < 1_500, "a one-event log takes {begun} bytes");
    let exists: bool = conn.exists(&keys.log_copy).await.unwrap();
    assert!(!exists, "the copy is not left behind");

    // Later events grow it as they come, in order.
    let next = [event(seq + 1, 100)];
    let appended = Changes {
        events: next.iter().collect(),
        ..Changes::default()
    };
    let applied = run(&mut conn, &commit(Some(seq), appended)).await;
    assert_eq!(applied, Committed::Applied { empty_until: None });
    let ids: Vec<String> = redis::cmd("XRANGE")
        .arg(&keys.log)
        .arg("-")
        .arg("+")
        .query_async::<Vec<(String, Vec<(String, Vec<u8>)>)>>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["0-1", "0-2"]);
    let grown = memory_usage(&mut conn, &keys.log).await;
    assert!(grown < begun + 500, "two events take {grown} bytes");

    // So is the log a new epoch begins.
    let _: () = conn.hset(&keys.meta, "run", "0".repeat(40)).await.unwrap();
    let after = [event(seq + 2, 100)];
    let restarted = || Changes {
        events: after.iter().collect(),
        ..Changes::default()
    };
    let renewed = run(&mut conn, &commit(Some(seq + 1), restarted())).await;
    assert_eq!(renewed, Committed::NewEpoch);
    let mut anew = commit(Some(seq + 1), restarted());
    anew.epoch = "e2";
    let applied = run(&mut conn, &anew).await;
    assert_eq!(applied, Committed::Applied { empty_until: None });
    let logged: usize = conn.xlen(&keys.log).await.unwrap();
    assert_eq!(logged, 1);
    let renewed = memory_usage(&mut conn, &keys.log).await;
    assert!(
        renewed < 1_500,
        "a new epoch's one-event log takes {renewed} bytes"
    );
}
