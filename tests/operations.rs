//! The operational surface: health, graceful shutdown ending streams with a resumable
//! position within the grace period, and the metrics an operator graphs.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const SERVICE: &str = "roomcontrol.v1.RoomControl";

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

/// Health answers SERVING for the server as a whole and for RoomControl, without a token.
async fn health_is_serving_without_a_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", SERVICE] {
        let status = health
            .check(check(service))
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
}

/// On shutdown health turns NOT_SERVING, open Events streams end UNAVAILABLE (SHUTTING_DOWN) with
/// the last delivered seq and the epoch so the client can resume elsewhere, and the server
/// finishes cleanly.
async fn shutdown_ends_streams_with_their_resume_position(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health.watch(check(SERVICE)).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut ops = server.client("ops", "r", "service").await;
    let joined = join(&mut ops, "r", "u").await;
    let mut stream = subscribe(&mut ops, "r", "", Some(0)).await.unwrap();
    assert_eq!(next_event(&mut stream).await.seq, 1);

    server.trigger_shutdown();
    let status = stream_end(&mut stream).await.unwrap_err();
    let meta = assert_error(&status, Code::Unavailable, "SHUTTING_DOWN");
    assert_eq!(meta["last_seq"], "1");
    assert_eq!(meta["epoch"], joined.epoch);

    let next = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    server.stop().await.unwrap();
}

/// The drain has a deadline: a client that keeps an endless stream open (here a health watch,
/// which knows nothing of our shutdown) cannot keep the server alive past `--grace`.
async fn draining_is_cut_after_the_grace_period(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.grace = Duration::from_millis(300)).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health.watch(check(SERVICE)).await.unwrap().into_inner();
    watch.message().await.unwrap().unwrap();
    server.stop().await.unwrap();
}

/// After a join, an observer, a refused drop and a drop, every node's /metrics shows them: RPCs
/// by method and code with their latency, open streams by kind, events appended and delivered,
/// the room census, build info; on Redis, store operations. Summed over the nodes.
async fn metrics_count_what_happened(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut ops = server.client("ops", "r", "service").await;
    let bob = join(&mut ops, "r", "Bob").await;
    let mut observer = subscribe(&mut ops, "r", "", Some(bob.seq)).await.unwrap();
    let mut carol = server.client("carol", "r", "participant").await;
    let status = carol
        .drop_user(drop_request("r", &[&bob.client_id], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    ops.drop_user(drop_request("r", &[&bob.client_id, "nobody"], ""))
        .await
        .unwrap();
    for _ in 0..3 {
        next_event(&mut observer).await;
    }
    let mut scrapes = Vec::new();
    for node in &server.nodes {
        scrapes.push(scrape(node.metrics.expect("metrics are on")).await);
    }
    let total = |series: &str| scrapes.iter().map(|text| metric(text, series)).sum::<f64>();
    for (series, expected) in [
        (r#"roomctl_rpcs_total{method="Join",code="OK"}"#, 1.0),
        (r#"roomctl_rpcs_total{method="DropUser",code="OK"}"#, 1.0),
        (
            r#"roomctl_rpcs_total{method="DropUser",code="PERMISSION_DENIED"}"#,
            1.0,
        ),
        (
            r#"roomctl_rpc_duration_seconds_count{method="DropUser"}"#,
            2.0,
        ),
        (r#"roomctl_events_streams_open{kind="observer"}"#, 1.0),
        ("roomctl_events_appended_total", 4.0),
        ("roomctl_events_delivered_total", 3.0),
    ] {
        assert_eq!(
            total(series),
            expected,
            "{series} in\n{}",
            scrapes.join("\n")
        );
    }
    assert!(scrapes
        .iter()
        .all(|t| t.contains("roomctl_build_info{version=")));
    if backend == Backend::Memory {
        assert_eq!(total("roomctl_rooms"), 1.0);
    } else {
        let commits = total(r#"roomctl_store_operations_total{op="commit",outcome="ok"}"#);
        assert!(commits >= 2.0, "{commits} commits");
    }
    drop(observer);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut open = 0.0;
        for node in &server.nodes {
            let text = scrape(node.metrics.unwrap()).await;
            open += metric(&text, r#"roomctl_events_streams_open{kind="observer"}"#);
        }
        if open == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed stream is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The metrics listener cannot exhaust the node: 300 idle connections to it take at most
/// `MAX_METRICS_CONNECTIONS` of the node's file descriptors (the rest wait in the kernel's
/// queue), gRPC clients are served meanwhile, every idle connection is closed once the
/// handshake timeout passes, and then a scrape is answered; `HEAD /metrics` answers as `GET`
/// without a body.
#[tokio::test]
async fn the_metrics_listener_cannot_exhaust_the_node() {
    use tokio::io::AsyncReadExt;
    let node = node_process::LoggedNode::start(node_process::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "500ms",
    ]))
    .await;
    let metrics = node.metrics.unwrap();
    let before = node.open_files();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(metrics).await.unwrap());
    }
    let mut ops = client_with_token(node.addr, &token("ops", "r", "service")).await;
    join(&mut ops, "r", "u").await;
    let held = node.open_files() - before;
    assert!(
        held <= roomctl::telemetry::MAX_METRICS_CONNECTIONS + 8,
        "300 idle metrics connections hold {held} descriptors of the node"
    );
    // Each is closed by the node in turn, unanswered (it sent nothing).
    let closed = async {
        for mut tcp in idle {
            let mut byte = [0u8; 1];
            assert_eq!(tcp.read(&mut byte).await.unwrap_or(0), 0);
        }
    };
    tokio::time::timeout(PATIENCE * 3, closed)
        .await
        .expect("every idle connection is closed by the node");
    // Then a scrape is answered (`scrape` checks its 200).
    assert!(scrape(metrics).await.contains("roomctl_rpcs"));
    let body = metrics_request(metrics, "HEAD").await;
    assert!(body.is_empty(), "HEAD has no body: {body:?}");
    let mut tcp = tokio::net::TcpStream::connect(metrics).await.unwrap();
    use tokio::io::AsyncWriteExt;
    tcp.write_all(b"POST /metrics HTTP/1.1\r\nHost: roomctl\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.to_lowercase().contains("allow: get, head"),
        "{answer}"
    );
    node.stop().await;
}

acceptance! {
    metrics_count_what_happened,
    health_is_serving_without_a_token,
    shutdown_ends_streams_with_their_resume_position,
    draining_is_cut_after_the_grace_period,
}
