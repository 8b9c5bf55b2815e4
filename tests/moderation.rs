//! Moderator controls end to end over gRPC: locking a room, ending the session, keeping dropped
//! users out with bans, and the fleet-wide room list. Each test runs on one memory node and on
//! two Redis nodes, with clients alternating between the nodes.

#[macro_use]
mod common;

use std::time::{Duration, SystemTime};

use common::*;
use roomctl::pb::{self, event::Payload, Role};
use tonic::{Code, Status};

fn lock(room: &str, request_id: &str) -> pb::LockRoomRequest {
    pb::LockRoomRequest {
        room_id: room.into(),
        request_id: request_id.into(),
    }
}

fn unlock(room: &str) -> pb::UnlockRoomRequest {
    pb::UnlockRoomRequest {
        room_id: room.into(),
        request_id: String::new(),
    }
}

fn destroy(room: &str, reason: &str, request_id: &str) -> pb::DestroySessionRequest {
    pb::DestroySessionRequest {
        room_id: room.into(),
        reason: reason.into(),
        request_id: request_id.into(),
    }
}

fn unban(room: &str, identity: &str) -> pb::UnbanRequest {
    pb::UnbanRequest {
        room_id: room.into(),
        identity: identity.into(),
    }
}

fn bans(room: &str) -> pb::ListBansRequest {
    pb::ListBansRequest {
        room_id: room.into(),
    }
}

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// A service's join on behalf of `identity` as `role`.
fn join_for(room: &str, identity: &str, role: Role) -> pb::JoinRequest {
    pb::JoinRequest {
        room_id: room.into(),
        name: identity.into(),
        role: role.into(),
        identity: identity.into(),
        request_id: String::new(),
    }
}

fn join_request(room: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        room_id: room.into(),
        name: "someone".into(),
        ..Default::default()
    }
}

/// Asserts one of the vendor's numbered errors: `code`, a message starting `number:`, and an
/// ErrorInfo with `reason` and `code = number`.
fn assert_numbered(status: &Status, code: Code, reason: &str, number: &str) {
    assert!(
        status.message().starts_with(&format!("{number}: ")),
        "{status:?}"
    );
    let meta = assert_error(status, code, reason);
    assert_eq!(meta["code"], number);
}

