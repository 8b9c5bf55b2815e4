//! `Events` as cursors over each room's ordered log: resume, history bounds, epochs, leaving,
//! late cursors of departed clients, slow consumers and cleanup.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use roomctl::pb::{self, event::Payload, DisconnectReason};
use tonic::transport::Channel;
use tonic::Code;

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// `Join` then `Events(after_seq = seq)` misses nothing, and a subscription without a cursor
/// starts at "now": it replays nothing from before it.
async fn join_then_subscribe_misses_nothing_and_unset_cursor_means_now(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let mine = join(&mut bob, "r", "Bob").await;
    join(&mut bob, "r", "Bob again").await; // seq 2, before the subscription opens
    let mut from_cursor = subscribe(&mut bob, "r", &mine.client_id, Some(mine.seq))
        .await
        .unwrap();
    let mut from_now = subscribe(&mut bob, "r", &mine.client_id, None)
        .await
        .unwrap();
    join(&mut bob, "r", "Bob thrice").await; // seq 3
    assert_eq!(next_event(&mut from_cursor).await.seq, 2);
    assert_eq!(next_event(&mut from_cursor).await.seq, 3);
    assert_eq!(next_event(&mut from_now).await.seq, 3);
}

/// A subscriber that disconnects and resumes with its last seq and epoch gets every later event
/// exactly once, in order, then follows live.
async fn resume_has_no_gap_and_no_duplicate(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "r", "service").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let first = join(&mut bob, "r", "b0").await;
    let mut stream = subscribe(&mut ops, "r", "", Some(0)).await.unwrap();
    for i in 1..5 {
        join(&mut bob, "r", &format!("b{i}")).await;
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..3 {
        seen.push(next_event(&mut stream).await.seq);
    }
    drop(stream);
    for i in 5..8 {
        join(&mut bob, "r", &format!("b{i}")).await;
    }
    let mut resumed = ops
        .events(pb::EventsRequest {
            room_id: "r".into(),
            client_id: String::new(),
            after_seq: Some(*seen.last().unwrap()),
            epoch: first.epoch.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..5 {
        seen.push(next_event(&mut resumed).await.seq);
    }
    join(&mut bob, "r", "live").await;
    seen.push(next_event(&mut resumed).await.seq);
    assert_eq!(seen, (1..=9).collect::<Vec<_>>());
}

/// A cursor more than two read batches behind gets every event, in order, then the live one:
/// a subscription reads again after a full batch even when nothing new was written.
async fn a_replay_of_many_batches_arrives_whole_then_follows_live(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "r", "service").await;
    let backlog = 2 * roomctl::store::READ_BATCH as u64 + 10;
    for i in 0..backlog {
        join(&mut ops, "r", &format!("u{i}")).await;
    }
    let mut stream = subscribe(&mut ops, "r", "", Some(0)).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..backlog {
        seen.push(next_event(&mut stream).await.seq);
    }
    join(&mut ops, "r", "live").await;
    seen.push(next_event(&mut stream).await.seq);
    assert_eq!(seen, (1..=backlog + 1).collect::<Vec<_>>());
}

/// With `--history 5` the oldest retained event is the newest minus 4; `after_seq = oldest - 1`
/// is valid, one less is OUT_OF_RANGE with the window in the metadata, and so are a cursor beyond
/// the newest event and a cursor of another epoch (with or without `after_seq`).
async fn history_is_exact_and_cursors_outside_it_are_out_of_range(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.rooms.history = 5).await;
    let mut ops = server.client("ops", "r", "service").await;
    let mut epoch = String::new();
    for i in 0..10 {
        epoch = join(&mut ops, "r", &format!("u{i}")).await.epoch;
    }
    let mut oldest = subscribe(&mut ops, "r", "", Some(5)).await.unwrap();
    assert_eq!(next_event(&mut oldest).await.seq, 6);

    let expect_out_of_range = |status: tonic::Status| {
        let meta = assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
        assert_eq!(meta["oldest_seq"], "6");
        assert_eq!(meta["newest_seq"], "10");
        assert_eq!(meta["epoch"], epoch);
    };
    expect_out_of_range(subscribe(&mut ops, "r", "", Some(4)).await.unwrap_err());
    expect_out_of_range(subscribe(&mut ops, "r", "", Some(11)).await.unwrap_err());
    // The largest cursor the wire can carry is beyond the newest event too (no overflow).
    expect_out_of_range(
        subscribe(&mut ops, "r", "", Some(u64::MAX))
            .await
            .unwrap_err(),
    );
    for after_seq in [Some(8), None] {
        let status = ops
            .events(pb::EventsRequest {
                room_id: "r".into(),
                client_id: String::new(),
                after_seq,
                epoch: "not-this-log".into(),
            })
            .await
            .unwrap_err();
        expect_out_of_range(status);
    }
    // The newest position is a valid cursor: nothing to replay, then live.
    let mut at_head = subscribe(&mut ops, "r", "", Some(10)).await.unwrap();
    join(&mut ops, "r", "late").await;
    assert_eq!(next_event(&mut at_head).await.seq, 11);
}

