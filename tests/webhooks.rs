//! Webhooks as a receiver sees them: a real HTTP server started by the test, a real node, and
//! the Python `standardwebhooks` package as the independent verifier of every signature.
//!
//! Every event of every room arrives, per room in `seq` order and each id once, with the body
//! the `Events` stream's event has in proto3 JSON; a receiver that fails, goes down and comes
//! back slow loses nothing, and a failing room holds back no other; one away past the history
//! is told exactly what it lost; a rotating endpoint signs with both secrets; the example
//! receiver of the README verifies and prints what it gets.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::webhook_receiver::{Received, Receiver};
use common::*;
use roomctl::codec::json;
use roomctl::pb;
use roomctl::webhooks::sign::Secret;
use roomctl::webhooks::Endpoint;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a test waits for deliveries that retries may delay.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(60);

/// A new signing secret, as Standard Webhooks writes it.
fn new_secret() -> String {
    let bytes: Vec<u8> = (0..2)
        .flat_map(|_| uuid::Uuid::new_v4().into_bytes())
        .collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// An endpoint at `url` signing with `secrets`, quick to time out and to retry (a test's
/// receiver is local).
fn endpoint(url: &str, secrets: &[&str]) -> Endpoint {
    let secrets = secrets.iter().map(|s| Secret::parse(s).unwrap()).collect();
    Endpoint::new(url, secrets, None)
        .unwrap()
        .with_timing(Duration::from_secs(2), Duration::from_millis(300))
        .unwrap()
}

/// Nodes of `backend` delivering to `endpoints`, with metrics on.
async fn nodes(backend: Backend, endpoints: Vec<Endpoint>, history: usize) -> TestServer {
    TestServer::start_with(backend, move |config| {
        config.webhooks = endpoints.clone();
        config.rooms.history = history;
        // The joined clients never stream: their time-outs would log events after the ones a
        // test counts.
        config.rooms.presence_timeout = None;
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        config.clock = roomctl::clock::Clock::system();
    })
    .await
}

/// One memory node delivering to `endpoints`.
async fn node(endpoints: Vec<Endpoint>, history: usize) -> TestServer {
    nodes(Backend::Memory, endpoints, history).await
}

/// `series` summed over every node of `server`.
async fn metric_of(server: &TestServer, series: &str) -> f64 {
    let mut sum = 0.0;
    for node in &server.nodes {
        sum += metric(&scrape(node.metrics.unwrap()).await, series);
    }
    sum
}

acceptance! {
    every_event_of_busy_rooms_arrives_in_order_once_and_verifies,
    a_failing_then_down_then_slow_receiver_loses_nothing_and_no_room_waits_for_another,
    a_receiver_away_past_the_history_is_told_exactly_what_it_lost,
    a_rotating_endpoint_signs_with_both_secrets,
    an_endpoint_that_is_down_holds_back_no_other,
    an_emptied_room_is_kept_until_its_events_are_delivered,
}

/// Some activity in `room`: `joins` participants join, every other one is dropped, the room is
/// locked and unlocked. Returns the room's last seq.
async fn activity(server: &TestServer, room: &str, joins: usize) -> u64 {
    let mut moderator = server.client("mod", room, "moderator").await;
    let mut seq = 0;
    let mut joined = Vec::new();
    for n in 0..joins {
        let mut client = server
            .client(&format!("user-{n}"), room, "participant")
            .await;
        let response = join(&mut client, room, "someone").await;
        seq = seq.max(response.seq);
        joined.push(response.client_id);
    }
    let dropped: Vec<&str> = joined.iter().step_by(2).map(String::as_str).collect();
    moderator
        .drop_user(drop_request(room, &dropped, "webhook test"))
        .await
        .unwrap();
    // The unlock is the room's last event.
    for locked in [true, false] {
        let response = if locked {
            let request = pb::LockRoomRequest {
                room_id: room.into(),
                ..Default::default()
            };
            moderator.lock_room(request).await.unwrap().into_inner().seq
        } else {
            let request = pb::UnlockRoomRequest {
                room_id: room.into(),
                ..Default::default()
            };
            moderator
                .unlock_room(request)
                .await
                .unwrap()
                .into_inner()
                .seq
        };
        seq = seq.max(response);
    }
    seq
}

/// The events of `room`'s log after `after` up to `last`, read from an `Events` stream.
async fn log_after(server: &TestServer, room: &str, after: u64, last: u64) -> Vec<pb::Event> {
    let mut observer = server.client("ops", "*", "service").await;
    let mut stream = subscribe(&mut observer, room, "", Some(after))
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.last().is_none_or(|e: &pb::Event| e.seq < last) {
        events.push(next_event(&mut stream).await);
    }
    events
}

/// Every event of `room`'s log up to `last`.
async fn log_of(server: &TestServer, room: &str, last: u64) -> Vec<pb::Event> {
    log_after(server, room, 0, last).await
}

/// The room of a delivery, from its id (`room:epoch:seq`, or `room:epoch:lost:from-to`).
fn room_of(received: &Received) -> String {
    let json = received.json();
    let room = json["roomId"]
        .as_str()
        .or_else(|| json["eventsLost"]["roomId"].as_str())
        .expect("a body names its room");
    room.to_owned()
}

/// The deliveries answered 2xx, per room, in the order they were answered.
fn delivered_per_room(received: &[Received]) -> BTreeMap<String, Vec<Received>> {
    let mut rooms: BTreeMap<String, Vec<Received>> = BTreeMap::new();
    for r in received.iter().filter(|r| r.delivered()) {
        rooms.entry(room_of(r)).or_default().push(r.clone());
    }
    rooms
}

/// Whether `room`'s deliveries reached seq `last`.
fn reached(received: &[Received], room: &str, last: u64) -> bool {
    received.iter().any(|r| {
        r.delivered()
            && r.id.starts_with(&format!("{room}:"))
            && r.id.ends_with(&format!(":{last}"))
    })
}

/// Asserts that `room` got exactly its log, in order, each id once, each body the event's
/// proto3 JSON (the `Events` stream's event, so one schema serves both).
fn assert_whole_log(delivered: &[Received], log: &[pb::Event]) {
    let ids: Vec<&str> = delivered.iter().map(|r| r.id.as_str()).collect();
    let expected: Vec<String> = log
        .iter()
        .map(|e| format!("{}:{}:{}", e.room_id, e.epoch, e.seq))
        .collect();
    assert_eq!(ids, expected, "a room's deliveries, in order, each once");
    for (received, event) in delivered.iter().zip(log) {
        assert_eq!(received.body, json(event));
        assert_eq!(received.content_type, "application/json");
    }
}

async fn every_event_of_busy_rooms_arrives_in_order_once_and_verifies(backend: Backend) {
    let receiver = Receiver::start().await;
    let secret = new_secret();
    let server = nodes(backend, vec![endpoint(&receiver.url(), &[&secret])], 10_000).await;
    let rooms: Vec<String> = (0..6).map(|n| format!("busy-{n}")).collect();
    let server = Arc::new(server);
    let mut busy = tokio::task::JoinSet::new();
    for room in rooms.clone() {
        let server = server.clone();
        busy.spawn(async move { (room.clone(), activity(&server, &room, 8).await) });
    }
    let mut last = BTreeMap::new();
    while let Some(done) = busy.join_next().await {
        let (room, seq) = done.unwrap();
        last.insert(room, seq);
    }
    let received = receiver
        .until("every room's last event", DELIVERY_PATIENCE, |received| {
            last.iter().all(|(room, &seq)| reached(received, room, seq))
        })
        .await;
    let per_room = delivered_per_room(&received);
    for (room, &seq) in &last {
        assert_whole_log(&per_room[room], &log_of(&server, room, seq).await);
    }
    assert!(received.iter().all(Received::delivered));
    common::standard_webhooks::verify_all(&received, &secret);
    let delivered = format!(
        "roomctl_webhook_deliveries_total{{endpoint=\"{}\",outcome=\"delivered\"}}",
        receiver.url()
    );
    assert_eq!(metric_of(&server, &delivered).await, received.len() as f64);
}

async fn a_failing_then_down_then_slow_receiver_loses_nothing_and_no_room_waits_for_another(
    backend: Backend,
) {
    let mut receiver = Receiver::start().await;
    let secret = new_secret();
    let server = nodes(backend, vec![endpoint(&receiver.url(), &[&secret])], 10_000).await;

    // One room the receiver refuses: the other's events arrive all the same.
    receiver.answer_with(|r| {
        let status = if r.body.contains("\"flaky\"") {
            500
        } else {
            204
        };
        (status, Duration::ZERO)
    });
    let flaky_first = activity(&server, "flaky", 3).await;
    let steady_first = activity(&server, "steady", 3).await;
    receiver
        .until(
            "the steady room's events while the flaky room is refused",
            DELIVERY_PATIENCE,
            |received| {
                reached(received, "steady", steady_first)
                    && received.iter().filter(|r| r.status == 500).count() >= 3
            },
        )
        .await;

    // Then: everything refused for the first requests, then down for a while, then slow.
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    receiver.answer_with(move |_| {
        if counted.fetch_add(1, Ordering::Relaxed) < 5 {
            (500, Duration::ZERO)
        } else {
            (204, Duration::from_millis(50))
        }
    });
    let more = activity(&server, "steady", 2).await;
    receiver.stop();
    let flaky_last = activity(&server, "flaky", 2).await;
    let steady_last = activity(&server, "steady", 2).await;
    assert!(flaky_last > flaky_first && steady_last > more);
    // Down for longer than several retries of the capped backoff.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let series = |outcome: &str| {
        format!(
            "roomctl_webhook_deliveries_total{{endpoint=\"{}\",outcome=\"{outcome}\"}}",
            receiver.url()
        )
    };
    assert!(metric_of(&server, &series("unreachable")).await > 0.0);
    assert!(metric_of(&server, &series("refused")).await >= 3.0);
    receiver.resume().await;

    let received = receiver
        .until("both rooms' last events", DELIVERY_PATIENCE, |received| {
            reached(received, "flaky", flaky_last) && reached(received, "steady", steady_last)
        })
        .await;
    let per_room = delivered_per_room(&received);
    assert_whole_log(
        &per_room["flaky"],
        &log_of(&server, "flaky", flaky_last).await,
    );
    assert_whole_log(
        &per_room["steady"],
        &log_of(&server, "steady", steady_last).await,
    );
    common::standard_webhooks::verify_all(&received, &secret);
    let retries = format!(
        "roomctl_webhook_retries_total{{endpoint=\"{}\"}}",
        receiver.url()
    );
    assert!(metric_of(&server, &retries).await >= 5.0);
    // Delivered: soon no node counts the endpoint behind, not even one whose failed rooms
    // another node took (well within a turn, after which they would be forgotten anyway).
    let lag = |name: &str| format!("roomctl_webhook_{name}{{endpoint=\"{}\"}}", receiver.url());
    let started = tokio::time::Instant::now();
    while metric_of(&server, &lag("events_behind")).await > 0.0
        || metric_of(&server, &lag("oldest_undelivered_age_seconds")).await > 0.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "a node still counts delivered events as behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_receiver_away_past_the_history_is_told_exactly_what_it_lost(backend: Backend) {
    let mut receiver = Receiver::start().await;
    receiver.stop();
    let secret = new_secret();
    let server = nodes(backend, vec![endpoint(&receiver.url(), &[&secret])], 5).await;
    // 10 joins, 5 drops (each drop commit logs 2 events per client and an ack), a lock, an
    // unlock: far more than the 5 events the history keeps.
    let last = activity(&server, "away", 10).await;
    let oldest = last - 4;
    receiver.resume().await;
    let received = receiver
        .until("the room's last event", DELIVERY_PATIENCE, |received| {
            reached(received, "away", last)
        })
        .await;
    let delivered = &delivered_per_room(&received)["away"];
    let notice = delivered[0].json();
    let log = log_after(&server, "away", oldest - 1, last).await;
    let epoch = &log[0].epoch;
    assert_eq!(
        notice,
        serde_json::json!({"eventsLost": {
            "roomId": "away", "epoch": epoch, "fromSeq": "1", "toSeq": (oldest - 1).to_string(),
            "nextEpoch": epoch, "nextSeq": oldest.to_string(),
        }}),
    );
    assert_eq!(
        delivered[0].id,
        format!("away:{epoch}:lost:1-{}", oldest - 1)
    );
    assert_whole_log(&delivered[1..], &log);
    common::standard_webhooks::verify_all(&received, &secret);
    let lost = format!(
        "roomctl_webhook_events_lost_notices_total{{endpoint=\"{}\"}}",
        receiver.url()
    );
    assert_eq!(metric_of(&server, &lost).await, 1.0);
}