/// A lock refuses participants' joins on every node while those already in stay and moderators
/// still join; every subscriber hears of it; a second lock is 5117, a retry answers the same, an
/// unlock admits participants again and a second unlock is 5118.
async fn a_locked_room_admits_only_moderators(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let mut carol = server.client("carol", "r", "participant").await;
    let mut ops = server.client("ops", "*", "service").await;
    let bob_joined = join(&mut bob, "r", "Bob").await;
    let mut bob_events = subscribe(&mut bob, "r", &bob_joined.client_id, None)
        .await
        .unwrap();

    let locked = alice
        .lock_room(lock("r", "lock-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((locked.request_id.as_str(), locked.seq), ("lock-1", 2));
    let told = next_event(&mut bob_events).await;
    let Some(Payload::RoomLocked(event)) = &told.payload else {
        panic!("{told:?}")
    };
    assert_eq!((event.moderator.as_str(), told.seq), ("alice", 2));

    for client in [&mut carol, &mut bob] {
        let refused = client.join(join_request("r")).await.unwrap_err();
        assert_error(&refused, Code::FailedPrecondition, "ROOM_LOCKED");
    }
    let refused = ops
        .join(join_for("r", "dave", Role::Participant))
        .await
        .unwrap_err();
    assert_error(&refused, Code::FailedPrecondition, "ROOM_LOCKED");
    join(&mut alice, "r", "Alice").await;
    ops.join(join_for("r", "erin", Role::Moderator))
        .await
        .unwrap();
    let room = bob.list_participants(list("r")).await.unwrap().into_inner();
    assert!(room.locked);
    assert_eq!(
        room.participants.len(),
        3,
        "bob stays, two moderators joined"
    );

    let again = ops.lock_room(lock("r", "")).await.unwrap_err();
    assert_numbered(
        &again,
        Code::FailedPrecondition,
        "ROOM_ALREADY_LOCKED",
        "5117",
    );
    let retry = alice
        .lock_room(lock("r", "lock-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, locked, "a retry returns the first answer");

    let unlocked = ops.unlock_room(unlock("r")).await.unwrap().into_inner();
    assert!(!unlocked.request_id.is_empty(), "a request id is generated");
    for _moderator in ["alice", "erin"] {
        assert_eq!(kind(&next_event(&mut bob_events).await), "user_connected");
    }
    let told = next_event(&mut bob_events).await;
    let Some(Payload::RoomUnlocked(event)) = &told.payload else {
        panic!("{told:?}")
    };
    assert_eq!((event.moderator.as_str(), told.seq), ("ops", unlocked.seq));
    join(&mut carol, "r", "Carol").await;
    assert!(
        !carol
            .list_participants(list("r"))
            .await
            .unwrap()
            .into_inner()
            .locked
    );
    let again = alice.unlock_room(unlock("r")).await.unwrap_err();
    assert_numbered(&again, Code::FailedPrecondition, "ROOM_NOT_LOCKED", "5118");
}

/// Participants may not lock or unlock (5115), nor end the session, list or lift bans (5116);
/// nothing is logged.
async fn participants_get_the_vendor_errors(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut bob = server.client("bob", "r", "participant").await;
    let joined = join(&mut bob, "r", "Bob").await;
    let status = bob.lock_room(lock("r", "")).await.unwrap_err();
    assert!(
        status.message().starts_with("5115: Unauthorized Access"),
        "{status:?}"
    );
    assert_numbered(
        &status,
        Code::PermissionDenied,
        "UNAUTHORIZED_ACCESS",
        "5115",
    );
    let status = bob.unlock_room(unlock("r")).await.unwrap_err();
    assert_numbered(
        &status,
        Code::PermissionDenied,
        "UNAUTHORIZED_ACCESS",
        "5115",
    );
    let refusals = [
        (
            bob.destroy_session(destroy("r", "", "")).await.unwrap_err(),
            "may not end sessions",
        ),
        (
            bob.list_bans(bans("r")).await.unwrap_err(),
            "may not list or lift bans",
        ),
        (
            bob.unban(unban("r", "carol")).await.unwrap_err(),
            "may not list or lift bans",
        ),
    ];
    for (status, what) in refusals {
        assert!(
            status.message().starts_with("5116: Unauthorized Access"),
            "{status:?}"
        );
        // Each refusal names what was refused, not another command's words.
        assert!(status.message().contains(what), "{what}: {status:?}");
        assert_numbered(
            &status,
            Code::PermissionDenied,
            "UNAUTHORIZED_ACCESS",
            "5116",
        );
    }
    let room = bob.list_participants(list("r")).await.unwrap().into_inner();
    assert_eq!(room.seq, joined.seq, "nothing was logged");
    // A moderator of another room is no moderator here.
    let mut other = server.client("mallory", "elsewhere", "moderator").await;
    let status = other.lock_room(lock("r", "")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

/// Ending the session: every stream of the room (clients' and observers', on both nodes)
/// delivers `session_destroyed` and ends OK; the room is empty and unlocked with the same epoch;
/// late cursors replay up to it and end there; a retry answers the same; a later join continues
/// the log.
async fn a_destroyed_session_ends_every_stream(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let mut carol = server.client("carol", "r", "participant").await;
    let mut ops = server.client("ops", "*", "service").await;
    let b = join(&mut bob, "r", "Bob").await;
    let c = join(&mut carol, "r", "Carol").await;
    alice.lock_room(lock("r", "")).await.unwrap();
    let mut streams = vec![
        subscribe(&mut bob, "r", &b.client_id, None).await.unwrap(),
        subscribe(&mut carol, "r", &c.client_id, None)
            .await
            .unwrap(),
        subscribe(&mut alice, "r", "", None).await.unwrap(),
        subscribe(&mut ops, "r", "", None).await.unwrap(),
    ];

    let ended = alice
        .destroy_session(destroy("r", "time is up", "end-1"))
        .await
        .unwrap()
        .into_inner();
    let mut ids = ended.client_ids.clone();
    ids.sort();
    let mut expected = vec![b.client_id.clone(), c.client_id.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!((ended.request_id.as_str(), ended.seq), ("end-1", 4));
    for stream in &mut streams {
        let event = next_event(stream).await;
        let Some(Payload::SessionDestroyed(end)) = &event.payload else {
            panic!("{event:?}")
        };
        assert_eq!(
            (end.moderator.as_str(), end.message.as_str(), event.seq),
            ("alice", "time is up", 4)
        );
        assert!(stream_end(stream).await.is_ok(), "every stream ends OK");
    }

    let room = ops.list_participants(list("r")).await.unwrap().into_inner();
    assert!(room.participants.is_empty());
    assert!(!room.locked);
    assert_eq!((room.seq, room.epoch.as_str()), (4, b.epoch.as_str()));
}

/// A late client cursor, an old observer cursor, and a retry all end at `session_destroyed`;
/// the next join continues the log under the same epoch.
async fn after_a_destroyed_session_the_log_goes_on(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let b = join(&mut bob, "r", "Bob").await;
    let ended = alice
        .destroy_session(destroy("r", "", "end-1"))
        .await
        .unwrap()
        .into_inner();
    let retry = alice
        .destroy_session(destroy("r", "", "end-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, ended, "a retry returns the first answer");

    let mut late = subscribe(&mut bob, "r", &b.client_id, Some(b.seq))
        .await
        .unwrap();
    assert_eq!(kind(&next_event(&mut late).await), "session_destroyed");
    assert!(stream_end(&mut late).await.is_ok());
    let mut replay = subscribe(&mut alice, "r", "", Some(0)).await.unwrap();
    assert_eq!(kind(&next_event(&mut replay).await), "user_connected");
    assert_eq!(kind(&next_event(&mut replay).await), "session_destroyed");
    assert!(stream_end(&mut replay).await.is_ok());

    let again = join(&mut bob, "r", "Bob").await;
    assert_eq!(
        (again.seq, again.epoch.as_str()),
        (ended.seq + 1, b.epoch.as_str())
    );
    let mut fresh = subscribe(&mut alice, "r", "", Some(ended.seq))
        .await
        .unwrap();
    assert_eq!(kind(&next_event(&mut fresh).await), "user_connected");
}

/// A drop with `ban_seconds` keeps the identity out through every node, on its own or through a
/// service, before the lock is even looked at, and after everyone else has left; `ListBans`
/// shows it; `Unban` lifts it (a second one is BAN_NOT_FOUND).
async fn a_banned_user_stays_out_until_unbanned(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut bobs = [
        server.client("bob", "r", "participant").await,
        server.client("bob", "r", "participant").await,
    ];
    let mut ops = server.client("ops", "*", "service").await;
    let b = join(&mut bobs[0], "r", "Bob").await;
    let mut observer = subscribe(&mut ops, "r", "", None).await.unwrap();

    let mut request = drop_request("r", &[&b.client_id], "bye");
    request.ban_seconds = 3600;
    let before = SystemTime::now();
    alice.drop_user(request).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut observer).await);
    }
    let names: Vec<_> = seen.iter().map(kind).collect();
    assert_eq!(
        names,
        [
            "room_disconnected",
            "user_disconnected",
            "user_banned",
            "ack_drop_user"
        ]
    );
    let Some(Payload::UserBanned(banned)) = &seen[2].payload else {
        unreachable!()
    };
    assert_eq!(
        (banned.identity.as_str(), banned.moderator.as_str()),
        ("bob", "alice")
    );
    let until = SystemTime::try_from(banned.until.unwrap()).unwrap();
    let length = until.duration_since(before).unwrap();
    assert!(length >= Duration::from_secs(3600) && length < Duration::from_secs(3610));

    alice.lock_room(lock("r", "")).await.unwrap();
    let mut refusals = Vec::new();
    for bob in &mut bobs {
        refusals.push(bob.join(join_request("r")).await.unwrap_err());
    }
    refusals.push(
        ops.join(join_for("r", "bob", Role::Moderator))
            .await
            .unwrap_err(),
    );
    for status in refusals {
        let meta = assert_error(&status, Code::PermissionDenied, "BANNED");
        assert_eq!(meta["identity"], "bob");
        let said = humantime::parse_rfc3339(&meta["until"]).unwrap();
        let apart = said.duration_since(until).unwrap_or_else(|e| e.duration());
        assert!(apart < Duration::from_secs(1), "{meta:?}");
    }
    alice.unlock_room(unlock("r")).await.unwrap();

    // Nobody is left, and the ban keeps the room (that it outlives its empty-room TTL because of
    // the ban is the stores' contract, shown in tests/store_conformance.rs).
    let listed = alice.list_bans(bans("r")).await.unwrap().into_inner().bans;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].identity.as_str(), listed[0].moderator.as_str()),
        ("bob", "alice")
    );
    for bob in &mut bobs {
        let refused = bob.join(join_request("r")).await.unwrap_err();
        assert_error(&refused, Code::PermissionDenied, "BANNED");
    }

    let lifted = ops.unban(unban("r", "bob")).await.unwrap().into_inner();
    assert_eq!(kind(&next_event(&mut observer).await), "room_locked");
    assert_eq!(kind(&next_event(&mut observer).await), "room_unlocked");
    let event = next_event(&mut observer).await;
    assert_eq!(event.seq, lifted.seq);
    let Some(Payload::UserUnbanned(unbanned)) = &event.payload else {
        panic!("{event:?}")
    };
    assert_eq!(
        (unbanned.identity.as_str(), unbanned.moderator.as_str()),
        ("bob", "ops")
    );
    assert!(alice
        .list_bans(bans("r"))
        .await
        .unwrap()
        .into_inner()
        .bans
        .is_empty());
    let gone = alice.unban(unban("r", "bob")).await.unwrap_err();
    assert_error(&gone, Code::NotFound, "BAN_NOT_FOUND");
    for bob in &mut bobs {
        join(bob, "r", "Bob").await;
    }
}

/// A ban ends on its own: once it has, `ListBans` no longer shows it and the identity joins. On
/// memory the ban lasts ten minutes (within the clients' tokens) and passes at once on paused time;
/// with Redis it is a second of real time.
async fn a_ban_ends_on_its_own(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.client("alice", "r", "moderator").await;
    let mut bob = server.client("bob", "r", "participant").await;
    let b = join(&mut bob, "r", "Bob").await;
    let mut request = drop_request("r", &[&b.client_id], "");
    let length = match backend {
        Backend::Memory => 600,
        _ => 1,
    };
    request.ban_seconds = length;
    alice.drop_user(request).await.unwrap();
    let refused = bob.join(join_request("r")).await.unwrap_err();
    assert_error(&refused, Code::PermissionDenied, "BANNED");
    tokio::time::sleep(Duration::from_secs(length.into())).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !alice
        .list_bans(bans("r"))
        .await
        .unwrap()
        .into_inner()
        .bans
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ban never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    join(&mut bob, "r", "Bob").await;

    let mut request = drop_request("r", &["anyone"], "");
    request.ban_seconds = 2_592_001;
    let status = alice.drop_user(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violations(&status), ["ban_seconds"]);
}

/// `ListRooms` is for services of every room: it pages through every room once, with its
/// summary, following opaque page tokens (from one node to the other); other tokens are
/// FORBIDDEN and bad pages, forged tokens included, INVALID_ARGUMENT.
async fn services_list_every_room_in_pages(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ops = server.client("ops", "*", "service").await;
    for i in 0..5 {
        ops.join(join_for(&format!("room-{i}"), "u", Role::Participant))
            .await
            .unwrap();
    }
    ops.join(join_for("room-2", "v", Role::Participant))
        .await
        .unwrap();
    ops.lock_room(lock("room-2", "")).await.unwrap();

    let mut rooms = Vec::new();
    let mut token = String::new();
    loop {
        let page = ops
            .list_rooms(pb::ListRoomsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.rooms.len() <= 2);
        if let Some(last) = page.rooms.last() {
            assert!(
                !page.next_page_token.contains(&last.room_id),
                "opaque: {}",
                page.next_page_token
            );
        }
        rooms.extend(page.rooms);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let ids: Vec<_> = rooms.iter().map(|r| r.room_id.as_str()).collect();
    assert_eq!(ids, ["room-0", "room-1", "room-2", "room-3", "room-4"]);
    let two = &rooms[2];
    assert_eq!((two.participants, two.locked, two.seq), (2, true, 3));
    assert!(!two.epoch.is_empty());
    assert!(!rooms[0].locked);

    let everything = ops
        .list_rooms(pb::ListRoomsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(everything.rooms.len(), 5);
    assert!(everything.next_page_token.is_empty());

    for bad in [
        pb::ListRoomsRequest {
            page_size: 1001,
            page_token: String::new(),
        },
        pb::ListRoomsRequest {
            page_size: 0,
            page_token: "not a token".into(),
        },
        // The old, readable form, forged: tamper-evident now.
        pb::ListRoomsRequest {
            page_size: 0,
            page_token: "after:room-2".into(),
        },
    ] {
        let status = ops.list_rooms(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    for (identity, room, role) in [
        ("gw", "room-1", "service"),
        ("alice", "room-1", "moderator"),
        ("bob", "room-1", "participant"),
    ] {
        let mut client = server.client(identity, room, role).await;
        let status = client
            .list_rooms(pb::ListRoomsRequest::default())
            .await
            .unwrap_err();
        assert_error(&status, Code::PermissionDenied, "FORBIDDEN");
    }
}

acceptance! {
    a_locked_room_admits_only_moderators,
    participants_get_the_vendor_errors,
    a_destroyed_session_ends_every_stream,
    after_a_destroyed_session_the_log_goes_on,
    a_banned_user_stays_out_until_unbanned,
    services_list_every_room_in_pages,
    ; paused: a_ban_ends_on_its_own,
}
