//! The operational surface: health, and graceful shutdown ending streams with a resumable
//! position within the grace period.

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

acceptance! {
    health_is_serving_without_a_token,
    shutdown_ends_streams_with_their_resume_position,
    draining_is_cut_after_the_grace_period,
}
