//! The clients of a run: workers calling random operations over a few contended rooms and
//! many quiet ones, each with a `request_id`, retrying an unknown outcome with the same id as
//! a real client would; and subscribers on every node holding each room's `Events` stream and
//! resuming with `(after_seq, epoch)` on any error, as `roomctl watch` does. Everything they
//! ask and see goes into the [`History`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use roomctl::pb;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::common::{token, Client};
use crate::fleet::Addresses;
use crate::history::{Answer, History, Invocation, Op, Outcome, Seen};

/// How long a client waits for an answer before calling the outcome unknown.
const DEADLINE: Duration = Duration::from_secs(1);
/// How long a client keeps retrying an unknown outcome.
const RETRYING: Duration = Duration::from_secs(20);
/// Identities the workers join on behalf of (bans need identities that come back).
const IDENTITIES: usize = 12;

/// The rooms of a run: a few that every worker contends for, and many it spreads over.
pub fn rooms() -> Vec<String> {
    (0..3)
        .map(|n| format!("hot-{n}"))
        .chain((0..12).map(|n| format!("spread-{n}")))
        .collect()
}

/// Where each room's log ended (epoch and seq; None: never created), known once the run is
/// over.
pub type Ends = Mutex<HashMap<String, Option<(String, u64)>>>;

/// What the workers share: where the nodes are, who is in each room (as far as answers
/// said), and the history.
pub struct Shared {
    pub addresses: Addresses,
    pub history: Arc<History>,
    members: Mutex<HashMap<String, Vec<String>>>,
    next_op: Mutex<usize>,
}

impl Shared {
    pub fn new(addresses: Addresses, history: Arc<History>) -> Arc<Self> {
        Arc::new(Self {
            addresses,
            history,
            members: Mutex::default(),
            next_op: Mutex::new(0),
        })
    }

    fn op_id(&self) -> usize {
        let mut next = self.next_op.lock().unwrap();
        *next += 1;
        *next
    }
}

/// A client of some node that is up, picked at random.
async fn any_node(shared: &Shared, rng: &mut StdRng) -> Option<(SocketAddr, Client)> {
    let up: Vec<SocketAddr> = shared
        .addresses
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .copied()
        .collect();
    let addr = *up.choose(rng)?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(DEADLINE)
        .connect()
        .await
        .ok()?;
    let client = roomctl::client::with_token(channel, &token("harness", "*", "service")).ok()?;
    Some((addr, client))
}

/// Whether `status` says for sure that nothing changed: a refusal the server made (it carries
/// its ErrorInfo), except the ones that leave the outcome open.
fn definite(status: &Status) -> Option<String> {
    let reason = status.get_error_details().error_info()?.reason.clone();
    match (status.code(), reason.as_str()) {
        (_, "OUTCOME_UNKNOWN") | (Code::DeadlineExceeded, _) | (_, "SHUTTING_DOWN") => None,
        _ => Some(reason),
    }
}

/// One worker: random operations until the nemesis is `done` (which is at the run's duration,
/// or later if some fault kind has not struck yet: faults never strike an idle fleet).
pub async fn worker(shared: Arc<Shared>, seed: u64, done: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let rooms = rooms();
    while !done.load(Ordering::Relaxed) {
        let room = if rng.gen_bool(0.6) {
            rooms[rng.gen_range(0..3)].clone()
        } else {
            rooms.choose(&mut rng).unwrap().clone()
        };
        let members = shared
            .members
            .lock()
            .unwrap()
            .get(&room)
            .cloned()
            .unwrap_or_default();
        let op = match rng.gen_range(0..100) {
            0..=34 => Op::Join {
                identity: format!("user-{}", rng.gen_range(0..IDENTITIES)),
                name: String::new(),
            },
            35..=47 if !members.is_empty() => Op::Leave {
                client_id: members.choose(&mut rng).unwrap().clone(),
            },
            48..=62 if !members.is_empty() => {
                let count = rng.gen_range(1..=2);
                let mut client_ids: Vec<String> =
                    members.choose_multiple(&mut rng, count).cloned().collect();
                if rng.gen_bool(0.2) {
                    client_ids.push("nobody".into());
                }
                let ban_seconds = if rng.gen_bool(0.3) {
                    rng.gen_range(1..=3)
                } else {
                    0
                };
                Op::Drop {
                    client_ids,
                    ban_seconds,
                }
            }
            63..=69 => Op::Lock,
            70..=77 => Op::Unlock,
            78..=80 => Op::Destroy,
            _ => Op::List,
        };
        run_op(&shared, &mut rng, room, op).await;
    }
}