async fn a_rotating_endpoint_signs_with_both_secrets(backend: Backend) {
    let receiver = Receiver::start().await;
    let (new, old) = (new_secret(), new_secret());
    let server = nodes(
        backend,
        vec![endpoint(&receiver.url(), &[&new, &old])],
        10_000,
    )
    .await;
    let last = activity(&server, "rotating", 2).await;
    let received = receiver
        .until("the room's last event", DELIVERY_PATIENCE, |received| {
            reached(received, "rotating", last)
        })
        .await;
    for r in &received {
        assert_eq!(r.signature.split(' ').count(), 2, "{}", r.signature);
    }
    // A receiver that still has the old secret, and one that has the new: both verify.
    common::standard_webhooks::verify_all(&received, &old);
    common::standard_webhooks::verify_all(&received, &new);
}

#[tokio::test]
async fn an_endpoint_gets_only_the_events_it_chose() {
    let receiver = Receiver::start().await;
    let secret = Secret::parse(&new_secret()).unwrap();
    let chosen = ["ack_drop_user".to_owned()];
    let only_acks = Endpoint::new(&receiver.url(), vec![secret], Some(&chosen)).unwrap();
    let server = node(vec![only_acks], 10_000).await;
    let last = activity(&server, "acks", 4).await;
    let mut moderator = server.client("mod", "acks", "moderator").await;
    // One more drop, then a lock: the filter skips what follows the ack.
    moderator
        .drop_user(drop_request("acks", &["nobody"], "again"))
        .await
        .unwrap();
    let lock = pb::LockRoomRequest {
        room_id: "acks".into(),
        ..Default::default()
    };
    let locked = moderator.lock_room(lock).await.unwrap().into_inner().seq;
    assert!(locked > last);
    let received = receiver
        .until("the second ack", DELIVERY_PATIENCE, |received| {
            received.len() >= 2
        })
        .await;
    let acks: Vec<u64> = log_of(&server, "acks", locked)
        .await
        .into_iter()
        .filter(|e| kind(e) == "ack_drop_user")
        .map(|e| e.seq)
        .collect();
    let got: Vec<u64> = received
        .iter()
        .map(|r| r.json()["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, acks);
}

/// The README's receiver (examples/webhook_receiver.py), run as a user would: it verifies and
/// prints every event, and refuses a forged one.
#[tokio::test]
async fn the_readme_receiver_verifies_and_prints_every_event() {
    let Some(python) = common::standard_webhooks::python() else {
        return;
    };
    let secret = new_secret();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/webhook_receiver.py");
    let mut python = tokio::process::Command::from(python);
    let mut receiver = python
        .arg(script)
        .arg("0")
        .env("WEBHOOK_SECRET", &secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut said = BufReader::new(receiver.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, said.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("the receiver says where it listens");
    let port = line.strip_prefix("listening on ").expect(&line);
    let url = format!("http://127.0.0.1:{port}/hook");

    // A forged delivery is refused.
    let forged = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &url,
        ])
        .args([
            "-H",
            "webhook-id: x",
            "-H",
            "webhook-timestamp: 1",
            "-H",
            "webhook-signature: v1,AAAA",
        ])
        .args(["-d", "{}"])
        .output();
    if let Ok(out) = forged {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    }

    let server = node(vec![endpoint(&url, &[&secret])], 10_000).await;
    let last = activity(&server, "readme", 2).await;
    let log = log_of(&server, "readme", last).await;
    let mut printed = BufReader::new(receiver.stdout.take().unwrap()).lines();
    for event in &log {
        let line = tokio::time::timeout(DELIVERY_PATIENCE, printed.next_line())
            .await
            .expect("the receiver prints each event")
            .unwrap()
            .unwrap();
        let got: serde_json::Value = serde_json::from_str(&line).unwrap();
        let want: serde_json::Value = serde_json::from_str(&json(event)).unwrap();
        assert_eq!(got, want);
    }
}

/// Two node processes on one Redis (or a Redis Cluster) deliver; one is SIGKILLed while it
/// holds rooms' turns mid-stream. The other takes those rooms once their turns run out and
/// goes on from their cursors: every event arrives, in order per room; an event sent twice (the
/// one in flight when the node died) has the same id and body both times.
async fn a_node_killed_mid_delivery_is_taken_over(store_url: String) {
    let receiver = Receiver::start().await;
    // Slow, so the node dies with deliveries in flight.
    receiver.answer_with(|_| (204, Duration::from_millis(150)));
    let secret = new_secret();
    let dir = common::certs::Dir::new("webhooks-kill");
    let config = dir.write(
        "roomctl.toml",
        &format!(
            "store = {store_url:?}\n[[webhooks]]\nurl = {:?}\nsecret = {secret:?}\ntimeout = \"1s\"\nmax_retry_delay = \"300ms\"\n",
            receiver.url()
        ),
    );
    let config = config.to_string_lossy().into_owned();
    // Presence off: the joined clients never stream, and their time-outs would log events
    // after the ones the test counts.
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--presence-timeout",
        "0",
        "--config",
        &config,
    ];
    // The doomed node starts alone, so the rooms' turns are its own.
    let mut doomed =
        common::node_process::LoggedNode::start(common::node_process::serve(&args)).await;
    let rooms: Vec<String> = (0..8).map(|n| format!("kill-{n}")).collect();
    let mut last = BTreeMap::new();
    for room in &rooms {
        let mut client = client_with_token(doomed.addr, &token("mod", room, "moderator")).await;
        let mut seq = 0;
        for n in 0..6 {
            seq = join(&mut client, room, &format!("p{n}")).await.seq;
        }
        last.insert(room.clone(), seq);
    }
    // Once it has delivered something, it holds turns mid-stream: start the other, kill it.
    let delivered = format!(
        "roomctl_webhook_deliveries_total{{endpoint=\"{}\",outcome=\"delivered\"}}",
        receiver.url()
    );
    let metrics = doomed.metrics.unwrap();
    let started = tokio::time::Instant::now();
    while metric(&scrape(metrics).await, &delivered) < 1.0 {
        assert!(
            started.elapsed() < PATIENCE,
            "the doomed node never delivered"
        );
        tokio::task::yield_now().await;
    }
    let survivor =
        common::node_process::LoggedNode::start(common::node_process::serve(&args)).await;
    doomed.child.start_kill().unwrap();
    doomed.child.wait().await.unwrap();
    let received = receiver
        .until("every room's last event", DELIVERY_PATIENCE, |received| {
            last.iter().all(|(room, &seq)| reached(received, room, seq))
        })
        .await;
    let server_logs = survivor.stop().await;
    let mut first: BTreeMap<String, Received> = BTreeMap::new();
    let mut per_room: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in received.iter().filter(|r| r.delivered()) {
        match first.get(&r.id) {
            Some(earlier) => assert_eq!(earlier.body, r.body, "a redelivery of {}", r.id),
            None => {
                first.insert(r.id.clone(), r.clone());
                let seq = r.json()["seq"].as_str().unwrap().parse().unwrap();
                per_room.entry(room_of(r)).or_default().push(seq);
            }
        }
    }
    for (room, &seq) in &last {
        assert_eq!(
            per_room[room],
            (1..=seq).collect::<Vec<_>>(),
            "{room}: {server_logs:?}"
        );
    }
    common::standard_webhooks::verify_all(&received, &secret);
}

#[tokio::test]
async fn redis_a_node_killed_mid_delivery_is_taken_over() {
    if !common::redis_server::redis_available() {
        return;
    }
    let redis = common::redis_server::RedisServer::start().await;
    a_node_killed_mid_delivery_is_taken_over(redis.url()).await;
}

#[tokio::test]
async fn redis_cluster_a_node_killed_mid_delivery_is_taken_over() {
    if !common::redis_server::redis_available() {
        return;
    }
    let cluster = common::redis_cluster::RedisCluster::start(3).await;
    a_node_killed_mid_delivery_is_taken_over(cluster.url()).await;
}

/// A Redis that comes back without the log's tail (restarted from an older append-only file)
/// starts the room's log anew under a new epoch: the endpoint, whose cursor Redis rolled back
/// with the log, is told that everything of the old epoch after its cursor is lost, and where
/// delivery goes on, then gets the new epoch's events.
#[tokio::test]
async fn a_redis_rollback_is_announced_as_the_end_of_the_old_epoch() {
    if !common::redis_server::redis_available() {
        return;
    }
    let receiver = Receiver::start().await;
    let secret = new_secret();
    let mut redis = common::redis_server::RedisServer::start_persistent().await;
    let mut config = roomctl::server::ServerConfig::new(SECRET);
    config.store = roomctl::server::StoreConfig::redis(redis.url());
    config.webhooks = vec![endpoint(&receiver.url(), &[&secret])];
    let node = Node::start(config).await;
    let mut ops = node.client("ops", "*", "service").await;
    let first = join(&mut ops, "rolled", "a").await;
    receiver
        .until("the first join", DELIVERY_PATIENCE, |r| {
            reached(r, "rolled", 1)
        })
        .await;
    // The cursor moves once the receiver has answered: copy once it has.
    let mut conn = redis.connection().await;
    let recorded = format!("{}:1", first.epoch);
    let started = tokio::time::Instant::now();
    loop {
        let cursors: Vec<String> = redis::cmd("HVALS")
            .arg("roomctl:{rolled}:hooks")
            .query_async(&mut conn)
            .await
            .unwrap();
        if cursors.contains(&recorded) {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the cursor never moved: {cursors:?}"
        );
        tokio::task::yield_now().await;
    }
    redis.copy_data();
    join(&mut ops, "rolled", "b").await;
    receiver
        .until("the second join", DELIVERY_PATIENCE, |r| {
            reached(r, "rolled", 2)
        })
        .await;
    redis.restart_from_copy().await;
    let after = loop {
        let request = pb::JoinRequest {
            room_id: "rolled".into(),
            name: "c".into(),
            ..Default::default()
        };
        if let Ok(joined) = ops.join(request).await {
            break joined.into_inner();
        }
        tokio::task::yield_now().await;
    };
    assert_ne!(after.epoch, first.epoch);
    let received = receiver
        .until("the new epoch's event", DELIVERY_PATIENCE, |received| {
            received
                .iter()
                .any(|r| r.id == format!("rolled:{}:{}", after.epoch, after.seq))
        })
        .await;
    let bodies: Vec<serde_json::Value> = received
        .iter()
        .filter(|r| r.delivered())
        .map(Received::json)
        .collect();
    let notice = bodies
        .iter()
        .find(|b| b.get("eventsLost").is_some())
        .expect("a notice of the old epoch's end");
    // `toSeq` is 0, which proto3 JSON leaves out.
    assert_eq!(
        notice,
        &serde_json::json!({"eventsLost": {
            "roomId": "rolled", "epoch": first.epoch, "fromSeq": "2",
            "nextEpoch": after.epoch, "nextSeq": after.seq.to_string(),
        }})
    );
    assert_eq!(
        bodies.last().unwrap()["epoch"].as_str(),
        Some(after.epoch.as_str())
    );
    common::standard_webhooks::verify_all(&received, &secret);
}

/// Two endpoints: one down, one up. The one that is up gets every event at once; the other
/// gets them all once it comes back.
async fn an_endpoint_that_is_down_holds_back_no_other(backend: Backend) {
    let up = Receiver::start().await;
    let mut down = Receiver::start().await;
    down.stop();
    let secret = new_secret();
    let endpoints = vec![
        endpoint(&down.url(), &[&secret]),
        endpoint(&up.url(), &[&secret]),
    ];
    let server = nodes(backend, endpoints, 10_000).await;
    let last = activity(&server, "two-ways", 4).await;
    let log = log_of(&server, "two-ways", last).await;
    let received = up
        .until(
            "every event at the endpoint that is up",
            DELIVERY_PATIENCE,
            |r| reached(r, "two-ways", last),
        )
        .await;
    assert_whole_log(&delivered_per_room(&received)["two-ways"], &log);
    assert!(down.received().is_empty());
    down.resume().await;
    let received = down
        .until(
            "every event at the endpoint that came back",
            DELIVERY_PATIENCE,
            |r| reached(r, "two-ways", last),
        )
        .await;
    assert_whole_log(&delivered_per_room(&received)["two-ways"], &log);
}

/// An https endpoint whose certificate a private CA signed: refused until the endpoint trusts
/// that CA (`ca_file`), then delivered to.
#[tokio::test]
async fn an_https_endpoint_of_a_private_ca_is_trusted_through_its_ca_file() {
    let ca = common::certs::Ca::new();
    let (cert, key) = ca.issue(&["127.0.0.1"]);
    let receiver = Receiver::start_https(&cert, &key).await;
    let dir = common::certs::Dir::new("webhooks-https");
    let ca_file = dir.write("ca.pem", &ca.pem());
    let secret = new_secret();
    let untrusted = endpoint(&receiver.url(), &[&secret])
        .named("untrusted")
        .unwrap();
    let trusted = endpoint(&receiver.url(), &[&secret])
        .trusting(&ca_file)
        .unwrap();
    let server = node(vec![untrusted, trusted], 10_000).await;
    let last = activity(&server, "private", 2).await;
    let received = receiver
        .until("the room's last event over https", DELIVERY_PATIENCE, |r| {
            reached(r, "private", last)
        })
        .await;
    assert_whole_log(
        &delivered_per_room(&received)["private"],
        &log_of(&server, "private", last).await,
    );
    // The endpoint that does not trust the CA never got through.
    let unreachable =
        "roomctl_webhook_deliveries_total{endpoint=\"untrusted\",outcome=\"unreachable\"}";
    let started = tokio::time::Instant::now();
    while metric_of(&server, unreachable).await == 0.0 {
        assert!(
            started.elapsed() < PATIENCE,
            "the untrusted endpoint was never tried"
        );
        tokio::task::yield_now().await;
    }
    let delivered =
        "roomctl_webhook_deliveries_total{endpoint=\"untrusted\",outcome=\"delivered\"}";
    assert_eq!(metric_of(&server, delivered).await, 0.0);
}

/// A room left empty while its endpoint is down outlives its `--empty-room-ttl` until the
/// endpoint has its events, and is forgotten after that.
async fn an_emptied_room_is_kept_until_its_events_are_delivered(backend: Backend) {
    let mut receiver = Receiver::start().await;
    receiver.stop();
    let secret = new_secret();
    let endpoints = vec![endpoint(&receiver.url(), &[&secret])];
    let server = TestServer::start_with(backend, move |config| {
        config.webhooks = endpoints.clone();
        config.rooms.empty_room_ttl = Duration::from_millis(300);
        config.rooms.presence_timeout = None;
        config.clock = roomctl::clock::Clock::system();
    })
    .await;
    let mut client = server.client("solo", "brief", "participant").await;
    let joined = join(&mut client, "brief", "solo").await;
    let left = client
        .leave(pb::LeaveRequest {
            room_id: "brief".into(),
            client_id: joined.client_id.clone(),
        })
        .await;
    assert!(left.is_ok(), "{left:?}");
    // Many times the TTL, with the endpoint away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut ops = server.client("ops", "*", "service").await;
    let kept = ops
        .list_participants(pb::ListParticipantsRequest {
            room_id: "brief".into(),
        })
        .await;
    assert!(
        kept.is_ok(),
        "the room was forgotten with undelivered events: {kept:?}"
    );
    receiver.resume().await;
    let received = receiver
        .until("the join and the leave", DELIVERY_PATIENCE, |r| {
            reached(r, "brief", 2)
        })
        .await;
    let ids: Vec<&str> = received
        .iter()
        .filter(|r| r.delivered())
        .map(|r| r.id.as_str())
        .collect();
    let epoch = &joined.epoch;
    assert_eq!(
        ids,
        [format!("brief:{epoch}:1"), format!("brief:{epoch}:2")]
    );
    // Delivered: now it goes as any empty room does.
    let started = tokio::time::Instant::now();
    loop {
        let request = pb::ListParticipantsRequest {
            room_id: "brief".into(),
        };
        match ops.list_participants(request).await {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            _ => assert!(started.elapsed() < PATIENCE, "the room was never forgotten"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An endpoint added to a fleet whose rooms already hold events is given them: no commit makes
/// those rooms due, the walk over the list of rooms finds their cursors behind. The same walk
/// catches any room a commit could not make due (a node dying at the wrong moment).
async fn an_endpoint_added_later_is_given_the_rooms_already_there(backend: Backend) {
    let before = TestServer::start_with(backend, |config| {
        config.rooms.presence_timeout = None;
    })
    .await;
    let rooms = ["there-a", "there-b", "there-c"];
    let mut last = BTreeMap::new();
    for room in rooms {
        last.insert(room.to_owned(), activity(&before, room, 3).await);
    }
    let TestServer {
        nodes,
        redis,
        cluster,
        ..
    } = before;
    for node in nodes {
        node.stop().await.unwrap();
    }
    let store_url = match (&redis, &cluster) {
        (Some(redis), _) => redis.url(),
        (_, Some(cluster)) => cluster.url(),
        _ => unreachable!("a fleet shares a Redis"),
    };
    let receiver = Receiver::start().await;
    let secret = new_secret();
    let mut config = roomctl::server::ServerConfig::new(SECRET);
    config.store = roomctl::server::StoreConfig::redis(store_url);
    config.webhooks = vec![endpoint(&receiver.url(), &[&secret])];
    config.rooms.presence_timeout = None;
    // The walk takes a step per sweep, a quarter of this.
    config.rooms.empty_room_ttl = Duration::from_millis(400);
    let after = Node::start(config).await;
    let received = receiver
        .until("every room's last event", DELIVERY_PATIENCE, |received| {
            last.iter().all(|(room, &seq)| reached(received, room, seq))
        })
        .await;
    for (room, delivered) in delivered_per_room(&received) {
        let seqs: Vec<u64> = delivered
            .iter()
            .map(|r| r.json()["seq"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(seqs, (1..=last[&room]).collect::<Vec<_>>(), "{room}");
    }
    common::standard_webhooks::verify_all(&received, &secret);
    after.stop().await.unwrap();
}

#[tokio::test]
async fn redis_an_endpoint_added_later_is_given_the_rooms_already_there() {
    if !common::redis_server::redis_available() {
        return;
    }
    an_endpoint_added_later_is_given_the_rooms_already_there(Backend::RedisTwoNodes).await;
}

#[tokio::test]
async fn redis_cluster_an_endpoint_added_later_is_given_the_rooms_already_there() {
    if !common::redis_server::redis_available() {
        return;
    }
    an_endpoint_added_later_is_given_the_rooms_already_there(Backend::RedisCluster).await;
}
