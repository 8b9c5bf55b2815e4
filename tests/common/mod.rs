//! Shared test harness: the real server on an ephemeral port, real tonic clients with tokens, and
//! helpers to read events and error details. Each test binary uses a different part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use roomctl::auth::{mint, Claims};
use roomctl::pb::{self, event::Payload, room_control_client::RoomControlClient};
use roomctl::server::{ServeError, Server, ServerConfig};
use roomctl::subscription::SubscriptionGauge;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use tonic_types::StatusExt;

/// The secret every test server verifies with.
pub const SECRET: &[u8] = b"integration-test-secret";

/// How long a test waits for something that should happen at once before calling it a failure.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A RoomControl client holding one token.
pub type Client = RoomControlClient<InterceptedService<Channel, Bearer>>;

/// A server running in this process on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub subscriptions: SubscriptionGauge,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    /// A server with the default configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server whose configuration `tweak` adjusts.
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        let mut config = ServerConfig::new(SECRET);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(config);
        let subscriptions = server.subscriptions();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            subscriptions,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A channel to the server (the listener is bound, so connecting needs no waiting).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A client with a token for `identity` in `room` as `role`.
    pub async fn client(&self, identity: &str, room: &str, role: &str) -> Client {
        self.client_with_token(&token(identity, room, role)).await
    }

    /// A client that sends `token` verbatim.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let value = format!("Bearer {token}").parse().unwrap();
        RoomControlClient::with_interceptor(self.channel().await, Bearer(value))
    }

    /// Triggers shutdown (as SIGTERM would) without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the server to finish.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.trigger_shutdown();
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server did not stop")
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A token signed with the test secret, valid for an hour.
pub fn token(identity: &str, room: &str, role: &str) -> String {
    mint(
        SECRET,
        &Claims::new(identity, room, role, Duration::from_secs(3600)),
    )
}

/// Joins `room` as `name` with the client's own token role.
pub async fn join(client: &mut Client, room: &str, name: &str) -> pb::JoinResponse {
    client
        .join(pb::JoinRequest {
            room_id: room.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Subscribes to `room` as `client_id` ("" observes) after `after_seq` (None: from now).
pub async fn subscribe(
    client: &mut Client,
    room: &str,
    client_id: &str,
    after_seq: Option<u64>,
) -> Result<Streaming<pb::Event>, Status> {
    client
        .events(pb::EventsRequest {
            room_id: room.into(),
            client_id: client_id.into(),
            after_seq,
            epoch: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The next event of a stream; fails the test if the stream ends or errs instead.
pub async fn next_event(stream: &mut Streaming<pb::Event>) -> pb::Event {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// How the stream ends: Ok(()) for a clean end, the status otherwise. Fails on a further event.
pub async fn stream_end(stream: &mut Streaming<pb::Event>) -> Result<(), Status> {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(None)) => Ok(()),
        Ok(Err(status)) => Err(status),
        other => panic!("expected the stream to end, got {other:?}"),
    }
}

/// A short name of an event's payload, for readable assertions.
pub fn kind(event: &pb::Event) -> &'static str {
    match event.payload.as_ref().expect("event has a payload") {
        Payload::UserConnected(_) => "user_connected",
        Payload::UserDisconnected(_) => "user_disconnected",
        Payload::RoomDisconnected(_) => "room_disconnected",
        Payload::AckDropUser(_) => "ack_drop_user",
    }
}

/// Asserts `status` has `code` and an ErrorInfo with `reason`; returns the ErrorInfo metadata.
pub fn assert_error(status: &Status, code: Code, reason: &str) -> HashMap<String, String> {
    assert_eq!(status.code(), code, "{status:?}");
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "roomcontrol.v1");
    info.metadata.clone()
}

/// The fields named by a status's BadRequest detail.
pub fn violations(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// A DropUser request for `ids` in `room`.
pub fn drop_request(room: &str, ids: &[&str], reason: &str) -> pb::DropUserRequest {
    pb::DropUserRequest {
        room_id: room.into(),
        client_ids: ids.iter().map(|s| s.to_string()).collect(),
        reason: reason.into(),
        request_id: String::new(),
    }
}
