//! The store's side of webhook delivery: where each endpoint stands in each room's log, kept
//! beside the room (so a room with undelivered events is not forgotten while its log holds
//! them), and which rooms are due: they logged events since their last turn, or their retry
//! time came.
//!
//! It holds positions and persists them; what is delivered, when and how is `webhooks`'.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;

/// A place in a room's log: everything of log `epoch` up to `seq` is behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The log's id.
    pub epoch: String,
    /// The last seq behind the cursor (0: none).
    pub seq: u64,
}

/// Where an endpoint stands in a room, and where the room's log is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// What the endpoint has received (or was told it lost).
    pub delivered: Cursor,
    /// The room's newest seq, in its current epoch.
    pub newest_seq: u64,
}

/// A webhook endpoint as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEndpoint {
    /// Its name, which identifies its cursors.
    pub name: String,
    /// The longest a room's turn may go without news from the node holding it (a request's
    /// timeout and then some): past it, on a shared store, another node may take the room.
    pub turn: Duration,
}

/// Delivery positions, per endpoint (numbered as the list given to
/// [`super::RoomStore::outbox`]) and room, and which rooms are due for delivery.
///
/// A room is due when it logged events since its last turn settled, or when its retry time
/// came. A room handed out by [`Outbox::due`] is this node's to deliver until its turn settles
/// or is retried (on a shared store, other nodes skip it meanwhile, and take it over if this
/// node stops renewing its turn: [`Outbox::position`] and [`Outbox::advance`] renew it).
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Waits until rooms are due for `endpoint`, and returns them (up to `want` on a shared
    /// store, where taking a room takes its turn), each once.
    async fn due(&self, endpoint: usize, want: usize) -> Result<Vec<Arc<str>>, Error>;

    /// Where `endpoint` stands in `room_id`; None when the room is gone, or its turn is no
    /// longer this node's.
    async fn position(&self, endpoint: usize, room_id: &str) -> Result<Option<Position>, Error>;

    /// Whether this node still holds the room's turn (renewing it when it runs low): asked
    /// before each request, so a node that was paused past its turn sends nothing more.
    async fn keep_turn(&self, endpoint: usize, room_id: &str) -> Result<bool, Error>;

    /// Records that `endpoint` has everything of `room_id` up to `to` (a cursor of another
    /// epoch than the room's, or behind the one recorded, changes nothing); false, recording
    /// nothing, when the room's turn is no longer this node's.
    async fn advance(&self, endpoint: usize, room_id: &str, to: &Cursor) -> Result<bool, Error>;

    /// Ends the room's turn with every event delivered: it is due again at its next event.
    async fn settle(&self, endpoint: usize, room_id: &str) -> Result<(), Error>;

    /// Ends the room's turn after a failure: it is due again after `delay` (its next events do
    /// not make it due sooner).
    async fn retry(&self, endpoint: usize, room_id: &str, delay: Duration) -> Result<(), Error>;

    /// Which of `room_ids`, rooms this node retried whose retry time has come and gone
    /// without the store handing them back, are another node's now: their turn is held
    /// elsewhere, or they were delivered there. One process alone never loses a room: none.
    async fn elsewhere(&self, endpoint: usize, room_ids: &[Arc<str>]) -> Result<Vec<bool>, Error> {
        let _ = endpoint;
        Ok(vec![false; room_ids.len()])
    }
}

/// Which rooms are due for one endpoint, in one process: rooms marked by commits since they
/// were handed out (a set, so a busy room is one entry however many commits it makes), and
/// rooms waiting for their retry time (which marks leave waiting).
#[derive(Debug, Default)]
pub struct DueRooms {
    rooms: Mutex<Due>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Due {
    marked: HashSet<Arc<str>>,
    /// Rooms waiting to be retried, by when, and the same by room.
    later: BTreeSet<(Instant, Arc<str>)>,
    retry_at: HashMap<Arc<str>, Instant>,
}

impl DueRooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, Due> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `room_id` logged events.
    pub fn mark(&self, room_id: &str) {
        let mut due = self.lock();
        if !due.marked.contains(room_id) && !due.retry_at.contains_key(room_id) {
            due.marked.insert(room_id.into());
            // A permit is kept when nobody waits yet: a mark is never missed.
            self.wake.notify_one();
        }
    }

    /// Makes `room_id` due again after `delay`.
    pub fn retry(&self, room_id: &str, delay: Duration) {
        let mut due = self.lock();
        let room: Arc<str> = room_id.into();
        let at = Instant::now() + delay;
        if let Some(before) = due.retry_at.insert(room.clone(), at) {
            due.later.remove(&(before, room.clone()));
        }
        due.marked.remove(room_id);
        due.later.insert((at, room));
        self.wake.notify_one();
    }

    /// The rooms due now, waiting until there is one.
    pub async fn take(&self) -> Vec<Arc<str>> {
        loop {
            let next = {
                let mut due = self.lock();
                let now = Instant::now();
                let mut rooms: Vec<Arc<str>> = due.marked.drain().collect();
                while let Some((at, _)) = due.later.first() {
                    if *at > now {
                        break;
                    }
                    if let Some((_, room)) = due.later.pop_first() {
                        due.retry_at.remove(&room);
                        rooms.push(room);
                    }
                }
                if !rooms.is_empty() {
                    return rooms;
                }
                due.later.first().map(|(at, _)| *at)
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}
