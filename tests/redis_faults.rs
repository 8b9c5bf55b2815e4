//! Several nodes on one Redis under stress and faults: concurrent writers on one room, a node
//! killed mid-stream, Redis stopped and restarted, Redis flushed, nodes that would trim logs
//! differently, a log shorter than expected. Every test runs its own
//! redis-server; they are skipped loudly when redis-server is missing (required in CI).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::redis_server::{redis_available, RedisServer};
use common::*;
use roomctl::pb::{self, event::Payload, DropOutcome};
use roomctl::server::{ServerConfig, StoreConfig};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

fn redis_config(redis: &RedisServer) -> ServerConfig {
    let mut config = ServerConfig::new(SECRET);
    config.store = StoreConfig::redis(redis.url());
    config
}

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// How many participants `room` has now.
async fn participants(client: &mut Client, room: &str) -> usize {
    let snapshot = client.list_participants(list(room)).await.unwrap();
    snapshot.into_inner().participants.len()
}

/// Waits until `room` has at least `count` participants (it may not exist yet: the joins that
/// create it can still be on their way).
async fn wait_for_participants(client: &mut Client, room: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.list_participants(list(room)).await {
            Ok(snapshot) if snapshot.get_ref().participants.len() >= count => return,
            Ok(_) => {}
            Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached {count} participants"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Reads a stream until the event at `last_seq`, returning every seq seen.
async fn read_through(stream: &mut tonic::Streaming<pb::Event>, last_seq: u64) -> Vec<pb::Event> {
    let mut events = Vec::new();
    while events.last().is_none_or(|e: &pb::Event| e.seq < last_seq) {
        events.push(next_event(stream).await);
    }
    events
}

/// Two nodes hammer one room at once with joins and overlapping drops: the log stays one
/// contiguous sequence with no seq reused, every client is dropped exactly once, and the
/// membership replayed from the log is the membership the room reports.
#[tokio::test]
async fn concurrent_writers_on_two_nodes_keep_one_contiguous_log() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let mut a = server.nodes[0].client("gw-a", "*", "service").await;
    let mut b = server.nodes[1].client("gw-b", "*", "service").await;
    let mut ids = Vec::new();
    for i in 0..120 {
        let client = if i % 2 == 0 { &mut a } else { &mut b };
        ids.push(join(client, "busy", &format!("u{i}")).await.client_id);
    }
    let work = |mut client: Client, ids: Vec<String>, prefix: &'static str| async move {
        let mut dropped = Vec::new();
        for (n, chunk) in ids.chunks(5).enumerate() {
            join(&mut client, "busy", &format!("{prefix}{n}")).await;
            let mut request = drop_request("busy", &[], "load");
            request.client_ids = chunk.to_vec();
            let response = client.drop_user(request).await.unwrap().into_inner();
            dropped.extend(
                response
                    .results
                    .into_iter()
                    .filter(|r| r.outcome() == DropOutcome::Dropped)
                    .map(|r| r.client_id),
            );
        }
        dropped
    };
    // Overlapping halves: ids 30..90 are requested by both nodes at once.
    let (from_a, from_b) = tokio::join!(
        work(a.clone(), ids[..90].to_vec(), "a"),
        work(b.clone(), ids[30..].to_vec(), "b"),
    );
    let mut all_dropped: Vec<&String> = from_a.iter().chain(&from_b).collect();
    all_dropped.sort();
    let unique: BTreeSet<&String> = all_dropped.iter().copied().collect();
    assert_eq!(
        all_dropped.len(),
        unique.len(),
        "a client was dropped twice"
    );
    assert_eq!(unique.len(), ids.len(), "every client was dropped once");

    let snapshot = a
        .list_participants(list("busy"))
        .await
        .unwrap()
        .into_inner();
    let mut replay = subscribe(&mut a, "busy", "", Some(0)).await.unwrap();
    let events = read_through(&mut replay, snapshot.seq).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=snapshot.seq).collect::<Vec<_>>(),
        "seqs are unique and contiguous"
    );
    let mut members = HashSet::new();
    for event in &events {
        match &event.payload {
            Some(Payload::UserConnected(c)) => {
                assert!(members.insert(c.participant.as_ref().unwrap().client_id.clone()));
            }
            Some(Payload::UserDisconnected(d)) => assert!(members.remove(&d.client_id)),
            _ => {}
        }
    }
    let reported: HashSet<String> = snapshot
        .participants
        .into_iter()
        .map(|p| p.client_id)
        .collect();
    assert_eq!(members, reported, "membership matches the log");
}

