//! Overload protection: every limit a node sets, with its default, and the parts that enforce
//! the ones that are not the store's or the transport's.
//!
//! - [`Guard`], a tower layer in front of RoomControl: sheds calls past
//!   `--max-concurrent-calls` at once with `UNAVAILABLE` (`OVERLOADED`) instead of queueing
//!   them, and gives every call a deadline, the shorter of `--request-timeout` and the client's
//!   `grpc-timeout`, answered `DEADLINE_EXCEEDED`. It also maps tonic's over-size answer to the
//!   contract's, and observes every call for the metrics and the access log.
//! - [`StreamSlot`]: an open `Events` stream counted against `--max-streams` (node) and
//!   `--max-streams-per-connection`, released when the stream is dropped.
//! - [`RateLimiter`]: moderator commands per identity (`--moderator-rate`, `--moderator-burst`),
//!   and, when set, service tokens' commands per identity (`--service-rate`, `--service-burst`).
//!
//! Members per room are the engine's rule; header and message sizes, keepalive and the HTTP/2
//! reset and ping defences are set on the transport in [`crate::server`]. This module holds no
//! room state and never calls the store: it counts calls, streams and rates, and depends on the
//! errors and telemetry only.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::{Code, Status};

use crate::error::{Error, Limit};
use crate::telemetry::{self, CallNote, OpenStream, StreamKind, Telemetry};

/// Every limit of a node, configurable on `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long a new connection may take to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// The longest a unary call (or the opening of a stream) may take.
    pub request_timeout: Duration,
    /// RoomControl calls in progress at once on the node; more are shed.
    pub max_concurrent_calls: usize,
    /// `Events` streams open at once on the node.
    pub max_streams: usize,
    /// `Events` streams open at once on one connection.
    pub max_streams_per_connection: usize,
    /// Moderator commands per second per identity, sustained.
    pub moderator_rate: u32,
    /// Moderator commands one identity may send in a burst.
    pub moderator_burst: u32,
    /// Commands per second per service identity, sustained; None: services are not limited
    /// (one gateway acts for every room, so a person's rate would cap a whole fleet's traffic).
    pub service_rate: Option<u32>,
    /// Commands one service identity may send in a burst (None: twice its rate).
    pub service_burst: Option<u32>,
    /// How often an idle connection is pinged.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_concurrent_calls: 2048,
            max_streams: 100_000,
            max_streams_per_connection: 10_000,
            moderator_rate: 100,
            moderator_burst: 200,
            service_rate: None,
            service_burst: None,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// The `Events` streams a node may hold, and how many it holds now.
#[derive(Debug, Clone)]
pub struct StreamBudget {
    open: Arc<AtomicUsize>,
    max: usize,
    max_per_connection: usize,
    telemetry: Telemetry,
}

impl StreamBudget {
    /// A budget of `max` streams on the node and `max_per_connection` on one connection, whose
    /// open streams `telemetry` counts by kind.
    pub fn new(max: usize, max_per_connection: usize, telemetry: Telemetry) -> Self {
        Self {
            open: Arc::default(),
            max,
            max_per_connection,
            telemetry,
        }
    }

    /// How many streams are open on the node now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Reserves a slot for one more stream of `kind` on `connection` (None: not counted per
    /// connection), or says which limit is full.
    pub fn reserve(
        &self,
        kind: StreamKind,
        connection: Option<&Arc<AtomicUsize>>,
    ) -> Result<StreamSlot, Error> {
        let mut slot =
            StreamSlot::count_against(&self.open, self.max, connection, self.max_per_connection)?;
        slot.metric = self.telemetry.stream_opened(kind);
        Ok(slot)
    }
}

/// One open `Events` stream, counted on the node and on its connection until dropped.
#[derive(Debug)]
pub struct StreamSlot {
    node: Arc<AtomicUsize>,
    connection: Option<Arc<AtomicUsize>>,
    metric: OpenStream,
}

