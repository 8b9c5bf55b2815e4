//! The baselines of the fan-out and unary targets: a minimal tonic server of the same
//! `RoomControl` service that does only what a fan-out or a drop needs. `Join` makes a
//! `user_connected` event and sends it through a `tokio::sync::broadcast` of prost messages;
//! `Events` streams what that channel carries. `DropUser` appends its `ack_drop_user` to its
//! room's log (a bounded `VecDeque` behind a mutex) and answers every id not found. Beside it,
//! tonic-health's Health/Check. No authentication, validation, access log, idempotency or
//! limits: the cost of these calls with tonic and nothing else. Run by the benchmark as
//! `roomctl-bench --minimal-server`, a process of its own like a roomctl node.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use roomctl::pb;
use tokio::sync::broadcast;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The plain generated server, whose `Events` streams yield `Event` messages (build.rs).
mod baseline {
    include!(concat!(env!("OUT_DIR"), "/baseline/roomcontrol.v1.rs"));
}

use baseline::room_control_server::{RoomControl, RoomControlServer};

/// Events a room's log keeps, as roomctl's default `--history`.
const HISTORY: usize = roomctl::store::DEFAULT_HISTORY;

struct Minimal {
    events: broadcast::Sender<Arc<pb::Event>>,
    seq: AtomicU64,
    rooms: Mutex<HashMap<String, VecDeque<pb::Event>>>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of the fan-out baseline"))
}

#[tonic::async_trait]
impl RoomControl for Minimal {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let participant = pb::Participant {
            client_id: format!("c{seq}"),
            identity: "ops".into(),
            name: request.name,
            ..Default::default()
        };
        let event = pb::Event {
            seq,
            epoch: "minimal".into(),
            room_id: request.room_id,
            time: Some(std::time::SystemTime::now().into()),
            payload: Some(pb::event::Payload::UserConnected(pb::UserConnected {
                participant: Some(participant.clone()),
            })),
        };
        // Nobody listening is no error: the first join happens before the subscriptions.
        let _ = self.events.send(Arc::new(event));
        Ok(Response::new(pb::JoinResponse {
            client_id: participant.client_id,
            seq,
            epoch: "minimal".into(),
            ..Default::default()
        }))
    }

    type EventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn events(
        &self,
        _request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let receiver = self.events.subscribe();
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let event = receiver.recv().await.ok()?;
            Some((Ok(pb::Event::clone(&event)), receiver))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn leave(
        &self,
        _: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        unimplemented()
    }

    async fn list_participants(
        &self,
        _: Request<pb::ListParticipantsRequest>,
    ) -> Result<Response<pb::ListParticipantsResponse>, Status> {
        unimplemented()
    }

    async fn drop_user(
        &self,
        request: Request<pb::DropUserRequest>,
    ) -> Result<Response<pb::DropUserResponse>, Status> {
        let request = request.into_inner();
        let response = pb::DropUserResponse {
            request_id: format!("r{}", self.seq.fetch_add(1, Ordering::Relaxed)),
            results: request
                .client_ids
                .into_iter()
                .map(|client_id| pb::DropResult {
                    client_id,
                    outcome: pb::DropOutcome::NotFound.into(),
                })
                .collect(),
        };
        let mut rooms = self.rooms.lock().unwrap();
        let log = rooms.entry(request.room_id.clone()).or_default();
        let event = pb::Event {
            seq: log.back().map_or(1, |last| last.seq + 1),
            epoch: "minimal".into(),
            room_id: request.room_id,
            time: Some(std::time::SystemTime::now().into()),
            payload: Some(pb::event::Payload::AckDropUser(pb::AckDropUser {
                request_id: response.request_id.clone(),
                moderator: "mod".into(),
                results: response.results.clone(),
            })),
        };
        if log.len() == HISTORY {
            log.pop_front();
        }
        log.push_back(event);
        Ok(Response::new(response))
    }

    async fn lock_room(
        &self,
        _: Request<pb::LockRoomRequest>,
    ) -> Result<Response<pb::LockRoomResponse>, Status> {
        unimplemented()
    }

    async fn unlock_room(
        &self,
        _: Request<pb::UnlockRoomRequest>,
    ) -> Result<Response<pb::UnlockRoomResponse>, Status> {
        unimplemented()
    }

    async fn destroy_session(
        &self,
        _: Request<pb::DestroySessionRequest>,
    ) -> Result<Response<pb::DestroySessionResponse>, Status> {
        unimplemented()
    }

    async fn list_bans(
        &self,
        _: Request<pb::ListBansRequest>,
    ) -> Result<Response<pb::ListBansResponse>, Status> {
        unimplemented()
    }

    async fn unban(
        &self,
        _: Request<pb::UnbanRequest>,
    ) -> Result<Response<pb::UnbanResponse>, Status> {
        unimplemented()
    }

    async fn list_rooms(
        &self,
        _: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsResponse>, Status> {
        unimplemented()
    }
}

/// Runs the minimal server on tokio's default multi-threaded runtime, or with the scheduler's
/// LIFO slot off as roomctl runs (`lifo_slot` false; a build with `--cfg tokio_unstable`, as
/// `.cargo/config.toml` makes it, only).
pub fn run(lifo_slot: bool) {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if !lifo_slot {
        #[cfg(tokio_unstable)]
        builder.disable_lifo_slot();
        #[cfg(not(tokio_unstable))]
        panic!("the LIFO slot can be turned off only in a build with --cfg tokio_unstable");
    }
    builder.build().unwrap().block_on(serve());
}

/// Serves the minimal server on a free loopback port, saying where on stderr as roomctl does.
/// Its connections have `TCP_NODELAY`, as tonic's `serve` sets by default and roomctl sets: with
/// Nagle's algorithm on, the kernel would coalesce a fan-out's small frames and the baseline
/// would save what neither server may (Nagle delays unary answers).
async fn serve() {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .with_nodelay(Some(true));
    eprintln!("listening on {}", incoming.local_addr().unwrap());
    let service = Minimal {
        events: broadcast::channel(16).0,
        seq: AtomicU64::new(0),
        rooms: Mutex::default(),
    };
    let (_health, health_service) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(RoomControlServer::new(service))
        .serve_with_incoming(incoming)
        .await
        .unwrap();
}
