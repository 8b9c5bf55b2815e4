//! `Events` subscriptions: a cursor into a room's log that follows it live.
//!
//! A subscription is a plain stream, not a task: tonic polls it as the client's HTTP/2 window
//! allows and drops it when the client goes away, so nothing outlives its client. It holds a
//! cursor, at most one batch of shared events (a read's, or the commit that woke it) and a
//! `watch` receiver; a subscriber that stops reading costs that much and no more, and if the
//! history moves past its cursor it ends with `OUT_OF_RANGE`. A room's subscribers woken by a
//! commit take its events from the wake-up itself: a commit costs its room one log append, not
//! one log read per subscriber. A subscription holds the client's presence lease, so a client is
//! connected exactly as long as one of its streams is. It works against any [`RoomStore`].
//!
//! It applies no command to a room (it opens, reads and watches one) and knows no backend; who
//! sees what is [`Audience`]'s rule.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

mod audience;

pub use audience::Audience;

use crate::auth::TokenGrant;
use crate::codec::EncodedEvent;
use crate::engine::Caller;
use crate::error::Error;
use crate::limits::StreamSlot;
use crate::pb;
use crate::store::{self, Head, Lease, LoggedEvent, RoomStore};
use crate::telemetry::Telemetry;
use crate::validate;

/// The response stream of `Events`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<EncodedEvent, Status>> + Send>>;

/// What a subscription holds beside its cursor: its place in the node's stream budget (given
/// back when it is dropped, whatever ended it), the server's shutdown signal, and what ends its
/// caller's token: its expiry, or the removal of the key that verified it (the stream ends
/// `UNAUTHENTICATED` then, resumable with a new token).
pub struct StreamContext {
    /// The stream's slot.
    pub slot: StreamSlot,
    /// Ends the stream with `UNAVAILABLE` / `SHUTTING_DOWN`: the server's shutdown, or the end
    /// of the stream's connection (whose client no longer reads it).
    pub shutdown: CancellationToken,
    /// When the caller's token stops being valid, and what retires its key.
    pub grant: Option<TokenGrant>,
    /// Counts the events delivered and the streams that fall behind.
    pub telemetry: Telemetry,
}

/// Opens a subscription for `caller`: checks who may subscribe how, then the cursor (before the
/// client, so an old client of a lost log learns it from `OUT_OF_RANGE`), then the client.
pub async fn subscribe(
    store: Arc<dyn RoomStore>,
    caller: &Caller,
    req: pb::EventsRequest,
    context: StreamContext,
) -> Result<EventStream, Error> {
    let client_id = validate::events(&req)?;
    caller.check_may_subscribe(&req.room_id, client_id)?;
    let opening = store.open(&req.room_id, client_id).await?;
    let start = opening.window.start(req.after_seq, &req.epoch)?;
    let audience = Audience::admit(caller, client_id, opening.client, start)?;
    let expiry = context
        .grant
        .as_ref()
        .map(|grant| Box::pin(tokio::time::sleep_until(grant.expires)));
    let retired = context.grant.map(|grant| grant.retired);
    let ends = Ends {
        cancelled: Box::pin(context.shutdown.clone().cancelled_owned()),
        shutdown: context.shutdown,
        retiring: retired
            .as_ref()
            .map(|retired| Box::pin(retired.clone().cancelled_owned())),
        retired,
        expiry,
        armed: None,
    };
    let subscription = Subscription {
        store,
        room_id: req.room_id,
        epoch: opening.window.epoch,
        cursor: start,
        audience,
        head: opening.head,
        read_all: false,
        ends,
        pending: Batch::default(),
        finished: false,
        telemetry: context.telemetry,
        _slot: context.slot,
        _lease: opening.lease,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        subscription,
        |mut subscription| async move { subscription.next().await.map(|item| (item, subscription)) },
    )))
}

/// One `Events` stream: its cursor into the room's log, what it has yet to deliver, and what
/// ends it.
struct Subscription {
    store: Arc<dyn RoomStore>,
    room_id: String,
    epoch: String,
    /// Every visible event up to here has been delivered.
    cursor: u64,
    audience: Audience,
    head: watch::Receiver<Head>,
    /// The last read, or the commit taken from `head`, returned every event committed when
    /// `head` was last marked seen, so until `head` changes another read would return nothing.
    read_all: bool,
    ends: Ends,
    /// What is left to deliver of the last read or commit.
    pending: Batch,
    finished: bool,
    telemetry: Telemetry,
    _slot: StreamSlot,
    /// Keeps the client present while the stream lives (see the store's presence).
    _lease: Lease,
}

/// Shared events and how many of them were delivered.
#[derive(Default)]
struct Batch {
    events: Option<Arc<[Arc<LoggedEvent>]>>,
    next: usize,
}

