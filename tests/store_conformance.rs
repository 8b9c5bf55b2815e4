//! The `RoomStore` contract, written once and run against every store: the in-memory one, and
//! two Redis stores sharing one redis-server (two nodes). Each test gets two handles; with memory
//! both are the same store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis_server::{redis_available, RedisServer};
use common::PATIENCE;
use prost::Message;
use roomctl::clock::Clock;
use roomctl::engine::RoomLimits;
use roomctl::engine::{
    Caller, ClientStatus, Command, DestroyCmd, DropCmd, JoinCmd, Reply, RoomScope, TokenRole,
};
use roomctl::error::Error;
use roomctl::pb::{self, DropOutcome, Role};
use roomctl::store::memory::MemoryStore;
use roomctl::store::redis::{RedisConfig, RedisStore};
use roomctl::store::{LoggedEvent, RoomSettings, RoomStore};
use roomctl::telemetry::Telemetry;

const HISTORY: usize = 5;
/// Participants per room in the conformance stores.
const MAX_MEMBERS: usize = 250;
/// Bytes of remembered answers per room in the conformance stores.
const ANSWER_BYTES: usize = 1024 * 1024;
/// Bytes of events (encoded) per room's history in the conformance stores: far more than
/// [`HISTORY`] small events weigh, so only large ones meet it.
const HISTORY_BYTES: usize = 8 * 1024;

/// Two handles on one store, and the Redis behind them if any.
struct Stores {
    a: Arc<dyn RoomStore>,
    b: Arc<dyn RoomStore>,
    _redis: Option<RedisServer>,
}

#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

/// How long the conformance stores keep an empty room: short, so a test can watch a room be
/// forgotten (it waits for that state, never for a time).
const EMPTY_ROOM_TTL: Duration = Duration::from_millis(300);

/// How long a client may go without a stream in the presence tests (on Redis it passes in real
/// time, so it is short).
const PRESENCE: Duration = Duration::from_secs(1);

async fn stores(kind: Kind) -> Stores {
    stores_of(kind, None).await
}

async fn stores_with_presence(kind: Kind) -> Stores {
    stores_of(kind, Some(PRESENCE)).await
}

async fn stores_of(kind: Kind, presence_timeout: Option<Duration>) -> Stores {
    let rooms = RoomSettings {
        history: HISTORY,
        history_bytes: HISTORY_BYTES,
        empty_room_ttl: EMPTY_ROOM_TTL,
        presence_timeout,
        limits: RoomLimits {
            max_members: MAX_MEMBERS,
            answer_bytes: ANSWER_BYTES,
        },
    };
    match kind {
        Kind::Memory => {
            let store = MemoryStore::open(rooms, Telemetry::off(), Clock::tokio());
            let store: Arc<dyn RoomStore> = Arc::new(store);
            Stores {
                a: store.clone(),
                b: store,
                _redis: None,
            }
        }
        Kind::Redis => {
            let redis = RedisServer::start().await;
            let config = RedisConfig {
                url: roomctl::store::redis::RedisUrl::new(redis.url()),
                ca_file: None,
                wait_replicas: 0,
                cluster_node_timeout: None,
                rooms,
            };
            let a = RedisStore::connect(config.clone()).await.unwrap();
            let b = RedisStore::connect(config).await.unwrap();
            Stores {
                a: Arc::new(a),
                b: Arc::new(b),
                _redis: Some(redis),
            }
        }
    }
}

/// Runs each test on both stores. On memory the test runs on tokio's paused time and the store
/// reads its clock from it, so waiting out a TTL, a ban or a lease takes no real time (and a wait
/// for what never comes fails at once). On Redis time is real: a real Redis cannot answer on
/// paused time, and its own clock expires a room's keys.
macro_rules! conformance {
    ($memory:ident, $redis:ident, $stores:ident: $($name:ident),* $(,)?) => {
        mod $memory {
            $(#[tokio::test(start_paused = true)] async fn $name() {
                super::$name(super::$stores(super::Kind::Memory).await).await
            })*
        }
        mod $redis {
            $(#[tokio::test] async fn $name() {
                if super::redis_available() {
                    super::$name(super::$stores(super::Kind::Redis).await).await
                }
            })*
        }
    };
}

fn service() -> Caller {
    Caller {
        identity: "svc".into(),
        scope: RoomScope::All,
        role: TokenRole::Service,
    }
}

fn join_cmd(client_id: &str) -> Command {
    Command::Join {
        client_id: client_id.into(),
        cmd: JoinCmd {
            name: client_id.into(),
            role: Role::Unspecified,
            identity: String::new(),
            request_id: None,
        },
    }
}

async fn join(store: &Arc<dyn RoomStore>, room: &str, client_id: &str) -> pb::JoinResponse {
    match store
        .execute(room, &service(), join_cmd(client_id))
        .await
        .unwrap()
        .reply
    {
        Reply::Joined(joined) => joined,
        other => panic!("{other:?}"),
    }
}

fn drop_cmd(ids: &[&str], request_id: &str) -> Command {
    Command::Drop(DropCmd {
        client_ids: ids.iter().map(|s| s.to_string()).collect(),
        reason: String::new(),
        request_id: request_id.into(),
        ban: None,
    })
}