/// A node killed with SIGKILL loses nothing: its subscriber resumes on another node with its
/// cursor and epoch and gets every later event exactly once.
#[tokio::test]
async fn a_killed_node_loses_nothing() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start().await;
    let url = redis.url();
    let serve = node_process::serve(&["--listen", "127.0.0.1:0", "--store", &url]);
    let (mut doomed, doomed_addr) = node_process::start_quiet(serve).await;
    let survivor = Node::start(redis_config(&redis)).await;

    let mut writer = survivor.client("gw", "r", "service").await;
    let first = join(&mut writer, "r", "u0").await;
    let mut on_doomed = client_with_token(doomed_addr, &token("audit", "r", "service")).await;
    let mut stream = subscribe(&mut on_doomed, "r", "", Some(0)).await.unwrap();

    let writes = tokio::spawn(async move {
        for i in 1..300 {
            join(&mut writer, "r", &format!("u{i}")).await;
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 50 {
        seen.push(next_event(&mut stream).await.seq);
    }
    doomed.kill().await.unwrap();
    // Whatever was already in flight may still arrive before the stream breaks.
    while let Ok(Ok(Some(event))) = tokio::time::timeout(PATIENCE, stream.message()).await {
        seen.push(event.seq);
    }
    writes.await.unwrap();

    let mut on_survivor = survivor.client("audit", "r", "service").await;
    let mut resumed = on_survivor
        .events(pb::EventsRequest {
            room_id: "r".into(),
            client_id: String::new(),
            after_seq: seen.last().copied(),
            epoch: first.epoch.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let rest = read_through(&mut resumed, 300).await;
    seen.extend(rest.iter().map(|e| e.seq));
    assert_eq!(
        seen,
        (1..=300).collect::<Vec<_>>(),
        "every event exactly once"
    );
}

async fn wait_for_health(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    want: ServingStatus,
) {
    let reached = async {
        while let Some(update) = watch.message().await.unwrap() {
            if update.status() == want {
                return;
            }
        }
        panic!("health watch ended before {want:?}");
    };
    tokio::time::timeout(PATIENCE, reached)
        .await
        .unwrap_or_else(|_| panic!("health never became {want:?}"));
}

/// Redis goes away: calls fail fast with UNAVAILABLE / STORE_UNAVAILABLE, health turns
/// NOT_SERVING, open streams end UNAVAILABLE. Redis comes back (empty, as without persistence):
/// the node serves again without a restart, and old cursors are OUT_OF_RANGE by their epoch.
#[tokio::test]
async fn redis_outage_and_recovery() {
    if !redis_available() {
        return;
    }
    let mut redis = RedisServer::start().await;
    let node = Node::start(redis_config(&redis)).await;
    let mut health = HealthClient::new(channel(node.addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_for_health(&mut watch, ServingStatus::Serving).await;

    let mut ops = node.client("ops", "r", "service").await;
    let before = join(&mut ops, "r", "u").await;
    let mut stream = subscribe(&mut ops, "r", "", None).await.unwrap();

    redis.kill().await;
    let status = stream_end(&mut stream).await.unwrap_err();
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    wait_for_health(&mut watch, ServingStatus::NotServing).await;
    let status = tokio::time::timeout(PATIENCE, ops.list_participants(list("r")))
        .await
        .expect("calls fail fast while Redis is down")
        .unwrap_err();
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    let status = tokio::time::timeout(
        PATIENCE,
        ops.join(pb::JoinRequest {
            room_id: "r".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("calls fail fast while Redis is down")
    .unwrap_err();
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");

    redis.restart().await;
    wait_for_health(&mut watch, ServingStatus::Serving).await;
    let after = tokio::time::timeout(PATIENCE, async {
        loop {
            // The node's connection may need one failed call to notice Redis is back.
            match ops
                .join(pb::JoinRequest {
                    room_id: "r".into(),
                    ..Default::default()
                })
                .await
            {
                Ok(joined) => return joined.into_inner(),
                Err(status) => assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE"),
            };
        }
    })
    .await
    .unwrap();
    assert_ne!(
        after.epoch, before.epoch,
        "a lost log comes back with a new epoch"
    );
    let status = ops
        .events(pb::EventsRequest {
            room_id: "r".into(),
            client_id: String::new(),
            after_seq: Some(before.seq),
            epoch: before.epoch,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
}

/// Redis freezes for 3 s in the middle of a stream of joins, each with its own request id (the
/// participant's name is that id, so the room shows which joins happened): no join is applied
/// without its caller being able to know. An OK join is in the room once; an UNAVAILABLE one is
/// not; a DEADLINE_EXCEEDED (`OUTCOME_UNKNOWN`) one may be, and its retry with the same request
/// id answers what happened, so in the end every request id is in the room exactly once.
#[tokio::test]
async fn joins_during_a_redis_stall_are_never_silently_applied() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let redis = server.redis.as_ref().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for worker in 0..6 {
        let mut client = server.client("gw", "*", "service").await;
        let stopped = stopped.clone();
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0.. {
                if *stopped.borrow() {
                    break;
                }
                let request_id = format!("w{worker}-{n}");
                let request = pb::JoinRequest {
                    room_id: "stall".into(),
                    name: request_id.clone(),
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                let outcome = client.join(request).await.map(|r| r.into_inner());
                outcomes.push((request_id, outcome));
            }
            (client, outcomes)
        }));
    }
    let mut ops = server.client("ops", "*", "service").await;
    wait_for_participants(&mut ops, "stall", 200).await;
    redis.pause();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    redis.resume();
    let after = participants(&mut ops, "stall").await;
    wait_for_participants(&mut ops, "stall", after + 200).await;
    stop.send(true).unwrap();

    let (mut failed, mut unknown) = (0, 0);
    let mut settled = Vec::new();
    for worker in workers {
        let (mut client, outcomes) = worker.await.unwrap();
        for (request_id, outcome) in outcomes {
            match outcome {
                Ok(_) => settled.push((request_id, true)),
                Err(status) if status.code() == Code::Unavailable => {
                    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
                    failed += 1;
                    settled.push((request_id, false));
                }
                Err(status) => {
                    let meta = assert_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
                    assert_eq!(meta["request_id"], request_id);
                    unknown += 1;
                    let retry = pb::JoinRequest {
                        room_id: "stall".into(),
                        name: request_id.clone(),
                        request_id: request_id.clone(),
                        ..Default::default()
                    };
                    client.join(retry).await.unwrap();
                    settled.push((request_id, true));
                }
            }
        }
    }
    assert!(failed + unknown > 0, "the stall made some joins fail");
    let snapshot = ops
        .list_participants(list("stall"))
        .await
        .unwrap()
        .into_inner();
    let mut in_room = std::collections::HashMap::new();
    for participant in &snapshot.participants {
        *in_room.entry(participant.name.clone()).or_insert(0) += 1;
    }
    for (request_id, joined) in &settled {
        let expected = usize::from(*joined);
        assert_eq!(
            in_room.get(request_id).copied().unwrap_or(0),
            expected,
            "{request_id}: answered {}",
            if *joined { "joined" } else { "UNAVAILABLE" }
        );
    }
    assert_eq!(
        snapshot.participants.len(),
        settled.iter().filter(|(_, j)| *j).count()
    );
}

/// A join whose caller gives up while its room is being read (Redis paused) does not commit
/// once Redis answers: its caller was told the outcome is unknown, and a retry elsewhere may
/// have been refused meanwhile (the fault harness saw such a join land after its retry was
/// refused BANNED). The next join on the same node, queued behind it, shows it never applied.
#[tokio::test]
async fn a_join_whose_caller_left_during_a_stall_is_not_applied() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let redis = server.redis.as_ref().unwrap();
    let mut client = server.client("gw", "*", "service").await;
    let join = |name: &str| pb::JoinRequest {
        room_id: "left".into(),
        name: name.into(),
        request_id: name.into(),
        ..Default::default()
    };
    redis.pause();
    // The node's own deadline (grpc-timeout) answers the caller, so the node knows it left.
    let mut gone = tonic::Request::new(join("gone"));
    gone.set_timeout(std::time::Duration::from_millis(300));
    let status = client.join(gone).await.unwrap_err();
    redis.resume();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let next = client.join(join("next")).await.unwrap().into_inner();
    assert_eq!(next.seq, 1, "the join whose caller left was not applied");
    let members = client.list_participants(list("left")).await.unwrap();
    let names: Vec<String> = members
        .into_inner()
        .participants
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["next"]);
}

/// A flushed Redis loses the log and its epoch: a live stream and old cursors get OUT_OF_RANGE
/// once the room is created anew, never events of the new log as if they were the old one's.
#[tokio::test]
async fn a_flushed_redis_is_detected_by_the_epoch() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let mut a = server.nodes[0].client("ops", "r", "service").await;
    let mut b = server.nodes[1].client("ops", "r", "service").await;
    let before = join(&mut a, "r", "u").await;
    join(&mut a, "r", "v").await;
    let mut live = subscribe(&mut b, "r", "", Some(before.seq)).await.unwrap();
    assert_eq!(next_event(&mut live).await.seq, 2);

    let mut conn = server.redis.as_ref().unwrap().connection().await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let status = a.list_participants(list("r")).await.unwrap_err();
    assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");
    let after = join(&mut a, "r", "u").await;
    assert_ne!(after.epoch, before.epoch);

    let status = stream_end(&mut live).await.unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    let status = b
        .events(pb::EventsRequest {
            room_id: "r".into(),
            client_id: String::new(),
            after_seq: Some(1),
            epoch: before.epoch,
        })
        .await
        .unwrap_err();
    let meta = assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    assert_eq!(meta["epoch"], after.epoch);
}

/// Every key of a room carries the room's hash tag, so a room lives in one Redis Cluster slot;
/// the only other keys are the fleet's history setting, schedules and list of rooms, one key
/// each.
#[tokio::test]
async fn every_key_of_a_room_shares_its_hash_tag() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let mut ops = server.nodes[0].client("ops", "team.x", "service").await;
    let a = join(&mut ops, "team.x", "a").await.client_id;
    let b = join(&mut ops, "team.x", "b").await.client_id;
    ops.leave(pb::LeaveRequest {
        room_id: "team.x".into(),
        client_id: a,
    })
    .await
    .unwrap();
    let mut request = drop_request("team.x", &[&b], "");
    request.request_id = "d1".into();
    ops.drop_user(request).await.unwrap();
    let mut conn = server.redis.as_ref().unwrap().connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (room, mut fleet): (Vec<&String>, Vec<&String>) = keys
        .iter()
        .partition(|k| k.starts_with("roomctl:{team.x}:"));
    assert!(room.len() >= 5, "{keys:?}");
    fleet.sort();
    assert_eq!(
        fleet,
        [
            "roomctl:history",
            "roomctl:history-bytes",
            "roomctl:presence",
            "roomctl:rooms",
            "roomctl:rooms:expiring",
            "roomctl:wait-replicas"
        ],
        "{keys:?}"
    );
}

/// A room emptied, then joined again before its keys expire, leaves the schedule of expiring
/// rooms once it comes due (it is in use again): the sweep that finds no room gone goes on to
/// reschedule. (It used to send Redis an empty pipeline there, fail, and keep the entry due
/// for ever.) Real time: the sweep runs against a real Redis.
#[tokio::test]
async fn a_room_in_use_again_leaves_the_expiring_schedule() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start_with(Backend::RedisTwoNodes, |c| {
        c.rooms.empty_room_ttl = Duration::from_millis(400);
        c.rooms.presence_timeout = None;
    })
    .await;
    let mut ops = server.nodes[0].client("ops", "*", "service").await;
    let a = join(&mut ops, "s1", "a").await.client_id;
    ops.leave(pb::LeaveRequest {
        room_id: "s1".into(),
        client_id: a,
    })
    .await
    .unwrap();
    let mut conn = server.redis.as_ref().unwrap().connection().await;
    let scheduled = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("ZSCORE")
                .arg("roomctl:rooms:expiring")
                .arg("s1")
                .query_async::<Option<f64>>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(
        scheduled(&mut conn).await.is_some(),
        "an emptied room is scheduled"
    );
    join(&mut ops, "s1", "b").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while scheduled(&mut conn).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a room in use again stays scheduled to expire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.nodes[1]
        .client("ops", "*", "service")
        .await
        .list_participants(pb::ListParticipantsRequest {
            room_id: "s1".into()
        })
        .await
        .is_ok());
}

/// A node whose `--history` differs from the fleet's refuses to start, saying which the fleet
/// uses and how to change it; one with the same starts.
#[tokio::test]
async fn nodes_must_agree_on_the_history() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start().await;
    let config = |history: usize| roomctl::store::redis::RedisConfig {
        url: roomctl::store::redis::RedisUrl::new(redis.url()),
        ca_file: None,
        wait_replicas: 0,
        cluster_node_timeout: None,
        rooms: roomctl::store::RoomSettings {
            history,
            presence_timeout: None,
            ..Default::default()
        },
    };
    let _first = roomctl::store::redis::RedisStore::connect(config(500))
        .await
        .unwrap();
    let Err(refused) = roomctl::store::redis::RedisStore::connect(config(1000)).await else {
        panic!("a node with another --history started")
    };
    let said = refused.detail();
    assert!(said.contains("--history 500, and this one 1000"), "{said}");
    assert!(said.contains("DEL roomctl:history"), "{said}");
    roomctl::store::redis::RedisStore::connect(config(500))
        .await
        .unwrap();
}

/// A log that holds less than the history promises (its tail lost, or trimmed behind the
/// nodes' backs) is never read past silently: a cursor in the missing part gets OUT_OF_RANGE
/// with the oldest event really held, and a cursor after it reads on.
#[tokio::test]
async fn a_log_shorter_than_expected_is_out_of_range() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let mut ops = server.nodes[0].client("ops", "r", "service").await;
    let first = join(&mut ops, "r", "u0").await;
    for i in 1..10 {
        join(&mut ops, "r", &format!("u{i}")).await;
    }
    let mut conn = server.redis.as_ref().unwrap().connection().await;
    redis::cmd("XTRIM")
        .arg("roomctl:{r}:log")
        .arg("MAXLEN")
        .arg(3)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let mut b = server.nodes[1].client("ops", "r", "service").await;
    let cursor = |after_seq| pb::EventsRequest {
        room_id: "r".into(),
        client_id: String::new(),
        after_seq: Some(after_seq),
        epoch: first.epoch.clone(),
    };
    let mut gap = b.events(cursor(2)).await.unwrap().into_inner();
    let status = stream_end(&mut gap).await.unwrap_err();
    let meta = assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    assert_eq!(
        (meta["oldest_seq"].as_str(), meta["newest_seq"].as_str()),
        ("8", "10")
    );
    let mut held = b.events(cursor(7)).await.unwrap().into_inner();
    assert_eq!(next_event(&mut held).await.seq, 8);
}