/// Adds one to `counter` if it is below `max`; whether it did.
fn increment_below(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl StreamSlot {
    /// Counts one stream against both the node (`node`, at most `max_node`) and the connection
    /// (`connection`, at most `max_connection`) if both have room; the limit that is full
    /// otherwise (and then neither counter changes).
    fn count_against(
        node: &Arc<AtomicUsize>,
        max_node: usize,
        connection: Option<&Arc<AtomicUsize>>,
        max_connection: usize,
    ) -> Result<Self, Error> {
        if let Some(connection) = connection {
            if !increment_below(connection, max_connection) {
                return Err(Error::LimitReached {
                    limit: Limit::StreamsPerConnection,
                    max: max_connection,
                });
            }
        }
        if !increment_below(node, max_node) {
            if let Some(connection) = connection {
                connection.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(Error::LimitReached {
                limit: Limit::Streams,
                max: max_node,
            });
        }
        Ok(Self {
            node: node.clone(),
            connection: connection.cloned(),
            metric: OpenStream::default(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.node.fetch_sub(1, Ordering::AcqRel);
        if let Some(connection) = &self.connection {
            connection.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Identities whose rate state is kept; a cold identity evicted past this starts afresh.
const RATED_IDENTITIES: usize = 100_000;

/// A per-identity rate limit (GCRA: one "theoretical arrival time" per identity), bounded in
/// memory by a cache of identities. Written here because governor's keyed limiter keeps every
/// key until told to sweep; this one never holds more than `RATED_IDENTITIES`.
pub struct RateLimiter {
    /// Which setting this limiter enforces, as its refusals name it.
    limit: Limit,
    /// Time between two commands at the sustained rate, in nanoseconds.
    interval: u64,
    /// How far ahead of now an identity's arrival time may run (the burst).
    tolerance: u64,
    rate: u32,
    /// Tokio's clock, which tests can pause: the same instants as the system's otherwise.
    start: tokio::time::Instant,
    arrivals: quick_cache::sync::Cache<String, Arc<AtomicU64>>,
}

impl RateLimiter {
    /// `rate` commands per second sustained, `burst` at once (both at least 1), enforcing
    /// `limit`.
    pub fn new(limit: Limit, rate: u32, burst: u32) -> Self {
        let interval = (1_000_000_000 / u64::from(rate.max(1))).max(1);
        Self {
            limit,
            interval,
            tolerance: interval * u64::from(burst.max(1) - 1),
            rate: rate.max(1),
            start: tokio::time::Instant::now(),
            arrivals: quick_cache::sync::Cache::new(RATED_IDENTITIES),
        }
    }

    /// Counts one command by `identity`, or says how long it must wait.
    pub fn check(&self, identity: &str) -> Result<(), Error> {
        // One arrival time per identity even when its first calls race: a plain get-then-insert
        // let each racer count on its own fresh state, and all but the last were lost, so a
        // concurrent burst passed well past the limit.
        let Ok(arrival) = self
            .arrivals
            .get_or_insert_with(identity, || Ok::<_, Infallible>(Arc::default()));
        let mut current = arrival.load(Ordering::Acquire);
        loop {
            // Read after the arrival time, so it is never earlier than the call that set it
            // (the clock is monotonic across threads): concurrent calls within the burst pass.
            let now = self.start.elapsed().as_nanos() as u64;
            let theoretical = current.max(now);
            if theoretical - now > self.tolerance {
                return Err(Error::RateLimited {
                    limit: self.limit,
                    retry_after: Duration::from_nanos(theoretical - now - self.tolerance),
                    rate: self.rate,
                });
            }
            match arrival.compare_exchange_weak(
                current,
                theoretical + self.interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// Reads a `grpc-timeout` header (`<up to 8 digits><H|M|S|m|u|n>`); None when absent or
/// unreadable (then only the server's own timeout applies).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Builds [`Guard`]s around the server's routes.
#[derive(Clone)]
pub struct GuardLayer {
    calls: Arc<Semaphore>,
    max_calls: usize,
    request_timeout: Duration,
    max_message_bytes: usize,
    telemetry: Telemetry,
}

impl GuardLayer {
    /// A guard for `limits`; `max_message_bytes` is what over-size answers name; `telemetry`
    /// records every call.
    pub fn new(limits: &Limits, max_message_bytes: usize, telemetry: Telemetry) -> Self {
        let calls = Arc::new(Semaphore::new(limits.max_concurrent_calls));
        let (slots, max) = (Arc::downgrade(&calls), limits.max_concurrent_calls);
        telemetry.on_scrape(move |telemetry| {
            if let Some(slots) = slots.upgrade() {
                telemetry.calls_in_progress(max - slots.available_permits());
            }
        });
        Self {
            calls,
            max_calls: limits.max_concurrent_calls,
            request_timeout: limits.request_timeout,
            max_message_bytes,
            telemetry,
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

/// Load shedding, deadlines and the over-size mapping, in front of the routes.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

/// The future a [`Guard`] answers a call with.
type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Guard<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule for cloned services).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.layer.max_message_bytes;
        // Only RoomControl is shed, timed and observed. Health and reflection stay answerable
        // under load, so load balancers see the truth and operators can still look.
        let Some(method) = telemetry::method_of(request.uri().path()) else {
            let answer = inner.call(request);
            return Box::pin(async move { answer.await.map(|r| map_oversize(r, limit)) });
        };
        let started = Instant::now();
        let note = CallNote::default();
        request.extensions_mut().insert(note.clone());
        let telemetry = self.layer.telemetry.clone();
        let Ok(permit) = self.layer.calls.clone().try_acquire_owned() else {
            let shed = Status::from(Error::Overloaded {
                max: self.layer.max_calls,
            });
            let answer = telemetry::observe(shed.into_http(), method, note, started, &telemetry);
            return Box::pin(async move { Ok(answer) });
        };
        let timeout = grpc_timeout(request.headers()).map_or(self.layer.request_timeout, |t| {
            t.min(self.layer.request_timeout)
        });
        let answer = inner.call(note.watch(request));
        Box::pin(async move {
            let _permit = permit;
            let response = match tokio::time::timeout(timeout, answer).await {
                Ok(answer) => map_oversize(answer?, limit),
                Err(_) => Status::from(Error::DeadlineExceeded { timeout }).into_http(),
            };
            Ok(telemetry::observe(
                response, method, note, started, &telemetry,
            ))
        })
    }
}

/// tonic answers an over-size request with `OUT_OF_RANGE`; the contract says
/// `RESOURCE_EXHAUSTED` with `MESSAGE_TOO_LARGE`. Such answers are trailers-only responses, so the
/// status is in the headers and the whole response can be replaced.
fn map_oversize(response: http::Response<Body>, limit: usize) -> http::Response<Body> {
    match Status::from_header_map(response.headers()) {
        Some(status)
            if status.code() == Code::OutOfRange
                && status.message().contains("message length too large") =>
        {
            Status::from(Error::MessageTooLarge { limit }).into_http()
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_writes_them() {
        assert_eq!(
            grpc_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(grpc_timeout(&headers("3S")), Some(Duration::from_secs(3)));
        assert_eq!(
            grpc_timeout(&headers("1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            grpc_timeout(&headers("123456789S")),
            None,
            "more than 8 digits"
        );
        assert_eq!(grpc_timeout(&headers("5x")), None);
        assert_eq!(grpc_timeout(&headers("m")), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn stream_slots_count_both_limits_and_give_back_on_drop() {
        let node = Arc::new(AtomicUsize::new(0));
        let conn = Arc::new(AtomicUsize::new(0));
        let a = StreamSlot::count_against(&node, 3, Some(&conn), 2).unwrap();
        let b = StreamSlot::count_against(&node, 3, Some(&conn), 2).unwrap();
        assert!(matches!(
            StreamSlot::count_against(&node, 3, Some(&conn), 2),
            Err(Error::LimitReached {
                limit: Limit::StreamsPerConnection,
                max: 2
            })
        ));
        let other = Arc::new(AtomicUsize::new(0));
        let c = StreamSlot::count_against(&node, 3, Some(&other), 2).unwrap();
        assert!(matches!(
            StreamSlot::count_against(&node, 3, Some(&other), 2),
            Err(Error::LimitReached {
                limit: Limit::Streams,
                max: 3
            })
        ));
        assert_eq!(
            other.load(Ordering::Acquire),
            1,
            "the refused slot gave its unit back"
        );
        drop((a, b, c));
        assert_eq!(node.load(Ordering::Acquire), 0);
        assert_eq!(conn.load(Ordering::Acquire), 0);
    }

    #[test]
    fn concurrent_calls_within_the_burst_all_pass() {
        let limiter = RateLimiter::new(Limit::ModeratorRate, 1, 800);
        let started = Instant::now();
        // All threads start together, so their first calls race to create alice's state.
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    start.wait();
                    for _ in 0..100 {
                        limiter.check("alice").unwrap();
                    }
                });
            }
        });
        // Past the burst, only what the rate (1/s) refilled meanwhile passes: none unless this
        // machine took seconds over the 800 calls.
        let mut over: u64 = 0;
        while limiter.check("alice").is_ok() {
            over += 1;
        }
        assert!(
            over <= started.elapsed().as_secs() + 1,
            "{over} calls passed over the burst in {:?}",
            started.elapsed()
        );
        // A rate the nanosecond clock cannot express still lets calls through.
        let unlimited = RateLimiter::new(Limit::ModeratorRate, u32::MAX, u32::MAX);
        for _ in 0..1000 {
            unlimited.check("bob").unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rates_allow_the_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(Limit::ServiceRate, 10, 3);
        for _ in 0..3 {
            limiter.check("alice").unwrap();
        }
        let Err(Error::RateLimited {
            limit,
            retry_after,
            rate,
        }) = limiter.check("alice")
        else {
            panic!("the fourth command in a burst of 3 is refused")
        };
        assert_eq!((limit, rate), (Limit::ServiceRate, 10));
        assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
        limiter.check("bob").unwrap();
        tokio::time::advance(retry_after - Duration::from_nanos(1)).await;
        assert!(limiter.check("alice").is_err(), "not a nanosecond early");
        tokio::time::advance(Duration::from_nanos(1)).await;
        limiter.check("alice").unwrap();
    }
}
