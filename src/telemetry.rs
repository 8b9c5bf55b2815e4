//! What a node tells its operators: one log line per RPC, and Prometheus metrics.
//!
//! Both are taken at one place, the [`crate::limits::Guard`] in front of RoomControl, which
//! sees every call from its arrival to the end of its response (for `Events`, the end of the
//! stream): [`observe`] wraps the response so that its final gRPC code is known however the call
//! ends, even when the client goes away. Handlers add what only they know (room, caller) to the
//! call's [`CallNote`].
//!
//! Metrics live in a registry of this server's own (`prometheus-client`, no global state, so
//! several servers share a process in tests) and are served as OpenMetrics text on
//! `--metrics-listen`. Without it, [`Telemetry`] is off and every recording is one branch.
//! Labels are low-cardinality: RPC method, gRPC code, stream kind, store operation; never a
//! room or an identity.
//!
//! It observes and never decides: it holds no room state and refuses no call, and of roomctl it
//! may depend on the generated types and the errors only.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::{Code, Status};

use crate::pb;

/// The RoomControl method a path names (`/roomcontrol.v1.RoomControl/DropUser`), if any, as it
/// appears in metrics and logs. The methods are the service descriptor's, so a new RPC is
/// guarded, timed, counted and audited without anyone adding it here.
pub fn method_of(path: &str) -> Option<&'static str> {
    let name = path.strip_prefix(pb::ROOM_CONTROL_PATH)?;
    pb::ROOM_CONTROL_METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
}

/// A gRPC code as its canonical name (`OK`, `INVALID_ARGUMENT`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    endpoint: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Latency buckets: 50 us to about 13 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    calls_in_progress: Gauge,
    streams: Family<KindLabels, Gauge>,
    rooms: Gauge,
    participants: Gauge,
    events_appended: Counter,
    events_delivered: Counter,
    streams_lagged: Counter,
    store_ops: Family<StoreLabels, Counter>,
    store_seconds: Family<StoreOpLabels, Histogram, fn() -> Histogram>,
    commit_conflicts: Counter,
    batch_sizes: Histogram,
    listener_reconnects: Counter,
    notices_received: Counter,
    log_lines_dropped: Counter,
    webhook_deliveries: Family<DeliveryLabels, Counter>,
    webhook_retries: Family<EndpointLabels, Counter>,
    webhook_lost: Family<EndpointLabels, Counter>,
    webhook_behind: Family<EndpointLabels, Gauge>,
    webhook_oldest: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    /// The total of dropped log lines last reported, so the counter grows by the difference.
    dropped_seen: AtomicU64,
    /// Called before each scrape, for values read rather than counted (a census of rooms).
    scrape_hooks: Mutex<Vec<ScrapeHook>>,
}