/// A dropped client that reconnects late with a cursor from before its drop replays up to its
/// `room_disconnected` (learning why), and the stream ends OK; with a later cursor it is
/// CLIENT_NOT_FOUND.
async fn late_cursor_of_a_dropped_client_replays_up_to_why_it_was_dropped(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let mine = join(&mut bob, "r", "Bob").await;
    let mut carol = server.client("carol", "r", "participant").await;
    join(&mut carol, "r", "Carol").await; // seq 2
    let mut alice = server.client("alice", "r", "moderator").await;
    alice
        .drop_user(drop_request("r", &[&mine.client_id], "flooding"))
        .await
        .unwrap(); // 3, 4, 5
    join(&mut carol, "r", "Carol 2").await; // seq 6

    let mut late = subscribe(&mut bob, "r", &mine.client_id, Some(mine.seq))
        .await
        .unwrap();
    assert_eq!(kind(&next_event(&mut late).await), "user_connected");
    let told = next_event(&mut late).await;
    let Some(Payload::RoomDisconnected(rd)) = &told.payload else {
        panic!("{told:?}")
    };
    assert_eq!((told.seq, rd.message.as_str()), (3, "flooding"));
    assert!(stream_end(&mut late).await.is_ok());

    let status = subscribe(&mut bob, "r", &mine.client_id, Some(3))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "CLIENT_NOT_FOUND");
}

/// A leaving client's own streams get its `user_disconnected` (LEFT) and then end OK; others
/// keep following; a late cursor from before the leave replays up to it.
async fn leave_ends_own_streams_after_user_disconnected(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let phone = join(&mut bob, "r", "phone").await;
    let laptop = join(&mut bob, "r", "laptop").await;
    let mut phone_events = subscribe(&mut bob, "r", &phone.client_id, None)
        .await
        .unwrap();
    let mut laptop_events = subscribe(&mut bob, "r", &laptop.client_id, None)
        .await
        .unwrap();
    bob.leave(pb::LeaveRequest {
        room_id: "r".into(),
        client_id: phone.client_id.clone(),
    })
    .await
    .unwrap();
    for stream in [&mut phone_events, &mut laptop_events] {
        let event = next_event(stream).await;
        let Some(Payload::UserDisconnected(ud)) = &event.payload else {
            panic!("{event:?}")
        };
        assert_eq!(
            (ud.client_id.as_str(), ud.reason()),
            (phone.client_id.as_str(), DisconnectReason::Left)
        );
    }
    assert!(stream_end(&mut phone_events).await.is_ok());
    join(&mut bob, "r", "tablet").await;
    assert_eq!(
        kind(&next_event(&mut laptop_events).await),
        "user_connected"
    );

    let mut late = subscribe(&mut bob, "r", &phone.client_id, Some(laptop.seq))
        .await
        .unwrap();
    assert_eq!(kind(&next_event(&mut late).await), "user_disconnected");
    assert!(stream_end(&mut late).await.is_ok());
}

/// Dropping one client of an identity leaves its other clients' streams running: they see the
/// `user_disconnected` but not the other client's `room_disconnected`.
async fn other_clients_of_a_dropped_identity_keep_streaming(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let phone = join(&mut bob, "r", "phone").await.client_id;
    let laptop = join(&mut bob, "r", "laptop").await.client_id;
    let mut laptop_events = subscribe(&mut bob, "r", &laptop, None).await.unwrap();
    let mut alice = server.client("alice", "r", "moderator").await;
    alice
        .drop_user(drop_request("r", &[&phone], ""))
        .await
        .unwrap();
    assert_eq!(
        kind(&next_event(&mut laptop_events).await),
        "user_disconnected"
    );
    join(&mut bob, "r", "tablet").await;
    assert_eq!(
        kind(&next_event(&mut laptop_events).await),
        "user_connected"
    );
}

