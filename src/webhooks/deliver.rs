//! The deliverer of one endpoint: a task that follows the rooms with events it has not
//! received, sends each room's events in order (the next once the previous got a 2xx), and
//! moves the room's cursor in the store after each.
//!
//! Rooms are worked on [`IN_FLIGHT`] at a time, each for one read batch before the next room's
//! turn, so a busy room never starves a quiet one. A room whose delivery fails waits out its own
//! backoff (capped, jittered) off the working set, then retries in a lane of its own
//! ([`RETRYING_IN_FLIGHT`] at a time), so rooms whose requests hang until their timeout never
//! take the places of rooms that deliver: a failing room holds back no other room. A room is
//! followed only while it has events to deliver: the store says which rooms are due
//! ([`Outbox::due`]), and keeps their retry times, so on a shared store any node may take a
//! room's next turn.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::bytes::Bytes;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{sign, Endpoint, MIN_RETRY_DELAY};
use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::codec::json;
use crate::error::Error;
use crate::pb;
use crate::store::{is_whole, Cursor, Outbox, RoomStore};
use crate::telemetry::{Delivery, Telemetry, WebhookMetrics};

/// Rooms one endpoint's deliverer works on at once (each has at most one request in flight),
/// besides those retrying.
const IN_FLIGHT: usize = 64;
/// Rooms retrying after a failure that it works on at once.
const RETRYING_IN_FLIGHT: usize = 16;
/// How long past its retry time a failed room may go without the store handing it back before
/// the deliverer asks whether another node took it (the store's time and this node's differ a
/// little).
const HANDED_BACK: Duration = Duration::from_secs(1);
/// Of a response's body, at most this much is read (and thrown away) so its connection can be
/// used again; a longer one closes it.
const RESPONSE_BODY_BYTES: usize = 64 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Starts a deliverer for each of `endpoints` (numbered as `outbox` was opened), reading events
/// from `store`, until `end` is cancelled.
pub fn start(
    store: Arc<dyn RoomStore>,
    outbox: Arc<dyn Outbox>,
    endpoints: Vec<Endpoint>,
    telemetry: &Telemetry,
    clock: Clock,
    end: CancellationToken,
) {
    for (index, endpoint) in endpoints.into_iter().enumerate() {
        let metrics = telemetry.webhook(endpoint.name());
        let client = http_client(&endpoint.ca);
        let context = Arc::new(Context {
            index,
            endpoint,
            store: store.clone(),
            outbox: outbox.clone(),
            client,
            clock,
            metrics,
        });
        let end = end.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = Deliverer::new(context).run() => {}
                () = end.cancelled() => {}
            }
        });
    }
}