type ScrapeHook = Box<dyn Fn(&Telemetry) + Send>;

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("roomctl");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpcs",
            "RoomControl calls, by method and gRPC code",
            rpcs.clone(),
        );
        let rpc_seconds =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
        registry.register_with_unit(
            "rpc_duration",
            "Time from a call's arrival to its end (for Events, the end of the stream)",
            Unit::Seconds,
            rpc_seconds.clone(),
        );
        let calls_in_progress = Gauge::default();
        registry.register(
            "calls_in_progress",
            "RoomControl calls holding one of the node's --max-concurrent-calls slots",
            calls_in_progress.clone(),
        );
        let streams = Family::<KindLabels, Gauge>::default();
        registry.register(
            "events_streams_open",
            "Events streams open on this node, by kind (client or observer)",
            streams.clone(),
        );
        let rooms = Gauge::default();
        registry.register(
            "rooms",
            "Rooms on this node (memory store), or that this node serves (Redis store)",
            rooms.clone(),
        );
        let participants = Gauge::default();
        registry.register(
            "participants",
            "Participants in the rooms counted by roomctl_rooms",
            participants.clone(),
        );
        let events_appended = Counter::default();
        registry.register(
            "events_appended",
            "Events this node appended to room logs",
            events_appended.clone(),
        );
        let events_delivered = Counter::default();
        registry.register(
            "events_delivered",
            "Events this node sent on Events streams",
            events_delivered.clone(),
        );
        let streams_lagged = Counter::default();
        registry.register(
            "events_streams_lagged",
            "Events streams ended OUT_OF_RANGE because the history moved past them",
            streams_lagged.clone(),
        );
        let store_ops = Family::<StoreLabels, Counter>::default();
        registry.register(
            "store_operations",
            "Operations on the Redis store, by operation and outcome (ok, error)",
            store_ops.clone(),
        );
        let store_seconds =
            Family::<StoreOpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
        registry.register_with_unit(
            "store_operation_duration",
            "Time Redis store operations took",
            Unit::Seconds,
            store_seconds.clone(),
        );
        let commit_conflicts = Counter::default();
        registry.register(
            "redis_commit_conflicts",
            "Redis commits refused because the room changed (another node wrote): each is retried",
            commit_conflicts.clone(),
        );
        let batch_sizes = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "redis_batch_size",
            "Commands a room's writer applied with one commit",
            batch_sizes.clone(),
        );
        let listener_reconnects = Counter::default();
        registry.register(
            "redis_listener_reconnects",
            "Times the Redis notification listener lost Redis and connected again",
            listener_reconnects.clone(),
        );
        let notices_received = Counter::default();
        registry.register(
            "redis_notices_received",
            "Notices of committed events this node received from Redis (only for rooms it has \
             subscribers in)",
            notices_received.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log writer was behind (requests never wait for it)",
            log_lines_dropped.clone(),
        );
        let webhook_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook requests, by endpoint and outcome (delivered, refused: a non-2xx answer, \
             timed_out, unreachable)",
            webhook_deliveries.clone(),
        );
        let webhook_retries = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "webhook_retries",
            "Times a room's webhook delivery failed and was scheduled again, by endpoint",
            webhook_retries.clone(),
        );
        let webhook_lost = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "webhook_events_lost_notices",
            "events_lost notices sent, by endpoint: the history moved past its cursor, or a log \
             was replaced",
            webhook_lost.clone(),
        );
        let webhook_behind = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "webhook_events_behind",
            "Events logged and not yet delivered, by endpoint (as of each room's last attempt)",
            webhook_behind.clone(),
        );
        let webhook_oldest = Family::<EndpointLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "webhook_oldest_undelivered_age",
            "Age of the oldest event an endpoint failed to receive (0: none)",
            Unit::Seconds,
            webhook_oldest.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "The roomctl version running (always 1)",
            build,
        );
        Self {
            registry,
            rpcs,
            rpc_seconds,
            calls_in_progress,
            streams,
            rooms,
            participants,
            events_appended,
            events_delivered,
            streams_lagged,
            store_ops,
            store_seconds,
            commit_conflicts,
            batch_sizes,
            listener_reconnects,
            notices_received,
            log_lines_dropped,
            webhook_deliveries,
            webhook_retries,
            webhook_lost,
            webhook_behind,
            webhook_oldest,
            dropped_seen: AtomicU64::new(0),
            scrape_hooks: Mutex::new(Vec::new()),
        }
    }
}

/// The metrics of one server, or nothing when metrics are off. Cheap to clone.
#[derive(Clone, Default)]
pub struct Telemetry(Option<Arc<Metrics>>);

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_on() {
            "Telemetry(on)"
        } else {
            "Telemetry(off)"
        })
    }
}

/// How a webhook request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Answered 2xx.
    Delivered,
    /// Answered, but not 2xx.
    Refused,
    /// Not answered in time.
    TimedOut,
    /// The endpoint could not be reached (connection refused, TLS, DNS...).
    Unreachable,
}

/// One webhook endpoint's series, looked up once (labels are not hashed per delivery).
#[derive(Clone, Default)]
pub struct WebhookMetrics(Option<Arc<WebhookSeries>>);

struct WebhookSeries {
    delivered: Counter,
    refused: Counter,
    timed_out: Counter,
    unreachable: Counter,
    retries: Counter,
    lost: Counter,
    behind: Gauge,
    oldest: Gauge<f64, AtomicU64>,
}