/// A subscriber that stops reading never blocks writers, and when the history moves past its
/// cursor its stream ends OUT_OF_RANGE after the events it could still get, in order, without gap.
async fn a_slow_consumer_falls_out_of_history_without_blocking_anyone(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.rooms.history = 10).await;
    // A small client window, so the server cannot push the whole backlog into it.
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow_client =
        roomctl::client::with_token(channel, &token("ops", "r", "service")).unwrap();
    let mut ops = server.client("ops", "r", "service").await;
    join(&mut ops, "r", "first").await;
    let mut slow = subscribe(&mut slow_client, "r", "", None).await.unwrap();

    // Each ack lists 1000 ids of 100 bytes: ~100 KB per event, ~4 MB in all.
    let ids: Vec<String> = (0..1000).map(|i| format!("{i:0>100}")).collect();
    for _ in 0..40 {
        let mut request = drop_request("r", &[], "");
        request.client_ids = ids.clone();
        tokio::time::timeout(PATIENCE, ops.drop_user(request))
            .await
            .expect("a writer was blocked by a slow subscriber")
            .unwrap();
    }

    let mut seqs = Vec::new();
    let status = loop {
        match tokio::time::timeout(PATIENCE, slow.message())
            .await
            .unwrap()
        {
            Ok(Some(event)) => seqs.push(event.seq),
            Ok(None) => panic!("stream ended OK; expected OUT_OF_RANGE"),
            Err(status) => break status,
        }
    };
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    assert!(
        seqs.len() < 40,
        "the server buffered the whole backlog: {}",
        seqs.len()
    );
    let expected: Vec<u64> = (2..2 + seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "delivered events are contiguous from the cursor"
    );
}

/// A subscription is gone as soon as its client goes away: nothing keeps running for it.
async fn a_subscription_ends_when_its_client_goes_away(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "r", "service").await;
    join(&mut ops, "r", "u").await;
    let stream = subscribe(&mut ops, "r", "", None).await.unwrap();
    let other = subscribe(&mut ops, "r", "", None).await.unwrap();
    assert_eq!(server.subscriptions(), 2);
    drop(stream);
    wait_until(|| server.subscriptions() == 1).await;
    drop(other);
    drop(ops);
    wait_until(|| server.subscriptions() == 0).await;
}

async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never became true"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A room stays after its last participant leaves, for `--empty-room-ttl`: with a long TTL the
/// emptied room still answers, with its position.
async fn an_empty_room_stays_for_its_ttl(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rooms.empty_room_ttl = Duration::from_secs(3600)
    })
    .await;
    let mut ops = server.client("ops", "r", "service").await;
    let first = join(&mut ops, "r", "u").await;
    ops.leave(pb::LeaveRequest {
        room_id: "r".into(),
        client_id: first.client_id,
    })
    .await
    .unwrap();
    let still_there = ops.list_participants(list("r")).await.unwrap().into_inner();
    assert_eq!((still_there.seq, still_there.participants.len()), (2, 0));
    assert_eq!(still_there.epoch, first.epoch);
}

/// With `--empty-room-ttl 0` a room goes as soon as it is empty: joins still create it (and it
/// is not reaped under the join that creates it), and once its last client leaves it is
/// forgotten (waited for as a state, not a time).
async fn a_zero_ttl_forgets_a_room_as_soon_as_it_is_empty(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.rooms.empty_room_ttl = Duration::ZERO).await;
    let mut ops = server.client("ops", "r", "service").await;
    let first = join(&mut ops, "r", "u").await;
    assert_eq!(first.seq, 1);
    ops.leave(pb::LeaveRequest {
        room_id: "r".into(),
        client_id: first.client_id,
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ops.list_participants(list("r")).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the empty room stayed"
        );
        tokio::task::yield_now().await;
    }
    let again = join(&mut ops, "r", "u").await;
    assert_ne!(again.epoch, first.epoch);
}