/// Calls `op` in `room` until it has a definite answer or [`RETRYING`] has gone, and records it.
async fn run_op(shared: &Shared, rng: &mut StdRng, room: String, mut op: Op) {
    let id = shared.op_id();
    if let Op::Join { name, .. } = &mut op {
        *name = format!("op-{id}");
    }
    let request_id = format!("req-{id}");
    let invoked = shared.history.now();
    let started = Instant::now();
    let mut attempts = 0;
    let mut unknown = None;
    let outcome = loop {
        attempts += 1;
        let answer = match any_node(shared, rng).await {
            Some((_, mut client)) => call(&mut client, &room, &op, &request_id).await,
            None => Err(Status::unavailable("no node is up")),
        };
        match answer {
            Ok(answer) => break Outcome::Ok(answer),
            // After an attempt that may have happened, an UNAVAILABLE answer (the store could
            // not be asked, or its master is short of replicas) says nothing of that attempt: a
            // real client keeps retrying (docs/api.md). The harness once took a retry's
            // NOT_ENOUGH_REPLICAS for "not applied" while its first attempt had been.
            Err(status) => {
                let open = unknown.is_some() && status.code() == Code::Unavailable;
                match definite(&status).filter(|_| !open) {
                    // A refusal after an unknown attempt of an operation without a request id
                    // (Leave) may be the first attempt's doing.
                    Some(reason) if unknown.is_some() && matches!(op, Op::Leave { .. }) => {
                        break Outcome::Unknown(format!("then {reason}"))
                    }
                    Some(reason) => break Outcome::Refused { reason },
                    None => {
                        unknown = Some(format!("{:?}: {}", status.code(), status.message()));
                        if started.elapsed() > RETRYING {
                            break Outcome::Unknown(unknown.unwrap_or_default());
                        }
                        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..250))).await;
                    }
                }
            }
        }
    };
    remember_members(shared, &room, &op, &outcome);
    shared.history.invocations.lock().unwrap().push(Invocation {
        id,
        room,
        op,
        request_id,
        invoked,
        completed: shared.history.now(),
        attempts,
        outcome,
    });
}

/// Keeps the workers' idea of who is in `room` roughly true, for picking whom to drop.
fn remember_members(shared: &Shared, room: &str, op: &Op, outcome: &Outcome) {
    let mut members = shared.members.lock().unwrap();
    let room_members = members.entry(room.to_owned()).or_default();
    match (op, outcome) {
        (_, Outcome::Ok(Answer::Joined { client_id, .. })) => room_members.push(client_id.clone()),
        (Op::Leave { client_id }, _) => room_members.retain(|c| c != client_id),
        (Op::Drop { client_ids, .. }, _) => room_members.retain(|c| !client_ids.contains(c)),
        (Op::Destroy, Outcome::Ok(_)) => room_members.clear(),
        (_, Outcome::Ok(Answer::Listed(list))) => {
            *room_members = list
                .participants
                .iter()
                .map(|p| p.client_id.clone())
                .collect();
        }
        _ => {}
    }
}