impl WebhookMetrics {
    /// Counts one request by how it ended.
    pub fn delivery(&self, delivery: Delivery) {
        if let Some(m) = &self.0 {
            match delivery {
                Delivery::Delivered => m.delivered.inc(),
                Delivery::Refused => m.refused.inc(),
                Delivery::TimedOut => m.timed_out.inc(),
                Delivery::Unreachable => m.unreachable.inc(),
            };
        }
    }

    /// Counts one room's delivery scheduled again after a failure.
    pub fn retry(&self) {
        if let Some(m) = &self.0 {
            m.retries.inc();
        }
    }

    /// Counts one `events_lost` notice sent.
    pub fn lost(&self) {
        if let Some(m) = &self.0 {
            m.lost.inc();
        }
    }

    /// Sets how many events the endpoint lacks, and the age of the oldest it failed to get.
    pub fn behind(&self, events: u64, oldest: Duration) {
        if let Some(m) = &self.0 {
            m.behind.set(i64::try_from(events).unwrap_or(i64::MAX));
            m.oldest.set(oldest.as_secs_f64());
        }
    }
}

/// The kind of an `Events` stream, as its metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Subscribed as one client.
    Client,
    /// Subscribed as an observer (no client id).
    Observer,
}

/// Counts one open stream in its kind's gauge until dropped.
#[derive(Debug, Default)]
pub struct OpenStream(Option<Gauge>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

impl Telemetry {
    /// Metrics kept and served.
    pub fn on() -> Self {
        Self(Some(Arc::new(Metrics::new())))
    }

    /// Metrics off: every recording is a no-op.
    pub fn off() -> Self {
        Self(None)
    }

    /// Whether metrics are kept.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Calls `hook` before each scrape, to set values that are read rather than counted.
    pub fn on_scrape(&self, hook: impl Fn(&Telemetry) + Send + 'static) {
        if let Some(m) = &self.0 {
            m.scrape_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Box::new(hook));
        }
    }

    /// Reports that the log writer has dropped `total` lines since the start.
    pub fn log_lines_dropped(&self, total: u64) {
        if let Some(m) = &self.0 {
            let before = m.dropped_seen.swap(total, Ordering::Relaxed);
            m.log_lines_dropped.inc_by(total.saturating_sub(before));
        }
    }

    fn rpc(&self, method: &'static str, code: Code, elapsed: Duration) {
        if let Some(m) = &self.0 {
            let code = code_name(code);
            m.rpcs.get_or_create(&RpcLabels { method, code }).inc();
            m.rpc_seconds
                .get_or_create(&MethodLabels { method })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Sets how many calls hold a slot of `--max-concurrent-calls` now.
    pub fn calls_in_progress(&self, calls: usize) {
        if let Some(m) = &self.0 {
            m.calls_in_progress.set(calls as i64);
        }
    }

    /// Counts a stream of `kind` as open until the returned guard is dropped.
    pub fn stream_opened(&self, kind: StreamKind) -> OpenStream {
        OpenStream(self.0.as_ref().map(|m| {
            let kind = match kind {
                StreamKind::Client => "client",
                StreamKind::Observer => "observer",
            };
            let gauge = m.streams.get_or_create(&KindLabels { kind }).clone();
            gauge.inc();
            gauge
        }))
    }

    /// Sets how many rooms, and participants in them, this node knows.
    pub fn census(&self, rooms: usize, participants: usize) {
        if let Some(m) = &self.0 {
            m.rooms.set(rooms as i64);
            m.participants.set(participants as i64);
        }
    }

    /// Counts `n` events appended to room logs.
    pub fn events_appended(&self, n: usize) {
        if let Some(m) = &self.0 {
            m.events_appended.inc_by(n as u64);
        }
    }

    /// Counts one event sent on a stream.
    pub fn event_delivered(&self) {
        if let Some(m) = &self.0 {
            m.events_delivered.inc();
        }
    }

    /// Counts one stream ended because it fell out of the history.
    pub fn stream_lagged(&self) {
        if let Some(m) = &self.0 {
            m.streams_lagged.inc();
        }
    }

    /// Records one store operation `op` that took `elapsed`.
    pub fn store_op(&self, op: &'static str, ok: bool, elapsed: Duration) {
        if let Some(m) = &self.0 {
            let outcome = if ok { "ok" } else { "error" };
            m.store_ops
                .get_or_create(&StoreLabels { op, outcome })
                .inc();
            m.store_seconds
                .get_or_create(&StoreOpLabels { op })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Counts one commit refused because the room changed meanwhile.
    pub fn commit_conflict(&self) {
        if let Some(m) = &self.0 {
            m.commit_conflicts.inc();
        }
    }

    /// Records a batch of `n` commands applied with one commit.
    pub fn batch(&self, n: usize) {
        if let Some(m) = &self.0 {
            m.batch_sizes.observe(n as f64);
        }
    }

    /// Counts one reconnection of the Redis listener.
    pub fn listener_reconnected(&self) {
        if let Some(m) = &self.0 {
            m.listener_reconnects.inc();
        }
    }

    /// The metrics of webhook endpoint `endpoint` (its series made now, so they show from the
    /// start).
    pub fn webhook(&self, endpoint: &str) -> WebhookMetrics {
        let Some(m) = &self.0 else {
            return WebhookMetrics(None);
        };
        let label = EndpointLabels {
            endpoint: endpoint.to_owned(),
        };
        let outcome = |outcome| {
            m.webhook_deliveries
                .get_or_create(&DeliveryLabels {
                    endpoint: endpoint.to_owned(),
                    outcome,
                })
                .clone()
        };
        WebhookMetrics(Some(Arc::new(WebhookSeries {
            delivered: outcome("delivered"),
            refused: outcome("refused"),
            timed_out: outcome("timed_out"),
            unreachable: outcome("unreachable"),
            retries: m.webhook_retries.get_or_create(&label).clone(),
            lost: m.webhook_lost.get_or_create(&label).clone(),
            behind: m.webhook_behind.get_or_create(&label).clone(),
            oldest: m.webhook_oldest.get_or_create(&label).clone(),
        })))
    }

    /// Counts one notice of committed events received from Redis.
    pub fn notice_received(&self) {
        if let Some(m) = &self.0 {
            m.notices_received.inc();
        }
    }

    /// The metrics in the OpenMetrics text format; None when metrics are off.
    pub fn encode(&self) -> Option<String> {
        let m = self.0.as_ref()?;
        for hook in m
            .scrape_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook(self);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).ok()?;
        Some(text)
    }
}

/// Connections the metrics listener serves at once. A scraper needs one; past this, new ones
/// wait in the kernel's accept queue instead of taking file descriptors the gRPC port needs.
pub const MAX_METRICS_CONNECTIONS: usize = 64;

/// Serves the metrics at `GET /metrics` (and `HEAD`) on `listener` until `stop`. Each connection
/// serves one request: it must send its request head within `timeout` (the gRPC port's
/// `--handshake-timeout`) and is closed at the latest `timeout` later, so idle or slow peers
/// cannot hold the listener's few connections.
pub async fn serve(
    listener: TcpListener,
    telemetry: Telemetry,
    timeout: Duration,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let accepted = async {
            let slot = slots.clone().acquire_owned().await.ok()?;
            Some((listener.accept().await, slot))
        };
        let (stream, slot) = tokio::select! {
            accepted = accepted => match accepted {
                Some((Ok((stream, _)), slot)) => (stream, slot),
                Some((Err(err), _)) => {
                    // Out of descriptors, most likely: the gRPC listener logs that; wait.
                    tracing::debug!(%err, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let telemetry = telemetry.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let answer = service_fn(move |request: http::Request<Incoming>| {
                let response = scrape(&telemetry, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), answer);
            tokio::select! {
                _ = tokio::time::timeout(timeout * 2, connection) => {},
                _ = stop.cancelled() => {},
            }
        });
    }
}

/// The answer to one request of the metrics listener: the metrics for `GET` and `HEAD` of
/// `/metrics` (hyper sends no body for `HEAD`), 405 for another method there, 404 elsewhere.
fn scrape(telemetry: &Telemetry, request: &http::Request<Incoming>) -> http::Response<Full<Bytes>> {
    let readable = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
    let refusal = |status, text: &'static [u8]| {
        http::Response::builder()
            .status(status)
            .header(http::header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::from_static(text)))
    };
    match (request.uri().path() == "/metrics", readable) {
        (true, true) => match telemetry.encode() {
            Some(text) => http::Response::builder()
                .header(
                    http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(text))),
            None => refusal(http::StatusCode::NOT_FOUND, b"metrics are off\n"),
        },
        (true, false) => refusal(http::StatusCode::METHOD_NOT_ALLOWED, b"GET /metrics\n"),
        (false, _) => refusal(http::StatusCode::NOT_FOUND, b"GET /metrics\n"),
    }
    .expect("a response of static parts")
}

/// Bytes of a caller's string a log line shows at most: more than any valid room id, identity or
/// request id (128 characters), far less than what a request may carry (4 MiB).
pub const MAX_LOGGED_BYTES: usize = 256;

/// A caller's string as a log line shows it: whole up to [`MAX_LOGGED_BYTES`], else cut there
/// (on a character boundary) with its length noted, so no request can make a log line long.
pub struct Clipped<'a>(pub &'a str);

impl std::fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0;
        if text.len() <= MAX_LOGGED_BYTES {
            return f.write_str(text);
        }
        let mut end = MAX_LOGGED_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{}…[{} bytes]", &text[..end], text.len())
    }
}

