//! The baseline of the fan-out target: a minimal tonic server of the same `RoomControl` service
//! that does only what a fan-out needs. `Join` makes a `user_connected` event and sends it
//! through a `tokio::sync::broadcast` of prost messages; `Events` streams what that channel
//! carries. No authentication, log, store or limits: the cost of delivering one message to many
//! HTTP/2 streams with tonic and nothing else. Run by the benchmark as
//! `roomctl-bench --minimal-server`, a process of its own like a roomctl node.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

struct Minimal {
    events: broadcast::Sender<Arc<pb::Event>>,
    seq: AtomicU64,
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
        _: Request<pb::DropUserRequest>,
    ) -> Result<Response<pb::DropUserResponse>, Status> {
        unimplemented()
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

/// Serves the minimal server on a free loopback port, saying where on stderr as roomctl does.
/// Its connections have `TCP_NODELAY`, as tonic's `serve` sets by default and roomctl sets: with
/// Nagle's algorithm on, the kernel would coalesce a fan-out's small frames and the baseline
/// would save what neither server may (Nagle delays unary answers).
pub async fn serve() {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .with_nodelay(Some(true));
    eprintln!("listening on {}", incoming.local_addr().unwrap());
    let service = Minimal {
        events: broadcast::channel(16).0,
        seq: AtomicU64::new(0),
    };
    tonic::transport::Server::builder()
        .add_service(RoomControlServer::new(service))
        .serve_with_incoming(incoming)
        .await
        .unwrap();
}
