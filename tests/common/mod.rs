//! Shared test harness: the real server on an ephemeral port, real tonic clients with tokens, and
//! helpers to read events and error details. Each test binary uses a different part of it.
#![allow(dead_code, unused_macros)]

pub mod browser;
pub mod certs;
pub mod grpcurl;
pub mod node_process;
pub mod proc;
pub mod redis_cluster;
pub mod redis_server;
pub mod standard_webhooks;
pub mod tools;
pub mod webhook_receiver;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis_server::RedisServer;
use roomctl::auth::{mint, Claims};
use roomctl::clock::Clock;
use roomctl::limits::StreamBudget;
use roomctl::pb::{self, event::Payload};
use roomctl::server::{Reloader, ServeError, Server, ServerConfig, StoreConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

/// The secret every test server verifies with.
pub const SECRET: &[u8] = b"integration-test-secret-of-32-bytes-or-more";

/// How long a test waits for something that should happen at once before calling it a failure.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub use roomctl::client::Client;

/// Which store the servers of a test use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One node, in-memory store.
    Memory,
    /// Two nodes sharing a private redis-server; clients alternate between them.
    RedisTwoNodes,
    /// Two nodes sharing a private Redis Cluster of three masters; clients alternate.
    RedisCluster,
}

/// Runs an acceptance test once per backend: `memory::name`, `redis_two_nodes::name` and
/// `redis_cluster::name`, so one suite, written once, shows that two nodes on one Redis, or on a
/// Redis Cluster of three masters, behave as one node.
///
/// The tests listed after `paused:` wait for a ban or a token to run out, the node's own timing:
/// on memory they run on tokio's paused time, which the node's clock follows (see
/// [`TestServer::start_with`]), so their sleeps take no real time; with Redis time is real, as a
/// real Redis cannot answer on paused time. Such a test waits by sleeping or polling, never with
/// `tokio::time::advance`, which only paused time allows.
macro_rules! acceptance {
    ($($name:ident),* $(,)? $(; paused: $($paused:ident),* $(,)?)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() {
                super::$name($crate::common::Backend::Memory).await
            })*
            $($(#[tokio::test(start_paused = true)] async fn $paused() {
                super::$paused($crate::common::Backend::Memory).await
            })*)?
        }
        redis_acceptance! { $($name),* $($(, $paused)*)? }
    };
}

/// Runs an acceptance test on the two Redis backends only: for what the memory store shows at
/// its own level on paused time (presence, in tests/store_conformance.rs), while a real Redis,
/// which answers in real time, cannot run on paused time.
macro_rules! redis_acceptance {
    ($($name:ident),* $(,)?) => {
        mod redis_two_nodes {
            $(#[tokio::test] async fn $name() {
                if $crate::common::redis_server::redis_available() {
                    super::$name($crate::common::Backend::RedisTwoNodes).await
                }
            })*
        }
        mod redis_cluster {
            $(#[tokio::test] async fn $name() {
                if $crate::common::redis_server::redis_available() {
                    super::$name($crate::common::Backend::RedisCluster).await
                }
            })*
        }
    };
}