impl Batch {
    /// The next event; once there is none, the events are let go (the history may drop them).
    fn pop_front(&mut self) -> Option<Arc<LoggedEvent>> {
        let event = self.events.as_ref()?.get(self.next).cloned();
        match event {
            Some(_) => self.next += 1,
            None => self.events = None,
        }
        event
    }
}

/// Why a subscription ends other than by its log.
enum End {
    Shutdown,
    Expired,
    /// A reload removed the key that verified the caller's token.
    Revoked,
}

/// What ends a subscription besides its log: the server's shutdown and the caller's token
/// expiring. Their waits are made once and registered with the stream's task, and registered
/// again only if another task polls the stream: an observer woken by every event of a busy room
/// does not unregister and register them each time.
struct Ends {
    shutdown: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Cancelled when the key of the caller's token is removed.
    retired: Option<CancellationToken>,
    retiring: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Never without an expiry.
    expiry: Option<Pin<Box<Sleep>>>,
    /// The waker both waits are registered with.
    armed: Option<Waker>,
}

impl Ends {
    /// Whether an end has come. Once the waits are registered the timer says whether the expiry
    /// came, without reading the clock: a room's observers look at every event.
    fn reached(&self) -> Option<End> {
        if self.shutdown.is_cancelled() {
            return Some(End::Shutdown);
        }
        if self
            .retired
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
        {
            return Some(End::Revoked);
        }
        self.expiry
            .as_ref()
            .is_some_and(|expiry| match self.armed {
                Some(_) => expiry.is_elapsed(),
                None => expiry.deadline() <= Instant::now(),
            })
            .then_some(End::Expired)
    }

