//! The client commands of the `roomctl` binary against real servers: join, participants, drop
//! and the moderator commands as an operator types them (text and `--json`), errors with their
//! exit codes, and `watch` following a room across a node killed and restarted on the Redis
//! store, printing every event exactly once, and across a restarted memory node, waiting for
//! the room and showing the new epoch.

mod common;

use std::process::{Output, Stdio};

use common::redis_server::{redis_available, RedisServer};
use common::*;
use roomctl::server::{ServerConfig, StoreConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_roomctl");

/// `roomctl ARGS` against `server` with `token`.
fn roomctl(server: &str, token: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("ROOMCTL_SERVER", server)
        .env("ROOMCTL_TOKEN", token)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run(server: &str, token: &str, args: &[&str]) -> Output {
    let output = roomctl(server, token, args).output();
    tokio::time::timeout(PATIENCE, output)
        .await
        .unwrap()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// join, participants and drop print what an operator expects, in text and as JSON; a
/// participant's drop exits 3 with the 5116 ErrorInfo, a missing room exits 4, and an
/// unreachable server exits 5.
#[tokio::test]
async fn join_participants_and_drop_from_the_command_line() {
    let server = TestServer::start(Backend::Memory).await;
    let url = format!("http://{}", server.addr);
    let ops = token("ops", "*", "service");
    let joined = run(&url, &ops, &["join", "demo", "--name", "Ann", "--json"]).await;
    assert!(joined.status.success(), "{}", stderr(&joined));
    let joined: serde_json::Value = serde_json::from_str(&stdout(&joined)).unwrap();
    let ann = joined["clientId"].as_str().unwrap().to_owned();
    assert_eq!(joined["seq"], "1");

    let listed = run(&url, &ops, &["participants", "demo"]).await;
    let table = stdout(&listed);
    assert!(table.starts_with("CLIENT ID"), "{table}");
    assert!(table.contains(&ann) && table.contains("Ann"), "{table}");

    let dropped = run(
        &url,
        &ops,
        &["drop", "demo", &ann, "nobody", "--reason", "bye"],
    )
    .await;
    assert!(dropped.status.success(), "{}", stderr(&dropped));
    let lines = stdout(&dropped);
    assert!(lines.contains(&format!("{ann}\tdropped")), "{lines}");
    assert!(lines.contains("nobody\tnot found"), "{lines}");

    let bob = token("bob", "demo", "participant");
    let refused = run(&url, &bob, &["drop", "demo", "x"]).await;
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    let said = stderr(&refused);
    assert!(
        said.contains("PERMISSION_DENIED: 5116: Unauthorized Access"),
        "{said}"
    );
    assert!(
        said.contains("UNAUTHORIZED_ACCESS") && said.contains("code: 5116"),
        "{said}"
    );
    let missing = run(&url, &ops, &["participants", "nowhere"]).await;
    assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("ROOM_NOT_FOUND"));
    let unreachable = run("http://127.0.0.1:1", &ops, &["participants", "demo"]).await;
    assert_eq!(
        unreachable.status.code(),
        Some(5),
        "{}",
        stderr(&unreachable)
    );
}

/// The moderator commands as an operator types them: lock (and 5117 on a second one, exit 4),
/// a participant's join refused while locked, unlock, a drop with `--ban` and the ban listed and
/// lifted, the session ended, and every room listed in text and JSON across pages.
#[tokio::test]
async fn moderate_a_room_from_the_command_line() {
    let server = TestServer::start(Backend::Memory).await;
    let url = format!("http://{}", server.addr);
    let ops = token("ops", "*", "service");
    let alice = token("alice", "demo", "moderator");
    let bob = token("bob", "demo", "participant");
    let ok = |output: &Output| assert!(output.status.success(), "{}", stderr(output));

    ok(&run(&url, &alice, &["join", "demo"]).await);
    let locked = run(&url, &alice, &["lock", "demo", "--request-id", "l1"]).await;
    ok(&locked);
    assert_eq!(stdout(&locked), "demo locked at seq 2\n(request l1)\n");
    let again = run(&url, &alice, &["lock", "demo"]).await;
    assert_eq!(again.status.code(), Some(4), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("FAILED_PRECONDITION: 5117:"),
        "{}",
        stderr(&again)
    );
    assert!(stderr(&again).contains("code: 5117"), "{}", stderr(&again));
    let refused = run(&url, &bob, &["join", "demo"]).await;
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("ROOM_LOCKED"),
        "{}",
        stderr(&refused)
    );
    let participant = run(&url, &bob, &["unlock", "demo"]).await;
    assert_eq!(participant.status.code(), Some(3));
    assert!(stderr(&participant).contains("5115: Unauthorized Access"));
    ok(&run(&url, &alice, &["unlock", "demo", "--json"]).await);

    let joined = run(&url, &bob, &["join", "demo", "--json"]).await;
    ok(&joined);
    let joined: serde_json::Value = serde_json::from_str(&stdout(&joined)).unwrap();
    let client_id = joined["clientId"].as_str().unwrap().to_owned();
    ok(&run(&url, &alice, &["drop", "demo", &client_id, "--ban", "1h"]).await);
    let banned = run(&url, &bob, &["join", "demo"]).await;
    assert_eq!(banned.status.code(), Some(3), "{}", stderr(&banned));
    assert!(
        stderr(&banned).contains("reason: BANNED"),
        "{}",
        stderr(&banned)
    );
    assert!(
        stderr(&banned).contains("identity: bob"),
        "{}",
        stderr(&banned)
    );
    let bans = run(&url, &alice, &["bans", "demo"]).await;
    ok(&bans);
    let table = stdout(&bans);
    assert!(table.starts_with("IDENTITY"), "{table}");
    assert!(
        table.contains("bob") && table.contains("alice") && table.contains("(1 bans)"),
        "{table}"
    );
    let lifted = run(&url, &alice, &["unban", "demo", "bob"]).await;
    ok(&lifted);
    assert!(
        stdout(&lifted).starts_with("bob unbanned at seq "),
        "{}",
        stdout(&lifted)
    );
    let gone = run(&url, &alice, &["unban", "demo", "bob"]).await;
    assert_eq!(gone.status.code(), Some(4));
    assert!(stderr(&gone).contains("BAN_NOT_FOUND"));

    let joined = run(&url, &bob, &["join", "demo", "--json"]).await;
    ok(&joined);
    let joined: serde_json::Value = serde_json::from_str(&stdout(&joined)).unwrap();
    let destroyed = run(
        &url,
        &alice,
        &["destroy", "demo", "--reason", "over", "--json"],
    )
    .await;
    ok(&destroyed);
    let destroyed: serde_json::Value = serde_json::from_str(&stdout(&destroyed)).unwrap();
    let removed = destroyed["clientIds"].as_array().unwrap();
    assert_eq!(removed.len(), 2, "alice and bob: {destroyed}");
    assert!(removed.contains(&joined["clientId"]), "{destroyed}");

    for room in ["a1", "a2", "a3"] {
        ok(&run(&url, &ops, &["join", room, "--identity", "u"]).await);
    }
    let rooms = run(&url, &ops, &["rooms", "--page-size", "2"]).await;
    ok(&rooms);
    let table = stdout(&rooms);
    let names: Vec<_> = table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(names, ["a1", "a2", "a3", "demo", "(4"], "{table}");
    let rooms = run(&url, &ops, &["rooms", "--json"]).await;
    ok(&rooms);
    let lines: Vec<serde_json::Value> = stdout(&rooms)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["roomId"], "a1");
    assert_eq!(lines[0]["participants"], 1);
    let forbidden = run(&url, &alice, &["rooms"]).await;
    assert_eq!(forbidden.status.code(), Some(3));
    assert!(stderr(&forbidden).contains("FORBIDDEN"));
    assert_eq!(stdout(&forbidden), "", "no table header before a refusal");
}

