//! A node's memory under hostile but authenticated input stays within what docs/operations.md
//! states ("Memory: a node's worst case"): each case that once took a node to gigabytes,
//! reproduced against the built binary, with its RSS read from /proc before and after.
//!
//! - a room's history and remembered answers filled with the largest events a moderator can
//!   make (acks of drops naming 1,000 ids of 128 characters), watched by observers that never
//!   read: bounded by `--history-bytes`, the answers' budget and a batch per stalled reader;
//! - 500 calls with a 4 MiB room id while nobody reads the node's log: each access line cuts
//!   the id, and the log's queue holds at most 16 MiB.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use roomctl::pb;
use tokio::io::{AsyncBufReadExt, BufReader};

const MIB: u64 = 1024 * 1024;

/// What the documented worst case allows a room's history, remembered answers and a stalled
/// reader's batch to take, measured over the node's RSS before the room existed.
const ROOM_BOUND: u64 = 64 * MIB;
/// What the worst case allows a room's keys in Redis: its history's and answers' budgets (16 +
/// 8 MiB encoded) and their bookkeeping.
const REDIS_ROOM_BOUND: u64 = 36 * MIB;
/// What the worst case allows each stalled stream beyond the room (its batch and HTTP/2 buffers).
const STREAM_BOUND: u64 = 3 * MIB / 2;
/// What the worst case allows the log's queue and the calls in flight here.
const LOG_BOUND: u64 = 16 * MIB;

fn rss(child: &tokio::process::Child) -> u64 {
    proc::rss_of(child.id().expect("the node runs"))
}

/// A drop naming 1,000 distinct ids of 128 characters: the largest ack a moderator can make.
fn largest_drop(n: usize) -> pb::DropUserRequest {
    pb::DropUserRequest {
        room_id: "r".into(),
        client_ids: (0..1000).map(|i| format!("{n:0>60}{i:0>68}")).collect(),
        reason: "x".repeat(256),
        request_id: format!("drop-{n}"),
        ban_seconds: 0,
    }
}

/// A room filled far past its budgets with the largest events there are, watched by 8
/// observers that never read: the node's RSS grows by at most the room's bound and a batch
/// per stalled stream, however many such drops come.
#[tokio::test]
async fn a_hostile_moderator_fills_a_room_within_its_bound() {
    let (mut child, addr) = node_process::start_quiet(node_process::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--presence-timeout",
        "0",
    ]))
    .await;
    let mut ops = client_with_token(addr, &token("ops", "*", "service")).await;
    join(&mut ops, "r", "someone").await;
    let before = rss(&child);
    // Observers that open their streams and never read: HTTP/2 flow control stops the node
    // sending, and each holds what it was given.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut observer = client_with_token(addr, &token("ops", "*", "service")).await;
        stalled.push(subscribe(&mut observer, "r", "", None).await.unwrap());
    }
    // 300 acks of about 134 KB are 40 MB of events, past the 16 MiB history, and as much in
    // answers, past their 8 MiB.
    for n in 0..300 {
        ops.drop_user(largest_drop(n)).await.unwrap();
    }
    let grown = rss(&child).saturating_sub(before);
    let bound = ROOM_BOUND + 8 * STREAM_BOUND;
    eprintln!("a full room and 8 stalled observers: +{} KiB", grown / 1024);
    assert!(
        grown <= bound,
        "the room grew the node by {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );
    let window = ops
        .list_participants(pb::ListParticipantsRequest {
            room_id: "r".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(window.seq > 300, "every drop was logged");
    drop(stalled);
    child.kill().await.unwrap();
}

/// The same room on the Redis store: its keys in Redis hold at most the history's and the
/// answers' budgets, whatever the drops (it took 953 MB of Redis before the history was bounded
/// in bytes).
#[tokio::test]
async fn a_hostile_moderator_fills_a_room_within_its_bound_in_redis() {
    if !redis_server::redis_available() {
        return;
    }
    let redis = redis_server::RedisServer::start().await;
    let mut config = roomctl::server::ServerConfig::new(SECRET);
    config.store = roomctl::server::StoreConfig::redis(redis.url());
    config.rooms.presence_timeout = None;
    let node = Node::start(config).await;
    let mut ops = node.client("ops", "*", "service").await;
    join(&mut ops, "r", "someone").await;
    for n in 0..300 {
        ops.drop_user(largest_drop(n)).await.unwrap();
    }
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("roomctl:{r}:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut used = 0;
    for key in &keys {
        let bytes: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
        used += bytes;
    }
    eprintln!(
        "a full room in Redis: {} KiB in {} keys",
        used / 1024,
        keys.len()
    );
    assert!(
        used <= REDIS_ROOM_BOUND,
        "the room takes {} MiB of Redis",
        used / MIB
    );
}

/// 500 calls with a 4 MiB room id, refused by validation, while nobody reads the node's stderr:
/// each access line holds the id cut to 256 bytes with its length, so the stalled queue of lines
/// stays small, and RSS stays within the log's bound (the queue's own bound in bytes, and what
/// it drops, are the log writer's unit tests).
#[tokio::test]
async fn huge_room_ids_and_a_stalled_log_cost_a_bounded_queue() {
    let mut command =
        node_process::serve(&["--listen", "127.0.0.1:0", "--max-message-bytes", "5000000"]);
    command.stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    // Read up to the line that says where the node listens, then never again until the end.
    let addr = node_process::listening_addr(&mut log).await;
    let before = rss(&child);
    let huge = "r".repeat(4 * 1024 * 1024);
    let mut ops = client_with_token(addr, &token("ops", "*", "service")).await;
    for _ in 0..500 {
        let status = ops
            .list_participants(pb::ListParticipantsRequest {
                room_id: huge.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let grown = rss(&child).saturating_sub(before);
    eprintln!(
        "500 calls with a 4 MiB room id, the log stalled: +{} KiB",
        grown / 1024
    );
    assert!(
        grown <= LOG_BOUND + 16 * MIB,
        "the node grew by {} MiB with its log stalled",
        grown / MIB
    );
    // Reading the log again: the lines that made it hold the id cut, with its length.
    let read = async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("roomctl::access") && line.contains("ListParticipants") {
                return line;
            }
        }
        panic!("no access line");
    };
    let line = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap();
    assert!(line.len() < 2048, "{} bytes", line.len());
    assert!(line.contains("…[4194304 bytes]"), "{line}");
    child.kill().await.unwrap();
}
