//! Each node's single listener: one notification connection, subscribed to the channels of
//! the rooms this node has subscribers in (and no others), which fills their feeds and watches
//! Redis's health.
//!
//! A node subscribes to a room's channel when the room gets its first local subscriber and
//! unsubscribes once it has none, so it hears only of the rooms it serves. Every subscribe and
//! unsubscribe goes through the listener task, which owns the connection: they happen in the
//! order asked, so an unsubscribe of a room's last feed can never undo the subscribe of its
//! next one. Across a reconnect every feed is dropped and its subscribers re-read what they
//! missed from the log. This module reads no room's keys beyond the census of its feeds.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::connection::{client, cluster_client, timed, unavailable, OP_TIMEOUT};
use super::feeds::Control;
use super::keys::{channel, room_of, Keys};
use super::Shared;
use crate::backoff::Backoff;
use crate::error::Error;

/// How often the listener checks that Redis answers (and sweeps feeds).
const PING_PERIOD: Duration = Duration::from_millis(500);
/// The listener's reconnects: from 50 ms, doubling, jittered, always under 2 s.
fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1))
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
        ping(shared).await?;
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

/// Unsubscribes from the channels of rooms that no longer have a feed on this node.
async fn unsubscribe_idle(
    shared: &Shared,
    notifier: &mut Notifier,
    subscribed: &mut HashSet<String>,
) -> Result<(), Error> {
    let idle = shared.feeds.idle(subscribed);
    if idle.is_empty() {
        return Ok(());
    }
    notifier.unsubscribe(&idle).await?;
    for room_id in idle {
        subscribed.remove(&room_id);
    }
    Ok(())
}

/// Forgets feeds nobody listens to, and feeds of rooms Redis has forgotten (expired empty
/// rooms), which ends their observers' streams with `ROOM_NOT_FOUND`. Also takes the census of
/// the rooms this node has subscribers in.
async fn sweep(shared: &Shared) -> Result<(), Error> {
    let rooms = shared.feeds.listened();
    if rooms.is_empty() {
        shared.telemetry.census(0, 0);
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for room_id in &rooms {
        let keys = Keys::new(room_id);
        pipe.cmd("EXISTS").arg(&keys.meta);
        pipe.cmd("HLEN").arg(&keys.members);
    }
    let replies: Vec<u64> = shared
        .timed("sweep", pipe.query_async(&mut shared.conn()))
        .await?;
    let (mut live, mut participants) = (0, 0);
    for (room_id, reply) in rooms.iter().zip(replies.chunks(2)) {
        if reply[0] == 0 {
            shared.feeds.remove(room_id);
        } else {
            live += 1;
            participants += reply[1] as usize;
        }
    }
    shared.telemetry.census(live, participants);
    Ok(())
}

async fn ping(shared: &Shared) -> Result<(), Error> {
    shared
        .timed(
            "ping",
            redis::cmd("PING").query_async::<()>(&mut shared.conn()),
        )
        .await
}

/// This node's single listener: receives every commit's events, feeds local subscribers, and
/// watches Redis's health. Reconnects with backoff for as long as the store lives.
pub(super) async fn listen(
    shared: Arc<Shared>,
    first: Notifier,
    mut control: mpsc::Receiver<Control>,
) {
    let mut backoff = reconnect_backoff();
    let mut first = Some(first);
    loop {
        let connected = match first.take() {
            Some(notifier) => Ok(notifier),
            None => {
                shared.telemetry.listener_reconnected();
                Notifier::open(&shared).await
            }
        };
        let wait = match connected {
            Ok(mut notifier) => {
                backoff.reset();
                // Events committed while we were not listening were never announced: wake every
                // subscriber to read them from Redis.
                shared.feeds.reset();
                shared.healthy.send_replace(true);
                tracing::info!("redis store serving");
                // The rooms this connection is subscribed to.
                let mut subscribed = HashSet::new();
                let mut checks = tokio::time::interval(PING_PERIOD);
                let fault = loop {
                    tokio::select! {
                        heard = notifier.next() => match heard {
                            Heard::Notice(payload) => {
                                shared.telemetry.notice_received();
                                shared.feeds.dispatch(&payload);
                            }
                            // Their subscribers re-read from the logs, and subscribe anew.
                            Heard::Lost => shared.feeds.reset(),
                            Heard::Dropped(room_id) => {
                                subscribed.remove(&room_id);
                                shared.feeds.remove(&room_id);
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
                        _ = checks.tick() => {
                            let check = async {
                                ping(&shared).await?;
                                sweep(&shared).await?;
                                unsubscribe_idle(&shared, &mut notifier, &mut subscribed).await
                            };
                            if let Err(err) = check.await {
                                break err.detail();
                            }
                        }
                    }
                };
                tracing::warn!(%fault, "redis store unavailable; streams end, health NOT_SERVING");
                backoff.next_delay()
            }
            Err(err) => {
                let wait = backoff.next_delay();
                let err = err.detail();
                tracing::warn!(%err, backoff = ?wait, "cannot reach redis; retrying");
                wait
            }
        };
        shared.healthy.send_replace(false);
        shared.feeds.reset();
        tokio::time::sleep(wait).await;
    }
}
