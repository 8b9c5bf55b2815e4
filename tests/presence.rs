//! Presence over the wire: a client stays while an `Events` stream as that client is open on
//! some node, and is removed with `DISCONNECT_REASON_TIMED_OUT` when it has had none for the
//! presence timeout, on two Redis nodes (one Redis, or a cluster), including when the node
//! holding its stream is killed. Tests wait for the events they expect; they sleep only to let
//! a timeout pass and show that nothing happened, in real time: the leases live in a real Redis,
//! which cannot answer on tokio's paused time. The memory store's presence is shown at the
//! store's level on paused time (tests/store_conformance.rs, `memory_presence`), and the memory
//! store serves the same `Events` path as Redis does.

#[macro_use]
mod common;

use std::time::Duration;

use common::redis_server::{redis_available, RedisServer};
use common::*;
use roomctl::pb::{self, event::Payload, DisconnectReason};
use roomctl::server::ServerConfig;

/// The presence timeout of these tests: short, so they run quickly.
const TIMEOUT: Duration = Duration::from_secs(1);

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// Joins `room` on behalf of `identity` (a gateway's join).
async fn join_as(client: &mut Client, room: &str, identity: &str) -> pb::JoinResponse {
    client
        .join(pb::JoinRequest {
            room_id: room.into(),
            identity: identity.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The client ids in `room` with their `connected` flag.
async fn connected(client: &mut Client, room: &str) -> Vec<(String, bool)> {
    let snapshot = client.list_participants(list(room)).await.unwrap();
    snapshot
        .into_inner()
        .participants
        .into_iter()
        .map(|p| (p.client_id, p.connected))
        .collect()
}

/// Waits until `client_id` is in `room` with `connected` as `expected`.
async fn wait_connected(client: &mut Client, room: &str, client_id: &str, expected: bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = connected(client, room).await;
        if now.iter().any(|(id, c)| id == client_id && *c == expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{client_id} never became connected={expected}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts `event` is the time-out of `client_id`.
fn assert_timed_out(event: &pb::Event, client_id: &str) {
    match &event.payload {
        Some(Payload::UserDisconnected(gone)) => {
            assert_eq!(gone.client_id, client_id);
            assert_eq!(gone.reason(), DisconnectReason::TimedOut);
        }
        other => panic!("expected {client_id} to time out, got {other:?}"),
    }
}

fn with_presence(config: &mut ServerConfig) {
    config.rooms.presence_timeout = Some(TIMEOUT);
}

/// A client that never opens a stream is removed with TIMED_OUT once the timeout has passed;
/// observers see it, it is gone from the room, and its own late cursor replays up to that event
/// and ends OK, as after a leave.
async fn a_client_that_never_subscribes_times_out(backend: Backend) {
    let server = TestServer::start_with(backend, with_presence).await;
    let mut gateway = server.client("gw", "*", "service").await;
    let ghost = join_as(&mut gateway, "r", "ghost").await;
    let mut observer = subscribe(&mut gateway, "r", "", Some(ghost.seq))
        .await
        .unwrap();
    assert_timed_out(&next_event(&mut observer).await, &ghost.client_id);
    assert!(connected(&mut gateway, "r").await.is_empty());
    let mut late = subscribe(&mut gateway, "r", &ghost.client_id, Some(ghost.seq))
        .await
        .unwrap();
    assert_timed_out(&next_event(&mut late).await, &ghost.client_id);
    stream_end(&mut late).await.unwrap();
}

/// A room with one client, "ann", streaming through a gateway, and an observer of the room.
struct Streaming {
    _server: TestServer,
    gateway: Client,
    me: pb::JoinResponse,
    observer: tonic::Streaming<pb::Event>,
    stream: tonic::Streaming<pb::Event>,
}

impl Streaming {
    /// Starts it on `backend` and waits until ann shows as connected.
    async fn start(backend: Backend) -> Self {
        let server = TestServer::start_with(backend, with_presence).await;
        let mut gateway = server.client("gw", "*", "service").await;
        let me = join_as(&mut gateway, "r", "ann").await;
        let observer = subscribe(&mut gateway, "r", "", Some(me.seq))
            .await
            .unwrap();
        let stream = subscribe(&mut gateway, "r", &me.client_id, Some(me.seq))
            .await
            .unwrap();
        wait_connected(&mut gateway, "r", &me.client_id, true).await;
        Self {
            _server: server,
            gateway,
            me,
            observer,
            stream,
        }
    }
}

/// A client whose stream is cancelled shows as not connected; if it subscribes again within
/// the timeout it stays, shows as connected, and nothing is logged, even after the timeout has
/// passed several times.
async fn a_client_that_comes_back_in_time_stays(backend: Backend) {
    let mut s = Streaming::start(backend).await;
    drop(s.stream);
    let (gateway, me, observer) = (&mut s.gateway, &s.me, &mut s.observer);
    wait_connected(gateway, "r", &me.client_id, false).await;
    let _again = subscribe(gateway, "r", &me.client_id, Some(me.seq))
        .await
        .unwrap();
    wait_connected(gateway, "r", &me.client_id, true).await;
    // Nothing may happen while it streams: let the timeout pass three times over.
    tokio::time::sleep(TIMEOUT * 3).await;
    let marker = join_as(gateway, "r", "marker").await;
    let next = next_event(observer).await;
    assert_eq!(next.seq, marker.seq, "no time-out was logged: {next:?}");
    let now = connected(gateway, "r").await;
    assert!(now.contains(&(me.client_id.clone(), true)), "{now:?}");
}

/// A client whose stream is cancelled and that does not come back is removed once the timeout
/// has passed, and observers see user_disconnected{TIMED_OUT}.
async fn a_client_that_does_not_come_back_times_out(backend: Backend) {
    let mut s = Streaming::start(backend).await;
    drop(s.stream);
    let (gateway, me, observer) = (&mut s.gateway, &s.me, &mut s.observer);
    assert_timed_out(&next_event(observer).await, &me.client_id);
    assert!(connected(gateway, "r").await.is_empty());
}

redis_acceptance! {
    a_client_that_never_subscribes_times_out,
    a_client_that_comes_back_in_time_stays,
    a_client_that_does_not_come_back_times_out,
}

/// A `roomctl serve` node on `redis` with the test timeout, as a separate process to kill.
async fn node_process(redis: &RedisServer) -> (tokio::process::Child, std::net::SocketAddr) {
    let timeout = format!("{}ms", TIMEOUT.as_millis());
    let url = redis.url();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--store",
        &url,
        "--presence-timeout",
        &timeout,
    ];
    node_process::start_quiet(node_process::serve(&args)).await
}

/// Node A holds the streams of two clients and is killed (SIGKILL): its leases stop being
/// renewed. One client comes back through node B within the timeout and stays; the other does
/// not and is removed, exactly once, although two live nodes (B and C) both watch for lapsed
/// leases.
#[tokio::test]
async fn clients_of_a_killed_node_time_out_unless_they_come_back_elsewhere() {
    if !redis_available() {
        return;
    }
    let server = TestServer::start_with(Backend::RedisTwoNodes, with_presence).await;
    let redis = server.redis.as_ref().unwrap();
    let (mut a, a_addr) = node_process(redis).await;
    let mut b = server.nodes[0].client("gw", "*", "service").await;
    let back = join_as(&mut b, "r", "comes-back").await;
    let gone = join_as(&mut b, "r", "stays-away").await;
    let mut observer = subscribe(&mut b, "r", "", Some(gone.seq)).await.unwrap();
    let mut via_a = client_with_token(a_addr, &token("gw", "*", "service")).await;
    let _back_on_a = subscribe(&mut via_a, "r", &back.client_id, Some(gone.seq)).await;
    let _gone_on_a = subscribe(&mut via_a, "r", &gone.client_id, Some(gone.seq)).await;
    wait_connected(&mut b, "r", &back.client_id, true).await;
    wait_connected(&mut b, "r", &gone.client_id, true).await;

    a.kill().await.unwrap();
    let _back_on_b = subscribe(&mut b, "r", &back.client_id, Some(gone.seq))
        .await
        .unwrap();
    assert_timed_out(&next_event(&mut observer).await, &gone.client_id);
    tokio::time::sleep(TIMEOUT * 2).await;
    let marker = join_as(&mut b, "r", "marker").await;
    let next = next_event(&mut observer).await;
    assert_eq!(next.seq, marker.seq, "one time-out, and only one: {next:?}");
    let now = connected(&mut b, "r").await;
    assert!(now.contains(&(back.client_id.clone(), true)), "{now:?}");
    assert!(!now.iter().any(|(id, _)| *id == gone.client_id), "{now:?}");
}
