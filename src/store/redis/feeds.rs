//! This node's feeds: for each room with local subscribers, a small cache of its most recent
//! published events and the wake-up channel its subscribers wait on.
//!
//! Subscribers read from their room's feed, and only a subscriber behind the cache (replaying an
//! old cursor) reads the log itself, so a commit costs one notice per node, not one read per
//! subscriber. A feed is created with the room's first local subscriber and registers interest
//! in the room's channel before that subscriber reads Redis (through the node's listener, in
//! `pubsub`), so no published event can fall between the two. Feeds hold no connection: the
//! listener fills them, drops them all when notices may have been lost, and sweeps the ones
//! nobody listens to.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};

use super::connection::OP_TIMEOUT;
use crate::error::Error;
use crate::pb;
use crate::store::{batch_of, Head, LoggedEvent, RoomSettings};

/// Subscriptions the listener is asked for (at most this many waiting).
const CONTROL_QUEUE: usize = 1024;
/// Most recent events cached per room with local subscribers (never more than the history, so
/// a subscriber the history has left behind is not served from the cache).
const CACHE_EVENTS: usize = 1024;
/// Most bytes of events (encoded) cached per room with local subscribers (never more than the
/// history's bytes, for the same reason).
const CACHE_BYTES: usize = 1024 * 1024;

/// What the listener is asked to do besides listening.
pub(super) enum Control {
    /// Subscribe to a room's channel, then say so.
    Subscribe {
        room_id: String,
        done: oneshot::Sender<Result<(), Error>>,
    },
}

/// The events a commit publishes, after `<room_id>\n` (room ids hold no newline), so a node
/// without subscribers of that room skips the message without decoding it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Notice {
    /// The events, in seq order.
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<pb::Event>,
}

impl Notice {
    pub(super) fn publish(room_id: &str, events: &[&pb::Event]) -> Vec<u8> {
        let notice = Notice {
            events: events.iter().map(|e| (*e).clone()).collect(),
        };
        let mut payload = Vec::with_capacity(room_id.len() + 1 + notice.encoded_len());
        payload.extend_from_slice(room_id.as_bytes());
        payload.push(b'\n');
        notice
            .encode(&mut payload)
            .expect("a Vec grows to fit any message");
        payload
    }
}

/// The feeds of the rooms this node has subscribers in.
pub(super) struct Feeds {
    rooms: Mutex<HashMap<String, Arc<Feed>>>,
    /// Asks this node's listener to subscribe to a room's channel.
    control: mpsc::Sender<Control>,
    /// The most events, and bytes of them, a feed caches.
    capacity: (usize, usize),
}

