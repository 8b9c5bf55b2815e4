//! The store's side of webhook delivery: where each endpoint stands in each room's log, kept
//! beside the room (so a room with undelivered events is not forgotten while its log holds
//! them), and which rooms logged events since an endpoint's deliverer last looked.
//!
//! It holds positions and persists them; what is delivered, when and how is `webhooks`'.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;

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

/// Delivery positions, per endpoint (numbered as the list given to
/// [`super::RoomStore::outbox`]) and room.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Waits until rooms have logged events since the last call for `endpoint`, and returns
    /// them, each once.
    async fn changed(&self, endpoint: usize) -> Vec<Arc<str>>;

    /// Where `endpoint` stands in `room_id`; None when the room is gone.
    async fn position(&self, endpoint: usize, room_id: &str) -> Result<Option<Position>, Error>;

    /// Records that `endpoint` has everything of `room_id` up to `to` (a cursor of another
    /// epoch than the room's, or behind the one recorded, changes nothing).
    async fn advance(&self, endpoint: usize, room_id: &str, to: &Cursor) -> Result<(), Error>;
}

/// The rooms changed since a deliverer last took them: a set, so a busy room is one entry
/// however many commits it makes, and at most one entry per room in all.
#[derive(Debug, Default)]
pub struct Changed {
    rooms: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
}

impl Changed {
    /// Notes that `room_id` logged events.
    pub fn mark(&self, room_id: &str) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if !rooms.contains(room_id) {
            rooms.insert(room_id.into());
            // A permit is kept when nobody waits yet: a mark is never missed.
            self.wake.notify_one();
        }
    }

    /// The rooms marked since the last call, waiting for one if there are none.
    pub async fn take(&self) -> Vec<Arc<str>> {
        loop {
            {
                let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
                if !rooms.is_empty() {
                    return rooms.drain().collect();
                }
            }
            self.wake.notified().await;
        }
    }
}
