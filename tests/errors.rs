//! Every row of docs/api.md's error table over the wire, with its ErrorInfo, and the field limits
//! at their edges.

#[macro_use]
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomctl::pb;
use tonic::Code;

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

fn raw_token(claims: serde_json::Value, algorithm: Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// No token, a malformed one, a bad signature, another algorithm, an expired token, a missing
/// claim and `room: "*"` on a non-service token are all UNAUTHENTICATED.
async fn bad_tokens_are_unauthenticated(backend: Backend) {
    let server = TestServer::start(backend).await;
    let exp = now() + 3600;
    let good = serde_json::json!({"sub": "a", "room": "r", "role": "moderator", "exp": exp});
    let tokens = [
        "not-a-jwt".to_owned(),
        raw_token(good.clone(), Algorithm::HS256, b"wrong secret"),
        raw_token(good.clone(), Algorithm::HS512, SECRET),
        raw_token(
            serde_json::json!({"sub": "a", "room": "r", "role": "moderator", "exp": now() - 30}),
            Algorithm::HS256,
            SECRET,
        ),
        raw_token(
            serde_json::json!({"sub": "a", "room": "r", "exp": exp}),
            Algorithm::HS256,
            SECRET,
        ),
        raw_token(
            serde_json::json!({"sub": "a", "room": "r", "role": "moderator"}),
            Algorithm::HS256,
            SECRET,
        ),
        raw_token(
            serde_json::json!({"sub": "a", "room": "*", "role": "moderator", "exp": exp}),
            Algorithm::HS256,
            SECRET,
        ),
    ];
    for token in tokens {
        let mut client = server.client_with_token(&token).await;
        let status = client.list_participants(list("r")).await.unwrap_err();
        assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    }
    // No authorization header at all.
    let mut anonymous = pb::room_control_client::RoomControlClient::new(server.channel().await);
    let status = anonymous.list_participants(list("r")).await.unwrap_err();
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    // The good token works, so the failures above are the tokens' fault.
    let mut client = server
        .client_with_token(&raw_token(good, Algorithm::HS256, SECRET))
        .await;
    join(&mut client, "r", "a").await;
}

/// FORBIDDEN: a token for another room; acting as someone else's client; a participant
/// observing; a non-service token choosing another role.
async fn forbidden_actions_are_permission_denied(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let bobs = join(&mut bob, "r", "Bob").await.client_id;
    let mut eve = server.client("eve", "r", "participant").await;
    join(&mut eve, "r", "Eve").await;
    let mut other_room = server.client("mallory", "elsewhere", "moderator").await;

    let forbidden =
        |status: tonic::Status| assert_error(&status, Code::PermissionDenied, "FORBIDDEN");
    forbidden(other_room.list_participants(list("r")).await.unwrap_err());
    forbidden(
        other_room
            .drop_user(drop_request("r", &[&bobs], ""))
            .await
            .unwrap_err(),
    );
    forbidden(subscribe(&mut other_room, "r", "", None).await.unwrap_err());
    forbidden(subscribe(&mut eve, "r", &bobs, None).await.unwrap_err());
    forbidden(
        eve.leave(pb::LeaveRequest {
            room_id: "r".into(),
            client_id: bobs.clone(),
        })
        .await
        .unwrap_err(),
    );
    forbidden(subscribe(&mut bob, "r", "", None).await.unwrap_err());
    let mut alice = server.client("alice", "r", "moderator").await;
    forbidden(subscribe(&mut alice, "r", &bobs, None).await.unwrap_err());
    forbidden(
        bob.join(pb::JoinRequest {
            room_id: "r".into(),
            role: pb::Role::Moderator as i32,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    forbidden(
        bob.join(pb::JoinRequest {
            room_id: "r".into(),
            identity: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    // A refused join creates no room.
    let mut carol = server.client("carol", "fresh", "participant").await;
    forbidden(
        carol
            .join(pb::JoinRequest {
                room_id: "fresh".into(),
                role: pb::Role::Moderator as i32,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    let status = carol.list_participants(list("fresh")).await.unwrap_err();
    assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");
}

/// What each role may do as the contract says: moderators make any client leave and repeat
/// their role; services choose roles and identities and subscribe as any client.
async fn allowed_actions_by_role(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let bobs = join(&mut bob, "r", "Bob").await.client_id;
    let mut gateway = server.client("gateway", "*", "service").await;
    let as_ann = gateway
        .join(pb::JoinRequest {
            room_id: "r".into(),
            name: "Ann".into(),
            role: pb::Role::Moderator as i32,
            identity: "ann".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ann = as_ann.participant.unwrap();
    assert_eq!(
        (ann.identity.as_str(), ann.role()),
        ("ann", pb::Role::Moderator)
    );
    let mut watch = subscribe(&mut gateway, "r", &bobs, None).await.unwrap();
    let mut alice = server.client("alice", "r", "moderator").await;
    let joined = alice
        .join(pb::JoinRequest {
            room_id: "r".into(),
            role: pb::Role::Moderator as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.participant.unwrap().role(), pb::Role::Moderator);
    alice
        .leave(pb::LeaveRequest {
            room_id: "r".into(),
            client_id: bobs.clone(),
        })
        .await
        .unwrap();
    assert_eq!(kind(&next_event(&mut watch).await), "user_connected");
    assert_eq!(kind(&next_event(&mut watch).await), "user_disconnected");
    assert!(stream_end(&mut watch).await.is_ok());
}

/// INVALID_ARGUMENT with BadRequest field violations for every field rule, and the limits are
/// inclusive: 1000 ids, a 256-byte reason and 128-character ids pass; one more fails.
async fn invalid_arguments_name_their_fields_and_limits_hold_at_their_edges(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "*", "service").await;
    join(&mut ops, "r", "x").await;
    let invalid = |status: tonic::Status, fields: &[&str]| {
        assert_error(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(violations(&status), fields, "{status:?}");
    };
    for bad_room in ["", "has space", "slash/y", &"r".repeat(129)] {
        invalid(
            ops.list_participants(list(bad_room)).await.unwrap_err(),
            &["room_id"],
        );
    }
    join(&mut ops, &"r".repeat(128), "longest room id").await;

    let ids = |n: usize| -> Vec<String> { (0..n).map(|i| format!("c{i}")).collect() };
    let mut request = drop_request("r", &[], &"x".repeat(256));
    request.client_ids = ids(1000);
    request.request_id = "q".repeat(128);
    ops.drop_user(request.clone()).await.unwrap();

    request.request_id = String::new();
    request.client_ids = ids(1001);
    invalid(
        ops.drop_user(request.clone()).await.unwrap_err(),
        &["client_ids"],
    );
    request.client_ids = Vec::new();
    invalid(
        ops.drop_user(request.clone()).await.unwrap_err(),
        &["client_ids"],
    );
    request.client_ids = vec!["c".repeat(128), "c".repeat(129), String::new()];
    invalid(
        ops.drop_user(request.clone()).await.unwrap_err(),
        &["client_ids[1]", "client_ids[2]"],
    );
    request.client_ids = ids(1);
    request.reason = "x".repeat(257);
    invalid(
        ops.drop_user(request.clone()).await.unwrap_err(),
        &["reason"],
    );
    request.reason = String::new();
    request.request_id = "q".repeat(129);
    invalid(ops.drop_user(request).await.unwrap_err(), &["request_id"]);

    let join_with = |name: String| pb::JoinRequest {
        room_id: "r".into(),
        name,
        ..Default::default()
    };
    ops.join(join_with("n".repeat(128))).await.unwrap();
    invalid(
        ops.join(join_with("n".repeat(129))).await.unwrap_err(),
        &["name"],
    );
    let leave = |client_id: String| pb::LeaveRequest {
        room_id: "r".into(),
        client_id,
    };
    invalid(
        ops.leave(leave(String::new())).await.unwrap_err(),
        &["client_id"],
    );
    invalid(
        ops.leave(leave("c".repeat(129))).await.unwrap_err(),
        &["client_id"],
    );
    invalid(
        subscribe(&mut ops, "r", &"c".repeat(129), None)
            .await
            .unwrap_err(),
        &["client_id"],
    );
}

/// A request over `--max-message-bytes` is RESOURCE_EXHAUSTED with MESSAGE_TOO_LARGE (tonic's own
/// OUT_OF_RANGE is mapped), and the connection keeps serving.
async fn oversized_requests_are_resource_exhausted(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.max_message_bytes = 64 * 1024).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    join(&mut alice, "r", "Alice").await;
    let mut request = drop_request("r", &[], "");
    request.client_ids = (0..1000).map(|i| format!("{i:0>100}")).collect();
    let status = alice.drop_user(request).await.unwrap_err();
    let meta = assert_error(&status, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert_eq!(meta["limit_bytes"], "65536");
    alice.list_participants(list("r")).await.unwrap();
}

/// NOT_FOUND: a room that does not exist (ROOM_NOT_FOUND) for every RPC but Join; a client not
/// in the room (CLIENT_NOT_FOUND) for Leave and Events.
async fn missing_rooms_and_clients_are_not_found(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let room_not_found =
        |status: tonic::Status| assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");
    room_not_found(alice.list_participants(list("r")).await.unwrap_err());
    room_not_found(
        alice
            .drop_user(drop_request("r", &["x"], ""))
            .await
            .unwrap_err(),
    );
    room_not_found(subscribe(&mut alice, "r", "", None).await.unwrap_err());
    room_not_found(
        alice
            .leave(pb::LeaveRequest {
                room_id: "r".into(),
                client_id: "x".into(),
            })
            .await
            .unwrap_err(),
    );
    join(&mut alice, "r", "Alice").await;
    let client_not_found = |status: tonic::Status| {
        let meta = assert_error(&status, Code::NotFound, "CLIENT_NOT_FOUND");
        assert_eq!(meta["client_id"], "ghost");
    };
    client_not_found(
        alice
            .leave(pb::LeaveRequest {
                room_id: "r".into(),
                client_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
    );
    client_not_found(subscribe(&mut alice, "r", "ghost", None).await.unwrap_err());
    // The cursor is checked before the client: a bad cursor wins over an unknown client.
    let status = subscribe(&mut alice, "r", "ghost", Some(99))
        .await
        .unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
}

/// Expired tokens are refused even when they were valid when the connection opened: every
/// call is verified. A token's expiry is the node's own timing, whatever its store: one memory
/// node, on tokio's paused time, which its clock follows.
#[tokio::test(start_paused = true)]
async fn every_call_is_verified() {
    let server = TestServer::start(Backend::Memory).await;
    let exp = now() + 3600;
    let soon = raw_token(
        serde_json::json!({"sub": "a", "room": "r", "role": "moderator", "exp": exp}),
        Algorithm::HS256,
        SECRET,
    );
    let mut client = server.client_with_token(&soon).await;
    join(&mut client, "r", "a").await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    let status = client.list_participants(list("r")).await.unwrap_err();
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
}

/// A body that is not valid protobuf (invalid UTF-8 in a string, a truncated field, a wrong wire
/// type) is the caller's fault: INVALID_ARGUMENT / MALFORMED_REQUEST on unary calls and on
/// `Events` alike, not INTERNAL; with a bad token it is UNAUTHENTICATED first.
async fn malformed_bodies_are_invalid_arguments(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ops = token("ops", "*", "service");
    let bodies: [Vec<u8>; 3] = [
        vec![0x0a, 0x02, 0xff, 0xfe], // room_id: two bytes that are not UTF-8
        vec![0x0a, 0x05, b'r'],       // room_id: says 5 bytes, carries 1
        vec![0x08, 0x01],             // field 1 as a varint; room_id is a string
    ];
    for method in [
        "/roomcontrol.v1.RoomControl/Join",
        "/roomcontrol.v1.RoomControl/DropUser",
        "/roomcontrol.v1.RoomControl/Events",
    ] {
        for body in &bodies {
            let status = raw::call(server.channel().await, method, &ops, body.clone())
                .await
                .unwrap_err();
            assert_error(&status, Code::InvalidArgument, "MALFORMED_REQUEST");
            let status = raw::call(server.channel().await, method, "forged", body.clone())
                .await
                .unwrap_err();
            assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
        }
    }
}

/// A request id reused by a caller for a different request is refused, as payment APIs refuse an
/// idempotency key reused with another body: a service's join for `y` reusing the id of its join
/// for `x` gets INVALID_ARGUMENT / REQUEST_ID_REUSED naming `request_id`, not `x`'s answer; the
/// same for a drop of other clients, and for a lock under the drop's id (ids are one space per
/// caller); the very same request again still gets its first answer.
async fn reused_request_ids_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "*", "service").await;
    let join_for = |identity: &str| pb::JoinRequest {
        room_id: "r".into(),
        name: identity.into(),
        identity: identity.into(),
        request_id: "k".into(),
        ..Default::default()
    };
    let x = ops.join(join_for("x")).await.unwrap().into_inner();
    let again = ops.join(join_for("x")).await.unwrap().into_inner();
    assert_eq!(again, x);
    let status = ops.join(join_for("y")).await.unwrap_err();
    let meta = assert_error(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
    assert_eq!(meta["request_id"], "k");
    assert_eq!(violations(&status), ["request_id"]);
    let drop = |ids: &[&str]| pb::DropUserRequest {
        request_id: "d".into(),
        ..drop_request("r", ids, "")
    };
    ops.drop_user(drop(&["nobody"])).await.unwrap();
    let status = ops.drop_user(drop(&[&x.client_id])).await.unwrap_err();
    assert_error(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
    let participants = ops
        .list_participants(pb::ListParticipantsRequest {
            room_id: "r".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(participants.participants.len(), 1, "nobody was dropped");
    // Ids are one space per caller, whatever the command: the drop's id for a lock is refused.
    let status = ops
        .lock_room(pb::LockRoomRequest {
            room_id: "r".into(),
            request_id: "d".into(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "REQUEST_ID_REUSED");
}

acceptance! {
    reused_request_ids_are_refused,
    bad_tokens_are_unauthenticated,
    forbidden_actions_are_permission_denied,
    allowed_actions_by_role,
    invalid_arguments_name_their_fields_and_limits_hold_at_their_edges,
    oversized_requests_are_resource_exhausted,
    missing_rooms_and_clients_are_not_found,
    malformed_bodies_are_invalid_arguments,
}