/// One roomctl node running in this process on 127.0.0.1:0.
pub struct Node {
    pub addr: SocketAddr,
    /// Where its metrics are served, when the configuration turned them on.
    pub metrics: Option<SocketAddr>,
    /// What SIGHUP would reload.
    pub reloader: Reloader,
    pub streams: StreamBudget,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Node {
    /// Starts a node with `config`.
    pub async fn start(config: ServerConfig) -> Self {
        Self::start_on(config, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a node with `config` listening on `addr`: a port a node before it used, for a
    /// restart that clients must find where they left it.
    pub async fn start_on(config: ServerConfig, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(config).await.unwrap();
        let streams = server.streams();
        let metrics = server.metrics_addr();
        let reloader = server.reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            metrics,
            reloader,
            streams,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Triggers shutdown (as SIGTERM would) without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the node to finish.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.trigger_shutdown();
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server did not stop")
            .unwrap()
    }

    /// A client of this node with a token for `identity` in `room` as `role`.
    pub async fn client(&self, identity: &str, room: &str, role: &str) -> Client {
        client_with_token(self.addr, &token(identity, room, role)).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The servers of one test: one node, or two sharing a private Redis.
pub struct TestServer {
    /// The first node's address.
    pub addr: SocketAddr,
    pub nodes: Vec<Node>,
    pub redis: Option<RedisServer>,
    pub cluster: Option<redis_cluster::RedisCluster>,
    next: AtomicUsize,
}

impl TestServer {
    /// Servers with the default configuration.
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// Servers whose configuration `tweak` adjusts. A memory node reads the time from tokio's
    /// clock: a test on tokio's paused time moves it (`tokio::time::advance`, or a sleep that
    /// the idle runtime skips), and otherwise it is the system's time.
    pub async fn start_with(backend: Backend, tweak: impl Fn(&mut ServerConfig)) -> Self {
        let mut config = ServerConfig::new(SECRET);
        if let Backend::Memory = backend {
            config.clock = Clock::tokio();
        }
        tweak(&mut config);
        let (mut redis, mut cluster) = (None, None);
        let nodes = match backend {
            Backend::Memory => vec![Node::start(config).await],
            Backend::RedisTwoNodes => {
                let server = RedisServer::start().await;
                config.store = StoreConfig::redis(server.url());
                redis = Some(server);
                vec![Node::start(config.clone()).await, Node::start(config).await]
            }
            Backend::RedisCluster => {
                let masters = redis_cluster::RedisCluster::start(3).await;
                config.store = StoreConfig::redis(masters.url());
                cluster = Some(masters);
                vec![Node::start(config.clone()).await, Node::start(config).await]
            }
        };
        Self {
            addr: nodes[0].addr,
            nodes,
            redis,
            cluster,
            next: AtomicUsize::new(0),
        }
    }

    /// Open subscriptions over all nodes.
    pub fn subscriptions(&self) -> usize {
        self.nodes.iter().map(|n| n.streams.open()).sum()
    }

    /// A channel to the first node (the listener is bound, so connecting needs no waiting).
    pub async fn channel(&self) -> Channel {
        channel(self.addr).await
    }

    /// A client with a token for `identity` in `room` as `role`, on the next node in turn.
    pub async fn client(&self, identity: &str, room: &str, role: &str) -> Client {
        self.client_with_token(&token(identity, room, role)).await
    }

    /// A client that sends `token` verbatim, on the next node in turn.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let node = self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len();
        client_with_token(self.nodes[node].addr, token).await
    }

    /// Triggers shutdown of every node without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        for node in &mut self.nodes {
            node.trigger_shutdown();
        }
    }

    /// Shuts every node down and waits for them.
    pub async fn stop(self) -> Result<(), ServeError> {
        for node in self.nodes {
            node.stop().await?;
        }
        Ok(())
    }
}

/// A channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A client of `addr` that sends `token`.
pub async fn client_with_token(addr: SocketAddr, token: &str) -> Client {
    roomctl::client::with_token(channel(addr).await, token).unwrap()
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
        Payload::RoomLocked(_) => "room_locked",
        Payload::RoomUnlocked(_) => "room_unlocked",
        Payload::SessionDestroyed(_) => "session_destroyed",
        Payload::UserBanned(_) => "user_banned",
        Payload::UserUnbanned(_) => "user_unbanned",
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
        ban_seconds: 0,
    }
}

/// Raw bytes as gRPC messages, for bodies no generated client would send (malformed protobuf).
pub mod raw {
    use prost::bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::{Request, Status};

    /// A codec that sends and receives message bodies verbatim.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;

        fn encoder(&mut self) -> Self::Encoder {
            RawCodec
        }

        fn decoder(&mut self) -> Self::Decoder {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }

    /// Calls `method` (`/package.Service/Method`) with `body` as the request message and
    /// `token` as the bearer token, and returns the first response message.
    pub async fn call(
        channel: tonic::transport::Channel,
        method: &'static str,
        token: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut request = Request::new(body);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        Ok(stream.message().await?.unwrap_or_default())
    }
}

/// Every method of `roomcontrol.v1.RoomControl`, read from the descriptor set the server serves
/// to reflection: tests that walk them cover a method added to the proto without a list to keep.
pub fn room_control_methods() -> Vec<String> {
    let pool = prost_reflect::DescriptorPool::decode(roomctl::pb::FILE_DESCRIPTOR_SET).unwrap();
    let service = pool
        .get_service_by_name("roomcontrol.v1.RoomControl")
        .expect("the service is in the descriptor set");
    service.methods().map(|m| m.name().to_owned()).collect()
}

/// The access lines (`roomctl::access`) of `method` in a node's log `lines`, by their gRPC code.
pub fn access_codes(lines: &[String], method: &str) -> Vec<String> {
    let field = format!("method=\"{method}\"");
    lines
        .iter()
        .filter(|line| line.contains("roomctl::access") && line.contains(&field))
        .map(|line| {
            let code = line.split("code=\"").nth(1).expect("the line has a code");
            code.split('"').next().unwrap().to_owned()
        })
        .collect()
}

/// A bare HTTP/2 client (the `h2` crate): for what a tonic client does not let a test do, such
/// as sending `grpc-timeout` without also timing the call out itself, or misbehaving.
pub mod bare {
    use bytes::Bytes;
    use prost::Message;
    use tonic::Status;

    /// An HTTP/2 connection to `addr`, driven in the background.
    pub async fn connect(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        send.ready().await.unwrap()
    }

    /// A gRPC request for `path` carrying `message` and `headers`, as tonic would frame it.
    pub fn request(
        path: &str,
        headers: &[(&str, &str)],
        message: &impl Message,
    ) -> (http::Request<()>, Bytes) {
        let mut builder = http::Request::post(format!("http://roomctl{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let body = message.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        (builder.body(()).unwrap(), framed.into())
    }

    /// Sends a unary call and returns the status the server ended it with (OK included).
    pub async fn call(
        send: &mut h2::client::SendRequest<Bytes>,
        request: (http::Request<()>, Bytes),
    ) -> Status {
        let (head, body) = request;
        let (response, mut stream) = send.send_request(head, false).unwrap();
        stream.send_data(body, true).unwrap();
        let response = response.await.unwrap();
        if let Some(status) = Status::from_header_map(response.headers()) {
            return status;
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().expect("gRPC trailers");
        Status::from_header_map(&trailers).expect("a grpc-status trailer")
    }
}

/// The metrics text a node serves at `GET /metrics` (a plain HTTP/1.1 request, as Prometheus
/// makes).
/// Sends `request` to `addr` over a new HTTP/1.1 connection (gRPC-Web, CORS preflights, the
/// console's files) and returns the response as it arrives.
pub async fn http1<B>(
    addr: SocketAddr,
    request: http::Request<B>,
) -> http::Response<hyper::body::Incoming>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    send.send_request(request).await.unwrap()
}

pub async fn scrape(addr: SocketAddr) -> String {
    metrics_request(addr, "GET").await
}

/// The body of the answer to `METHOD /metrics`, which must be the metrics' 200.
pub async fn metrics_request(addr: SocketAddr, method: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{method} /metrics HTTP/1.1\r\nHost: roomctl\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_owned()
}

/// Waits until the node serving metrics at `metrics` shows `value` for `series`.
pub async fn until_metric(metrics: SocketAddr, series: &str, value: f64) {
    let reached = async {
        while metric(&scrape(metrics).await, series) != value {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, reached)
        .await
        .unwrap_or_else(|_| panic!("{series} never became {value}"));
}

/// The value of `series` (name and labels, exactly as exposed) in a scrape; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}