/// One attempt of `op`.
async fn call(
    client: &mut Client,
    room: &str,
    op: &Op,
    request_id: &str,
) -> Result<Answer, Status> {
    fn request<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(DEADLINE);
        request
    }
    let room_id = room.to_owned();
    let request_id = request_id.to_owned();
    Ok(match op {
        Op::Join { identity, name } => {
            let joined = client
                .join(request(pb::JoinRequest {
                    room_id,
                    name: name.clone(),
                    identity: identity.clone(),
                    request_id,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            Answer::Joined {
                client_id: joined.client_id,
                seq: joined.seq,
                epoch: joined.epoch,
            }
        }
        Op::Leave { client_id } => {
            client
                .leave(request(pb::LeaveRequest {
                    room_id,
                    client_id: client_id.clone(),
                }))
                .await?;
            Answer::Left
        }
        Op::Drop {
            client_ids,
            ban_seconds,
        } => {
            let dropped = client
                .drop_user(request(pb::DropUserRequest {
                    room_id,
                    client_ids: client_ids.clone(),
                    reason: "fault test".into(),
                    request_id,
                    ban_seconds: *ban_seconds,
                }))
                .await?
                .into_inner();
            Answer::Dropped {
                request_id: dropped.request_id,
                dropped: dropped
                    .results
                    .iter()
                    .filter(|r| r.outcome() == pb::DropOutcome::Dropped)
                    .map(|r| r.client_id.clone())
                    .collect(),
            }
        }
        Op::Lock => Answer::Seq(
            client
                .lock_room(request(pb::LockRoomRequest {
                    room_id,
                    request_id,
                }))
                .await?
                .into_inner()
                .seq,
        ),
        Op::Unlock => Answer::Seq(
            client
                .unlock_room(request(pb::UnlockRoomRequest {
                    room_id,
                    request_id,
                }))
                .await?
                .into_inner()
                .seq,
        ),
        Op::Destroy => Answer::Seq(
            client
                .destroy_session(request(pb::DestroySessionRequest {
                    room_id,
                    reason: "fault test".into(),
                    request_id,
                }))
                .await?
                .into_inner()
                .seq,
        ),
        Op::List => Answer::Listed(
            client
                .list_participants(request(pb::ListParticipantsRequest { room_id }))
                .await?
                .into_inner(),
        ),
    })
}

/// One subscriber of `room`: holds an `Events` stream on some node, resuming after what it
/// saw on any error, until it has seen `last` (set at the end of the run).
pub async fn subscriber(shared: Arc<Shared>, room: String, seed: u64, last: Arc<Ends>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = Vec::new();
    let mut at: Option<(String, u64)> = None;
    let mut end = None;
    'run: while !overdue(&last, &room, &mut end) {
        if caught_up(&last, &room, &at) {
            break;
        }
        let Some((_, mut client)) = any_node(&shared, &mut rng).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (after_seq, epoch) = match &at {
            Some((epoch, seq)) => (Some(*seq), epoch.clone()),
            None => (Some(0), String::new()),
        };
        let opened = client
            .events(pb::EventsRequest {
                room_id: room.clone(),
                client_id: String::new(),
                after_seq,
                epoch: epoch.clone(),
            })
            .await;
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                out_of_range(&status, &mut at, &mut seen);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        seen.push(Seen::Resumed { after_seq, epoch });
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            match next {
                Ok(Ok(Some(event))) => {
                    at = Some((event.epoch.clone(), event.seq));
                    seen.push(Seen::Event {
                        at: shared.history.now(),
                        event,
                    });
                }
                // Ended (a destroyed session ends streams OK) or failed: resume elsewhere.
                Ok(Ok(None)) => continue 'run,
                Ok(Err(status)) => {
                    out_of_range(&status, &mut at, &mut seen);
                    continue 'run;
                }
                // Quiet: look whether the run is over and this subscriber has seen it all.
                Err(_) => {
                    if caught_up(&last, &room, &at) || overdue(&last, &room, &mut end) {
                        break 'run;
                    }
                }
            }
        }
    }
    shared.history.views.lock().unwrap().push((room, seen));
}

/// Whether a subscriber of `room` should stop looking for the rest of its log: the run's ends
/// have been known for twice [`RETRYING`] (`end`, set the first time they are), and the checker
/// will report what it missed.
fn overdue(last: &Ends, room: &str, end: &mut Option<Instant>) -> bool {
    if !last.lock().unwrap().contains_key(room) {
        return false;
    }
    Instant::now() >= *end.get_or_insert_with(|| Instant::now() + RETRYING * 2)
}

/// Whether the run is over and `at` is where `room`'s log ended (None: it was never created).
fn caught_up(last: &Ends, room: &str, at: &Option<(String, u64)>) -> bool {
    last.lock().unwrap().get(room).is_some_and(|end| end == at)
}

/// Where every room's log ends once the run is over and every fault healed (absent: never
/// created), asked of any node until one answers. `ListRooms` says it even of a room whose
/// newest change waits for its replicas, which `ListParticipants` refuses to snapshot.
pub async fn ends(shared: &Shared) -> HashMap<String, (String, u64)> {
    let mut rng = StdRng::seed_from_u64(0);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < RETRYING, "no node lists the rooms");
        let Some((_, mut client)) = any_node(shared, &mut rng).await else {
            continue;
        };
        let request = pb::ListRoomsRequest {
            page_size: 1000,
            page_token: String::new(),
        };
        match client.list_rooms(request).await {
            Ok(page) => {
                return page
                    .into_inner()
                    .rooms
                    .into_iter()
                    .map(|room| (room.room_id, (room.epoch, room.seq)))
                    .collect();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// If `status` says the cursor `at` is out of the room's log, records the log's window and
/// moves `at` to its start, as `roomctl watch` does.
fn out_of_range(status: &Status, at: &mut Option<(String, u64)>, seen: &mut Vec<Seen>) {
    if status.code() != Code::OutOfRange {
        return;
    }
    let info = status.get_error_details().error_info().cloned();
    let window = info.as_ref().and_then(|info| {
        let oldest: u64 = info.metadata.get("oldest_seq")?.parse().ok()?;
        Some((info.metadata.get("epoch")?.clone(), oldest))
    });
    let Some((epoch, oldest_seq)) = window else {
        panic!("OUT_OF_RANGE without its window: {status:?}");
    };
    seen.push(Seen::OutOfRange {
        epoch: epoch.clone(),
        oldest_seq,
    });
    *at = Some((epoch, oldest_seq.saturating_sub(1)));
}
