//! The mission end to end over gRPC: a moderator drops participants, each dropped client is told
//! why and its stream ends, the moderator is acknowledged, a participant gets 5116.

#[macro_use]
mod common;

use common::*;
use roomctl::pb::{self, event::Payload, DisconnectReason, DropOutcome};
use tonic::Code;

fn outcomes(response: &pb::DropUserResponse) -> Vec<(&str, DropOutcome)> {
    response
        .results
        .iter()
        .map(|r| (r.client_id.as_str(), r.outcome()))
        .collect()
}

/// The room's current log position, as ListParticipants reports it.
async fn room_seq(client: &mut Client, room: &str) -> u64 {
    let request = pb::ListParticipantsRequest {
        room_id: room.into(),
    };
    client
        .list_participants(request)
        .await
        .unwrap()
        .into_inner()
        .seq
}

/// The seed's scenario: the dropped client's stream delivers `room_disconnected` with the reason
/// and ends OK; the moderator's observer stream sees `user_disconnected` then the ack with the
/// same results the call returned, and never the dropped client's `room_disconnected`.
async fn moderator_drops_participant_who_is_told_why_and_moderator_is_acknowledged(
    backend: Backend,
) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "standup", "participant").await;
    let mut alice = server.client("alice", "standup", "moderator").await;
    let joined = join(&mut bob, "standup", "Bob").await;
    let mut bob_events = subscribe(&mut bob, "standup", &joined.client_id, Some(joined.seq))
        .await
        .unwrap();
    let mut alice_events = subscribe(&mut alice, "standup", "", None).await.unwrap();

    let response = alice
        .drop_user(drop_request("standup", &[&joined.client_id], "off-topic"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcomes(&response),
        [(joined.client_id.as_str(), DropOutcome::Dropped)]
    );
    assert!(!response.request_id.is_empty(), "a request id is generated");

    let told = next_event(&mut bob_events).await;
    let Some(Payload::RoomDisconnected(rd)) = &told.payload else {
        panic!("expected room_disconnected, got {told:?}")
    };
    assert_eq!(rd.client_id, joined.client_id);
    assert_eq!(rd.reason(), DisconnectReason::DroppedByModerator);
    assert_eq!(rd.message, "off-topic");
    assert_eq!(
        (told.seq, told.epoch.as_str(), told.room_id.as_str()),
        (2, joined.epoch.as_str(), "standup")
    );
    assert!(told.time.is_some());
    assert!(
        stream_end(&mut bob_events).await.is_ok(),
        "a dropped client's stream ends OK"
    );

    let gone = next_event(&mut alice_events).await;
    let Some(Payload::UserDisconnected(ud)) = &gone.payload else {
        panic!("expected user_disconnected, got {gone:?}")
    };
    assert_eq!(
        (ud.client_id.as_str(), ud.reason()),
        (
            joined.client_id.as_str(),
            DisconnectReason::DroppedByModerator
        )
    );
    assert_eq!(gone.seq, 3);
    let ack = next_event(&mut alice_events).await;
    let Some(Payload::AckDropUser(ack_body)) = &ack.payload else {
        panic!("expected ack_drop_user, got {ack:?}")
    };
    assert_eq!(ack.seq, 4);
    assert_eq!(ack_body.request_id, response.request_id);
    assert_eq!(ack_body.moderator, "alice");
    assert_eq!(ack_body.results, response.results);
}