/// What only a handler knows of a call, for its log line: the room, the caller and, for a
/// moderator's command, its request id (so one line per call is the whole audit trail).
#[derive(Clone, Default)]
pub struct CallNote(Arc<Noted>);

#[derive(Default)]
struct Noted {
    call: OnceLock<(String, String)>,
    request_id: OnceLock<String>,
    /// The client's request broke off (a reset stream, a closed connection) before it was
    /// read whole: whatever the handler answers, the call was cancelled by its client.
    broke_off: std::sync::atomic::AtomicBool,
}

impl CallNote {
    /// Notes the call's room and caller identity (the first note counts), as the log shows
    /// them: the room id comes from the request before it is validated, so it may be long.
    pub fn record(&self, room_id: &str, identity: &str) {
        let noted = (Clipped(room_id).to_string(), Clipped(identity).to_string());
        let _ = self.0.call.set(noted);
    }

    /// Notes the request id of the command the call ran (the first note counts).
    pub fn record_request_id(&self, request_id: &str) {
        let _ = self.0.request_id.set(Clipped(request_id).to_string());
    }

    /// `request` with its body watched: if the client breaks it off, the call is counted and
    /// logged `CANCELLED`, not as the error the handler made of the broken body.
    pub fn watch(&self, request: http::Request<Body>) -> http::Request<Body> {
        let note = self.clone();
        let inspect = move |polled: &Polled| {
            if let Poll::Ready(Some(Err(_))) = polled {
                note.0.broke_off.store(true, Ordering::Relaxed);
            }
        };
        request.map(|body| Body::new(Inspected { body, inspect }))
    }
}