impl Feeds {
    /// No feeds yet, caching at most what `rooms` keeps of a log; the listener takes its
    /// requests from the returned queue.
    pub(super) fn new(rooms: &RoomSettings) -> (Self, mpsc::Receiver<Control>) {
        let (control, requests) = mpsc::channel(CONTROL_QUEUE);
        let feeds = Self {
            rooms: Mutex::default(),
            control,
            capacity: (
                rooms.history.min(CACHE_EVENTS),
                rooms.history_bytes.min(CACHE_BYTES),
            ),
        };
        (feeds, requests)
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<String, Arc<Feed>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `room_id`'s feed, if this node has one.
    pub(super) fn get(&self, room_id: &str) -> Option<Arc<Feed>> {
        self.rooms().get(room_id).cloned()
    }

    /// This node's feed of `room_id`, created on first use, once the room's channel is
    /// subscribed: interest is registered before the caller reads Redis, so no published event
    /// can fall between the two.
    pub(super) async fn subscribe(&self, room_id: &str) -> Result<watch::Receiver<Head>, Error> {
        let (feed, head) = {
            let mut rooms = self.rooms();
            let feed = rooms
                .entry(room_id.to_owned())
                .or_insert_with(|| Arc::new(Feed::new(self.capacity)))
                .clone();
            let head = feed.head.subscribe();
            (feed, head)
        };
        feed.subscribed
            .get_or_try_init(|| self.ask_subscribe(room_id))
            .await?;
        Ok(head)
    }

    /// Asks the listener to subscribe to `room_id`'s channel and waits for it to be done.
    async fn ask_subscribe(&self, room_id: &str) -> Result<(), Error> {
        let (done, confirmed) = oneshot::channel();
        let asked = async {
            let request = Control::Subscribe {
                room_id: room_id.to_owned(),
                done,
            };
            let gone = || Error::StoreUnavailable("the redis listener has stopped".into());
            self.control.send(request).await.map_err(|_| gone())?;
            confirmed.await.map_err(|_| gone())?
        };
        tokio::time::timeout(OP_TIMEOUT, asked)
            .await
            .map_err(|_| Error::StoreUnavailable("subscribing to the room timed out".into()))?
    }

    /// Hands a published notice to its room's feed, if this node has one.
    pub(super) fn dispatch(&self, payload: &[u8]) {
        let Some(split) = payload.iter().position(|b| *b == b'\n') else {
            tracing::warn!("ignoring an unreadable notice");
            return;
        };
        let room_id = String::from_utf8_lossy(&payload[..split]);
        let Some(feed) = self.get(&room_id) else {
            return;
        };
        match Notice::decode(&payload[split + 1..]) {
            Ok(notice) => feed.append(notice.events),
            Err(_) => tracing::warn!(%room_id, "ignoring an unreadable notice"),
        }
    }

    /// Drops every feed: their subscribers wake, find the channel closed and ask the store
    /// again, which answers with the store's state (serving, or unavailable).
    pub(super) fn reset(&self) {
        self.rooms().clear();
    }

    /// Drops `room_id`'s feed (its subscribers re-read the log and subscribe anew).
    pub(super) fn remove(&self, room_id: &str) {
        self.rooms().remove(room_id);
    }

    /// Forgets the feeds nobody listens to, and answers the rooms of those left.
    pub(super) fn listened(&self) -> Vec<String> {
        let mut rooms = self.rooms();
        rooms.retain(|_, feed| feed.head.receiver_count() > 0);
        rooms.keys().cloned().collect()
    }

    /// Of the channels in `subscribed`, those whose room has no feed any more.
    pub(super) fn idle(&self, subscribed: &HashSet<String>) -> Vec<String> {
        let rooms = self.rooms();
        subscribed
            .iter()
            .filter(|room_id| !rooms.contains_key(*room_id))
            .cloned()
            .collect()
    }
}

/// Recent events of a room with local subscribers, and their wake-up channel.
pub(super) struct Feed {
    head: watch::Sender<Head>,
    cache: Mutex<Cache>,
    /// The most events, and bytes of them, the cache holds.
    capacity: (usize, usize),
    /// Set once the listener has subscribed to the room's channel for this feed.
    subscribed: OnceCell<()>,
}

/// A feed's recent events, one contiguous run of one log, and what they weigh.
#[derive(Default)]
struct Cache {
    events: VecDeque<Arc<LoggedEvent>>,
    bytes: usize,
}

impl Feed {
    fn new(capacity: (usize, usize)) -> Self {
        Self {
            head: watch::Sender::new(Head::default()),
            cache: Mutex::default(),
            capacity,
            subscribed: OnceCell::new(),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends published events; a gap or another epoch restarts the cache from them, so the
    /// cache is always one contiguous run of one log. Of a notice overlapping what the cache
    /// holds (a confirmation on demand may repeat events another node's confirmation
    /// announced), only the events past it are new.
    fn append(&self, mut events: Vec<pb::Event>) {
        let mut cache = self.cache();
        if let Some(last) = cache.events.back() {
            let (epoch, held) = (last.epoch.clone(), last.seq);
            events.retain(|event| event.epoch != epoch || event.seq > held);
        }
        let Some(first) = events.first() else { return };
        match cache.events.back() {
            Some(last)
                if last.epoch == first.epoch && last.seq.checked_add(1) == Some(first.seq) => {}
            _ => *cache = Cache::default(),
        }
        let newest = events.last().map_or(first.seq, |e| e.seq);
        let commit: Arc<[Arc<LoggedEvent>]> = events
            .into_iter()
            .map(|e| Arc::new(LoggedEvent::new(e)))
            .collect();
        cache.bytes += commit.iter().map(|e| e.size()).sum::<usize>();
        cache.events.extend(commit.iter().cloned());
        let (most, most_bytes) = self.capacity;
        while cache.events.len() > most || cache.bytes > most_bytes {
            match cache.events.pop_front() {
                Some(gone) => cache.bytes -= gone.size(),
                None => break,
            }
        }
        drop(cache);
        self.head.send_replace(Head::committed(newest, commit));
    }

    /// Events after `after` from the cache, when it can answer: `Some(empty)` means the
    /// subscriber is caught up with everything published.
    pub(super) fn read(&self, epoch: &str, after: u64) -> Option<Vec<Arc<LoggedEvent>>> {
        let cache = &self.cache().events;
        let (first, last) = (cache.front()?, cache.back()?);
        // The oldest cursor the cache serves (saturating: notices come from outside the process).
        let oldest_cursor = first.seq.saturating_sub(1);
        if first.epoch != epoch || after < oldest_cursor || after > last.seq {
            return None;
        }
        let skip = (after - oldest_cursor) as usize;
        Some(batch_of(cache.iter().skip(skip).cloned(), |e| e.size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(epoch: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<pb::Event> {
        seqs.map(|seq| pb::Event {
            seq,
            epoch: epoch.into(),
            ..Default::default()
        })
        .collect()
    }

    fn cached(feed: &Feed) -> Vec<(String, u64)> {
        let cache = feed.cache();
        cache
            .events
            .iter()
            .map(|e| (e.epoch.clone(), e.seq))
            .collect()
    }

    #[test]
    fn a_notice_overlapping_the_cache_adds_only_its_newer_events() {
        let feed = Feed::new((100, 1 << 20));
        feed.append(events("e", 1..=3));
        let mut head = feed.head.subscribe();
        head.mark_unchanged();
        feed.append(events("e", 2..=5));
        assert_eq!(
            cached(&feed),
            (1..=5).map(|seq| ("e".into(), seq)).collect::<Vec<_>>()
        );
        assert!(
            head.has_changed().unwrap(),
            "subscribers are woken for 4 and 5"
        );
        head.mark_unchanged();
        // Nothing new, nobody woken.
        feed.append(events("e", 1..=5));
        assert!(!head.has_changed().unwrap());
        assert_eq!(cached(&feed).len(), 5);
        // A gap, or another epoch, starts the cache anew.
        feed.append(events("e", 7..=7));
        assert_eq!(cached(&feed), [("e".to_owned(), 7)]);
        feed.append(events("f", 1..=2));
        assert_eq!(cached(&feed), [("f".to_owned(), 1), ("f".to_owned(), 2)]);
    }
}