/// After its TTL an empty room is forgotten (observers' streams end ROOM_NOT_FOUND, which the
/// test waits for instead of a time), and a new join creates it with a new epoch, so old cursors
/// are OUT_OF_RANGE rather than silently pointing into another log.
async fn empty_rooms_are_forgotten_after_their_ttl_and_come_back_with_a_new_epoch(
    backend: Backend,
) {
    let ttl = Duration::from_millis(300);
    let server = TestServer::start_with(backend, |c| c.rooms.empty_room_ttl = ttl).await;
    let mut ops = server.client("ops", "r", "service").await;
    let first = join(&mut ops, "r", "u").await;
    let mut observer = subscribe(&mut ops, "r", "", None).await.unwrap();
    ops.leave(pb::LeaveRequest {
        room_id: "r".into(),
        client_id: first.client_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(kind(&next_event(&mut observer).await), "user_disconnected");

    let status = stream_end(&mut observer).await.unwrap_err();
    assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");
    let status = ops.list_participants(list("r")).await.unwrap_err();
    assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");

    let again = join(&mut ops, "r", "u").await;
    assert_eq!(again.seq, 1);
    assert_ne!(again.epoch, first.epoch);
    let status = ops
        .events(pb::EventsRequest {
            room_id: "r".into(),
            client_id: String::new(),
            after_seq: Some(1),
            epoch: first.epoch,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
}

/// A join retried with the same request id (same identity, same room) answers the first
/// JoinResponse and logs nothing, even after that client has left; without a request id, or
/// from another identity, it is a new join.
async fn a_retried_join_returns_the_first_answer(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut gateway = server.client("gw", "*", "service").await;
    let request = |request_id: &str| pb::JoinRequest {
        room_id: "r".into(),
        name: "Ann".into(),
        identity: "ann".into(),
        request_id: request_id.into(),
        ..Default::default()
    };
    let first = gateway.join(request("j-1")).await.unwrap().into_inner();
    let mut retry = server.client("gw", "*", "service").await;
    let again = retry.join(request("j-1")).await.unwrap().into_inner();
    assert_eq!(again, first);
    gateway
        .leave(pb::LeaveRequest {
            room_id: "r".into(),
            client_id: first.client_id.clone(),
        })
        .await
        .unwrap();
    let after_leave = retry.join(request("j-1")).await.unwrap().into_inner();
    assert_eq!(after_leave, first);
    let snapshot = retry
        .list_participants(list("r"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((snapshot.seq, snapshot.participants.len()), (2, 0));

    let fresh = retry.join(request("")).await.unwrap().into_inner();
    assert_ne!(fresh.client_id, first.client_id);
    let mut other = server.client("gw-2", "*", "service").await;
    let theirs = other.join(request("j-1")).await.unwrap().into_inner();
    assert_ne!(theirs.client_id, first.client_id);
    let status = other.join(request(&"q".repeat(129))).await.unwrap_err();
    assert_eq!(violations(&status), ["request_id"]);
}

/// ListParticipants is a snapshot in join order with the position it was taken at, so
/// `Events(after_seq = seq)` continues exactly from it.
async fn list_participants_is_a_snapshot_with_its_position(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let a = join(&mut alice, "r", "Alice").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let b = join(&mut bob, "r", "Bob").await;
    let snapshot = bob.list_participants(list("r")).await.unwrap().into_inner();
    let people: Vec<_> = snapshot
        .participants
        .iter()
        .map(|p| (p.client_id.as_str(), p.identity.as_str(), p.role()))
        .collect();
    assert_eq!(
        people,
        [
            (a.client_id.as_str(), "alice", pb::Role::Moderator),
            (b.client_id.as_str(), "bob", pb::Role::Participant)
        ]
    );
    assert_eq!(
        (snapshot.seq, snapshot.epoch.as_str()),
        (2, a.epoch.as_str())
    );
    let mut stream = subscribe(&mut alice, "r", "", Some(snapshot.seq))
        .await
        .unwrap();
    join(&mut bob, "r", "Bob 2").await;
    assert_eq!(next_event(&mut stream).await.seq, 3);
}

acceptance! {
    join_then_subscribe_misses_nothing_and_unset_cursor_means_now,
    resume_has_no_gap_and_no_duplicate,
    a_replay_of_many_batches_arrives_whole_then_follows_live,
    history_is_exact_and_cursors_outside_it_are_out_of_range,
    late_cursor_of_a_dropped_client_replays_up_to_why_it_was_dropped,
    leave_ends_own_streams_after_user_disconnected,
    other_clients_of_a_dropped_identity_keep_streaming,
    a_slow_consumer_falls_out_of_history_without_blocking_anyone,
    a_subscription_ends_when_its_client_goes_away,
    an_empty_room_stays_for_its_ttl,
    a_zero_ttl_forgets_a_room_as_soon_as_it_is_empty,
    empty_rooms_are_forgotten_after_their_ttl_and_come_back_with_a_new_epoch,
    list_participants_is_a_snapshot_with_its_position,
    a_retried_join_returns_the_first_answer,
}