/// A service's join on behalf of `identity`, as `role`.
fn join_as(client_id: &str, identity: &str, role: Role) -> Command {
    Command::Join {
        client_id: client_id.into(),
        cmd: JoinCmd {
            name: identity.into(),
            role,
            identity: identity.into(),
            request_id: None,
        },
    }
}

fn lock(request_id: &str) -> Command {
    Command::Lock {
        request_id: request_id.into(),
    }
}

fn unlock(request_id: &str) -> Command {
    Command::Unlock {
        request_id: request_id.into(),
    }
}

/// Drops `client_id` and bans its identity for `seconds`.
fn ban_cmd(client_id: &str, seconds: u64, request_id: &str) -> Command {
    Command::Drop(DropCmd {
        client_ids: vec![client_id.into()],
        reason: String::new(),
        request_id: request_id.into(),
        ban: Some(Duration::from_secs(seconds)),
    })
}

/// Waits until `room` is forgotten by `store`.
async fn until_forgotten(store: &Arc<dyn RoomStore>, room: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while store.snapshot(room).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the empty room was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seqs(events: &[Arc<LoggedEvent>]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// Only a join brings a room into existence; every other operation on a missing room is
/// ROOM_NOT_FOUND.
async fn only_join_creates_rooms(s: Stores) {
    let missing =
        |r: Result<(), Error>| assert!(matches!(r, Err(Error::RoomNotFound { .. })), "{r:?}");
    missing(
        s.a.execute(
            "r",
            &service(),
            Command::Leave {
                client_id: "x".into(),
            },
        )
        .await
        .map(|_| ()),
    );
    missing(
        s.a.execute("r", &service(), drop_cmd(&["x"], "q"))
            .await
            .map(|_| ()),
    );
    missing(s.a.snapshot("r").await.map(|_| ()));
    missing(s.a.open("r", None).await.map(|_| ()));
    missing(s.a.read("r", "e", 0).await.map(|_| ()));
    missing(s.a.rewatch("r").await.map(|_| ()));
    let joined = join(&s.a, "r", "c1").await;
    assert_eq!(joined.seq, 1);
    let snapshot = s.b.snapshot("r").await.unwrap();
    assert_eq!(
        (snapshot.window.epoch, snapshot.window.newest_seq),
        (joined.epoch, 1)
    );
}

/// The log keeps exactly the last `history` events; reads return what follows a cursor, in
/// order, and refuse cursors that fell out of the window or belong to another epoch.
async fn reads_follow_the_retained_window(s: Stores) {
    let mut epoch = String::new();
    for i in 0..8 {
        epoch = join(&s.a, "r", &format!("c{i}")).await.epoch;
    }
    let window = s.b.snapshot("r").await.unwrap().window;
    assert_eq!((window.oldest_seq, window.newest_seq), (4, 8));
    assert_eq!(
        seqs(&s.b.read("r", &epoch, 3).await.unwrap()),
        [4, 5, 6, 7, 8]
    );
    assert_eq!(seqs(&s.b.read("r", &epoch, 6).await.unwrap()), [7, 8]);
    // What a stream sends of an event is its encoding, however the store came to hold it.
    for event in s.b.read("r", &epoch, 3).await.unwrap() {
        let sent = event.encoded().encode_to_vec();
        assert_eq!(pb::Event::decode(sent.as_slice()).unwrap(), **event);
    }
    assert!(s.b.read("r", &epoch, 8).await.unwrap().is_empty());
    for (epoch, after) in [(epoch.as_str(), 2), ("another", 5)] {
        let err = s.b.read("r", epoch, after).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::CursorOutOfRange {
                    oldest_seq: 4,
                    newest_seq: 8,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

/// A history is bounded in bytes as well as in events, on every store: large events (acks of
/// drops naming many long ids) push the oldest out before the count would, the newest is always
/// kept however large, every handle sees the same window, cursors inside it read on and older
/// ones get OUT_OF_RANGE with the window that is really held.
async fn the_history_is_bounded_in_bytes(s: Stores) {
    let epoch = join(&s.a, "r", "c").await.epoch;
    let long: Vec<String> = (0..30).map(|i| format!("{i:0>100}")).collect();
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    // Each ack weighs about 3.2 KB: the third pushes the oldest events out.
    for i in 0..3 {
        s.a.execute("r", &service(), drop_cmd(&long, &format!("big{i}")))
            .await
            .unwrap();
    }
    let window = s.b.snapshot("r").await.unwrap().window;
    assert_eq!(window.newest_seq, 4);
    assert!(
        window.oldest_seq > 1,
        "{window:?}: trimmed by bytes, not by count (5)"
    );
    let held = s.b.read("r", &epoch, window.oldest_seq - 1).await.unwrap();
    assert_eq!(seqs(&held).first(), Some(&window.oldest_seq));
    assert_eq!(seqs(&held).last(), Some(&4));
    let weight: usize = held.iter().map(|e| e.encoded_len()).sum();
    assert!(weight <= HISTORY_BYTES, "{weight} bytes held");
    assert_eq!(s.a.snapshot("r").await.unwrap().window, window);
    let err =
        s.b.read("r", &epoch, window.oldest_seq - 2)
            .await
            .unwrap_err();
    assert!(
        matches!(&err, Error::CursorOutOfRange { oldest_seq, newest_seq: 4, .. } if *oldest_seq == window.oldest_seq),
        "{err:?}"
    );
    // One event heavier than the whole budget is still kept: the newest always is.
    let huge: Vec<String> = (0..100).map(|i| format!("{i:0>100}")).collect();
    let huge: Vec<&str> = huge.iter().map(String::as_str).collect();
    s.a.execute("r", &service(), drop_cmd(&huge, "huge"))
        .await
        .unwrap();
    let window = s.b.snapshot("r").await.unwrap().window;
    assert_eq!((window.oldest_seq, window.newest_seq), (5, 5));
    assert_eq!(seqs(&s.b.read("r", &epoch, 4).await.unwrap()), [5]);
}

/// `open` reports where a client stands: present with its identity, departed with the seq that
/// ended its streams while that is in the history, unknown otherwise.
async fn open_reports_client_status(s: Stores) {
    join(&s.a, "r", "stays").await;
    join(&s.a, "r", "goes").await;
    s.a.execute("r", &service(), drop_cmd(&["goes"], "q"))
        .await
        .unwrap(); // 3, 4, 5
    let present = s.b.open("r", Some("stays")).await.unwrap();
    assert_eq!(
        present.client,
        ClientStatus::Present {
            identity: "svc".into()
        }
    );
    let departed = s.b.open("r", Some("goes")).await.unwrap();
    assert_eq!(
        departed.client,
        ClientStatus::Departed {
            identity: "svc".into(),
            end_seq: 3
        }
    );
    assert_eq!(
        s.b.open("r", Some("never")).await.unwrap().client,
        ClientStatus::Unknown
    );
    // Once the departure leaves the history, the client is forgotten.
    for i in 0..5 {
        join(&s.a, "r", &format!("later{i}")).await;
    }
    assert_eq!(
        s.b.open("r", Some("goes")).await.unwrap().client,
        ClientStatus::Unknown
    );
}

/// Commands racing on one room from both handles all succeed with unique, contiguous seqs.
async fn concurrent_commands_get_contiguous_seqs(s: Stores) {
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let store = if worker % 2 == 0 {
            s.a.clone()
        } else {
            s.b.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                seqs.push(join(&store, "r", &format!("w{worker}-{i}")).await.seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    assert_eq!(s.a.snapshot("r").await.unwrap().participants.len(), 200);
}

/// A write through one handle wakes a subscriber opened through the other, which then reads it,
/// or takes it from the wake-up: the commit it carries is the same events as the log.
async fn writes_wake_subscribers_of_every_handle(s: Stores) {
    let first = join(&s.a, "r", "c0").await;
    let mut head = s.b.open("r", None).await.unwrap().head;
    head.borrow_and_update();
    join(&s.a, "r", "c1").await;
    tokio::time::timeout(PATIENCE, head.changed())
        .await
        .unwrap()
        .unwrap();
    let read = s.b.read("r", &first.epoch, 1).await.unwrap();
    assert_eq!(seqs(&read), [2]);
    assert_eq!(head.borrow().seq, 2);
    let (commit, next) = head.borrow().continuing(&first.epoch, 1).unwrap();
    assert_eq!(seqs(&commit[next..]), [2]);
    assert_eq!(**commit[next], **read[0]);
}

/// A room whose watchers have all gone wakes the next one all the same: from where the room is
/// when it subscribes, with the commit that follows (the memory store keeps a room's wake-up
/// channel only while someone watches).
async fn watchers_come_and_go(s: Stores) {
    let first = join(&s.a, "r", "c0").await;
    drop(s.b.open("r", None).await.unwrap().head);
    join(&s.a, "r", "c1").await;
    let mut head = s.b.open("r", None).await.unwrap().head;
    assert_eq!(head.borrow_and_update().seq, 2);
    join(&s.a, "r", "c2").await;
    tokio::time::timeout(PATIENCE, head.changed())
        .await
        .unwrap()
        .unwrap();
    let (commit, next) = head.borrow().continuing(&first.epoch, 2).unwrap();
    assert_eq!(seqs(&commit[next..]), [3]);
    let mut again = s.b.rewatch("r").await.unwrap();
    assert_eq!(again.borrow_and_update().seq, 3);
}

/// A retried drop through the other handle returns the first answer and writes nothing.
async fn drops_are_idempotent_across_handles(s: Stores) {
    join(&s.a, "r", "c0").await;
    let first =
        s.a.execute("r", &service(), drop_cmd(&["c0", "zz"], "req-1"))
            .await
            .unwrap();
    assert_eq!(first.events.len(), 3);
    let retry =
        s.b.execute("r", &service(), drop_cmd(&["c0", "zz"], "req-1"))
            .await
            .unwrap();
    assert_eq!(retry.reply, first.reply);
    assert!(retry.events.is_empty());
    assert_eq!(s.b.snapshot("r").await.unwrap().window.newest_seq, 4);
}

/// The same drop sent many times at once, through both handles, is applied exactly once and
/// every caller gets the same answer.
async fn concurrent_retries_apply_once(s: Stores) {
    for i in 0..3 {
        join(&s.a, "r", &format!("c{i}")).await;
    }
    let mut tasks = Vec::new();
    for n in 0..12 {
        let store = if n % 2 == 0 { s.a.clone() } else { s.b.clone() };
        tasks.push(tokio::spawn(async move {
            let cmd = drop_cmd(&["c0", "c2", "nobody"], "same-request");
            store.execute("r", &service(), cmd).await.unwrap()
        }));
    }
    let mut replies = Vec::new();
    let mut events = 0;
    for task in tasks {
        let applied = task.await.unwrap();
        events += applied.events.len();
        replies.push(applied.reply);
    }
    assert_eq!(events, 5, "two drops' events and one ack, written once");
    assert!(replies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.b.snapshot("r").await.unwrap().window.newest_seq, 3 + 5);
}

/// What one handle learnt of a room is never trusted beyond what it saw: members and answers
/// that were already there when it last looked, and changes made through the other handle
/// since, are all taken into account.
async fn handles_never_act_on_stale_knowledge(s: Stores) {
    join(&s.b, "r", "c1").await; // 1
    s.b.execute("r", &service(), drop_cmd(&["nobody"], "q1"))
        .await
        .unwrap(); // 2
    join(&s.a, "r", "c0").await; // 3: a looks at the room, but not at c1 or q1
    let dropped =
        s.a.execute("r", &service(), drop_cmd(&["c1"], "q2"))
            .await
            .unwrap(); // 4, 5, 6
    let Reply::Dropped(response) = dropped.reply else {
        panic!()
    };
    assert_eq!(
        response.results[0].outcome(),
        DropOutcome::Dropped,
        "a member a had not seen"
    );
    let retry =
        s.a.execute("r", &service(), drop_cmd(&["nobody"], "q1"))
            .await
            .unwrap();
    assert!(
        retry.events.is_empty(),
        "an answer a had not seen is remembered"
    );

    s.b.execute("r", &service(), drop_cmd(&["c0"], "q3"))
        .await
        .unwrap(); // 7, 8, 9
    let leave =
        s.a.execute(
            "r",
            &service(),
            Command::Leave {
                client_id: "c0".into(),
            },
        )
        .await;
    assert!(
        matches!(leave, Err(Error::ClientNotFound { .. })),
        "dropped through b: {leave:?}"
    );
    assert_eq!(
        s.a.snapshot("r").await.unwrap().window.newest_seq,
        9,
        "nothing written on a stale view"
    );
}

/// Remembered answers belong to the room's epoch: once an empty room is forgotten and joined
/// anew, a request id used in the old room is a new request (the client is dropped), on every
/// store alike.
async fn answers_are_forgotten_with_their_room(s: Stores) {
    join(&s.a, "r", "c0").await;
    let first =
        s.a.execute("r", &service(), drop_cmd(&["c0"], "req-1"))
            .await
            .unwrap();
    until_forgotten(&s.b, "r").await;
    let again = join(&s.b, "r", "c0").await;
    assert_ne!(again.epoch, first.events[0].epoch);
    let second =
        s.b.execute("r", &service(), drop_cmd(&["c0"], "req-1"))
            .await
            .unwrap();
    let Reply::Dropped(response) = second.reply else {
        panic!("{:?}", second.reply)
    };
    assert_eq!(response.results[0].outcome(), DropOutcome::Dropped);
    assert_eq!(second.events.len(), 3);
}

/// A room remembers answers for their window within a budget in bytes, on every store: well
/// past a count of 1,024 small answers the first still answers its retry (from the other
/// handle too); past the budget the oldest are forgotten (a retry of the very first request is
/// a new request) and the newest still answer retries.
async fn remembered_answers_are_bounded(s: Stores) {
    join(&s.a, "r", "keep").await;
    let drop_q = |i: usize| drop_cmd(&["nobody"], &format!("q{i}"));
    // About 60 bytes each and 512 of bookkeeping: 1,100 fit in the conformance stores' budget,
    // some 1,800 do not.
    for i in 0..1100 {
        s.a.execute("r", &service(), drop_q(i)).await.unwrap();
    }
    let first = s.b.execute("r", &service(), drop_q(0)).await.unwrap();
    assert!(first.events.is_empty(), "remembered past 1,024 answers");
    for i in 1100..ANSWER_BYTES / 500 {
        s.a.execute("r", &service(), drop_q(i)).await.unwrap();
    }
    // Through the handle that wrote them: the other may answer from what it read within the
    // last second (a writer's view of its room outlives a forgotten answer by at most that).
    let oldest = s.a.execute("r", &service(), drop_q(0)).await.unwrap();
    assert_eq!(oldest.events.len(), 1, "forgotten, so applied again");
    let newest =
        s.b.execute("r", &service(), drop_q(ANSWER_BYTES / 500 - 1))
            .await
            .unwrap();
    assert!(newest.events.is_empty(), "still remembered");
}

/// A request id reused for a different request by the same caller is refused on every store
/// and from every handle, and changes nothing; the same request again gets its first answer.
async fn reused_request_ids_are_refused(s: Stores) {
    let keyed = |name: &str| Command::Join {
        client_id: format!("c-{name}-{}", std::process::id()),
        cmd: JoinCmd {
            name: name.into(),
            role: Role::Participant,
            identity: "u".into(),
            request_id: Some("k".into()),
        },
    };
    let first = s.a.execute("r", &service(), keyed("x")).await.unwrap();
    let retry = s.b.execute("r", &service(), keyed("x")).await.unwrap();
    assert_eq!(retry.reply, first.reply);
    let seq = s.b.snapshot("r").await.unwrap().window.newest_seq;
    for store in [&s.a, &s.b] {
        let reused = store.execute("r", &service(), keyed("y")).await;
        assert!(
            matches!(&reused, Err(Error::RequestIdReused { request_id }) if request_id == "k"),
            "{reused:?}"
        );
    }
    assert_eq!(s.a.snapshot("r").await.unwrap().window.newest_seq, seq);
}

/// A room holds at most its limit of participants, counted across handles: one more join is
/// ROOM_FULL on either, and once someone leaves through one handle the other admits a join.
async fn full_rooms_refuse_joins_on_every_handle(s: Stores) {
    for i in 0..MAX_MEMBERS {
        let store = if i % 2 == 0 { &s.a } else { &s.b };
        join(store, "r", &format!("c{i}")).await;
    }
    for store in [&s.a, &s.b] {
        let full = store.execute("r", &service(), join_cmd("one-more")).await;
        assert!(
            matches!(
                full,
                Err(Error::LimitReached {
                    max: MAX_MEMBERS,
                    ..
                })
            ),
            "{full:?}"
        );
    }
    s.b.execute(
        "r",
        &service(),
        Command::Leave {
            client_id: "c0".into(),
        },
    )
    .await
    .unwrap();
    join(&s.a, "r", "one-more").await;
    assert_eq!(
        s.b.snapshot("r").await.unwrap().participants.len(),
        MAX_MEMBERS
    );
}

/// The same time-out, issued by both handles at once (as two nodes that both noticed a lapsed
/// lease would), removes each client once: one `user_disconnected` per client in all, and the
/// handles that lost the race report nobody removed.
async fn concurrent_time_outs_remove_once(s: Stores) {
    for i in 0..3 {
        join(&s.a, "r", &format!("c{i}")).await;
    }
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 { s.a.clone() } else { s.b.clone() };
        tasks.push(tokio::spawn(async move {
            let cmd = Command::TimeOut {
                client_ids: vec!["c0".into(), "c2".into(), "nobody".into()],
            };
            store.execute("r", &Caller::system(), cmd).await.unwrap()
        }));
    }
    let mut removed = Vec::new();
    let mut events = 0;
    for task in tasks {
        let applied = task.await.unwrap();
        events += applied.events.len();
        match applied.reply {
            Reply::TimedOut(ids) => removed.extend(ids),
            other => panic!("{other:?}"),
        }
    }
    removed.sort();
    assert_eq!(removed, ["c0", "c2"]);
    assert_eq!(events, 2);
    let snapshot = s.b.snapshot("r").await.unwrap();
    assert_eq!(snapshot.window.newest_seq, 3 + 2);
    let left: Vec<_> = snapshot.participants.iter().map(|p| &p.client_id).collect();
    assert_eq!(left, ["c1"]);
}

/// A lock set through one handle refuses participants' joins through the other, even one that
/// had looked at the room before the lock; moderators still join; the second lock and an unlock
/// of an unlocked room are refused on either handle; an unlock through one handle admits
/// participants through the other, which had seen the lock.
async fn locks_hold_across_handles(s: Stores) {
    s.b.execute("r", &service(), join_as("c0", "u0", Role::Participant))
        .await
        .unwrap(); // b has seen the room unlocked
    let locked = s.a.execute("r", &service(), lock("l1")).await.unwrap();
    let Reply::Locked(response) = &locked.reply else {
        panic!("{:?}", locked.reply)
    };
    assert_eq!(response.seq, 2);
    assert!(s.b.snapshot("r").await.unwrap().locked);

    let refused =
        s.b.execute("r", &service(), join_as("c1", "u1", Role::Participant))
            .await;
    assert!(
        matches!(refused, Err(Error::RoomLocked { .. })),
        "{refused:?}"
    );
    s.b.execute("r", &service(), join_as("m1", "mod", Role::Moderator))
        .await
        .unwrap();
    let again = s.b.execute("r", &service(), lock("l2")).await;
    assert!(
        matches!(again, Err(Error::RoomAlreadyLocked { .. })),
        "{again:?}"
    );
    let retry = s.b.execute("r", &service(), lock("l1")).await.unwrap();
    assert!(retry.events.is_empty(), "a retry is answered, not applied");
    assert_eq!(retry.reply, locked.reply);

    s.b.execute("r", &service(), unlock("u1")).await.unwrap();
    assert!(!s.a.snapshot("r").await.unwrap().locked);
    s.a.execute("r", &service(), join_as("c1", "u1", Role::Participant))
        .await
        .unwrap(); // a had seen the lock it set
    let not_locked = s.a.execute("r", &service(), unlock("u2")).await;
    assert!(
        matches!(not_locked, Err(Error::RoomNotLocked { .. })),
        "{not_locked:?}"
    );
    assert_eq!(s.b.snapshot("r").await.unwrap().window.newest_seq, 5);
}

/// A refusal the room's state decided is remembered under the request's id like an answer: an
/// attempt of the same request that reaches the store later, through the other handle and after
/// the room changed (a node paused with it, say), gets the refusal and changes nothing, so a
/// request refused once is never applied. A new request id is a new request; a join without one
/// is not remembered.
async fn refusals_are_remembered_under_their_request_id(s: Stores) {
    let participant = |client_id: &str, request_id: Option<&str>| Command::Join {
        client_id: client_id.into(),
        cmd: JoinCmd {
            name: "u1".into(),
            role: Role::Participant,
            identity: "u1".into(),
            request_id: request_id.map(str::to_owned),
        },
    };
    join(&s.a, "r", "c0").await;
    s.a.execute("r", &service(), lock("l1")).await.unwrap();
    for attempt in [participant("c1", Some("q")), participant("c2", None)] {
        let refused = s.b.execute("r", &service(), attempt).await;
        assert!(
            matches!(refused, Err(Error::RoomLocked { .. })),
            "{refused:?}"
        );
    }
    let again = s.b.execute("r", &service(), lock("l2")).await;
    assert!(
        matches!(again, Err(Error::RoomAlreadyLocked { .. })),
        "{again:?}"
    );
    s.b.execute("r", &service(), unlock("u1")).await.unwrap();

    let late =
        s.a.execute("r", &service(), participant("c3", Some("q")))
            .await;
    assert!(matches!(late, Err(Error::RoomLocked { .. })), "{late:?}");
    let late_lock = s.a.execute("r", &service(), lock("l2")).await;
    assert!(
        matches!(late_lock, Err(Error::RoomAlreadyLocked { .. })),
        "{late_lock:?}"
    );
    let snapshot = s.b.snapshot("r").await.unwrap();
    assert!(!snapshot.locked, "the remembered refusal locked nothing");
    assert_eq!(snapshot.participants.len(), 1, "{snapshot:?}");
    assert_eq!(snapshot.window.newest_seq, 3, "refusals log nothing");

    s.a.execute("r", &service(), participant("c4", Some("q2")))
        .await
        .unwrap();
    s.a.execute("r", &service(), participant("c5", None))
        .await
        .unwrap();
    assert_eq!(s.b.snapshot("r").await.unwrap().participants.len(), 3);
}

/// A ban set through one handle keeps its identity out through the other (which had seen the
/// room before), is listed by both, and outlives the room's emptiness: the room is not forgotten
/// while it is in force. Unbanning through one handle lets the identity in through the other,
/// which had seen the ban.
async fn bans_hold_across_handles_and_keep_the_room(s: Stores) {
    s.b.execute("r", &service(), join_as("c0", "u0", Role::Participant))
        .await
        .unwrap();
    let dropped =
        s.a.execute("r", &service(), ban_cmd("c0", 60, "d1"))
            .await
            .unwrap();
    let kinds: Vec<_> = dropped.events.iter().map(|e| common::kind(e)).collect();
    assert_eq!(
        kinds,
        [
            "room_disconnected",
            "user_disconnected",
            "user_banned",
            "ack_drop_user"
        ]
    );

    let refused =
        s.b.execute("r", &service(), join_as("c1", "u0", Role::Moderator))
            .await;
    match refused {
        Err(Error::Banned { identity, .. }) => assert_eq!(identity, "u0"),
        other => panic!("{other:?}"),
    }
    let bans = s.b.bans("r").await.unwrap();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].identity, "u0");
    assert_eq!(bans[0].moderator, "svc");
    let left = bans[0]
        .until
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60));

    // Empty now, yet kept: every handle still answers for the room well past its empty TTL.
    tokio::time::sleep(EMPTY_ROOM_TTL * 3).await;
    assert_eq!(
        s.a.bans("r").await.unwrap().len(),
        1,
        "the room was forgotten"
    );
    assert!(s.b.snapshot("r").await.unwrap().participants.is_empty());

    let unbanned =
        s.b.execute(
            "r",
            &service(),
            Command::Unban {
                identity: "u0".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(common::kind(&unbanned.events[0]), "user_unbanned");
    assert!(s.a.bans("r").await.unwrap().is_empty());
    let gone =
        s.a.execute(
            "r",
            &service(),
            Command::Unban {
                identity: "u0".into(),
            },
        )
        .await;
    assert!(matches!(gone, Err(Error::BanNotFound { .. })), "{gone:?}");
    s.a.execute("r", &service(), join_as("c1", "u0", Role::Participant))
        .await
        .unwrap(); // a had seen its own ban
}

/// Once its last ban ends, an empty room is forgotten after its TTL like any other.
async fn rooms_are_forgotten_after_their_last_ban(s: Stores) {
    join(&s.a, "r", "c0").await;
    s.a.execute("r", &service(), ban_cmd("c0", 1, "d1"))
        .await
        .unwrap();
    assert_eq!(s.b.bans("r").await.unwrap().len(), 1);
    until_forgotten(&s.b, "r").await;
    assert!(matches!(
        s.a.bans("r").await,
        Err(Error::RoomNotFound { .. })
    ));
}

/// A ban that would take a room past its limit of bans fails and drops nobody.
async fn bans_are_bounded(s: Stores) {
    let max = roomctl::engine::MAX_BANS;
    join(&s.a, "r", "c0").await;
    // Fill the room's bans cheaply: each drop of an absent client bans nobody, so ban real
    // identities by joining and dropping them in large batches.
    let mut ids = Vec::new();
    for i in 0..max {
        let id = format!("b{i}");
        s.a.execute("r", &service(), join_as(&id, &id, Role::Participant))
            .await
            .unwrap();
        ids.push(id);
        if ids.len() == 200 || i + 1 == max {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let mut cmd = drop_cmd(&refs, &format!("batch{i}"));
            if let Command::Drop(drop) = &mut cmd {
                drop.ban = Some(Duration::from_secs(600));
            }
            s.a.execute("r", &service(), cmd).await.unwrap();
            ids.clear();
        }
    }
    assert_eq!(s.b.bans("r").await.unwrap().len(), max);
    let before = s.b.snapshot("r").await.unwrap().window.newest_seq;
    let over =
        s.b.execute("r", &service(), ban_cmd("c0", 60, "over"))
            .await;
    assert!(
        matches!(over, Err(Error::LimitReached { max: m, .. }) if m == max),
        "{over:?}"
    );
    let after = s.a.snapshot("r").await.unwrap();
    assert_eq!(after.window.newest_seq, before, "nothing logged");
    assert_eq!(after.participants.len(), 1, "nobody dropped");
}

/// Destroying a session through one handle removes every member, including those joined
/// through the other handle that it had never seen, logs one `session_destroyed` after which
/// everyone departed, unlocks the room and keeps its epoch; a retry answers the same; the next
/// join continues the log.
async fn destroy_removes_every_member(s: Stores) {
    join(&s.a, "r", "c0").await; // a knows c0 only
    for id in ["c1", "c2"] {
        join(&s.b, "r", id).await;
    }
    s.b.execute("r", &service(), lock("l")).await.unwrap(); // 4
    let destroy = || {
        Command::Destroy(DestroyCmd {
            reason: "over".into(),
            request_id: "end".into(),
        })
    };
    let destroyed = s.a.execute("r", &service(), destroy()).await.unwrap();
    let Reply::Destroyed(response) = &destroyed.reply else {
        panic!("{:?}", destroyed.reply)
    };
    let mut ids = response.client_ids.clone();
    ids.sort();
    assert_eq!(ids, ["c0", "c1", "c2"]);
    assert_eq!(response.seq, 5);
    assert_eq!(destroyed.events.len(), 1);
    assert_eq!(destroyed.events[0].seq, 5);
    assert_eq!(common::kind(&destroyed.events[0]), "session_destroyed");

    let snapshot = s.b.snapshot("r").await.unwrap();
    assert!(snapshot.participants.is_empty());
    assert!(!snapshot.locked);
    assert_eq!(snapshot.window.epoch, destroyed.events[0].epoch);
    for id in ["c0", "c1", "c2"] {
        let opening = s.b.open("r", Some(id)).await.unwrap();
        assert!(
            matches!(opening.client, ClientStatus::Departed { end_seq: 5, .. }),
            "{id}: {:?}",
            opening.client
        );
    }
    let retry = s.b.execute("r", &service(), destroy()).await.unwrap();
    assert!(retry.events.is_empty());
    assert_eq!(retry.reply, destroyed.reply);
    let next = join(&s.b, "r", "c3").await;
    assert_eq!(next.seq, 6);
    assert_eq!(next.epoch, destroyed.events[0].epoch);
}

/// Listing rooms in pages visits every room that exists throughout exactly once, in id order,
/// while other rooms are created and forgotten between pages, and whichever handle reads.
async fn rooms_are_listed_once_across_pages(s: Stores) {
    let stable: Vec<String> = (0..25).map(|i| format!("room-{i:02}")).collect();
    for (i, room) in stable.iter().enumerate() {
        let store = if i % 2 == 0 { &s.a } else { &s.b };
        join(store, room, "c0").await;
    }
    s.a.execute("room-03", &service(), lock("l")).await.unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut page = 0;
    loop {
        let store = if page % 2 == 0 { &s.a } else { &s.b };
        let rooms = store.list_rooms(after.as_deref(), 4).await.unwrap();
        // Churn between pages: a room appears before the cursor, another after it, and one
        // ahead of it is dropped empty.
        join(&s.a, &format!("churn-{page}"), "c0").await;
        join(&s.b, &format!("room-{page:02}x"), "c0").await;
        if rooms.is_empty() {
            break;
        }
        for room in &rooms {
            if room.room_id == "room-03" {
                assert!(room.locked);
                assert_eq!((room.participants, room.seq), (1, 2));
            }
        }
        after = rooms.last().map(|r| r.room_id.clone());
        seen.extend(rooms.into_iter().map(|r| r.room_id));
        page += 1;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "in order, each once");
    for room in &stable {
        assert!(seen.contains(room), "{room} was never listed");
    }
}

/// A store reports itself healthy once it can serve.
async fn health_turns_serving(s: Stores) {
    let mut health = s.a.health();
    tokio::time::timeout(PATIENCE, health.wait_for(|serving| *serving))
        .await
        .unwrap()
        .unwrap();
}

conformance! {
    memory, redis, stores:
    only_join_creates_rooms,
    reads_follow_the_retained_window,
    the_history_is_bounded_in_bytes,
    open_reports_client_status,
    concurrent_commands_get_contiguous_seqs,
    writes_wake_subscribers_of_every_handle,
    watchers_come_and_go,
    drops_are_idempotent_across_handles,
    concurrent_retries_apply_once,
    handles_never_act_on_stale_knowledge,
    answers_are_forgotten_with_their_room,
    remembered_answers_are_bounded,
    reused_request_ids_are_refused,
    full_rooms_refuse_joins_on_every_handle,
    concurrent_time_outs_remove_once,
    locks_hold_across_handles,
    refusals_are_remembered_under_their_request_id,
    bans_hold_across_handles_and_keep_the_room,
    rooms_are_forgotten_after_their_last_ban,
    bans_are_bounded,
    destroy_removes_every_member,
    rooms_are_listed_once_across_pages,
    health_turns_serving,
    with_presence_off_clients_stay,
}

/// Waits until `client_id` is no longer in `room`.
async fn until_removed(store: &Arc<dyn RoomStore>, room: &str, client_id: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let snapshot = store.snapshot(room).await.unwrap();
        if !snapshot
            .participants
            .iter()
            .any(|p| p.client_id == client_id)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{client_id} was never timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that never opens a stream is timed out once the timeout has passed; one with a
/// stream open (through the other handle) stays however long it lasts, and is timed out once
/// its stream has been closed for the timeout. Each time-out is logged once, as TIMED_OUT.
async fn presence_times_out_only_clients_without_a_stream(s: Stores) {
    let first = join(&s.a, "r", "ghost").await;
    join(&s.a, "r", "ann").await;
    let streaming = s.b.open("r", Some("ann")).await.unwrap();
    until_removed(&s.a, "r", "ghost").await;
    tokio::time::sleep(PRESENCE * 3).await;
    let present = s.a.snapshot("r").await.unwrap().participants;
    assert_eq!(present.len(), 1, "{present:?}");
    assert!(present[0].connected, "{present:?}");
    drop(streaming);
    until_removed(&s.b, "r", "ann").await;
    let events = s.a.read("r", &first.epoch, first.seq + 1).await.unwrap();
    let gone: Vec<(String, i32)> = events
        .iter()
        .map(|e| match &e.payload {
            Some(pb::event::Payload::UserDisconnected(gone)) => {
                (gone.client_id.clone(), gone.reason)
            }
            other => panic!("only time-outs are logged: {other:?}"),
        })
        .collect();
    let timed_out = pb::DisconnectReason::TimedOut as i32;
    assert_eq!(
        gone,
        [
            ("ghost".to_owned(), timed_out),
            ("ann".to_owned(), timed_out)
        ]
    );
}

/// With presence off, a client without a stream stays however long it waits.
async fn with_presence_off_clients_stay(s: Stores) {
    join(&s.a, "r", "ann").await;
    tokio::time::sleep(PRESENCE * 3).await;
    let present = s.b.snapshot("r").await.unwrap().participants;
    assert_eq!(present.len(), 1, "{present:?}");
    assert!(!present[0].connected, "off: never connected");
}

conformance! {
    memory_presence, redis_presence, stores_with_presence:
    presence_times_out_only_clients_without_a_stream,
}

/// One cluster-mode Redis holding every slot, reached as `redis://`: a script of one room may
/// not touch the fleet's room list there (another slot), so the node keeps the list around its
/// commits, as on a cluster, and rooms are created, listed and emptied as anywhere.
#[tokio::test]
async fn a_cluster_mode_redis_reached_as_one_serves() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start_cluster_of_one().await;
    let config = RedisConfig {
        url: roomctl::store::redis::RedisUrl::new(redis.url()),
        ca_file: None,
        wait_replicas: 0,
        cluster_node_timeout: None,
        rooms: RoomSettings {
            presence_timeout: None,
            ..RoomSettings::default()
        },
    };
    let store: Arc<dyn RoomStore> = Arc::new(RedisStore::connect(config).await.unwrap());
    join(&store, "r", "c1").await;
    let listed = store.list_rooms(None, 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| r.room_id.as_str())
            .collect::<Vec<_>>(),
        ["r"]
    );
    store
        .execute("r", &service(), drop_cmd(&["c1"], "d1"))
        .await
        .unwrap();
    assert!(store.snapshot("r").await.unwrap().participants.is_empty());
}
