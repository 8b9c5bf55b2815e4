//! The `roomctl` binary as an operator runs it: secrets, `token`, `serve --dev`, and SIGTERM.

mod common;

use std::process::Stdio;

use common::*;
use std::time::Duration;

use roomctl::auth::{mint, Authenticator, Claims};
use roomctl::engine::{RoomScope, TokenRole};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_roomctl");
/// Secrets given through the environment and through a file (32 bytes or more, as HS256 needs).
const ENV_SECRET: &str = "a-secret-from-the-environment-0123456789";
const FILE_SECRET: &str = "a-secret-from-a-file-0123456789abcdef";

fn roomctl(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("ROOMCTL_JWT_SECRET")
        .env("ROOMCTL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads the child's stderr until the "listening on ADDR" line and returns ADDR.
async fn listening_addr(child: &mut Child) -> std::net::SocketAddr {
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    node_process::listening_addr(&mut log).await
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Without a secret and without --dev, serve refuses to start and says how to set one.
#[tokio::test]
async fn serve_without_a_secret_refuses_and_says_how_to_set_one() {
    let output = roomctl(&["serve", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ROOMCTL_JWT_SECRET"), "{stderr}");
    assert!(stderr.contains("--jwt-secret-file"), "{stderr}");
}

/// `roomctl token` signs with the secret from the environment or a file, and the claims are the
/// ones asked for; a participant token for every room is refused.
#[tokio::test]
async fn token_mints_what_the_server_accepts() {
    let output = roomctl(&[
        "token",
        "--identity",
        "ann",
        "--room",
        "r1",
        "--role",
        "moderator",
    ])
    .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
    .output()
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap();
    let caller = Authenticator::new(ENV_SECRET.as_bytes())
        .verify(token.trim())
        .unwrap()
        .caller;
    assert_eq!(caller.identity, "ann");
    assert_eq!(caller.scope, RoomScope::One("r1".into()));
    assert_eq!(caller.role, TokenRole::Moderator);

    let file = std::env::temp_dir().join(format!("roomctl-secret-{}", std::process::id()));
    std::fs::write(&file, format!("{FILE_SECRET}\n")).unwrap();
    let output = roomctl(&[
        "token",
        "--identity",
        "gw",
        "--room",
        "*",
        "--role",
        "service",
        "--ttl",
        "5m",
    ])
    .arg("--jwt-secret-file")
    .arg(&file)
    .output()
    .await
    .unwrap();
    std::fs::remove_file(&file).unwrap();
    let token = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        Authenticator::new(FILE_SECRET.as_bytes())
            .verify(token.trim())
            .unwrap()
            .caller
            .scope,
        RoomScope::All
    );

    let output = roomctl(&[
        "token",
        "--identity",
        "x",
        "--room",
        "*",
        "--role",
        "participant",
    ])
    .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
}

/// HS256 needs a 256-bit key: a shorter secret is refused by `serve` and `token` alike, with
/// the way to make a good one.
#[tokio::test]
async fn short_secrets_are_refused_with_how_to_make_one() {
    for args in [
        &["serve", "--listen", "127.0.0.1:0"][..],
        &[
            "token",
            "--identity",
            "a",
            "--room",
            "r",
            "--role",
            "moderator",
        ][..],
    ] {
        let output = roomctl(args)
            .env("ROOMCTL_JWT_SECRET", "s3cret")
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("at least 32"), "{stderr}");
        assert!(
            stderr.contains("head -c 32 /dev/urandom | base64"),
            "{stderr}"
        );
    }
}

/// `serve --dev` prints working tokens and the address it listens on; SIGTERM ends open streams with SHUTTING_DOWN and the
/// process exits with status 0.
#[tokio::test]
async fn dev_server_prints_tokens_and_drains_on_sigterm() {
    let mut child = roomctl(&["serve", "--dev", "--listen", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child).await;
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut moderator_token = None;
    while let Some(line) = stdout.next_line().await.unwrap() {
        if let Some(rest) = line.strip_prefix("export MOD=") {
            moderator_token = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.starts_with("A=") {
            assert!(
                line.starts_with(&format!("A={addr};")),
                "the banner's address line names the real address: {line}"
            );
        }
        if line.contains("/DropUser") {
            assert!(line.contains("$A $R/DropUser"), "{line}");
            break;
        }
    }
    let moderator_token = moderator_token.expect("--dev prints a moderator token");

    let mut alice = client_with_token(addr, &moderator_token).await;
    let joined = join(&mut alice, "demo", "Alice").await;
    let mut stream = subscribe(&mut alice, "demo", "", Some(0)).await.unwrap();
    assert_eq!(next_event(&mut stream).await.seq, joined.seq);

    sigterm(&child);
    let status = stream_end(&mut stream).await.unwrap_err();
    assert_error(&status, Code::Unavailable, "SHUTTING_DOWN");
    exits_cleanly(&mut child).await;
}

/// A production server reads its secret from the environment; tokens signed otherwise fail.
#[tokio::test]
async fn serve_uses_the_configured_secret() {
    let mut child = roomctl(&["serve", "--listen", "127.0.0.1:0", "--history", "3"])
        .env(
            "ROOMCTL_JWT_SECRET",
            String::from_utf8_lossy(SECRET).as_ref(),
        )
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child).await;
    let mut ops = client_with_token(addr, &token("ops", "r", "service")).await;
    for i in 0..5 {
        join(&mut ops, "r", &format!("u{i}")).await;
    }
    // --history 3 reached the server: seq 1 is no longer a valid cursor.
    let status = subscribe(&mut ops, "r", "", Some(1)).await.unwrap_err();
    assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    let dev = roomctl::auth::mint(
        roomctl::cli::DEV_SECRET.as_bytes(),
        &roomctl::auth::Claims::new("ops", "r", "service", std::time::Duration::from_secs(60)),
    );
    let mut forged = client_with_token(addr, &dev).await;
    let status = forged
        .list_participants(roomctl::pb::ListParticipantsRequest {
            room_id: "r".into(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    sigterm(&child);
    exits_cleanly(&mut child).await;
}

/// A Redis password never reaches the operator's terminal or logs: serve against an unreachable
/// or unreadable Redis URL that carries one says what failed, with the password as `***`, and
/// never that it was listening.
#[tokio::test]
async fn redis_passwords_are_redacted_from_errors() {
    for url in [
        "redis://:hunter2-secret@127.0.0.1:1",
        "redis://:hunter2-secret@127.0.0.1:notaport",
    ] {
        let output = roomctl(&["serve", "--listen", "127.0.0.1:0", "--store", url])
            .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(said.contains("cannot open the store"), "{said}");
        assert!(!said.contains("hunter2"), "{said}");
        // The node never said it was listening: it opens its store first.
        assert!(!said.contains("listening on"), "{said}");
    }
}

/// The log a node writes in `format` at `trace` while it is called with each of `tokens`: a
/// join and two drops (`audit-1`, then `audit-2` which the moderator rate of one refuses).
async fn logged_run(format: &str, tokens: &[&str]) -> String {
    let mut child = roomctl(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        format,
        "--moderator-rate",
        "1",
        "--moderator-burst",
        "1",
    ])
    .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
    .env("ROOMCTL_LOG", "trace")
    .spawn()
    .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut logged = String::new();
    let addr = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            logged.push_str(&line);
            logged.push('\n');
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest
                    .split(|c: char| c.is_whitespace() || c == '"')
                    .next()
                    .unwrap()
                    .to_owned();
            }
        }
        panic!("serve exited without listening");
    })
    .await
    .unwrap();
    let collect = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let addr = addr.parse().unwrap();
    for token in tokens {
        let mut client = client_with_token(addr, token).await;
        let _ = client
            .join(roomctl::pb::JoinRequest {
                room_id: "r".into(),
                ..Default::default()
            })
            .await;
        for request_id in ["audit-1", "audit-2"] {
            let _ = client
                .drop_user(roomctl::pb::DropUserRequest {
                    request_id: request_id.into(),
                    ..drop_request("r", &["x"], "")
                })
                .await;
        }
    }
    sigterm(&child);
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    logged.push_str(&collect.await.unwrap());
    logged
}

/// Each call logs one access line, and a moderator's command is audited by it alone: method,
/// room, caller, request id and code, with no second line of its own; a command the rate limit
/// refuses is audited the same way.
#[tokio::test]
async fn a_drop_is_audited_by_its_access_line() {
    let secret = ENV_SECRET.as_bytes();
    let alice = mint(
        secret,
        &Claims::new("alice", "r", "moderator", Duration::from_secs(60)),
    );
    let logged = logged_run("json", &[&alice]).await;
    for (request_id, code) in [("audit-1", "OK"), ("audit-2", "RESOURCE_EXHAUSTED")] {
        let lines: Vec<serde_json::Value> = logged
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|line: &serde_json::Value| line["fields"]["request_id"] == request_id)
            .collect();
        assert_eq!(lines.len(), 1, "one line names {request_id}: {logged}");
        let fields = &lines[0]["fields"];
        assert_eq!(lines[0]["target"], "roomctl::access");
        assert_eq!(
            (&fields["method"], &fields["room"], &fields["identity"]),
            (&"DropUser".into(), &"r".into(), &"alice".into())
        );
        assert_eq!(fields["code"], code, "{request_id}");
    }
}

/// A production start warns of nothing; in particular the binary was built as
/// `.cargo/config.toml` says, with the tokio scheduler setting the server's fan-out relies on.
#[tokio::test]
async fn a_normal_start_warns_of_nothing() {
    let logged = logged_run("json", &[]).await;
    let warnings: Vec<serde_json::Value> = logged
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| line["level"] == "WARN")
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// No token (valid, expired or forged) and no secret ever reaches the logs, in text or JSON,
/// even at the most verbose level: a run with each kind of token is searched for them.
#[tokio::test]
async fn logs_never_hold_tokens_or_secrets() {
    let secret = ENV_SECRET.as_bytes();
    let valid = mint(
        secret,
        &Claims::new("ops", "r", "service", Duration::from_secs(60)),
    );
    let expired = mint(
        secret,
        &Claims {
            exp: 1,
            ..Claims::new("ops", "r", "service", Duration::ZERO)
        },
    );
    let forged = mint(
        b"not the server's secret, but long enough",
        &Claims::new("ops", "r", "service", Duration::from_secs(60)),
    );
    for format in ["text", "json"] {
        let logged = logged_run(format, &[&valid, &expired, &forged]).await;
        assert!(
            logged.contains("roomctl::access"),
            "the calls were logged: {logged}"
        );
        for (what, text) in [
            ("the valid token", valid.as_str()),
            ("the expired token", expired.as_str()),
            ("the forged token", forged.as_str()),
            ("the secret", ENV_SECRET),
        ] {
            // A signature or a payload alone would be as bad as the whole token.
            for part in text.split('.').filter(|p| p.len() > 16) {
                assert!(!logged.contains(part), "{what} is in the {format} logs");
            }
        }
    }
}

/// A signal sent the moment `serve` says it listens is handled, not fatal: SIGHUP reloads and
/// SIGTERM drains, so the process exits 0 rather than dying of the signal's default action
/// (it once did, the handlers being installed only once the server ran).
#[tokio::test]
async fn signals_sent_as_soon_as_serve_listens_are_handled() {
    for _ in 0..5 {
        let mut child = roomctl(&["serve", "--dev", "--listen", "127.0.0.1:0"])
            .spawn()
            .unwrap();
        listening_addr(&mut child).await;
        sighup(&child);
        sigterm(&child);
        exits_cleanly(&mut child).await;
    }
}

/// A setting that cannot act where it is given is said so at startup, not silently taken.
#[tokio::test]
async fn a_cluster_node_timeout_without_a_checked_cluster_is_warned_of() {
    let mut child = roomctl(&[
        "serve",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--redis-cluster-node-timeout",
        "1s",
    ])
    .spawn()
    .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut warned = false;
    while let Some(line) = log.next_line().await.unwrap() {
        warned |= line.contains("--redis-cluster-node-timeout has no effect here");
        if line.contains("listening on") {
            break;
        }
    }
    assert!(warned);
    sigterm(&child);
    exits_cleanly(&mut child).await;
}

/// Waits for the child to exit, which it must do with status 0.
async fn exits_cleanly(child: &mut Child) {
    let exit = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

fn sighup(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A token minted by `roomctl token` with these arguments.
async fn minted(args: &[&str]) -> String {
    let output = roomctl(&["token"]).args(args).output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Key rotation: with `kid=secret` lines two keys are valid at once, chosen by the token's kid,
/// and an unknown kid is refused. After the old key is removed from the file and the server
/// gets SIGHUP, the old key's tokens are refused, and the `Events` streams they opened end
/// UNAUTHENTICATED with their resume position, while the new key's tokens and streams go on: no
/// restart, no live token of the new key refused.
#[tokio::test]
async fn keys_rotate_by_kid_on_sighup() {
    let dir = std::env::temp_dir().join(format!("roomctl-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    let (old, new) = (format!("old={ENV_SECRET}"), format!("new={FILE_SECRET}"));
    std::fs::write(&file, format!("{new}\n{old}\n")).unwrap();
    let path = file.to_str().unwrap();
    let mut child = roomctl(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret-file",
        path,
    ])
    .spawn()
    .unwrap();
    let addr = listening_addr(&mut child).await;
    let claims = ["--identity", "ops", "--room", "r", "--role", "service"];
    let with = |kid: &'static str| {
        let mut args = claims.to_vec();
        args.extend(["--jwt-secret-file", path, "--kid", kid]);
        args
    };
    let (old_token, new_token) = (minted(&with("old")).await, minted(&with("new")).await);
    let list = || roomctl::pb::ListParticipantsRequest {
        room_id: "r".into(),
    };
    let mut by_old = client_with_token(addr, &old_token).await;
    let mut by_new = client_with_token(addr, &new_token).await;
    join(&mut by_new, "r", "x").await;
    by_old.list_participants(list()).await.unwrap();
    let stranger = roomctl::auth::KeySet::parse(&format!("other={ENV_SECRET}")).unwrap();
    let claims = Claims::new("ops", "r", "service", Duration::from_secs(60));
    let unknown = roomctl::auth::mint_with(&stranger, Some("other"), &claims).unwrap();
    let status = client_with_token(addr, &unknown)
        .await
        .list_participants(list())
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    // Streams opened with each key, before the rotation.
    let mut old_stream = subscribe(&mut by_old, "r", "", None).await.unwrap();
    let mut new_stream = subscribe(&mut by_new, "r", "", None).await.unwrap();
    let seen = join(&mut by_new, "r", "y").await;
    assert_eq!(next_event(&mut old_stream).await.seq, seen.seq);
    assert_eq!(next_event(&mut new_stream).await.seq, seen.seq);

    std::fs::write(&file, format!("{new}\n")).unwrap();
    sighup(&child);
    // The removed key's stream ends at once, resumable with a current key's token.
    let status = stream_end(&mut old_stream).await.unwrap_err();
    let meta = assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(meta["last_seq"], seen.seq.to_string());
    assert!(status.message().contains("was removed"), "{status:?}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while by_old.list_participants(list()).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed key still works"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    by_new.list_participants(list()).await.unwrap();
    let after = join(&mut by_new, "r", "z").await;
    assert_eq!(
        next_event(&mut new_stream).await.seq,
        after.seq,
        "a kept key's stream goes on"
    );
    sigterm(&child);
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The room's retained window as a node started with `extra` arguments and `env` reports it:
/// after 10 joins, the oldest retained seq says what `--history` the node runs with.
async fn oldest_kept(extra: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = roomctl(&["serve", "--listen", "127.0.0.1:0"]);
    command.args(extra).env("ROOMCTL_JWT_SECRET", ENV_SECRET);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let addr = listening_addr(&mut child).await;
    let token = mint(
        ENV_SECRET.as_bytes(),
        &Claims::new("ops", "r", "service", Duration::from_secs(60)),
    );
    let mut ops = client_with_token(addr, &token).await;
    for i in 0..10 {
        join(&mut ops, "r", &format!("u{i}")).await;
    }
    // A cursor beyond the newest event is refused with the window in the metadata.
    let status = subscribe(&mut ops, "r", "", Some(u64::MAX))
        .await
        .unwrap_err();
    let meta = assert_error(&status, Code::OutOfRange, "CURSOR_OUT_OF_RANGE");
    sigterm(&child);
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    meta["oldest_seq"].clone()
}

/// Settings come from flags, over `ROOMCTL_*` variables, over the `--config` file, over the
/// defaults; an unknown key in the file is refused by name (exit code 2), and `config check`
/// validates a file without serving.
#[tokio::test]
async fn settings_come_from_flags_then_variables_then_the_file() {
    let dir = std::env::temp_dir().join(format!("roomctl-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("roomctl.toml");
    std::fs::write(&file, "history = 3\nempty_room_ttl = \"1h\"\n").unwrap();
    let config = file.to_str().unwrap();
    assert_eq!(
        oldest_kept(&[], &[]).await,
        "1",
        "the default keeps them all"
    );
    assert_eq!(
        oldest_kept(&["--config", config], &[]).await,
        "8",
        "the file: 3"
    );
    let env = [("ROOMCTL_HISTORY", "4")];
    assert_eq!(
        oldest_kept(&["--config", config], &env).await,
        "7",
        "the variable: 4"
    );
    let flags = ["--config", config, "--history", "5"];
    assert_eq!(oldest_kept(&flags, &env).await, "6", "the flag: 5");

    let output = roomctl(&["config", "check", config])
        .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    // What it prints can be pasted back into a file.
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("history = 3   # file"), "{printed}");
    assert!(
        printed.contains("empty_room_ttl = \"1h\"   # file"),
        "{printed}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "histroy = 3\n").unwrap();
    let bad = bad.to_str().unwrap();
    for args in [
        &["config", "check", bad][..],
        &["serve", "--listen", "127.0.0.1:0", "--config", bad][..],
    ] {
        let output = roomctl(args)
            .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("unknown key `histroy`"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Settings out of their range are usage errors (exit 2) that say what is allowed, before
/// anything starts: a timeout of 0 would refuse everything, a keepalive interval of 0 would
/// ping without pause.
#[tokio::test]
async fn settings_out_of_range_are_refused() {
    for (flag, value, allowed) in [
        ("--presence-timeout", "5ms", "from 100ms to 24h"),
        ("--presence-timeout", "2d", "from 100ms to 24h"),
        ("--history", "0", "1..=10000000"),
        ("--max-message-bytes", "0", "at least 1"),
        ("--http2-keepalive-interval", "0s", "at least 1s"),
        ("--request-timeout", "0s", "at least 10ms"),
        ("--handshake-timeout", "1ms", "at least 100ms"),
        ("--http2-keepalive-timeout", "0s", "at least 100ms"),
        ("--history-bytes", "1000", "1048576"),
        ("--listen", "localhost:0", "a host name"),
    ] {
        let output = roomctl(&["serve", "--listen", "127.0.0.1:0", flag, value])
            .env("ROOMCTL_JWT_SECRET", ENV_SECRET)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(allowed), "{flag} {value}: {stderr}");
    }
}
