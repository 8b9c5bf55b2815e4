//! Live delivery: a notification channel per room, each node's single listener, and the
//! per-room feeds of recent events that wake local subscribers.
//!
//! A node subscribes to a room's channel when the room gets its first local subscriber and
//! unsubscribes once it has none, so it hears only of the rooms it serves. Every subscribe and
//! unsubscribe goes through the listener task, which owns the connection: they happen in the
//! order asked, so an unsubscribe of a room's last feed can never undo the subscribe of its
//! next one. A subscriber reads Redis only after its room's subscription is confirmed, so no
//! published event can fall between the two; across a reconnect every feed is dropped and its
//! subscribers re-read what they missed from the log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};

use super::connection::{client, cluster_client, timed, unavailable, OP_TIMEOUT};
use super::keys::Keys;
use super::Shared;
use crate::error::Error;
use crate::pb;
use crate::store::{batch_of, Head, LoggedEvent};

/// The channel a room's commits publish their events on; in the room's hash tag, so it shares
/// the room's Redis Cluster slot.
pub(super) fn channel(room_id: &str) -> String {
    format!("roomctl:{{{room_id}}}:events")
}

/// Subscriptions the listener is asked for (at most this many waiting).
pub(super) const CONTROL_QUEUE: usize = 1024;

/// What the listener is asked to do besides listening.
pub(super) enum Control {
    /// Subscribe to a room's channel, then say so.
    Subscribe {
        room_id: String,
        done: oneshot::Sender<Result<(), Error>>,
    },
}

/// How often the listener checks that Redis answers (and sweeps feeds).
pub(super) const PING_PERIOD: Duration = Duration::from_millis(500);
/// Reconnect backoff of the listener.
pub(super) const BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_secs(2));
/// Most recent events cached per room with local subscribers (never more than the history, so
/// a subscriber the history has left behind is not served from the cache).
pub(super) const CACHE_EVENTS: usize = 1024;
/// Most bytes of events (encoded) cached per room with local subscribers (never more than the
/// history's bytes, for the same reason).
pub(super) const CACHE_BYTES: usize = 1024 * 1024;

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

/// Recent events of a room with local subscribers, and their wake-up channel.
pub(super) struct Feed {
    pub(super) head: watch::Sender<Head>,
    pub(super) cache: Mutex<Cache>,
    /// The most events, and bytes of them, the cache holds.
    pub(super) capacity: (usize, usize),
    /// Set once the listener has subscribed to the room's channel for this feed.
    pub(super) subscribed: OnceCell<()>,
}

/// A feed's recent events, one contiguous run of one log, and what they weigh.
#[derive(Default)]
pub(super) struct Cache {
    events: VecDeque<Arc<LoggedEvent>>,
    bytes: usize,
}

impl Feed {
    pub(super) fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends published events; a gap or another epoch restarts the cache from them, so the
    /// cache is always one contiguous run of one log.
    pub(super) fn append(&self, events: Vec<pb::Event>) {
        let Some(first) = events.first() else { return };
        let mut cache = self.cache();
        match cache.events.back() {
            Some(last) if last.epoch == first.epoch && last.seq >= first.seq => return,
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
        Some(batch_of(cache.iter().skip(skip).cloned()))
    }
}

impl Shared {
    pub(super) fn feeds(&self) -> MutexGuard<'_, HashMap<String, Arc<Feed>>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn feed(&self, room_id: &str) -> Option<Arc<Feed>> {
        self.feeds().get(room_id).cloned()
    }

