//! `Events` subscriptions: a cursor into a room's log that follows it live.
//!
//! A subscription is a plain stream, not a task: tonic polls it as the client's HTTP/2 window
//! allows and drops it when the client goes away, so nothing outlives its client. It holds a
//! cursor, at most one read batch of shared events and a `watch` receiver; a subscriber that
//! stops reading costs that much and no more, and if the history moves past its cursor it ends
//! with `OUT_OF_RANGE`. It holds the client's presence lease, so a client is connected exactly as
//! long as one of its streams is. It works against any [`RoomStore`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::engine::{Audience, Caller};
use crate::error::Error;
use crate::limits::StreamSlot;
use crate::pb;
use crate::store::{Lease, RoomStore};
use crate::telemetry::Telemetry;
use crate::validate;

/// The response stream of `Events`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// What a subscription holds beside its cursor: its place in the node's stream budget (given
/// back when it is dropped, whatever ended it), the server's shutdown signal, and when its
/// caller's token expires (the stream ends `UNAUTHENTICATED` then, resumable with a new token).
pub struct Tenancy {
    /// The stream's slot.
    pub slot: StreamSlot,
    /// Ends the stream with `UNAVAILABLE` / `SHUTTING_DOWN`.
    pub shutdown: CancellationToken,
    /// When the caller's token stops being valid.
    pub expires_at: Option<SystemTime>,
    /// Counts the events delivered and the streams that fall behind.
    pub telemetry: Telemetry,
}

/// Opens a subscription for `caller`: checks who may subscribe how, then the cursor (before the
/// client, so an old client of a lost log learns it from `OUT_OF_RANGE`), then the client.
pub async fn subscribe(
    store: Arc<dyn RoomStore>,
    caller: &Caller,
    req: pb::EventsRequest,
    tenancy: Tenancy,
) -> Result<EventStream, Error> {
    let client_id = validate::events(&req)?;
    caller.check_may_subscribe(&req.room_id, client_id)?;
    let opening = store.open(&req.room_id, client_id).await?;
    let start = opening.window.start(req.after_seq, &req.epoch)?;
    let audience = Audience::admit(caller, client_id, opening.client, start)?;
    let expires_at = tenancy.expires_at.map(|at| {
        let left = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::Instant::now() + left
    });
    let follow = Follow {
        store,
        room_id: req.room_id,
        epoch: opening.window.epoch,
        cursor: start,
        audience,
        head: opening.head,
        shutdown: tenancy.shutdown,
        expires_at,
        pending: VecDeque::new(),
        finished: false,
        telemetry: tenancy.telemetry,
        _slot: tenancy.slot,
        _lease: opening.lease,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        follow,
        |mut follow| async move { follow.next().await.map(|item| (item, follow)) },
    )))
}

struct Follow {
    store: Arc<dyn RoomStore>,
    room_id: String,
    epoch: String,
    /// Every visible event up to here has been delivered.
    cursor: u64,
    audience: Audience,
    head: watch::Receiver<u64>,
    shutdown: CancellationToken,
    expires_at: Option<tokio::time::Instant>,
    /// The rest of the last read batch (at most one batch).
    pending: VecDeque<Arc<pb::Event>>,
    finished: bool,
    telemetry: Telemetry,
    _slot: StreamSlot,
    /// Keeps the client present while the stream lives (see the store's presence).
    _lease: Lease,
}

impl Follow {
    fn finish(&mut self, err: Error) -> Option<Result<pb::Event, Status>> {
        self.finished = true;
        if let Error::CursorOutOfRange { .. } = err {
            self.telemetry.stream_lagged();
        }
        Some(Err(err.into()))
    }

    fn shutting_down(&mut self) -> Option<Result<pb::Event, Status>> {
        let err = Error::ShuttingDown {
            last_seq: self.cursor,
            epoch: self.epoch.clone(),
        };
        self.finish(err)
    }

    fn token_expired(&mut self) -> Option<Result<pb::Event, Status>> {
        let err = Error::TokenExpired {
            last_seq: self.cursor,
            epoch: self.epoch.clone(),
        };
        self.finish(err)
    }

    /// Completes when the caller's token expires; never without one.
    async fn expiry(deadline: Option<tokio::time::Instant>) {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }

    async fn next(&mut self) -> Option<Result<pb::Event, Status>> {
        loop {
            if self.finished {
                return None;
            }
            while let Some(event) = self.pending.pop_front() {
                self.cursor = event.seq;
                if self.audience.sees(&event) {
                    self.finished = self.audience.ends_after(&event);
                    self.telemetry.event_delivered();
                    return Some(Ok(pb::Event::clone(&event)));
                }
            }
            // Checked before each read too, not only while waiting, so a stream that never
            // catches up still ends promptly on shutdown or expiry (per batch, not per event).
            if self.shutdown.is_cancelled() {
                return self.shutting_down();
            }
            if self
                .expires_at
                .is_some_and(|at| at <= tokio::time::Instant::now())
            {
                return self.token_expired();
            }
            // Mark the head seen before reading, so an append racing the read still wakes us.
            self.head.borrow_and_update();
            match self
                .store
                .read(&self.room_id, &self.epoch, self.cursor)
                .await
            {
                Err(err) => return self.finish(err),
                Ok(batch) if !batch.is_empty() => {
                    self.pending.extend(batch);
                    continue;
                }
                Ok(_) => {}
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.shutting_down(),
                _ = Self::expiry(self.expires_at) => return self.token_expired(),
                changed = self.head.changed() => {
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