/// Each node hears only of the rooms it has subscribers in: a node whose only subscriber is in
/// room A receives no notice while another node writes to 20 other rooms, receives A's, and
/// stops hearing of A once its subscriber is gone. On a cluster the rooms lie on every master.
async fn a_node_hears_only_of_the_rooms_it_serves(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let received = || async {
        let text = scrape(server.nodes[1].metrics.unwrap()).await;
        metric(&text, "roomctl_redis_notices_received_total")
    };
    let mut writer = server.nodes[0].client("ops", "*", "service").await;
    let mut reader = server.nodes[1].client("ops", "*", "service").await;
    join(&mut writer, "a", "anchor").await;
    let mut watching = subscribe(&mut reader, "a", "", None).await.unwrap();
    let before = received().await;
    for i in 0..20 {
        join(&mut writer, &format!("b{i}"), "u").await;
    }
    let joined = join(&mut writer, "a", "one").await;
    assert_eq!(next_event(&mut watching).await.seq, joined.seq);
    assert_eq!(
        received().await - before,
        1.0,
        "one notice, room A's; none of the other rooms' 20"
    );
    if let Some(cluster) = &server.cluster {
        for port in cluster.ports() {
            let mut master = cluster.master(port).await;
            let keys: u64 = redis::cmd("DBSIZE").query_async(&mut master).await.unwrap();
            assert!(keys > 0, "the rooms are spread over every master");
        }
    }

    drop(watching);
    // Once the listener has let room A go, its events no longer reach this node.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let heard = received().await;
        join(&mut writer, "a", "probe").await;
        let mut quiet = true;
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            quiet &= received().await == heard;
        }
        if quiet {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "room A was never let go"
        );
    }
}