/// The vendor's error: a participant calling DropUser gets PERMISSION_DENIED "5116: Unauthorized
/// Access" with code 5116 in ErrorInfo, and nobody is dropped.
async fn participant_calling_drop_user_gets_5116_and_nothing_happens(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r1", "participant").await;
    let carol_joined = join(
        &mut server.client("carol", "r1", "participant").await,
        "r1",
        "Carol",
    )
    .await;
    let status = bob
        .drop_user(drop_request("r1", &[&carol_joined.client_id], ""))
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("5116: Unauthorized Access"),
        "{status:?}"
    );
    let meta = assert_error(&status, Code::PermissionDenied, "UNAUTHORIZED_ACCESS");
    assert_eq!(meta["code"], "5116");
    let list = bob
        .list_participants(pb::ListParticipantsRequest {
            room_id: "r1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.participants.len(), 1);
    assert_eq!(list.seq, carol_joined.seq, "no event was logged");
}

/// One call drops several clients: results are per distinct id in request order (duplicates
/// answered once at their first position, unknown ids NOT_FOUND), the log holds
/// room_disconnected then user_disconnected per dropped client and one ack after them all.
async fn drop_of_several_ids_answers_each_once_in_order_and_acks_after_all(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "*", "service").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let a = join(&mut bob, "r", "phone").await.client_id;
    let b = join(&mut bob, "r", "laptop").await.client_id;
    let mut observer = subscribe(&mut ops, "r", "", Some(2)).await.unwrap();
    let mut alice = server.client("alice", "r", "moderator").await;
    let response = alice
        .drop_user(drop_request("r", &[&b, "ghost", &a, &b], "bye"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcomes(&response),
        [
            (b.as_str(), DropOutcome::Dropped),
            ("ghost", DropOutcome::NotFound),
            (a.as_str(), DropOutcome::Dropped)
        ]
    );
    let mut seen = Vec::new();
    for _ in 0..5 {
        let event = next_event(&mut observer).await;
        seen.push((event.seq, kind(&event)));
    }
    assert_eq!(
        seen,
        [
            (3, "room_disconnected"),
            (4, "user_disconnected"),
            (5, "room_disconnected"),
            (6, "user_disconnected"),
            (7, "ack_drop_user")
        ]
    );
}

/// A retry with the same request_id by the same identity returns the first answer and logs
/// nothing new, even though the clients are gone by then.
async fn retried_request_id_returns_first_answer_without_new_events(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let a = join(&mut bob, "r", "Bob").await.client_id;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut request = drop_request("r", &[&a], "spam");
    request.request_id = "drop-42".into();
    let first = alice.drop_user(request.clone()).await.unwrap().into_inner();
    let seq_after_first = room_seq(&mut alice, "r").await;
    let retry = alice.drop_user(request.clone()).await.unwrap().into_inner();
    assert_eq!(retry, first);
    assert_eq!(retry.request_id, "drop-42");
    assert_eq!(outcomes(&retry), [(a.as_str(), DropOutcome::Dropped)]);
    let seq_after_retry = room_seq(&mut alice, "r").await;
    assert_eq!(seq_after_retry, seq_after_first);

    // Another moderator using the same key makes another request.
    let mut dave = server.client("dave", "r", "moderator").await;
    let other = dave.drop_user(request).await.unwrap().into_inner();
    assert_eq!(outcomes(&other), [(a.as_str(), DropOutcome::NotFound)]);
}

/// Service tokens may drop too, with the moderator's reason, and service observers see the
/// dropped client's room_disconnected and the ack of another identity's drop.
async fn service_drops_with_moderator_reason_and_service_observers_see_everything(
    backend: Backend,
) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let a = join(&mut bob, "r", "Bob").await.client_id;
    let mut audit = server.client("audit", "r", "service").await;
    let mut watch = subscribe(&mut audit, "r", "", None).await.unwrap();
    let mut gateway = server.client("gateway", "*", "service").await;
    gateway
        .drop_user(drop_request("r", &[&a], ""))
        .await
        .unwrap();
    let told = next_event(&mut watch).await;
    let Some(Payload::RoomDisconnected(rd)) = &told.payload else {
        panic!("{told:?}")
    };
    assert_eq!(rd.reason(), DisconnectReason::DroppedByModerator);
    assert_eq!(kind(&next_event(&mut watch).await), "user_disconnected");
    let ack = next_event(&mut watch).await;
    let Some(Payload::AckDropUser(body)) = &ack.payload else {
        panic!("{ack:?}")
    };
    assert_eq!(body.moderator, "gateway");
}

/// Acks go to the subscriptions of the dropping identity only: another moderator's observer
/// stream skips them.
async fn acks_reach_only_the_dropping_identity(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let a = join(&mut bob, "r", "Bob").await.client_id;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut dave = server.client("dave", "r", "moderator").await;
    let mut dave_watch = subscribe(&mut dave, "r", "", None).await.unwrap();
    alice.drop_user(drop_request("r", &[&a], "")).await.unwrap();
    assert_eq!(
        kind(&next_event(&mut dave_watch).await),
        "user_disconnected"
    );
    // The next thing dave sees is his own later join, not alice's ack.
    join(&mut dave, "r", "Dave").await;
    assert_eq!(kind(&next_event(&mut dave_watch).await), "user_connected");
}

/// After a drop the client can no longer act as its id: subscribing without a cursor is
/// CLIENT_NOT_FOUND; leaving is CLIENT_NOT_FOUND; a second drop answers NOT_FOUND.
async fn a_dropped_client_id_is_gone(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let a = join(&mut bob, "r", "Bob").await.client_id;
    let mut alice = server.client("alice", "r", "moderator").await;
    alice.drop_user(drop_request("r", &[&a], "")).await.unwrap();
    let status = subscribe(&mut bob, "r", &a, None).await.unwrap_err();
    assert_error(&status, Code::NotFound, "CLIENT_NOT_FOUND");
    let status = bob
        .leave(pb::LeaveRequest {
            room_id: "r".into(),
            client_id: a.clone(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "CLIENT_NOT_FOUND");
    let again = alice
        .drop_user(drop_request("r", &[&a], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&again), [(a.as_str(), DropOutcome::NotFound)]);
}

/// The largest drop the contract allows, 1000 ids with a 256-byte reason, works end to end.
async fn a_thousand_ids_at_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut gateway = server.client("gw", "big", "service").await;
    let mut ids = Vec::new();
    for i in 0..1000 {
        let joined = gateway
            .join(pb::JoinRequest {
                room_id: "big".into(),
                name: format!("u{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(joined.client_id);
    }
    let mut request = drop_request("big", &[], &"r".repeat(256));
    request.client_ids = ids.clone();
    let response = gateway.drop_user(request).await.unwrap().into_inner();
    assert_eq!(response.results.len(), 1000);
    assert!(response
        .results
        .iter()
        .all(|r| r.outcome() == DropOutcome::Dropped));
    let list = gateway
        .list_participants(pb::ListParticipantsRequest {
            room_id: "big".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.participants.is_empty());
    assert_eq!(list.seq, 1000 + 2000 + 1);
}

acceptance! {
    moderator_drops_participant_who_is_told_why_and_moderator_is_acknowledged,
    participant_calling_drop_user_gets_5116_and_nothing_happens,
    drop_of_several_ids_answers_each_once_in_order_and_acks_after_all,
    retried_request_id_returns_first_answer_without_new_events,
    service_drops_with_moderator_reason_and_service_observers_see_everything,
    acks_reach_only_the_dropping_identity,
    a_dropped_client_id_is_gone,
    a_thousand_ids_at_once,
}