/// HTTP/1.1 with keep-alive, https through rustls trusting the Mozilla roots and `ca`.
fn http_client(ca: &[rustls::pki_types::CertificateDer<'static>]) -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Each was read from a PEM file and checked when the settings were.
    let _ = roots.add_parsable_certificates(ca.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the ring provider supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// What every delivery of one endpoint shares.
struct Context {
    index: usize,
    endpoint: Endpoint,
    store: Arc<dyn RoomStore>,
    outbox: Arc<dyn Outbox>,
    client: HttpsClient,
    clock: Clock,
    metrics: WebhookMetrics,
}

/// A room the deliverer follows: it has, or may have, events to deliver.
struct Track {
    /// Events were logged since its current turn began.
    dirty: bool,
    /// Its turn is running.
    running: bool,
    /// It failed and waits for the store to hand it out again, from then on.
    waiting: Option<Instant>,
    /// Its retries' delays, while it fails (its turns then run in the retrying lane).
    backoff: Option<Backoff>,
    /// The lane its running turn holds a place in.
    lane: usize,
    /// Events not yet delivered, as of its last turn.
    behind: u64,
    /// When the oldest of them was logged, if it was read.
    oldest: Option<SystemTime>,
}

/// How a room's turn ended.
enum Turn {
    /// Every event logged when it read was delivered, and the turn settled.
    CaughtUp,
    /// Some were delivered; there are more.
    More,
    /// The room is gone (forgotten once delivered), or its turn went to another node.
    Gone,
}

/// What a turn reports: how it ended, or why it failed, and how far behind the room is.
struct Report {
    outcome: Result<Turn, String>,
    behind: u64,
    oldest: Option<SystemTime>,
}

/// Rooms waiting for a turn, and turns running, of one kind.
struct Lane {
    ready: VecDeque<Arc<str>>,
    running: usize,
    limit: usize,
}

/// The lane of rooms that deliver, and the lane of rooms retrying after a failure.
const DELIVERING: usize = 0;
const RETRYING: usize = 1;

struct Deliverer {
    context: Arc<Context>,
    rooms: HashMap<Arc<str>, Track>,
    lanes: [Lane; 2],
    running: JoinSet<(Arc<str>, Report)>,
    /// Retries being scheduled in the store.
    retries: JoinSet<()>,
    /// The question which failed rooms went to other nodes, while it is asked.
    asking: JoinSet<Vec<Arc<str>>>,
    /// Rooms whose last attempt failed: the endpoint is logged failing when the first one
    /// fails and delivering again when the last one recovers, never once per event.
    failing: usize,
}

impl Deliverer {
    fn new(context: Arc<Context>) -> Self {
        Self {
            context,
            rooms: HashMap::new(),
            lanes: [IN_FLIGHT, RETRYING_IN_FLIGHT].map(|limit| Lane {
                ready: VecDeque::new(),
                running: 0,
                limit,
            }),
            running: JoinSet::new(),
            retries: JoinSet::new(),
            asking: JoinSet::new(),
            failing: 0,
        }
    }

    /// Queues `room` for a turn in its lane.
    fn ready(&mut self, room: Arc<str>) {
        let retrying = self
            .rooms
            .get(&room)
            .is_some_and(|track| track.backoff.is_some());
        self.lanes[if retrying { RETRYING } else { DELIVERING }]
            .ready
            .push_back(room);
    }

    /// Starts the turns each lane has places for.
    fn start_turns(&mut self) {
        for (index, lane) in self.lanes.iter_mut().enumerate() {
            while lane.running < lane.limit {
                let Some(room) = lane.ready.pop_front() else {
                    break;
                };
                let Some(track) = self.rooms.get_mut(&room) else {
                    continue;
                };
                track.running = true;
                track.dirty = false;
                track.lane = index;
                lane.running += 1;
                let context = self.context.clone();
                self.running.spawn(async move {
                    let report = context.turn(&room).await;
                    (room, report)
                });
            }
        }
    }

    async fn run(mut self) {
        let mut census = tokio::time::interval(Duration::from_secs(1));
        // Asked apart, so that taking rooms (on a shared store, their turns) is never cut off
        // halfway by another branch of the loop; it ends with the deliverer.
        let (rooms, mut due) = tokio::sync::mpsc::channel(1);
        let _asking = AbortOnDropHandle::new(tokio::spawn(ask_due(self.context.clone(), rooms)));
        loop {
            self.start_turns();
            let delivering = &self.lanes[DELIVERING];
            let room_for_more = delivering.running + delivering.ready.len() < IN_FLIGHT;
            tokio::select! {
                Some(rooms) = due.recv(), if room_for_more => {
                    rooms.into_iter().for_each(|room| self.follow(room));
                }
                Some(done) = self.running.join_next() => match done {
                    Ok((room, report)) => self.finish(room, report),
                    Err(err) => tracing::error!(%err, "a webhook delivery task failed"),
                },
                Some(_) = self.retries.join_next() => {}
                Some(Ok(elsewhere)) = self.asking.join_next() => self.forget_elsewhere(&elsewhere),
                _ = census.tick() => self.census(),
            }
        }
    }

    /// Follows `room`, which the store says is due: at once if it was quiet or waiting for
    /// its retry; after its turn if one is running.
    fn follow(&mut self, room: Arc<str>) {
        match self.rooms.get_mut(&room) {
            Some(track) if track.running => track.dirty = true,
            Some(track) if track.waiting.is_some() => {
                track.waiting = None;
                self.ready(room);
            }
            // Already queued for a turn.
            Some(_) => {}
            None => {
                self.rooms.insert(
                    room.clone(),
                    Track {
                        dirty: false,
                        running: false,
                        waiting: None,
                        backoff: None,
                        lane: DELIVERING,
                        behind: 0,
                        oldest: None,
                    },
                );
                self.ready(room);
            }
        }
    }

    fn finish(&mut self, room: Arc<str>, report: Report) {
        let Some(track) = self.rooms.get_mut(&room) else {
            return;
        };
        track.running = false;
        self.lanes[track.lane].running -= 1;
        track.behind = report.behind;
        track.oldest = match &report.outcome {
            Ok(_) => report.oldest,
            // A failure whose event was not read (the store failed, or the notice of a loss
            // was refused) is as old as the room's first failure.
            Err(_) => report
                .oldest
                .or(track.oldest)
                .or_else(|| Some(self.context.clock.now())),
        };
        match report.outcome {
            Ok(turn) => {
                if track.backoff.take().is_some() {
                    self.failing -= 1;
                    if self.failing == 0 {
                        tracing::info!(endpoint = %self.context.endpoint.name(), "webhook endpoint delivering again");
                    }
                }
                let again =
                    matches!(turn, Turn::More) || matches!(turn, Turn::CaughtUp if track.dirty);
                if again {
                    self.ready(room);
                } else {
                    self.rooms.remove(&room);
                }
            }
            Err(reason) => {
                if track.backoff.is_none() {
                    self.failing += 1;
                    if self.failing == 1 {
                        tracing::warn!(endpoint = %self.context.endpoint.name(), %reason, "webhook endpoint failing; retrying with backoff");
                    }
                }
                self.context.metrics.retry();
                let delay = track
                    .backoff
                    .get_or_insert_with(|| {
                        // Jitter adds up to the delay itself: doubling to half the cap keeps
                        // every delay under it.
                        let cap = self.context.endpoint.max_retry_delay / 2;
                        Backoff::new(MIN_RETRY_DELAY.min(cap), cap)
                    })
                    .next_delay();
                track.waiting = Some(Instant::now() + delay);
                let context = self.context.clone();
                // Short, and bounded by the store's deadline; if it fails, the room's turn
                // runs out on a shared store and another attempt follows.
                self.retries.spawn(async move {
                    if let Err(err) = context.outbox.retry(context.index, &room, delay).await {
                        tracing::debug!(err = %err.detail(), "webhooks: could not schedule a retry");
                    }
                });
            }
        }
    }

    /// Tells the metrics how far behind the endpoint is, and asks the store whether the
    /// failed rooms it has not handed back since their retry time went to other nodes (on a
    /// shared store), whose metrics then count them.
    fn census(&mut self) {
        let overdue: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|(_, track)| {
                track
                    .waiting
                    .is_some_and(|retry| retry.elapsed() > HANDED_BACK)
            })
            .map(|(room, _)| room.clone())
            .collect();
        if !overdue.is_empty() && self.asking.is_empty() {
            let context = self.context.clone();
            self.asking.spawn(async move {
                match context.outbox.elsewhere(context.index, &overdue).await {
                    Ok(elsewhere) => overdue
                        .into_iter()
                        .zip(elsewhere)
                        .filter_map(|(room, gone)| gone.then_some(room))
                        .collect(),
                    // Asked again at the next census.
                    Err(_) => Vec::new(),
                }
            });
        }
        let behind = self.rooms.values().map(|track| track.behind).sum();
        let oldest = self.rooms.values().filter_map(|track| track.oldest).min();
        let age = oldest
            .and_then(|at| self.context.clock.now().duration_since(at).ok())
            .unwrap_or_default();
        self.context.metrics.behind(behind, age);
    }

    /// Forgets the failed rooms that went to other nodes and are still waiting here: this node
    /// no longer delivers them, nor counts them.
    fn forget_elsewhere(&mut self, elsewhere: &[Arc<str>]) {
        for room in elsewhere {
            if self
                .rooms
                .get(room)
                .is_some_and(|track| track.waiting.is_some())
            {
                self.rooms.remove(room);
                // A waiting room is a failing one.
                self.failing -= 1;
                if self.failing == 0 {
                    tracing::info!(endpoint = %self.context.endpoint.name(), "webhook endpoint has no failing room on this node any more: other nodes took them");
                }
            }
        }
    }
}

/// Hands the deliverer the rooms the store says are due, as it has room for them.
async fn ask_due(context: Arc<Context>, rooms: tokio::sync::mpsc::Sender<Vec<Arc<str>>>) {
    loop {
        match context.outbox.due(context.index, IN_FLIGHT).await {
            Ok(due) => {
                if rooms.send(due).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                tracing::debug!(err = %err.detail(), "webhooks: the store cannot say which rooms are due");
                tokio::time::sleep(MIN_RETRY_DELAY).await;
            }
        }
    }
}

impl Context {
    /// One turn of `room`: reads a batch after the endpoint's cursor and delivers it in order,
    /// moving the cursor after each event.
    async fn turn(&self, room: &str) -> Report {
        let mut report = Report {
            outcome: Ok(Turn::Gone),
            behind: 0,
            oldest: None,
        };
        let position = match self.outbox.position(self.index, room).await {
            Ok(Some(position)) => position,
            Ok(None) => return report,
            Err(err) => return failed(report, format!("store: {}", err.detail())),
        };
        let mut cursor = position.delivered;
        report.behind = position.newest_seq.saturating_sub(cursor.seq);
        let batch = match self.store.read(room, &cursor.epoch, cursor.seq).await {
            Ok(batch) => batch,
            Err(Error::CursorOutOfRange {
                oldest_seq, epoch, ..
            }) => {
                return match self.lost(room, &cursor, &epoch, oldest_seq).await {
                    Ok(()) => Report {
                        outcome: Ok(Turn::More),
                        ..report
                    },
                    Err(reason) => failed(report, reason),
                }
            }
            Err(Error::RoomNotFound { .. }) => return report,
            Err(err) => return failed(report, format!("store: {}", err.detail())),
        };
        let whole = is_whole(&batch);
        let mut unsaved = false;
        for event in &batch {
            if self.endpoint.wants(event) {
                report.oldest = event.time.and_then(|time| SystemTime::try_from(time).ok());
                match self.outbox.keep_turn(self.index, room).await {
                    Ok(true) => {}
                    Ok(false) => return gone(report),
                    Err(err) => return failed(report, format!("store: {}", err.detail())),
                }
                let id = format!("{room}:{}:{}", event.epoch, event.seq);
                if let Err(reason) = self.post(&id, json(&***event)).await {
                    return failed(report, reason);
                }
            }
            cursor.seq = event.seq;
            report.behind = position.newest_seq.saturating_sub(cursor.seq);
            unsaved = !self.endpoint.wants(event);
            if !unsaved {
                // Saved after each delivered event: a deliverer that dies resends one at most.
                match self.advance(room, &cursor).await {
                    Ok(true) => {}
                    Ok(false) => return gone(report),
                    Err(reason) => return failed(report, reason),
                }
            }
        }
        if unsaved {
            match self.advance(room, &cursor).await {
                Ok(true) => {}
                Ok(false) => return gone(report),
                Err(reason) => return failed(report, reason),
            }
        }
        report.oldest = None;
        if !whole || cursor.seq < position.newest_seq {
            report.outcome = Ok(Turn::More);
            return report;
        }
        report.outcome = match self.outbox.settle(self.index, room).await {
            Ok(()) => Ok(Turn::CaughtUp),
            Err(err) => Err(format!("store: {}", err.detail())),
        };
        report
    }

    /// Tells the endpoint that the events after `cursor` up to the log's oldest (or, when the
    /// log is another epoch, every event of the old one after the cursor) will never come, and
    /// moves the cursor to where delivery goes on.
    async fn lost(
        &self,
        room: &str,
        cursor: &Cursor,
        epoch: &str,
        oldest_seq: u64,
    ) -> Result<(), String> {
        let same_log = epoch == cursor.epoch;
        let lost = pb::EventsLost {
            room_id: room.to_owned(),
            epoch: cursor.epoch.clone(),
            from_seq: cursor.seq + 1,
            to_seq: if same_log { oldest_seq - 1 } else { 0 },
            next_epoch: epoch.to_owned(),
            next_seq: oldest_seq,
        };
        let id = format!(
            "{room}:{}:lost:{}-{}",
            lost.epoch, lost.from_seq, lost.to_seq
        );
        let notice = pb::WebhookNotice {
            notice: Some(pb::webhook_notice::Notice::EventsLost(lost)),
        };
        self.post(&id, json(&notice)).await?;
        self.metrics.lost();
        let next = Cursor {
            epoch: epoch.to_owned(),
            seq: oldest_seq - 1,
        };
        self.advance(room, &next).await.map(drop)
    }

    /// Moves the cursor; false when the room's turn went to another node.
    async fn advance(&self, room: &str, cursor: &Cursor) -> Result<bool, String> {
        self.outbox
            .advance(self.index, room, cursor)
            .await
            .map_err(|err| format!("store: {}", err.detail()))
    }

    /// POSTs `body` as message `id`, signed now; Ok on a 2xx answer.
    async fn post(&self, id: &str, body: String) -> Result<(), String> {
        let timestamp = self
            .clock
            .now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = sign::signature(&self.endpoint.secrets, id, timestamp, body.as_bytes());
        let request = http::Request::post(&self.endpoint.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("roomctl/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| format!("request: {err}"))?;
        let timeout = self.endpoint.timeout;
        let sent = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status();
                // The answer's head decides; its body is read (within the timeout again) only
                // so the connection can carry the next request, and otherwise dropped with it.
                let body = Limited::new(response.into_body(), RESPONSE_BODY_BYTES).collect();
                let _ = tokio::time::timeout(timeout, body).await;
                Ok(Ok(status))
            }
            Ok(Err(err)) => Ok(Err(err)),
            Err(elapsed) => Err(elapsed),
        };
        let (delivery, result) = match sent {
            Ok(Ok(status)) if status.is_success() => (Delivery::Delivered, Ok(())),
            Ok(Ok(status)) => (Delivery::Refused, Err(format!("answered {status}"))),
            Ok(Err(err)) => (Delivery::Unreachable, Err(with_causes(&err))),
            Err(_) => (
                Delivery::TimedOut,
                Err(format!("no answer within {:?}", self.endpoint.timeout)),
            ),
        };
        self.metrics.delivery(delivery);
        result
    }
}

/// The turn ended because the room's turn went to another node.
fn gone(report: Report) -> Report {
    Report {
        outcome: Ok(Turn::Gone),
        ..report
    }
}

fn failed(report: Report, reason: String) -> Report {
    Report {
        outcome: Err(reason),
        ..report
    }
}

/// An error and its causes on one line (hyper's own says little: "client error (Connect)").
fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}