#[tokio::test]
async fn a_node_hears_only_of_the_rooms_it_serves_on_one_redis() {
    if redis_available() {
        a_node_hears_only_of_the_rooms_it_serves(Backend::RedisTwoNodes).await
    }
}

#[tokio::test]
async fn a_node_hears_only_of_the_rooms_it_serves_on_a_cluster() {
    if redis_available() {
        a_node_hears_only_of_the_rooms_it_serves(Backend::RedisCluster).await
    }
}

/// A busy room's slot moves to another master while a subscriber on the other node follows
/// it: every join acknowledged reaches the subscriber exactly once, in order, and the room
/// keeps working on its new master.
#[tokio::test]
async fn a_slot_migration_loses_and_repeats_nothing() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisCluster).await;
    let cluster = server.cluster.as_ref().unwrap();
    let mut writer = server.nodes[0].client("ops", "busy", "service").await;
    let mut reader = server.nodes[1].client("ops", "busy", "service").await;
    join(&mut writer, "busy", "anchor").await;
    let mut observer = subscribe(&mut reader, "busy", "", Some(0)).await.unwrap();

    // Joins run throughout; a join that fails while keys are in flight is retried with its
    // request id, so it is applied once whatever the failure was.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let joining = {
        let stop = stop.clone();
        let mut writer = writer.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 50 {
                let request = pb::JoinRequest {
                    room_id: "busy".into(),
                    name: format!("u{n}"),
                    request_id: format!("join-{n}"),
                    ..Default::default()
                };
                let deadline = tokio::time::Instant::now() + PATIENCE;
                let joined = loop {
                    match writer.join(request.clone()).await {
                        Ok(joined) => break joined.into_inner(),
                        Err(status) => {
                            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                };
                acknowledged.push(joined.seq);
                n += 1;
            }
            acknowledged
        })
    };
    let slot = cluster.slot_of("roomctl:{busy}:meta").await;
    let (from, to) = cluster.owner_of(slot).await;
    cluster.migrate(slot, from, to).await;
    assert_eq!(cluster.owner_of(slot).await.0, to);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = joining.await.unwrap();

    let last = *acknowledged.last().unwrap();
    let seen = read_through(&mut observer, last).await;
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let mut sorted = acknowledged.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), acknowledged.len(), "no join applied twice");
    // The room goes on at its new master, seen through either node.
    let more = join(&mut reader, "busy", "after").await;
    assert_eq!(more.seq, last + 1);
    assert_eq!(next_event(&mut observer).await.seq, last + 1);
}
