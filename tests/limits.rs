//! Overload protection over the wire: stream caps per connection and per node, full rooms, the
//! per-identity moderator rate, deadlines (the server's and the client's `grpc-timeout`), load
//! shedding, streams that end when their token expires, and connections that never send the
//! HTTP/2 preface. Each limit is set low so the test reaches it; each refusal names its limit.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::redis_server::redis_available;
use common::*;
use roomctl::auth::{mint, Claims};
use roomctl::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tonic_types::StatusExt;

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// A connection holds at most `--max-streams-per-connection` Events streams and the node at
/// most `--max-streams`; past either the call is RESOURCE_EXHAUSTED naming the limit, and a
/// closed stream frees its place.
#[tokio::test]
async fn stream_caps_hold_per_connection_and_per_node() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.limits.max_streams_per_connection = 3;
        c.limits.max_streams = 5;
    })
    .await;
    let mut first = server.client("ops", "r", "service").await;
    join(&mut first, "r", "x").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(subscribe(&mut first, "r", "", None).await.unwrap());
    }
    let status = subscribe(&mut first, "r", "", None).await.unwrap_err();
    let meta = assert_error(&status, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    assert_eq!(
        (meta["limit"].as_str(), meta["max"].as_str()),
        ("max_streams_per_connection", "3")
    );
    // The connection still takes unary calls.
    first.list_participants(list("r")).await.unwrap();

    let mut second = server.client("ops", "r", "service").await;
    for _ in 0..2 {
        open.push(subscribe(&mut second, "r", "", None).await.unwrap());
    }
    let status = subscribe(&mut second, "r", "", None).await.unwrap_err();
    let meta = assert_error(&status, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    assert_eq!(
        (meta["limit"].as_str(), meta["max"].as_str()),
        ("max_streams", "5")
    );
    assert_eq!(server.subscriptions(), 5);
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.subscriptions() != 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream was never released"
        );
        tokio::task::yield_now().await;
    }
    subscribe(&mut second, "r", "", None).await.unwrap();
}