    /// This node's feed of `room_id`, created on first use, once the room's channel is
    /// subscribed: interest is registered before the caller reads Redis, so no published event
    /// can fall between the two.
    pub(super) async fn subscribe_feed(
        &self,
        room_id: &str,
    ) -> Result<watch::Receiver<Head>, Error> {
        let (feed, head) = {
            let mut feeds = self.feeds();
            let feed = feeds
                .entry(room_id.to_owned())
                .or_insert_with(|| {
                    Arc::new(Feed {
                        head: watch::Sender::new(Head::default()),
                        cache: Mutex::default(),
                        capacity: (
                            self.config.rooms.history.min(CACHE_EVENTS),
                            self.config.rooms.history_bytes.min(CACHE_BYTES),
                        ),
                        subscribed: OnceCell::new(),
                    })
                })
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

    pub(super) fn dispatch(&self, payload: &[u8]) {
        self.telemetry.notice_received();
        let Some(split) = payload.iter().position(|b| *b == b'\n') else {
            tracing::warn!("ignoring an unreadable notice");
            return;
        };
        let room_id = String::from_utf8_lossy(&payload[..split]);
        let Some(feed) = self.feed(&room_id) else {
            return;
        };
        match Notice::decode(&payload[split + 1..]) {
            Ok(notice) => feed.append(notice.events),
            Err(_) => tracing::warn!(%room_id, "ignoring an unreadable notice"),
        }
    }

    /// Drops every feed: their subscribers wake, find the channel closed and ask the store
    /// again, which answers with the store's state (serving, or unavailable).
    pub(super) fn reset_feeds(&self) {
        self.feeds().clear();
    }

    /// Forgets feeds nobody listens to, and feeds of rooms Redis has forgotten (expired empty
    /// rooms), which ends their observers' streams with `ROOM_NOT_FOUND`.
    /// Also takes the census of the rooms this node has subscribers in.
    pub(super) async fn sweep_feeds(&self) -> Result<(), Error> {
        let rooms: Vec<String> = {
            let mut feeds = self.feeds();
            feeds.retain(|_, feed| feed.head.receiver_count() > 0);
            feeds.keys().cloned().collect()
        };
        if rooms.is_empty() {
            self.telemetry.census(0, 0);
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for room_id in &rooms {
            let keys = Keys::new(room_id);
            pipe.cmd("EXISTS").arg(&keys.meta);
            pipe.cmd("HLEN").arg(&keys.members);
        }
        let replies: Vec<u64> = self
            .timed("sweep", pipe.query_async(&mut self.conn()))
            .await?;
        let (mut live, mut participants) = (0, 0);
        let mut feeds = self.feeds();
        for (room_id, reply) in rooms.iter().zip(replies.chunks(2)) {
            if reply[0] == 0 {
                feeds.remove(room_id);
            } else {
                live += 1;
                participants += reply[1] as usize;
            }
        }
        drop(feeds);
        self.telemetry.census(live, participants);
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), Error> {
        self.timed(
            "ping",
            redis::cmd("PING").query_async::<()>(&mut self.conn()),
        )
        .await
    }
}

/// How many cluster pushes may wait for the listener; past that they are dropped, and every
/// feed re-reads what it missed from the logs.
const PUSH_QUEUE: usize = 4096;

/// Where this node hears of commits: a pub/sub connection to one server, or, on a cluster, a
/// RESP3 cluster connection whose sharded messages arrive as pushes, each from the master of
/// its room's slot.
pub(super) enum Notifier {
    Single {
        sink: redis::aio::PubSubSink,
        messages: redis::aio::PubSubStream,
    },
    Cluster {
        conn: redis::cluster_async::ClusterConnection,
        pushes: mpsc::Receiver<redis::PushInfo>,
        overflowed: Arc<AtomicBool>,
    },
}

/// What a notifier heard.
enum Heard {
    /// A commit's notice.
    Notice(Vec<u8>),
    /// Notices may have been lost (a master's connection dropped, pushes overflowed).
    Lost,
    /// Redis ended this room's subscription (its slot moved to another master).
    Dropped(String),
    /// Nothing that matters here (a subscription's confirmation).
    Nothing,
    /// The connection is gone.
    Closed,
}

impl Notifier {
    /// The notification connection (subscribed to nothing yet), once Redis answers.
    pub(super) async fn open(shared: &Shared) -> Result<Self, Error> {
        let config = &shared.config;
        let notifier = if config.url.is_cluster() {
            let (sender, pushes) = mpsc::channel(PUSH_QUEUE);
            let overflowed = Arc::new(AtomicBool::new(false));
            let flag = overflowed.clone();
            // The connection's reader must never wait for the listener: a full queue drops
            // the push and says so.
            let push = move |info: redis::PushInfo| {
                if sender.try_send(info).is_err() {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok::<(), ()>(())
            };
            let client = cluster_client(config)?
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push)
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(OP_TIMEOUT)
                .build()
                .map_err(unavailable)?;
            Notifier::Cluster {
                conn: timed(client.get_async_connection()).await?,
                pushes,
                overflowed,
            }
        } else {
            let pubsub = timed(client(config)?.get_async_pubsub()).await?;
            let (sink, messages) = pubsub.split();
            Notifier::Single { sink, messages }
        };
        shared.ping().await?;
        Ok(notifier)
    }

    async fn next(&mut self) -> Heard {
        match self {
            Notifier::Single { messages, .. } => match messages.next().await {
                Some(message) => Heard::Notice(message.get_payload_bytes().to_vec()),
                None => Heard::Closed,
            },
            Notifier::Cluster {
                pushes, overflowed, ..
            } => {
                let Some(push) = pushes.recv().await else {
                    return Heard::Closed;
                };
                if overflowed.swap(false, Ordering::Relaxed) {
                    return Heard::Lost;
                }
                let text = |value: Option<&redis::Value>| match value {
                    Some(redis::Value::BulkString(bytes)) => Some(bytes.clone()),
                    _ => None,
                };
                match push.kind {
                    redis::PushKind::SMessage => {
                        text(push.data.get(1)).map_or(Heard::Nothing, Heard::Notice)
                    }
                    redis::PushKind::SUnsubscribe => text(push.data.first())
                        .and_then(|channel| room_of(&String::from_utf8_lossy(&channel)))
                        .map_or(Heard::Nothing, Heard::Dropped),
                    redis::PushKind::Disconnection => Heard::Lost,
                    _ => Heard::Nothing,
                }
            }
        }
    }

    async fn subscribe(&mut self, room_id: &str) -> Result<(), Error> {
        match self {
            Notifier::Single { sink, .. } => timed(sink.subscribe(channel(room_id))).await,
            Notifier::Cluster { conn, .. } => timed(conn.ssubscribe(channel(room_id))).await,
        }
    }

    async fn unsubscribe(&mut self, room_ids: &[String]) -> Result<(), Error> {
        let channels: Vec<String> = room_ids.iter().map(|room_id| channel(room_id)).collect();
        match self {
            Notifier::Single { sink, .. } => timed(sink.unsubscribe(channels)).await,
            // Sharded channels of different slots cannot share one SUNSUBSCRIBE.
            Notifier::Cluster { conn, .. } => {
                for channel in channels {
                    timed(conn.sunsubscribe(channel)).await?;
                }
                Ok(())
            }
        }
    }
}

/// The room whose channel is `channel`.
fn room_of(channel: &str) -> Option<String> {
    let room_id = channel
        .strip_prefix("roomctl:{")?
        .strip_suffix("}:events")?;
    Some(room_id.to_owned())
}

/// Unsubscribes from the channels of rooms that no longer have a feed on this node.
async fn unsubscribe_idle(
    shared: &Shared,
    notifier: &mut Notifier,
    subscribed: &mut HashSet<String>,
) -> Result<(), Error> {
    let idle: Vec<String> = {
        let feeds = shared.feeds();
        subscribed
            .iter()
            .filter(|room_id| !feeds.contains_key(*room_id))
            .cloned()
            .collect()
    };
    if idle.is_empty() {
        return Ok(());
    }
    notifier.unsubscribe(&idle).await?;
    for room_id in idle {
        subscribed.remove(&room_id);
    }
    Ok(())
}

/// This node's single listener: receives every commit's events, feeds local subscribers, and
/// watches Redis's health. Reconnects with backoff for as long as the store lives.
pub(super) async fn listen(
    shared: Arc<Shared>,
    first: Notifier,
    mut control: mpsc::Receiver<Control>,
) {
    let mut backoff = BACKOFF.0;
    let mut first = Some(first);
    loop {
        let connected = match first.take() {
            Some(notifier) => Ok(notifier),
            None => {
                shared.telemetry.listener_reconnected();
                Notifier::open(&shared).await
            }
        };
        match connected {
            Ok(mut notifier) => {
                backoff = BACKOFF.0;
                // Events committed while we were not listening were never announced: wake every
                // subscriber to read them from Redis.
                shared.reset_feeds();
                shared.healthy.send_replace(true);
                tracing::info!("redis store serving");
                // The rooms this connection is subscribed to.
                let mut subscribed = HashSet::new();
                let mut ping = tokio::time::interval(PING_PERIOD);
                let fault = loop {
                    tokio::select! {
                        heard = notifier.next() => match heard {
                            Heard::Notice(payload) => shared.dispatch(&payload),
                            // Their subscribers re-read from the logs, and subscribe anew.
                            Heard::Lost => shared.reset_feeds(),
                            Heard::Dropped(room_id) => {
                                subscribed.remove(&room_id);
                                shared.feeds().remove(&room_id);
                            }
                            Heard::Nothing => {}
                            Heard::Closed => break "the notification connection closed".to_owned(),
                        },
                        Some(Control::Subscribe { room_id, done }) = control.recv() => {
                            let subscribing = notifier.subscribe(&room_id).await;
                            let failed = subscribing.as_ref().err().map(Error::detail);
                            if subscribing.is_ok() {
                                subscribed.insert(room_id);
                            }
                            let _ = done.send(subscribing);
                            if let Some(fault) = failed {
                                break fault;
                            }
                        }
                        _ = ping.tick() => {
                            let check = async {
                                shared.ping().await?;
                                shared.sweep_feeds().await?;
                                unsubscribe_idle(&shared, &mut notifier, &mut subscribed).await
                            };
                            if let Err(err) = check.await {
                                break err.detail();
                            }
                        }
                    }
                };
                tracing::warn!(%fault, "redis store unavailable; streams end, health NOT_SERVING");
            }
            Err(err) => {
                tracing::warn!(err = %err.detail(), ?backoff, "cannot reach redis; retrying")
            }
        }
        shared.healthy.send_replace(false);
        shared.reset_feeds();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}
