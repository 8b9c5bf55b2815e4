//! Certificates as a newcomer makes them: the openssl recipe of docs/operations.md, run as
//! written, gives a server certificate and a client certificate that `serve`, roomctl's client
//! and grpcurl all accept, over TLS and mutual TLS; `serve --dev` prints grpcurl commands that
//! work over TLS; and the usual mistakes (a lone self-signed certificate, http:// to a TLS port,
//! https:// to a plaintext one) are told as what they are, with where the docs show the fix.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::certs::{Ca, Dir};
use common::grpcurl::grpcurl;
use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_roomctl");

/// The recipe: the shell block of the "Certificates for TLS" section of docs/operations.md.
fn recipe() -> &'static str {
    let operations = include_str!("../docs/operations.md");
    let section = operations
        .split("\n## Certificates for TLS\n")
        .nth(1)
        .expect("docs/operations.md has a \"Certificates for TLS\" section");
    section
        .split("```sh\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("the section has a shell recipe")
}

/// Runs the recipe in `dir`, as a reader pastes it into a shell.
async fn run_recipe(dir: &Path) {
    let output = Command::new("sh")
        .args(["-e", "-c", recipe()])
        .current_dir(dir)
        .output()
        .await
        .expect("sh runs");
    assert!(output.status.success(), "the recipe failed: {output:?}");
}

/// `roomctl ARGS` with the tests' secret and token variables cleared.
async fn roomctl(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("ROOMCTL_TOKEN")
        .env_remove("ROOMCTL_SERVER")
        .output()
        .await
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The documented recipe makes a CA, a server certificate and a client certificate with which a
/// node serves mutual TLS: roomctl's client and grpcurl reach it with the CA and the client
/// certificate (the room does not exist, so roomctl answers NOT_FOUND: the call got through).
#[tokio::test]
async fn the_documented_recipe_makes_certificates_that_work() {
    let dir = Dir::new("certificates-recipe");
    run_recipe(dir.path()).await;
    let mut command = node_process::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "server.crt",
        "--tls-key",
        "server.key",
        "--tls-client-ca",
        "ca.crt",
    ]);
    command.current_dir(dir.path());
    let (_node, addr) = node_process::start_quiet(command).await;
    let server = format!("https://127.0.0.1:{}", addr.port());
    let ops = token("ops", "*", "service");
    let output = roomctl(
        &[
            "participants",
            "demo",
            "--server",
            &server,
            "--ca",
            "ca.crt",
            "--cert",
            "client.crt",
            "--key",
            "client.key",
            "--token",
            &ops,
        ],
        dir.path(),
    )
    .await;
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("ROOM_NOT_FOUND"),
        "{}",
        stderr(&output)
    );

    let Some(grpcurl) = grpcurl() else { return };
    let listed = Command::new(grpcurl)
        .args([
            "-cacert",
            "ca.crt",
            "-cert",
            "client.crt",
            "-key",
            "client.key",
        ])
        .arg(addr.to_string())
        .arg("list")
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(text.contains("roomcontrol.v1.RoomControl"), "{text}");
}