/// A room at `--max-room-members` refuses the next join with RESOURCE_EXHAUSTED / ROOM_FULL;
/// a retry of a join that got in still answers.
#[tokio::test]
async fn a_full_room_refuses_joins() {
    let server = TestServer::start_with(Backend::Memory, |c| c.rooms.limits.max_members = 2).await;
    let mut ops = server.client("ops", "r", "service").await;
    let keyed = pb::JoinRequest {
        room_id: "r".into(),
        request_id: "first".into(),
        ..Default::default()
    };
    let first = ops.join(keyed.clone()).await.unwrap().into_inner();
    join(&mut ops, "r", "b").await;
    let status = ops
        .join(pb::JoinRequest {
            room_id: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let meta = assert_error(&status, Code::ResourceExhausted, "ROOM_FULL");
    assert_eq!(
        (meta["limit"].as_str(), meta["max"].as_str()),
        ("max_room_members", "2")
    );
    assert_eq!(ops.join(keyed).await.unwrap().into_inner(), first);
}

/// Moderator commands (DropUser, LockRoom, UnlockRoom, ... sharing one allowance) are limited
/// per identity to `--moderator-rate` (after a burst of `--moderator-burst`): the next is
/// RESOURCE_EXHAUSTED / RATE_LIMITED with a RetryInfo, and other identities are untouched. That
/// it goes through after the delay is the limiter's own test, on paused time (src/limits.rs).
#[tokio::test]
async fn moderator_commands_are_rate_limited_per_identity() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.limits.moderator_rate = 5;
        c.limits.moderator_burst = 2;
    })
    .await;
    let mut alice = server.client("alice", "r", "moderator").await;
    join(&mut alice, "r", "Alice").await;
    alice
        .drop_user(drop_request("r", &["nobody"], ""))
        .await
        .unwrap();
    alice
        .lock_room(pb::LockRoomRequest {
            room_id: "r".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let status = alice
        .unlock_room(pb::UnlockRoomRequest {
            room_id: "r".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    let meta = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(
        (meta["limit"].as_str(), meta["max"].as_str()),
        ("moderator_rate", "5")
    );
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo says when to retry");
    assert!(retry <= Duration::from_millis(200), "{retry:?}");
    let mut carol = server.client("carol", "r", "moderator").await;
    carol
        .drop_user(drop_request("r", &["nobody"], ""))
        .await
        .unwrap();
}

/// A service token is not throttled as if it were a person: one gateway acting for every room
/// sends 300 DropUser calls in a row, past the moderator rate and burst, and every one is
/// answered. With `--service-rate` set, services have a limit of their own, named in the
/// refusal, which leaves moderators' allowances alone.
#[tokio::test]
async fn services_have_their_own_rate() {
    let server = TestServer::start(Backend::Memory).await;
    let mut gateway = server.client("gateway", "*", "service").await;
    join(&mut gateway, "r", "x").await;
    for _ in 0..300 {
        gateway
            .drop_user(drop_request("r", &["nobody"], ""))
            .await
            .unwrap();
    }

    let server = TestServer::start_with(Backend::Memory, |c| {
        c.limits.service_rate = Some(5);
        c.limits.service_burst = Some(2);
        c.limits.moderator_burst = 2;
    })
    .await;
    let mut gateway = server.client("gateway", "*", "service").await;
    join(&mut gateway, "r", "x").await;
    for _ in 0..2 {
        gateway
            .drop_user(drop_request("r", &["nobody"], ""))
            .await
            .unwrap();
    }
    let status = gateway
        .drop_user(drop_request("r", &["nobody"], ""))
        .await
        .unwrap_err();
    let meta = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(
        (meta["limit"].as_str(), meta["max"].as_str()),
        ("service_rate", "5")
    );
    assert!(status.message().contains("--service-rate"), "{status:?}");
    let mut alice = server.client("alice", "r", "moderator").await;
    for _ in 0..2 {
        alice
            .drop_user(drop_request("r", &["nobody"], ""))
            .await
            .unwrap();
    }
}

/// Every call has a deadline: `--request-timeout`, or the client's `grpc-timeout` when shorter,
/// answered DEADLINE_EXCEEDED with the deadline that applied (here while Redis is frozen), and
/// past `--max-concurrent-calls` new calls fail at once with UNAVAILABLE / OVERLOADED while
/// health still answers.
#[tokio::test]
async fn deadlines_hold_and_overload_is_shed() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start_with(Backend::RedisTwoNodes, |c| {
        c.limits.request_timeout = Duration::from_millis(1500);
        c.limits.max_concurrent_calls = 2;
    })
    .await;
    let node = &server.nodes[0];
    let mut ops = node.client("ops", "r", "service").await;
    join(&mut ops, "r", "x").await;
    let redis = server.redis.as_ref().unwrap();
    redis.pause();

    // A bare HTTP/2 client, so only the server times the call (a tonic client would stop
    // waiting at its own grpc-timeout).
    let mut bare = bare::connect(node.addr).await;
    let bearer = format!("Bearer {}", token("ops", "r", "service"));
    let path = "/roomcontrol.v1.RoomControl/ListParticipants";
    let hurried = bare::request(
        path,
        &[("authorization", &bearer), ("grpc-timeout", "300m")],
        &list("r"),
    );
    let patient = bare::request(path, &[("authorization", &bearer)], &list("r"));
    let mut other = bare.clone();
    let (short, long) = tokio::join!(
        bare::call(&mut other, hurried),
        bare::call(&mut bare, patient),
    );
    let meta = assert_error(&short, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert_eq!(meta["timeout_ms"], "300");
    let meta = assert_error(&long, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert_eq!(meta["timeout_ms"], "1500");

    // Four calls at once on the frozen Redis: two take the places and hang until their
    // deadline, the other two are shed at once; health answers meanwhile.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut ops = ops.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let status = ops.list_participants(list("r")).await.unwrap_err();
                (status, started.elapsed())
            })
        })
        .collect();
    let mut health = HealthClient::new(channel(node.addr).await);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers under load");
    let mut shed = 0;
    for call in calls {
        let (status, took) = call.await.unwrap();
        if status.code() == Code::Unavailable {
            let meta = assert_error(&status, Code::Unavailable, "OVERLOADED");
            assert_eq!(
                (meta["limit"].as_str(), meta["max"].as_str()),
                ("max_concurrent_calls", "2")
            );
            assert!(
                took < Duration::from_millis(1500),
                "shed without waiting: {took:?}"
            );
            shed += 1;
        } else {
            assert_error(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
        }
    }
    assert_eq!(shed, 2);
    redis.resume();
    ops.list_participants(list("r")).await.unwrap();
}

/// A stream ends when its token expires: UNAUTHENTICATED with the position it reached, from
/// which a fresh token resumes without a gap. On tokio's paused time, which the node's clock
/// follows: the hour passes at once.
#[tokio::test(start_paused = true)]
async fn a_stream_ends_when_its_token_expires() {
    // Presence off: the hour would time the joined client out, a change of its own.
    let server = TestServer::start_with(Backend::Memory, |c| c.rooms.presence_timeout = None).await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let claims = Claims {
        exp: now.as_secs() + 3600,
        ..Claims::new("ops", "r", "service", Duration::ZERO)
    };
    let mut short_lived = server.client_with_token(&mint(SECRET, &claims)).await;
    let joined = join(&mut short_lived, "r", "x").await;
    let mut stream = subscribe(&mut short_lived, "r", "", Some(0)).await.unwrap();
    assert_eq!(next_event(&mut stream).await.seq, joined.seq);
    tokio::time::advance(Duration::from_secs(3600)).await;
    let status = stream_end(&mut stream).await.unwrap_err();
    let meta = assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(
        (meta["last_seq"].as_str(), meta["epoch"].as_str()),
        ("1", joined.epoch.as_str())
    );
    // Valid on the node's clock, an hour ahead of the system's.
    let fresh = Claims::new("ops", "r", "service", Duration::from_secs(3 * 3600));
    let mut renewed = server.client_with_token(&mint(SECRET, &fresh)).await;
    let later = join(&mut renewed, "r", "y").await;
    let mut resumed = subscribe(&mut renewed, "r", "", Some(1)).await.unwrap();
    assert_eq!(next_event(&mut resumed).await.seq, later.seq);
}

/// A connection that never sends the HTTP/2 preface is closed after `--handshake-timeout`; one
/// that does is served.
#[tokio::test]
async fn silent_connections_are_closed() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.limits.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, silent.read(&mut buf))
        .await
        .expect("the server closes a silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let mut speaking = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    speaking
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let read = tokio::time::timeout(PATIENCE, speaking.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        read >= 9 && buf[3] == 4,
        "the server answers with its SETTINGS frame"
    );
}