    /// Completes when an end comes, waking the task that polls it.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Both will wake this task when they come: look, without registering again.
            return self.reached().map_or(Poll::Pending, Poll::Ready);
        }
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Shutdown);
        }
        if let Some(retiring) = &mut self.retiring {
            if retiring.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Revoked);
            }
        }
        if let Some(expiry) = &mut self.expiry {
            if expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Expired);
            }
        }
        self.armed = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Subscription {
    fn finish(&mut self, err: Error) -> Option<Result<EncodedEvent, Status>> {
        self.finished = true;
        if let Error::CursorOutOfRange { .. } = err {
            self.telemetry.stream_lagged();
        }
        Some(Err(err.into()))
    }

    /// Ends the stream for `end`, with the position to resume from.
    fn end(&mut self, end: End) -> Option<Result<EncodedEvent, Status>> {
        let (last_seq, epoch) = (self.cursor, self.epoch.clone());
        let err = match end {
            End::Shutdown => Error::ShuttingDown { last_seq, epoch },
            End::Expired => Error::TokenExpired { last_seq, epoch },
            End::Revoked => Error::TokenRevoked { last_seq, epoch },
        };
        self.finish(err)
    }

    async fn next(&mut self) -> Option<Result<EncodedEvent, Status>> {
        loop {
            if self.finished {
                return None;
            }
            while let Some(event) = self.pending.pop_front() {
                self.cursor = event.seq;
                if self.audience.sees(&event) {
                    self.finished = self.audience.ends_after(&event);
                    self.telemetry.event_delivered();
                    return Some(Ok(event.encoded()));
                }
            }
            // A closed channel counts as a change: the read says whether we can go on.
            let changed = self.head.has_changed();
            let open = changed.is_ok();
            if !self.read_all || changed.unwrap_or(true) {
                // Checked before each read too, not only while waiting, so a stream that never
                // catches up still ends promptly on shutdown or expiry (per batch, not per
                // event).
                if let Some(end) = self.ends.reached() {
                    return self.end(end);
                }
                // Mark the head seen before reading, so an append racing the read still wakes
                // us. When the commit that moved the head continues our cursor, it is all that
                // is new: no read. A closed channel's last commit says nothing of what may
                // follow (the room was forgotten, or the store lost its notifications): only the
                // read can tell.
                let commit = {
                    let head = self.head.borrow_and_update();
                    if open {
                        head.continuing(&self.epoch, self.cursor)
                    } else {
                        None
                    }
                };
                if let Some((events, next)) = commit {
                    self.pending = Batch {
                        events: Some(events),
                        next,
                    };
                    self.read_all = true;
                    continue;
                }
                match self
                    .store
                    .read(&self.room_id, &self.epoch, self.cursor)
                    .await
                {
                    Err(err) => return self.finish(err),
                    Ok(batch) => {
                        self.read_all = store::is_whole(&batch);
                        if !batch.is_empty() {
                            self.pending = Batch {
                                events: Some(batch.into()),
                                next: 0,
                            };
                            continue;
                        }
                    }
                }
            }
            // The head first: a wake-up for an event need not look at the ends (the read
            // above looks at them once per event).
            let woken = {
                let ends = &mut self.ends;
                let mut changed = std::pin::pin!(self.head.changed());
                std::future::poll_fn(|cx| match changed.as_mut().poll(cx) {
                    Poll::Ready(changed) => Poll::Ready(Ok(changed)),
                    Poll::Pending => ends.poll(cx).map(Err),
                })
                .await
            };
            match woken {
                Err(end) => return self.end(end),
                Ok(changed) => {
                    // `changed` marked the head seen: only a read tells what is new.
                    self.read_all = false;
                    if changed.is_err() {
                        // The store closed our wake-ups; it says whether we can go on.
                        match self.store.rewatch(&self.room_id).await {
                            Ok(head) => self.head = head,
                            Err(err) => return self.finish(err),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;
    use crate::engine::{Command, JoinCmd};
    use crate::limits::StreamBudget;
    use crate::store::memory::MemoryStore;
    use crate::store::RoomSettings;
    use crate::telemetry::StreamKind;

    /// A stream polled again after its room was forgotten (its wake-up channel closed while it
    /// was not waiting on it) ends ROOM_NOT_FOUND: the closed channel's last commit, which
    /// holds everything up to the stream's cursor, is not taken for all there is to read.
    /// A memory store whose empty rooms go at once, with `presence_timeout`, holding room `r`
    /// of one client `c`.
    async fn room_of_one(presence_timeout: Option<Duration>) -> Arc<dyn RoomStore> {
        let store: Arc<dyn RoomStore> = Arc::new(MemoryStore::new(RoomSettings {
            empty_room_ttl: Duration::ZERO,
            presence_timeout,
            ..RoomSettings::default()
        }));
        let join = Command::Join {
            client_id: "c".into(),
            cmd: JoinCmd {
                name: "c".into(),
                role: pb::Role::Unspecified,
                identity: String::new(),
                request_id: None,
            },
        };
        store.execute("r", &Caller::system(), join).await.unwrap();
        store
    }

    /// A stream of room `r` after its first event, as `client_id` ("": an observer).
    async fn stream_of_r(store: &Arc<dyn RoomStore>, client_id: &str) -> EventStream {
        let budget = StreamBudget::new(10, 10, Telemetry::off());
        let kind = match client_id {
            "" => StreamKind::Observer,
            _ => StreamKind::Client,
        };
        let context = StreamContext {
            slot: budget.reserve(kind, None).unwrap(),
            shutdown: CancellationToken::new(),
            grant: None,
            telemetry: Telemetry::off(),
        };
        let request = pb::EventsRequest {
            room_id: "r".into(),
            client_id: client_id.into(),
            after_seq: Some(1),
            ..Default::default()
        };
        subscribe(store.clone(), &Caller::system(), request, context)
            .await
            .unwrap()
    }

    /// `c` leaves room `r`.
    async fn leave_r(store: &Arc<dyn RoomStore>) {
        let leave = Command::Leave {
            client_id: "c".into(),
        };
        store.execute("r", &Caller::system(), leave).await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_polled_after_its_room_is_forgotten_ends() {
        let store = room_of_one(None).await;
        let mut events = stream_of_r(&store, "").await;
        leave_r(&store).await;
        assert!(events.next().await.unwrap().is_ok());
        // The room is empty past its TTL: the next look at it forgets it.
        assert!(store.snapshot("r").await.is_err());
        // On a thread of its own: the defect this guards against never returns.
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _ = done.send(runtime.block_on(events.next()).map(|item| item.map(|_| ())));
        });
        let end = ended
            .recv_timeout(Duration::from_secs(30))
            .expect("the stream ends instead of spinning");
        let status = end.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }

    /// A client's stream waiting when its client leaves gets that departure, its last event,
    /// even when the room is forgotten before the stream is polled again: its presence lease
    /// keeps the room's wake-up channel, and the commit on it.
    #[tokio::test]
    async fn a_client_gets_its_departure_from_a_room_forgotten_meanwhile() {
        let store = room_of_one(Some(Duration::from_secs(20))).await;
        let mut events = stream_of_r(&store, "c").await;
        // Caught up, the stream waits on the room's wake-up.
        assert!(futures_util::FutureExt::now_or_never(events.next()).is_none());
        leave_r(&store).await;
        assert!(store.snapshot("r").await.is_err(), "the room is forgotten");
        // Streams yield events encoded: decoded here to look at.
        let encoded = prost::Message::encode_to_vec(&events.next().await.unwrap().unwrap());
        let event = <pb::Event as prost::Message>::decode(encoded.as_slice()).unwrap();
        assert!(
            matches!(event.payload, Some(pb::event::Payload::UserDisconnected(_))),
            "{event:?}"
        );
        assert!(
            events.next().await.is_none(),
            "the departure ends the stream"
        );
    }
}