/// `serve --dev` over TLS prints an address line for the port it chose and grpcurl commands
/// that speak TLS: with the reader's `CA` set as the banner says, its first command (Bob's
/// join) works as printed.
#[tokio::test]
async fn the_dev_banner_works_over_tls() {
    let Some(grpcurl) = grpcurl() else { return };
    let dir = Dir::new("certificates-dev");
    run_recipe(dir.path()).await;
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", "server.crt", "--tls-key", "server.key"])
        .current_dir(dir.path())
        .env("ROOMCTL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut banner = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut script = String::new();
    let mut join = None;
    let read = async {
        while let Some(line) = banner.next_line().await.unwrap() {
            if line.starts_with("export ") || line.starts_with("A=") {
                script.push_str(&line);
                script.push('\n');
            }
            if line.starts_with("grpcurl") && line.ends_with("$R/Join") {
                join = Some(line);
                break;
            }
        }
    };
    tokio::time::timeout(PATIENCE, read).await.unwrap();
    let join = join.expect("the banner has bob's join");
    assert!(join.contains("-cacert \"$CA\""), "{join}");
    assert!(!join.contains("-plaintext"), "{join}");
    script.push_str(&format!(
        "CA=ca.crt\n{}\n",
        join.replacen("grpcurl", &grpcurl, 1)
    ));
    let output = Command::new("sh")
        .args(["-e", "-c", &script])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{script}\n{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("clientId"));
}

/// The mistakes a newcomer makes are configuration errors (exit 2) that say what is wrong: a
/// lone `openssl req -x509` certificate (a CA certificate) presented as the server's, a
/// certificate whose CA the client was not given, http:// to a TLS port, and https:// to a
/// plaintext one.
#[tokio::test]
async fn tls_mistakes_are_told_as_what_they_are() {
    let dir = Dir::new("certificates-mistakes");
    run_recipe(dir.path()).await;
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "lone.key",
            "-out",
            "lone.crt",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let ops = token("ops", "*", "service");
    let call = |server: String, ca: Option<&'static str>| {
        let ops = ops.clone();
        let dir = dir.path().to_owned();
        async move {
            let mut args = vec!["participants", "demo", "--server", &server, "--token", &ops];
            if let Some(ca) = ca {
                args.extend(["--ca", ca]);
            }
            roomctl(&args, &dir).await
        }
    };
    let tls_node = |cert: &'static str, key: &'static str| {
        let mut command = node_process::serve(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]);
        command.current_dir(dir.path());
        node_process::start_quiet(command)
    };

    let (_lone, addr) = tls_node("lone.crt", "lone.key").await;
    let port = addr.port();
    let output = call(format!("https://127.0.0.1:{port}"), Some("lone.crt")).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    for said in ["CA certificate", "Certificates for TLS"] {
        assert!(
            stderr(&output).contains(said),
            "{said}: {}",
            stderr(&output)
        );
    }
    let output = call(format!("http://127.0.0.1:{port}"), None).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let expected = format!("speaks TLS: use --server https://127.0.0.1:{port}");
    assert!(stderr(&output).contains(&expected), "{}", stderr(&output));

    let (_signed, addr) = tls_node("server.crt", "server.key").await;
    let output = call(format!("https://127.0.0.1:{}", addr.port()), None).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(stderr(&output).contains("--ca"), "{}", stderr(&output));

    let plain = TestServer::start(Backend::Memory).await;
    let output = call(
        format!("https://127.0.0.1:{}", plain.addr.port()),
        Some("ca.crt"),
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("does not speak TLS"),
        "{}",
        stderr(&output)
    );

    // A --ca that holds no certificate (a key given by mistake), or cannot be read.
    let output = call(format!("https://127.0.0.1:{port}"), Some("ca.key")).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("holds no PEM certificate"),
        "{output:?}"
    );
    let output = call(format!("https://127.0.0.1:{port}"), Some("missing.crt")).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "cannot read a file: {output:?}"
    );

    // A certificate for another host than the one called.
    let other = Ca::new();
    let (cert, key) = other.issue(&["other.internal"]);
    dir.write("other.crt", &cert);
    dir.write("other.key", &key);
    dir.write("other-ca.crt", &other.pem());
    let (_elsewhere, addr) = tls_node("other.crt", "other.key").await;
    let output = call(
        format!("https://127.0.0.1:{}", addr.port()),
        Some("other-ca.crt"),
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(stderr(&output).contains("does not name"), "{output:?}");
}

/// A server that asks for client certificates (mutual TLS) and a client that brings none, or
/// one signed by another CA: each is told what the server wants, not a bare transport error.
#[tokio::test]
async fn mutual_tls_mistakes_are_told_as_what_they_are() {
    let dir = Dir::new("certificates-mtls-mistakes");
    run_recipe(dir.path()).await;
    let mut command = node_process::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "server.crt",
        "--tls-key",
        "server.key",
        "--tls-client-ca",
        "ca.crt",
    ]);
    command.current_dir(dir.path());
    let (_node, addr) = node_process::start_quiet(command).await;
    let server = format!("https://127.0.0.1:{}", addr.port());
    let ops = token("ops", "*", "service");
    let base = [
        "participants",
        "demo",
        "--server",
        &server,
        "--token",
        &ops,
        "--ca",
        "ca.crt",
    ];
    let output = roomctl(&base, dir.path()).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("asks for a client certificate"),
        "{}",
        stderr(&output)
    );
    // A client certificate of another CA.
    let other = Ca::new();
    let (cert, key) = other.issue(&["stranger"]);
    dir.write("stranger.crt", &cert);
    dir.write("stranger.key", &key);
    let mut args = base.to_vec();
    args.extend(["--cert", "stranger.crt", "--key", "stranger.key"]);
    let output = roomctl(&args, dir.path()).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("refused this client's certificate"),
        "{}",
        stderr(&output)
    );
}
