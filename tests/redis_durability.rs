//! What Redis may lose, roomctl never passes off as continuous: a Redis restarted from an
//! append-only file that lost its tail, a commit its replicas do not confirm
//! (`--redis-wait-replicas`), and a cluster master killed and replaced by its replica while events
//! flow. Every test runs its own redis-server processes; they are skipped loudly when
//! redis-server is missing (required in CI).

mod common;

use common::redis_cluster::RedisCluster;
use common::redis_server::{redis_available, RedisServer};
use common::*;
use roomctl::pb;
use roomctl::server::{ServerConfig, StoreConfig};
use roomctl::store::redis::RedisUrl;
use tonic::Code;

fn store(url: String, wait_replicas: usize) -> ServerConfig {
    let mut config = ServerConfig::new(SECRET);
    config.store = StoreConfig::Redis {
        url: RedisUrl::new(url),
        ca_file: None,
        wait_replicas,
        // Read from the cluster.
        cluster_node_timeout: None,
    };
    config
}

fn join_request(room: &str, n: usize) -> pb::JoinRequest {
    pb::JoinRequest {
        room_id: room.into(),
        name: format!("u{n}"),
        request_id: format!("join-{n}"),
        ..Default::default()
    }
}

/// Sends `request` until it is answered OK (retries with its request id are safe), failing the
/// test if that takes longer than [`PATIENCE`].
async fn join_until_ok(client: &mut Client, request: pb::JoinRequest) -> pb::JoinResponse {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.join(request.clone()).await {
            Ok(joined) => return joined.into_inner(),
            Err(status) => {
                assert!(tokio::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

fn participants_of(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// The error an `Events` call ends with, at once or as its stream's first message.
async fn refused(client: &mut Client, request: pb::EventsRequest) -> tonic::Status {
    match client.events(request).await {
        Ok(stream) => stream_end(&mut stream.into_inner()).await.unwrap_err(),
        Err(status) => status,
    }
}

fn cursor(room: &str, epoch: &str, after_seq: u64) -> pb::EventsRequest {
    pb::EventsRequest {
        room_id: room.into(),
        client_id: String::new(),
        after_seq: Some(after_seq),
        epoch: epoch.into(),
    }
}

/// Redis comes back from an append-only file that lacks its last write (as one written with
/// `appendfsync everysec` can after a crash): the room's log is one event shorter than what
/// clients saw. The next commit must not reuse that seq under the same epoch, which would make a
/// client resuming from it skip the new event: the room goes on under a new epoch, and the old
/// cursor gets OUT_OF_RANGE.
#[tokio::test]
async fn a_redis_restarted_without_its_last_writes_starts_a_new_epoch() {
    if !redis_available() {
        return;
    }
    let mut redis = RedisServer::start_persistent().await;
    let node = Node::start(store(redis.url(), 0)).await;
    let mut ops = node.client("ops", "r", "service").await;
    let first = join(&mut ops, "r", "a").await;
    redis.copy_data();
    let seen = join(&mut ops, "r", "b").await;
    assert_eq!((seen.epoch.as_str(), seen.seq), (first.epoch.as_str(), 2));

    redis.restart_from_copy().await;
    let after = join_until_ok(&mut ops, join_request("r", 3)).await;
    assert_ne!(
        after.epoch, first.epoch,
        "seq 2 is reused, so the log needs a new epoch"
    );
    assert_eq!(after.seq, 2, "the new epoch continues the numbering");
    let status = refused(&mut ops, cursor("r", &first.epoch, seen.seq)).await;
    let window = assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    assert_eq!(window["epoch"], after.epoch);
    // The new epoch holds only what was written since; its members are what Redis kept.
    let status = refused(&mut ops, cursor("r", &after.epoch, 0)).await;
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    let mut live = subscribe(&mut ops, "r", "", Some(after.seq - 1))
        .await
        .unwrap();
    assert_eq!(next_event(&mut live).await.seq, after.seq);
    let names: Vec<String> = ops
        .list_participants(pb::ListParticipantsRequest {
            room_id: "r".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .participants
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a", "u3"]);
}

/// With `--redis-wait-replicas 1` and a master that has no replica (as a promoted replica has,
/// after a failover in a cluster of one replica per master), commits are refused at once with
/// UNAVAILABLE / NOT_ENOUGH_REPLICAS, naming the replicas the master has and needs, and change
/// nothing: a definite answer instead of OUTCOME_UNKNOWN after every deadline. Once a replica
/// is online, commits apply again.
#[tokio::test]
async fn commits_a_master_cannot_confirm_are_refused() {
    if !redis_available() {
        return;
    }
    let master = RedisServer::start().await;
    let node = Node::start(store(master.url(), 1)).await;
    let mut ops = node.client("ops", "r", "service").await;
    for n in 0..3 {
        let status = ops.join(join_request("r", n)).await.unwrap_err();
        let meta = assert_error(&status, Code::Unavailable, "NOT_ENOUGH_REPLICAS");
        assert_eq!(
            (meta["replicas"].as_str(), meta["needed"].as_str()),
            ("0", "1")
        );
    }
    let status = ops
        .list_participants(pb::ListParticipantsRequest {
            room_id: "r".into(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");

    let _replica = RedisServer::start_replica_of(&master).await;
    let joined = join_until_ok(&mut ops, join_request("r", 9)).await;
    assert_eq!(joined.seq, 1, "nothing refused was applied");
}

/// With `--redis-wait-replicas 1`, a commit the replica has not confirmed is answered
/// DEADLINE_EXCEEDED / OUTCOME_UNKNOWN and shown to nobody (a failover could still lose it):
/// not in the log's reads, not in a snapshot (refused meanwhile), while the node goes on
/// serving other reads; once the replica is back, a snapshot confirms it on demand (the room
/// is quiet: no later commit would), the observer is shown it, and the first request's retry
/// answers what it did.
#[tokio::test]
async fn a_commit_its_replicas_do_not_confirm_is_never_shown() {
    if !redis_available() {
        return;
    }
    let master = RedisServer::start().await;
    let replica = RedisServer::start_replica_of(&master).await;
    let a = Node::start(store(master.url(), 1)).await;
    let b = Node::start(store(master.url(), 1)).await;
    let mut writer = a.client("ops", "r", "service").await;
    let mut reader = b.client("ops", "r", "service").await;
    let first = join_until_ok(&mut writer, join_request("r", 1)).await;
    let mut observer = subscribe(&mut reader, "r", "", Some(first.seq))
        .await
        .unwrap();

    replica.pause();
    let status = writer.join(join_request("r", 2)).await.unwrap_err();
    assert_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    let mut conn = master.connection().await;
    let logged: u64 = redis::cmd("XLEN")
        .arg("roomctl:{r}:log")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(logged, 2, "the commit is in the master's log");
    // Nobody is shown it: the room is listed at the confirmed seq, and no snapshot of members
    // that already hold the hidden join is passed off as the state at that seq.
    let mut lister = b.client("ops", "*", "service").await;
    let rooms = lister
        .list_rooms(pb::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rooms;
    assert_eq!(rooms[0].seq, first.seq, "but nobody is shown it");
    let status = reader
        .list_participants(pb::ListParticipantsRequest {
            room_id: "r".into(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    let status = reader
        .events(cursor("r", &first.epoch, first.seq + 1))
        .await
        .unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");

    // Commits that wait for the paused replica (up to a second each, one after the other) do
    // not hold up the node's reads: they have a connection of their own.
    let fleet = a.client("ops", "*", "service").await;
    let mut waiting = tokio::task::JoinSet::new();
    for n in 10..13 {
        let mut writer = fleet.clone();
        waiting.spawn(async move { writer.join(join_request(&format!("other-{n}"), n)).await });
    }
    let mut reading = fleet.clone();
    while !waiting.is_empty() {
        reading
            .list_rooms(pb::ListRoomsRequest::default())
            .await
            .expect("reads are served while commits wait for replicas");
        while let Some(done) = waiting.try_join_next() {
            let status = done.unwrap().unwrap_err();
            assert_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
        }
    }

    replica.resume();
    // Back in sync, the replica confirms the hidden join on demand, with no later commit: the
    // quiet room's snapshot, its observer and the first request's retry all see it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let snapshot = loop {
        match reader.list_participants(participants_of("r")).await {
            Ok(snapshot) => break snapshot.into_inner(),
            Err(status) => {
                assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
                assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            }
        }
    };
    assert_eq!(
        (snapshot.seq, snapshot.participants.len()),
        (first.seq + 1, 2)
    );
    let shown = next_event(&mut observer).await;
    assert_eq!((shown.seq, kind(&shown)), (first.seq + 1, "user_connected"));
    let retried = join_until_ok(&mut writer, join_request("r", 2)).await;
    assert_eq!(
        retried.seq,
        first.seq + 1,
        "the retry answers the first join"
    );

    let third = join_until_ok(&mut writer, join_request("r", 3)).await;
    assert_eq!(third.seq, first.seq + 2);
    let shown = next_event(&mut observer).await;
    assert_eq!((shown.seq, kind(&shown)), (third.seq, "user_connected"));
    let snapshot = writer
        .list_participants(participants_of("r"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((snapshot.seq, snapshot.participants.len()), (third.seq, 3));

    // Hidden again; this time the retry comes first, and confirms it on demand itself.
    replica.pause();
    let status = writer.join(join_request("r", 4)).await.unwrap_err();
    assert_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    replica.resume();
    let fourth = join_until_ok(&mut writer, join_request("r", 4)).await;
    assert_eq!(
        fourth.seq,
        third.seq + 1,
        "the retry answers the hidden join"
    );
    let shown = next_event(&mut observer).await;
    assert_eq!((shown.seq, kind(&shown)), (fourth.seq, "user_connected"));
}

/// With `--redis-wait-replicas 1`, a refusal remembered by a commit the replica has not
/// confirmed is not answered again: its commit leaves the seq as it was, so nothing else marks
/// it hidden, and a failover could lose it and let the request apply after all (an attack on
/// remembered refusals found the retry answered `ROOM_LOCKED` from the master alone). Once the
/// replica holds it, the retry gets the refusal, still after an unlock.
#[tokio::test]
async fn a_refusal_its_replicas_do_not_confirm_is_not_answered_again() {
    if !redis_available() {
        return;
    }
    let master = RedisServer::start().await;
    let replica = RedisServer::start_replica_of(&master).await;
    let a = Node::start(store(master.url(), 1)).await;
    let b = Node::start(store(master.url(), 1)).await;
    let mut first = a.client("ops", "r", "service").await;
    let mut retry = b.client("ops", "r", "service").await;
    join_until_ok(&mut first, join_request("r", 1)).await;
    first
        .lock_room(pb::LockRoomRequest {
            room_id: "r".into(),
            request_id: "lock".into(),
        })
        .await
        .unwrap();
    let locked_out = pb::JoinRequest {
        role: pb::Role::Participant as i32,
        identity: "late".into(),
        ..join_request("r", 2)
    };

    replica.pause();
    let status = first.join(locked_out.clone()).await.unwrap_err();
    assert_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    let status = retry.join(locked_out.clone()).await.unwrap_err();
    assert_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");

    replica.resume();
    retry
        .unlock_room(pb::UnlockRoomRequest {
            room_id: "r".into(),
            request_id: "unlock".into(),
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let refused = loop {
        let status = retry.join(locked_out.clone()).await.unwrap_err();
        if status.code() != Code::DeadlineExceeded {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
    };
    assert_error(&refused, Code::FailedPrecondition, "ROOM_LOCKED");
    let members = retry
        .list_participants(participants_of("r"))
        .await
        .unwrap()
        .into_inner()
        .participants;
    assert_eq!(members.len(), 1, "the refused join never applied");
}

/// Two roomctl nodes with `--redis-wait-replicas 1` on a cluster of 3 masters with a replica
/// each. Joins flow through one node while an observer follows the room through the other; the
/// room's master is killed and its replica promoted. Every acknowledged join is still in the
/// room, the observer resumes its cursor in the same epoch and sees every seq once, each the
/// event that was acknowledged for it, and once the lost host is back (as the new master's
/// replica, which commits wait for) the store serves again without a restart of roomctl.
#[tokio::test]
async fn a_failover_loses_nothing_acknowledged() {
    if !redis_available() {
        return;
    }
    let mut cluster = RedisCluster::start_with_replicas(3, 1).await;
    let a = Node::start(store(cluster.url(), 1)).await;
    let b = Node::start(store(cluster.url(), 1)).await;
    let mut writer = a.client("ops", "busy", "service").await;
    let mut reader = b.client("ops", "busy", "service").await;
    let first = join_until_ok(&mut writer, join_request("busy", 0)).await;
    let mut observer = subscribe(&mut reader, "busy", "", Some(0)).await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let joining = {
        let stop = stop.clone();
        let mut writer = writer.clone();
        tokio::spawn(async move {
            // (seq, client id) of every join answered OK.
            let mut acknowledged = Vec::new();
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(joined) = writer.join(join_request("busy", n)).await {
                    let joined = joined.into_inner();
                    acknowledged.push((joined.seq, joined.client_id));
                }
                n += 1;
            }
            acknowledged
        })
    };
    let slot = cluster.slot_of("roomctl:{busy}:meta").await;
    let (master, _) = cluster.owner_of(slot).await;
    let replica = cluster.replica_of(master).await;
    // Some joins before the failure.
    let mut seen = Vec::new();
    while seen.last().is_none_or(|e: &pb::Event| e.seq < 20) {
        seen.push(next_event(&mut observer).await);
    }
    cluster.kill(master).await;
    cluster.promote(replica, slot).await;
    // Commits wait for a replica the new master does not have until the lost host comes back.
    cluster.restart_as_replica(master, replica).await;
    // The store recovers by itself: joins are acknowledged again.
    let after = join_until_ok(&mut writer, join_request("busy", 100_000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = joining.await.unwrap();
    acknowledged.push((after.seq, after.client_id.clone()));
    assert_eq!(after.epoch, first.epoch, "acknowledged events survived");
    let newest = acknowledged.iter().map(|(seq, _)| *seq).max().unwrap();

    // The observer's stream may end with the master; its cursor resumes where it was.
    let mut last = seen.last().map_or(0, |e| e.seq);
    while last < newest {
        match tokio::time::timeout(PATIENCE, observer.message()).await {
            Ok(Ok(Some(event))) => {
                last = event.seq;
                seen.push(event);
            }
            Ok(Err(status)) => {
                assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
                observer = resume(&mut reader, &first.epoch, last).await;
            }
            Ok(Ok(None)) => panic!("the stream ended OK"),
            Err(_) => panic!("no event for {PATIENCE:?} after seq {last}"),
        }
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=newest).collect::<Vec<_>>(), "every seq once");
    for (seq, client_id) in &acknowledged {
        let event = &seen[*seq as usize - 1];
        let Some(pb::event::Payload::UserConnected(joined)) = &event.payload else {
            panic!("seq {seq} is {event:?}");
        };
        assert_eq!(
            joined.participant.as_ref().unwrap().client_id,
            *client_id,
            "seq {seq} is the acknowledged join"
        );
    }
    let members: Vec<String> = reader
        .list_participants(pb::ListParticipantsRequest {
            room_id: "busy".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .participants
        .into_iter()
        .map(|p| p.client_id)
        .collect();
    for (seq, client_id) in &acknowledged {
        assert!(members.contains(client_id), "join at {seq} was lost");
    }
}

/// Two failovers while a room is quiet: its master is killed and replaced, comes back as its
/// successor's replica, and is promoted again when the successor dies in turn. The room's last
/// commit is then two failovers back, yet a replica confirmed it: the room keeps its epoch, and
/// a cursor from before both failovers still resumes. (The fault harness found a new epoch
/// here, a spread room quiet through two failovers of its slot.)
#[tokio::test]
async fn a_quiet_room_keeps_its_epoch_through_two_failovers() {
    if !redis_available() {
        return;
    }
    let mut cluster = RedisCluster::start_with_replicas(3, 1).await;
    let node = Node::start(store(cluster.url(), 1)).await;
    let mut client = node.client("ops", "quiet", "service").await;
    let first = join_until_ok(&mut client, join_request("quiet", 0)).await;
    let slot = cluster.slot_of("roomctl:{quiet}:meta").await;
    let (master, _) = cluster.owner_of(slot).await;
    let replica = cluster.replica_of(master).await;
    cluster.kill(master).await;
    cluster.promote(replica, slot).await;
    cluster.restart_as_replica(master, replica).await;
    cluster.kill(replica).await;
    cluster.promote(master, slot).await;
    cluster.restart_as_replica(replica, master).await;

    let second = join_until_ok(&mut client, join_request("quiet", 1)).await;
    assert_eq!(
        (second.epoch.as_str(), second.seq),
        (first.epoch.as_str(), first.seq + 1),
        "the room went on in its epoch"
    );
    let mut stream = client
        .events(cursor("quiet", &first.epoch, first.seq))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut stream).await.seq, second.seq);
}

/// A cluster master restarted from its own RDB file (as a host that reboots faster than its
/// replica takes over): the file may lack the last writes, confirmed by replicas or not, so the
/// room begins a new epoch. Redis 7 gives such a master the file's replication id as its
/// second one, which a promoted replica has too; only the node id tells them apart (before,
/// this master kept the epoch with `--redis-wait-replicas`).
#[tokio::test]
async fn a_master_restarted_from_its_snapshot_begins_a_new_epoch() {
    if !redis_available() {
        return;
    }
    let mut cluster = RedisCluster::start_with_replicas(3, 1).await;
    let node = Node::start(store(cluster.url(), 1)).await;
    let mut client = node.client("ops", "saved", "service").await;
    let first = join_until_ok(&mut client, join_request("saved", 0)).await;
    let slot = cluster.slot_of("roomctl:{saved}:meta").await;
    let (master, _) = cluster.owner_of(slot).await;
    cluster.restart_from_snapshot(master).await;

    let second = join_until_ok(&mut client, join_request("saved", 1)).await;
    assert_ne!(second.epoch, first.epoch, "a new epoch");
    let status = refused(&mut client, cursor("saved", &first.epoch, first.seq)).await;
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
}

/// Reopens a stream after `after_seq` of `epoch`, retrying while the store is still
/// recovering.
async fn resume(client: &mut Client, epoch: &str, after_seq: u64) -> tonic::Streaming<pb::Event> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.events(cursor("busy", epoch, after_seq)).await {
            Ok(stream) => return stream.into_inner(),
            Err(status) => {
                assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
                assert!(tokio::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}