/// A `roomctl serve` node on the Redis at `redis`, listening on `listen`.
async fn node(redis: &RedisServer, listen: &str) -> (Child, std::net::SocketAddr) {
    node_process::start_quiet(node_process::serve(&[
        "--listen",
        listen,
        "--store",
        &redis.url(),
    ]))
    .await
}

/// The next JSON object the watch prints.
async fn next_line(
    printed: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(PATIENCE, printed.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("watch printed a line");
    serde_json::from_str(&line).unwrap()
}

/// `watch --json` as a client follows its room through node A being killed (SIGKILL) and
/// another node starting on A's address, while events keep being logged through node B: every
/// event is printed exactly once, in order, and when the client is dropped the watch prints
/// its `roomDisconnected` and exits 0.
#[tokio::test]
async fn watch_resumes_across_a_node_restart_on_redis() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start().await;
    let (mut a, addr) = node(&redis, "127.0.0.1:0").await;
    let mut config = ServerConfig::new(SECRET);
    config.store = StoreConfig::redis(redis.url());
    let b = Node::start(config).await;
    let mut ops = b.client("ops", "*", "service").await;
    let me = join(&mut ops, "r", "watcher").await;

    let mut watch = roomctl(
        &format!("http://{addr}"),
        &token("ops", "*", "service"),
        &["watch", "r", "--client", &me.client_id, "--json"],
    )
    .spawn()
    .unwrap();
    let mut printed = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seqs = Vec::new();
    let snapshot = next_line(&mut printed).await;
    assert_eq!(snapshot["seq"], me.seq.to_string(), "the start snapshot");

    for i in 0..2 {
        join(&mut ops, "r", &format!("before-{i}")).await;
        let event = next_line(&mut printed).await;
        seqs.push(event["seq"].as_str().unwrap().parse::<u64>().unwrap());
    }
    a.kill().await.unwrap();
    for i in 0..2 {
        join(&mut ops, "r", &format!("while-down-{i}")).await;
    }
    let (_a_again, _) = node(&redis, &addr.to_string()).await;
    join(&mut ops, "r", "after").await;
    ops.drop_user(drop_request("r", &[&me.client_id], "done"))
        .await
        .unwrap();
    let last = loop {
        let event = next_line(&mut printed).await;
        seqs.push(event["seq"].as_str().unwrap().parse::<u64>().unwrap());
        if event.get("roomDisconnected").is_some() {
            break event;
        }
    };
    assert_eq!(last["roomDisconnected"]["message"], "done");
    let expected: Vec<u64> = (me.seq + 1..=me.seq + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every event once, in order");
    let status = tokio::time::timeout(PATIENCE, watch.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "watch exits 0 when its stream ends OK: {status:?}"
    );
    let mut said = String::new();
    watch
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .await
        .unwrap();
    assert!(
        said.contains("reconnecting"),
        "a progress line while reconnecting: {said}"
    );
}

/// The next line the watch prints, as text.
async fn next_text(
    printed: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> String {
    tokio::time::timeout(PATIENCE, printed.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("watch printed a line")
}

/// `watch` on the memory store across a restart of its node: the room is gone with the node,
/// so the watch says so and waits for the room instead of exiting; once the room is joined
/// again (a new log, a new epoch) it resyncs and goes on, and its text shows the change of
/// epoch on a line of its own, so the new log's `#2` is not taken for the old one's.
#[tokio::test]
async fn watch_waits_for_a_room_lost_with_a_memory_node() {
    let memory_node = |listen: String| {
        node_process::start_quiet(node_process::serve(&[
            "--listen",
            &listen,
            "--presence-timeout",
            "0",
        ]))
    };
    let (mut first, addr) = memory_node("127.0.0.1:0".into()).await;
    let ops = token("ops", "*", "service");
    let mut client = client_with_token(addr, &ops).await;
    join(&mut client, "r", "before").await;
    let mut watch = roomctl(&format!("http://{addr}"), &ops, &["watch", "r"])
        .spawn()
        .unwrap();
    let mut printed = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut said = BufReader::new(watch.stderr.take().unwrap()).lines();
    // The watch has its snapshot once it says so.
    let snapshot = tokio::time::timeout(PATIENCE, said.next_line())
        .await
        .unwrap();
    assert!(snapshot.unwrap().unwrap().contains("participants at seq 1"));
    join(&mut client, "r", "old-two").await;
    let old = next_text(&mut printed).await;
    assert!(old.contains("#2") && old.contains("old-two"), "{old}");

    first.kill().await.unwrap();
    let (_second, _) = memory_node(addr.to_string()).await;
    let waiting = async {
        while let Some(line) = said.next_line().await.unwrap() {
            if line.contains("is gone") && line.contains("waiting") {
                return;
            }
        }
        panic!("the watch ended instead of waiting");
    };
    tokio::time::timeout(PATIENCE, waiting).await.unwrap();
    let mut client = client_with_token(addr, &ops).await;
    join(&mut client, "r", "new-one").await;
    let resynced = async {
        while let Some(line) = said.next_line().await.unwrap() {
            if line.contains("exists again") {
                return;
            }
        }
        panic!("the watch ended instead of resyncing");
    };
    tokio::time::timeout(PATIENCE, resynced).await.unwrap();
    join(&mut client, "r", "new-two").await;
    let marker = next_text(&mut printed).await;
    assert!(marker.starts_with("-- epoch "), "{marker}");
    let new = next_text(&mut printed).await;
    assert!(new.contains("#2") && new.contains("new-two"), "{new}");
    watch.kill().await.unwrap();
}

/// What a newcomer gets wrong with the client is told plainly: a server that is not there
/// (exit 5, naming the address and asking whether it runs), no token (exit 2, naming
/// `ROOMCTL_TOKEN`), and a pipe closed by its reader (`| head`) ends the command quietly, with
/// no panic.
#[tokio::test]
async fn client_mistakes_are_told_plainly() {
    // A port nothing listens on: bound, then let go.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let ops = token("ops", "*", "service");
    let output = run(&nowhere, &ops, &["participants", "demo"]).await;
    assert_eq!(output.status.code(), Some(5), "{output:?}");
    assert!(stderr(&output).contains(&nowhere), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("is the server running"),
        "{}",
        stderr(&output)
    );

    let output = Command::new(BIN)
        .args(["participants", "demo", "--server", &nowhere])
        .env_remove("ROOMCTL_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("ROOMCTL_TOKEN"),
        "{}",
        stderr(&output)
    );

    let server = TestServer::start(Backend::Memory).await;
    let url = format!("http://{}", server.addr);
    for room in ["a1", "a2", "a3"] {
        let output = run(&url, &ops, &["join", room, "--identity", "u"]).await;
        assert!(output.status.success(), "{output:?}");
    }
    let mut rooms = roomctl(&url, &ops, &["rooms", "--page-size", "1"])
        .spawn()
        .unwrap();
    // The reader goes away before the command prints.
    drop(rooms.stdout.take());
    let output = rooms.wait_with_output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}
