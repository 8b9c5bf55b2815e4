//! The tonic handlers of `roomcontrol.v1.RoomControl`: each takes the verified caller, validates
//! the request into domain values, checks what needs no room state, calls the store and maps the
//! result. Rules live in the engine; persistence in the store: the service holds no room state,
//! and what depends on a room's state it leaves to them.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::accept::ConnInfo;
use crate::auth::{caller, TokenGrant};
use crate::engine::{self, Command, Reply};
use crate::error::Error;
use crate::error::Limit;
use crate::limits::{Limits, RateLimiter, StreamBudget};
use crate::page_token::PageTokens;
use crate::pb::{self, room_control_server::RoomControl};
use crate::store::RoomStore;
use crate::subscription::{self, EventStream, StreamContext};
use crate::telemetry::{CallNote, Clipped, StreamKind, Telemetry};
use crate::validate;

/// The RoomControl service over a store.
pub struct RoomControlService {
    store: Arc<dyn RoomStore>,
    shutdown: CancellationToken,
    streams: StreamBudget,
    /// Moderator commands per identity (`--moderator-rate`, `--moderator-burst`).
    moderator_limiter: RateLimiter,
    /// None: service tokens' commands are not rate-limited (`--service-rate` unset).
    service_limiter: Option<RateLimiter>,
    /// Seals and opens `ListRooms` page tokens.
    pages: PageTokens,
    telemetry: Telemetry,
}

impl RoomControlService {
    /// A service over `store`; `shutdown` ends open `Events` streams with `UNAVAILABLE`;
    /// `streams` counts them against the node's budget; `pages` keys `ListRooms` page tokens;
    /// `telemetry` counts what they deliver.
    pub fn new(
        store: Arc<dyn RoomStore>,
        shutdown: CancellationToken,
        streams: StreamBudget,
        limits: &Limits,
        pages: PageTokens,
        telemetry: Telemetry,
    ) -> Self {
        Self {
            pages,
            store,
            shutdown,
            streams,
            moderator_limiter: RateLimiter::new(
                Limit::ModeratorRate,
                limits.moderator_rate,
                limits.moderator_burst,
            ),
            service_limiter: limits.service_rate.map(|rate| {
                let burst = limits.service_burst.unwrap_or(rate.saturating_mul(2));
                RateLimiter::new(Limit::ServiceRate, rate, burst)
            }),
            telemetry,
        }
    }
}

/// Notes the call's room and caller for its access log line, and returns the note for what
/// the handler learns later.
fn note<T>(request: &Request<T>, room_id: &str, caller: &engine::Caller) -> Option<CallNote> {
    let note = request.extensions().get::<CallNote>()?;
    note.record(room_id, &caller.identity);
    Some(note.clone())
}

fn unexpected(reply: Reply) -> Status {
    Error::Internal(format!("a command got the wrong kind of reply: {reply:?}")).into()
}

impl RoomControlService {
    /// Runs a moderator's command (whose permission the caller checked) within the identity's
    /// rate (a moderator's, or a service's when `--service-rate` is set); its request id goes into
    /// the call's access line, which is its audit line.
    async fn run_rate_limited(
        &self,
        room_id: &str,
        caller: &engine::Caller,
        note: Option<CallNote>,
        cmd: Command,
    ) -> Result<Reply, Status> {
        // Noted before the rate check, so a refused command is audited by its id too.
        if let (Some(note), Some(request_id)) = (note, cmd.request_id()) {
            note.record_request_id(request_id);
        }
        let limiter = if caller.is_service() {
            self.service_limiter.as_ref()
        } else {
            Some(&self.moderator_limiter)
        };
        if let Some(limiter) = limiter {
            limiter.check(&caller.identity)?;
        }
        Ok(self.store.execute(room_id, caller, cmd).await?.reply)
    }

    /// Locks (`lock`) or unlocks `room_id` for `caller`: the rules both calls share.
    async fn set_lock(
        &self,
        room_id: &str,
        request_id: String,
        caller: &engine::Caller,
        note: Option<CallNote>,
        lock: bool,
    ) -> Result<Reply, Status> {
        let request_id = validate::lock(room_id, request_id)?;
        caller.check_may_lock(room_id)?;
        let cmd = if lock {
            Command::Lock { request_id }
        } else {
            Command::Unlock { request_id }
        };
        self.run_rate_limited(room_id, caller, note, cmd).await
    }
}

