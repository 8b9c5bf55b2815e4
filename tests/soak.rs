//! A bounded soak at full speed, on the memory store and on two nodes sharing Redis: rounds of
//! joins, per-client subscriptions, drops, an observer that reads everything, one that never
//! reads, and one whose connection is reset mid-stream. It checks that memory stays flat after
//! the first round, that every reading subscriber got every visible event in order, that the
//! one that never read ended OUT_OF_RANGE once the history moved past it, and that once the
//! clients are gone no subscription and no task of theirs is left on the server (its runtime's
//! task count and the stream gauge prove it).
//!
//! Each store soaks for `ROOMCTL_SOAK_SECONDS` (default 12) and at least four rounds.

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::redis_available;
use common::*;
use prost::Message;
use roomctl::pb::{self, event::Payload};
use tokio::runtime::Runtime;
use tonic::transport::Channel;
use tonic::Code;

/// The allocator the `roomctl` binary runs with, counting the bytes it holds: unlike RSS, the
/// count is exact, so a leak of even a few bytes per call shows over thousands of calls.
#[global_allocator]
static ALLOCATOR: Counting = Counting(AtomicUsize::new(0));

struct Counting(AtomicUsize);

// SAFETY: every call is passed to mimalloc unchanged; only the byte count is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.fetch_add(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.0.fetch_sub(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.0.fetch_add(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.0.fetch_add(new_size, Ordering::Relaxed);
        self.0.fetch_sub(layout.size(), Ordering::Relaxed);
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

/// Bytes allocated and not yet freed, by the whole process.
fn heap() -> usize {
    ALLOCATOR.0.load(Ordering::Relaxed)
}

const ROOMS: usize = 4;
/// Clients joined per room per round; they all go by the end of it.
const CLIENTS: usize = 400;
/// One client in this many holds a stream as itself and is dropped; the others leave. (Every
/// client's stream receives every join and leave of the room, so streams for all would make
/// the test about the machine's speed; and each drop's answer is remembered, up to 1,024 per
/// room, a bounded growth reached only after many rounds, kept small here.)
const SUBSCRIBED_EVERY: usize = 10;
/// Clients per DropUser.
const DROP_BATCH: usize = 5;
/// Events a room keeps: fewer than a round logs (about 850), so a subscriber that stops
/// reading falls out within a round, yet far more than a reading one lags behind.
const HISTORY: usize = 300;
/// Allowed growth of the heap (bytes allocated and not freed, counted exactly) between the
/// second round and the last, sampled between rounds once every client, stream and server task
/// of theirs is gone. A leak of 100 bytes per join adds 160 KiB a round.
const HEAP_SLACK: usize = 128 * 1024;
/// Allowed growth of RSS on top of a fifth: what the allocator keeps of the peaks.
const RSS_SLACK: u64 = 24 * 1024 * 1024;

fn rss() -> u64 {
    common::proc::rss_of(std::process::id())
}

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// Reads an observer's stream up to `last`, checking that seqs follow one another.
async fn read_all(stream: &mut tonic::Streaming<pb::Event>, after: u64, last: u64) {
    let mut expected = after + 1;
    while expected <= last {
        let event = next_event(stream).await;
        assert_eq!(
            event.seq, expected,
            "an observer sees every event, in order"
        );
        expected += 1;
    }
}

/// A subscriber on a connection of its own, replaying from `after`, that is reset (RST) after
/// its first event.
async fn abrupt_subscriber(addr: std::net::SocketAddr, room: &str, after: u64) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_zero_linger().unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.unwrap();
    let bearer = format!("Bearer {}", token("ops", "*", "service"));
    let request = pb::EventsRequest {
        room_id: room.into(),
        after_seq: Some(after),
        ..Default::default()
    };
    let (head, body) = bare::request(
        "/roomcontrol.v1.RoomControl/Events",
        &[("authorization", &bearer)],
        &request,
    );
    let (response, mut stream) = send.send_request(head, false).unwrap();
    stream.send_data(body, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let first = body.data().await.unwrap().unwrap();
    assert!(pb::Event::decode(&first[5..]).is_ok());
    // Dropping the socket with SO_LINGER 0 resets the connection.
    connection.abort();
}