/// What polling a body gives.
type Polled = Poll<Option<Result<Frame<<Body as HttpBody>::Data>, <Body as HttpBody>::Error>>>;

/// A body passed on unchanged, each of its polls shown to `inspect` first: a request's, to note
/// that its client broke it off; a response's, to learn the call's code.
struct Inspected<F> {
    body: Body,
    inspect: F,
}

impl<F: FnMut(&Polled) + Unpin> HttpBody for Inspected<F> {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        (this.inspect)(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A call being observed: recorded in the metrics and logged once, when its code is known.
struct Observation {
    method: &'static str,
    note: CallNote,
    started: Instant,
    telemetry: Telemetry,
}

impl Observation {
    fn finish(self, code: Code) {
        // The handler's error about a request its client broke off is the client's cancel.
        let code = match code {
            Code::Internal | Code::Unknown if self.note.0.broke_off.load(Ordering::Relaxed) => {
                Code::Cancelled
            }
            code => code,
        };
        let elapsed = self.started.elapsed();
        self.telemetry.rpc(self.method, code, elapsed);
        let (room, identity) = self
            .note
            .0
            .call
            .get()
            .map_or(("-", "-"), |(r, i)| (r.as_str(), i.as_str()));
        let request_id = self.note.0.request_id.get().map_or("-", String::as_str);
        tracing::info!(
            target: "roomctl::access",
            method = self.method,
            room,
            identity,
            request_id,
            code = code_name(code),
            duration_us = elapsed.as_micros() as u64,
            "rpc"
        );
    }
}

/// Observes the call `method` whose response is `response`: when its status is already in the
/// headers (errors, trailers-only answers), now; otherwise when its body ends, with the code
/// of its trailers, or CANCELLED if the body is dropped first (the client went away).
pub fn observe(
    response: http::Response<Body>,
    method: &'static str,
    note: CallNote,
    started: Instant,
    telemetry: &Telemetry,
) -> http::Response<Body> {
    if !telemetry.is_on() && !tracing::enabled!(target: "roomctl::access", tracing::Level::INFO) {
        return response;
    }
    let observation = Observation {
        method,
        note,
        started,
        telemetry: telemetry.clone(),
    };
    if let Some(status) = Status::from_header_map(response.headers()) {
        observation.finish(status.code());
        return response;
    }
    let mut ending = Ending(Some(observation));
    let inspect = move |polled: &Polled| match polled {
        Poll::Ready(Some(Ok(frame))) => {
            if let Some(trailers) = frame.trailers_ref() {
                ending.finish(Status::from_header_map(trailers).map_or(Code::Ok, |s| s.code()));
            }
        }
        Poll::Ready(Some(Err(status))) => ending.finish(status.code()),
        Poll::Ready(None) => ending.finish(Code::Ok),
        Poll::Pending => {}
    };
    response.map(|body| Body::new(Inspected { body, inspect }))
}

/// A response's observation, finished with the call's code once the body ends, or `CANCELLED`
/// when the body is dropped before (its client went away).
struct Ending(Option<Observation>);

impl Ending {
    fn finish(&mut self, code: Code) {
        if let Some(observation) = self.0.take() {
            observation.finish(code);
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_read_from_paths() {
        assert_eq!(
            method_of("/roomcontrol.v1.RoomControl/DropUser"),
            Some("DropUser")
        );
        assert_eq!(
            method_of("/roomcontrol.v1.RoomControl/Unban"),
            Some("Unban")
        );
        assert_eq!(method_of("/roomcontrol.v1.RoomControl/Nope"), None);
        assert_eq!(method_of("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn long_strings_are_clipped_with_their_length() {
        assert_eq!(Clipped("room-1").to_string(), "room-1");
        let long = "é".repeat(1000);
        let shown = Clipped(&long).to_string();
        assert!(shown.ends_with("…[2000 bytes]"), "{shown}");
        assert!(shown.len() <= MAX_LOGGED_BYTES + 20, "{}", shown.len());
        assert_eq!(Clipped(&"x".repeat(256)).to_string(), "x".repeat(256));
    }

    #[test]
    fn series_are_named_and_labelled_as_prometheus_expects() {
        let telemetry = Telemetry::on();
        telemetry.rpc("DropUser", Code::Ok, Duration::from_millis(2));
        telemetry.rpc("DropUser", Code::PermissionDenied, Duration::from_millis(1));
        let open = telemetry.stream_opened(StreamKind::Observer);
        telemetry.events_appended(3);
        telemetry.on_scrape(|t| t.log_lines_dropped(7));
        let text = telemetry.encode().unwrap();
        for line in [
            "roomctl_rpcs_total{method=\"DropUser\",code=\"OK\"} 1",
            "roomctl_rpcs_total{method=\"DropUser\",code=\"PERMISSION_DENIED\"} 1",
            "roomctl_rpc_duration_seconds_count{method=\"DropUser\"} 2",
            "roomctl_events_streams_open{kind=\"observer\"} 1",
            "roomctl_events_appended_total 3",
            "roomctl_log_lines_dropped_total 7",
            "roomctl_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop(open);
        assert!(telemetry
            .encode()
            .unwrap()
            .contains("roomctl_events_streams_open{kind=\"observer\"} 0"));
        assert!(Telemetry::off().encode().is_none());
    }
}