#[tonic::async_trait]
impl RoomControl for RoomControlService {
    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let caller = caller(&request)?;
        note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        let room_id = req.room_id.clone();
        let cmd = validate::join(req)?;
        caller.check_room(&room_id)?;
        // Checked before the store too, so a refused join never creates a room.
        caller.join_grant(cmd.role, &cmd.identity)?;
        let client_id = uuid::Uuid::new_v4().simple().to_string();
        let applied = self
            .store
            .execute(&room_id, &caller, Command::Join { client_id, cmd })
            .await?;
        match applied.reply {
            Reply::Joined(joined) => Ok(Response::new(joined)),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let caller = caller(&request)?;
        note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        validate::leave(&req)?;
        caller.check_room(&req.room_id)?;
        let cmd = Command::Leave {
            client_id: req.client_id,
        };
        match self.store.execute(&req.room_id, &caller, cmd).await?.reply {
            Reply::Left => Ok(Response::new(pb::LeaveResponse {})),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn list_participants(
        &self,
        request: Request<pb::ListParticipantsRequest>,
    ) -> Result<Response<pb::ListParticipantsResponse>, Status> {
        let caller = caller(&request)?;
        let room_id = &request.get_ref().room_id;
        note(&request, room_id, &caller);
        validate::room_id(room_id)?;
        caller.check_room(room_id)?;
        let snapshot = self.store.snapshot(room_id).await?;
        Ok(Response::new(pb::ListParticipantsResponse {
            participants: snapshot.participants,
            seq: snapshot.window.newest_seq,
            epoch: snapshot.window.epoch,
            locked: snapshot.locked,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn drop_user(
        &self,
        request: Request<pb::DropUserRequest>,
    ) -> Result<Response<pb::DropUserResponse>, Status> {
        let caller = caller(&request)?;
        let note = note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        let room_id = req.room_id.clone();
        let cmd = validate::drop_user(req)?;
        caller.check_may_drop(&room_id)?;
        match self
            .run_rate_limited(&room_id, &caller, note, Command::Drop(cmd))
            .await?
        {
            Reply::Dropped(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn lock_room(
        &self,
        request: Request<pb::LockRoomRequest>,
    ) -> Result<Response<pb::LockRoomResponse>, Status> {
        let caller = caller(&request)?;
        let note = note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        match self
            .set_lock(&req.room_id, req.request_id, &caller, note, true)
            .await?
        {
            Reply::Locked(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn unlock_room(
        &self,
        request: Request<pb::UnlockRoomRequest>,
    ) -> Result<Response<pb::UnlockRoomResponse>, Status> {
        let caller = caller(&request)?;
        let note = note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        match self
            .set_lock(&req.room_id, req.request_id, &caller, note, false)
            .await?
        {
            Reply::Unlocked(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn destroy_session(
        &self,
        request: Request<pb::DestroySessionRequest>,
    ) -> Result<Response<pb::DestroySessionResponse>, Status> {
        let caller = caller(&request)?;
        let note = note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        let room_id = req.room_id.clone();
        let cmd = validate::destroy_session(req)?;
        caller.check_may_end_session(&room_id)?;
        match self
            .run_rate_limited(&room_id, &caller, note, Command::Destroy(cmd))
            .await?
        {
            Reply::Destroyed(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn list_bans(
        &self,
        request: Request<pb::ListBansRequest>,
    ) -> Result<Response<pb::ListBansResponse>, Status> {
        let caller = caller(&request)?;
        let room_id = &request.get_ref().room_id;
        note(&request, room_id, &caller);
        validate::room_id(room_id)?;
        caller.check_may_manage_bans(room_id)?;
        let bans = self.store.bans(room_id).await?;
        Ok(Response::new(pb::ListBansResponse {
            bans: bans.iter().map(engine::Ban::to_pb).collect(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn unban(
        &self,
        request: Request<pb::UnbanRequest>,
    ) -> Result<Response<pb::UnbanResponse>, Status> {
        let caller = caller(&request)?;
        let note = note(&request, &request.get_ref().room_id, &caller);
        let req = request.into_inner();
        validate::unban(&req)?;
        caller.check_may_manage_bans(&req.room_id)?;
        let cmd = Command::Unban {
            identity: req.identity,
        };
        match self
            .run_rate_limited(&req.room_id, &caller, note, cmd)
            .await?
        {
            Reply::Unbanned(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    async fn list_rooms(
        &self,
        request: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsResponse>, Status> {
        let caller = caller(&request)?;
        note(&request, "*", &caller);
        let (size, after) = validate::list_rooms(request.get_ref(), &self.pages)?;
        caller.check_may_list_rooms()?;
        // One more than the page tells whether another page follows.
        let mut rooms = self.store.list_rooms(after.as_deref(), size + 1).await?;
        let next_page_token = if rooms.len() > size {
            rooms.truncate(size);
            rooms
                .last()
                .map_or_else(String::new, |room| self.pages.seal(&room.room_id))
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRoomsResponse {
            rooms,
            next_page_token,
        }))
    }

    type EventsStream = EventStream;

    #[tracing::instrument(level = "debug", skip_all, fields(room_id = %Clipped(&request.get_ref().room_id)))]
    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller(&request)?;
        note(&request, &request.get_ref().room_id, &caller);
        let connection = request.extensions().get::<ConnInfo>();
        let kind = if request.get_ref().client_id.is_empty() {
            StreamKind::Observer
        } else {
            StreamKind::Client
        };
        let context = StreamContext {
            slot: self.streams.reserve(kind, connection.map(|c| &c.streams))?,
            // The connection's own ends, which also come when it is gone.
            shutdown: connection.map_or_else(|| self.shutdown.clone(), |c| c.ends.clone()),
            grant: request.extensions().get::<TokenGrant>().cloned(),
            telemetry: self.telemetry.clone(),
        };
        let stream =
            subscription::subscribe(self.store.clone(), &caller, request.into_inner(), context)
                .await
                .map_err(Status::from)?;
        Ok(Response::new(stream))
    }
}