/// One round in one room, from its creation to its end: an anchor joins first (creating the
/// room, with a new epoch), an observer and a subscriber that never reads follow from there;
/// clients join, some with a stream of their own, and all go (most leave, the subscribed ones
/// are dropped); a subscriber on a connection of its own is reset midway; then the checks, and
/// the anchor leaves last, so the room (empty-room TTL 0) is forgotten before the next round.
async fn round(addr: std::net::SocketAddr, ops: Client, stalled_channel: Channel, room: String) {
    let mut ops = ops;
    let anchor = join(&mut ops, &room, "anchor").await;
    let start = anchor.seq - 1;
    let mut stalled = roomctl::client::with_token(stalled_channel, &token("ops", "*", "service"))
        .unwrap()
        .events(pb::EventsRequest {
            room_id: room.clone(),
            after_seq: Some(start),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut observer = subscribe(&mut ops, &room, "", Some(start)).await.unwrap();
    let (mut dropped, mut leaving, mut readers) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..CLIENTS {
        let joined = ops
            .join(pb::JoinRequest {
                room_id: room.clone(),
                identity: format!("user-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if i == CLIENTS / 2 {
            abrupt_subscriber(addr, &room, joined.seq - 1).await;
        }
        if i % SUBSCRIBED_EVERY != 0 {
            leaving.push(joined.client_id);
            continue;
        }
        let mut stream = subscribe(&mut ops, &room, &joined.client_id, Some(joined.seq))
            .await
            .unwrap();
        let client_id = joined.client_id.clone();
        readers.push(tokio::spawn(async move {
            let mut last = None;
            while let Some(event) = stream.message().await.unwrap() {
                last = Some(event);
            }
            match last.and_then(|e| e.payload) {
                Some(Payload::RoomDisconnected(told)) => assert_eq!(told.client_id, client_id),
                other => panic!("a dropped client's stream ends at its drop: {other:?}"),
            }
        }));
        dropped.push(joined.client_id);
    }
    for client_id in leaving {
        ops.leave(pb::LeaveRequest {
            room_id: room.clone(),
            client_id,
        })
        .await
        .unwrap();
    }
    for batch in dropped.chunks(DROP_BATCH) {
        let ids: Vec<&str> = batch.iter().map(String::as_str).collect();
        ops.drop_user(drop_request(&room, &ids, "soak"))
            .await
            .unwrap();
    }
    for reader in readers {
        reader.await.unwrap();
    }
    let end = ops
        .list_participants(list(&room))
        .await
        .unwrap()
        .into_inner()
        .seq;
    read_all(&mut observer, start, end).await;
    let ended = async {
        loop {
            match stalled.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    };
    let status = tokio::time::timeout(PATIENCE, ended)
        .await
        .unwrap()
        .unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    ops.leave(pb::LeaveRequest {
        room_id: room,
        client_id: anchor.client_id,
    })
    .await
    .unwrap();
}

fn soak(backend: Backend) {
    // The two soaks share the process's allocator count: one at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let seconds: u64 = std::env::var("ROOMCTL_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    // The server runs on a runtime of its own, so its live tasks can be counted apart from the
    // clients'.
    let server_runtime = Runtime::new().unwrap();
    let clients = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = clients.block_on(async {
        server_runtime
            .spawn(TestServer::start_with(backend, |c| {
                c.rooms.history = HISTORY;
                // Each round's rooms are forgotten as soon as they empty: what a room holds
                // (its log, remembered answers, departed clients) must go with it.
                c.rooms.empty_room_ttl = Duration::ZERO;
                c.limits.moderator_rate = 1_000_000;
                c.limits.moderator_burst = 1_000_000;
            }))
            .await
            .unwrap()
    });
    let addrs: Vec<_> = server.nodes.iter().map(|n| n.addr).collect();
    // Once a node has answered a call it runs all its own tasks: every node must have, since
    // each starts serving on its own (a node still starting would add its tasks later, and the
    // soak would blame them on its clients). The probes' connections stay open to the end, so
    // the count after the soak must come back to this one exactly.
    let (mut probes, idle_tasks, idle_client_tasks) = clients.block_on(async {
        let mut probes = Vec::new();
        for addr in &addrs {
            let mut probe = client_with_token(*addr, &token("ops", "*", "service")).await;
            let _ = probe.list_participants(list("none")).await;
            probes.push(probe);
        }
        let clients = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        (probes, server_runtime.metrics().num_alive_tasks(), clients)
    });

    // Waits until no stream is open on the server, its task count is back to idle and it has
    // forgotten every room: between rounds, so memory is sampled at comparable moments (a Redis
    // node's room writers, and what they remember of their rooms, retire after a few idle
    // seconds; an emptied room's log goes once the store's sweeper or a look at it forgets
    // the room), and at the end.
    let mut settle = || {
        clients.block_on(async {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let streams = server.subscriptions();
                let alive = server_runtime.metrics().num_alive_tasks();
                let clients_busy = tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
                    > idle_client_tasks;
                let mut rooms = 0;
                if streams == 0 && !clients_busy && alive <= idle_tasks {
                    for probe in &mut probes {
                        let listed = probe.list_rooms(pb::ListRoomsRequest::default()).await;
                        rooms += listed.unwrap().into_inner().rooms.len();
                    }
                    if rooms == 0 {
                        return;
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "left behind: {streams} streams, {alive} tasks (idle: {idle_tasks}), \
                     {rooms} rooms"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 5 || started.elapsed() < Duration::from_secs(seconds) {
        let rounds = samples.len();
        clients.block_on(async {
            let mut work = Vec::new();
            for r in 0..ROOMS {
                let addr = addrs[(rounds + r) % addrs.len()];
                let ops = client_with_token(addr, &token("ops", "*", "service")).await;
                // A tiny window: the server can push it a handful of events, then must wait.
                let stalled = Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .initial_stream_window_size(1024)
                    .connect()
                    .await
                    .unwrap();
                work.push(tokio::spawn(round(addr, ops, stalled, format!("soak-{r}"))));
            }
            for task in work {
                task.await.unwrap();
            }
        });
        settle();
        samples.push((rss(), heap()));
        eprintln!("ROUND {} rss {} heap {}", samples.len(), rss(), heap());
    }
    // The first round warms caches, pools and the allocator; from the second on, memory is flat.
    let ((warm_rss, warm_heap), (end_rss, end_heap)) = (samples[1], samples[samples.len() - 1]);
    assert!(
        end_heap <= warm_heap + HEAP_SLACK,
        "the heap grew from {warm_heap} to {end_heap} bytes over {} rounds",
        samples.len()
    );
    assert!(
        end_rss <= warm_rss + warm_rss / 5 + RSS_SLACK,
        "RSS grew from {warm_rss} to {end_rss} bytes over {} rounds",
        samples.len()
    );
    // Every client is gone: no stream and no task of theirs may remain on the server.
    settle();
    drop(probes);
    drop(clients);
    server_runtime.block_on(async move { drop(server) });
}

/// The soak on one in-memory node.
#[test]
fn soak_memory() {
    soak(Backend::Memory);
}

/// The soak on two nodes sharing a private redis-server, rooms spread over both.
#[test]
fn soak_redis() {
    if redis_available() {
        soak(Backend::RedisTwoNodes);
    }
}
