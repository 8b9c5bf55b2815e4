//! The client commands: `join`, `leave`, `participants`, `drop` and `watch` call a running
//! server, for operators and scripts (the moderator commands are in [`super::moderate`]).
//!
//! Each takes `--server` (`http://` or `https://`, with `--ca`, `--cert`, `--key` for TLS and
//! mTLS), `--token` (or `ROOMCTL_TOKEN`) and `--json`, which prints each answer or event as one
//! proto3 JSON object per line (through the proto's own descriptors, so names and types are
//! exactly grpcurl's). Errors print the gRPC code, the message and the ErrorInfo, and exit with
//! the code of their kind ([`Failure`]).
//!
//! A connection that fails for a reason no retry can fix (TLS spoken to a plaintext port or the
//! other way round, a server certificate the client refuses) is told as a configuration error
//! that says what is wrong and where docs/operations.md shows how to fix it.
//!
//! `watch` follows a room through anything short of a refusal: on a broken connection, a node
//! shutting down or a reset mid-stream it reconnects with capped, jittered backoff and resumes
//! from the last seq and epoch, so nothing is missed or repeated; when its cursor falls out of
//! the history (or the log was lost) it says so, resyncs from a `ListParticipants` snapshot and
//! goes on from there; when the room itself is gone (forgotten, or lost with a restarted
//! in-memory server) it says so and waits for the room to be joined again. In text, a change of
//! epoch is a line of its own, so events of two logs are never told apart by `seq` alone.
//!
//! It reaches the server only over gRPC, through [`crate::client`] and the generated types; of the
//! server's own code it borrows only the error domain and the names of gRPC codes.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::{diagnose, say, Failure};
use crate::backoff::Backoff;
use crate::client::{self, Client};
use crate::codec::json;
use crate::error::DOMAIN;
use crate::pb::{self, event::Payload};

/// How to reach a server and what to print.
#[derive(Debug, Args)]
pub struct Connection {
    /// The server: `http://HOST:PORT`, or `https://HOST:PORT` for TLS.
    #[arg(long, env = "ROOMCTL_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The bearer token to call with (see `roomctl token`).
    #[arg(long, env = "ROOMCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For https: the PEM CA to trust (default: the usual public CAs).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// For mTLS: a PEM client certificate (with --key).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// For mTLS: the PEM key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Print each answer or event as one proto3 JSON object per line.
    #[arg(long)]
    json: bool,
}

fn read(path: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Other(format!("cannot read {}: {e}", path.display())))
}

/// A PEM file that must hold a certificate (`--ca`, `--cert`).
fn read_certificate(flag: &str, path: &PathBuf) -> Result<String, Failure> {
    let text = read(path)?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Failure::Usage(format!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(text)
}

impl Connection {
    /// A client of the server (inside a runtime); connecting is lazy, so an unreachable server
    /// shows on the first call.
    pub(super) fn client(&self) -> Result<Client, Failure> {
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| Failure::Usage(format!("--server: {}", with_causes(&e))))?;
        if self.server.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read_certificate("--ca", ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                let cert = read_certificate("--cert", cert)?;
                tls = tls.identity(Identity::from_pem(cert, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                let text = with_causes(&e);
                let why = diagnose::certificate_refused(&text, "")
                    .map_or_else(String::new, |why| format!("\n  {why}"));
                Failure::Usage(format!("--ca, --cert, --key: {text}{why}"))
            })?;
        } else if self.ca.is_some() || self.cert.is_some() {
            return Err(Failure::Usage(
                "--ca and --cert need an https:// --server".into(),
            ));
        }
        let channel: Channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let token = self.token.as_deref().ok_or_else(|| {
            Failure::Usage(
                "no token: pass --token TOKEN or set ROOMCTL_TOKEN (`roomctl token` mints one)"
                    .into(),
            )
        })?;
        client::with_token(channel, token).map_err(|s| Failure::Usage(s.message().into()))
    }

    /// A failed call as the operator sees it ([`failure`]). When the transport failed, it says
    /// which server and why (the causes tonic keeps behind "transport error"), and, for a
    /// reason on this side that no retry fixes, it is a configuration error saying what to
    /// change.
    pub(super) async fn failure(&self, status: &Status) -> Failure {
        if from_roomctl(status) {
            return failure(status);
        }
        let said = format!(
            "{}: {}",
            crate::telemetry::code_name(status.code()),
            with_causes(status)
        );
        let asked = diagnose::Asked {
            server: &self.server,
            with_certificate: self.cert.is_some(),
        };
        if let Some(why) = diagnose::misconfigured(&asked, &said).await {
            return Failure::Usage(format!("{said}\n  {why}"));
        }
        let hint = if said.contains("connect") {
            "\n  is the server running there, and is --server (or ROOMCTL_SERVER) its address?"
        } else {
            ""
        };
        Failure::Unreachable(format!("the server at {}: {said}{hint}", self.server))
    }

    /// Whether answers are printed as JSON.
    pub(super) fn json(&self) -> bool {
        self.json
    }

    /// Prints `message`: its proto3 JSON with `--json`, else `text`.
    pub(super) fn print<M: Message + Default>(&self, message: &M, text: impl FnOnce() -> String) {
        if self.json {
            say(json(message));
        } else {
            say(text());
        }
    }
}

/// A status's message, or an error, with its causes: tonic's errors say "transport error" and
/// keep the cause in their source.
fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = match err.downcast_ref::<Status>() {
        Some(status) => status.message().to_owned(),
        None => err.to_string(),
    };
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

/// A failed call as the operator sees it: code, message, and the ErrorInfo with its metadata.
pub(super) fn failure(status: &Status) -> Failure {
    let mut text = format!(
        "{}: {}",
        crate::telemetry::code_name(status.code()),
        status.message()
    );
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        text.push_str(&format!("\n  reason: {} ({})", info.reason, info.domain));
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        for (key, value) in metadata {
            text.push_str(&format!("\n  {key}: {value}"));
        }
    }
    if let Some(bad) = details.bad_request() {
        for violation in &bad.field_violations {
            text.push_str(&format!(
                "\n  {}: {}",
                violation.field, violation.description
            ));
        }
    }
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Failure::Refused(text),
        _ if !from_roomctl(status) => Failure::Unreachable(text),
        _ => Failure::Server(text),
    }
}

/// Whether roomctl itself answered (every error it raises carries its ErrorInfo); otherwise
/// the transport did (a refused connection, a reset, a proxy).
fn from_roomctl(status: &Status) -> bool {
    status
        .get_error_details()
        .error_info()
        .is_some_and(|info| info.domain == DOMAIN)
}

/// Runs `call` with a client of `connection`, and maps a failed call to its [`Failure`].
pub(super) fn call<T, F>(
    connection: &Connection,
    call: impl FnOnce(Client) -> F,
) -> Result<T, Failure>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    on_runtime(async {
        let client = connection.client()?;
        match call(client).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(connection.failure(&status).await),
        }
    })
}

pub(super) fn on_runtime<T>(
    work: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start tokio: {e}")))?
        .block_on(work)
}

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Moderator) => "moderator",
        Ok(pb::Role::Participant) => "participant",
        _ => "-",
    }
}

pub(super) fn time(stamp: Option<&prost_types::Timestamp>) -> String {
    stamp
        .and_then(|t| SystemTime::try_from(*t).ok())
        .map_or_else(
            || "-".into(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        )
}

/// `roomctl join ROOM`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The room.
    room: String,
    /// Display name.
    #[arg(long, default_value = "")]
    name: String,
    /// Join on behalf of this identity (service tokens only).
    #[arg(long, default_value = "")]
    identity: String,
    /// participant or moderator (service tokens only).
    #[arg(long, value_parser = ["participant", "moderator"])]
    role: Option<String>,
    /// Idempotency key: a retry with the same one returns the first answer.
    #[arg(long, default_value = "")]
    request_id: String,
    #[command(flatten)]
    connection: Connection,
}

/// Joins a room and prints the new client.
pub fn join(args: JoinArgs) -> Result<(), Failure> {
    let role = match args.role.as_deref() {
        Some("moderator") => pb::Role::Moderator,
        Some(_) => pb::Role::Participant,
        None => pb::Role::Unspecified,
    };
    let request = pb::JoinRequest {
        room_id: args.room,
        name: args.name,
        role: role as i32,
        identity: args.identity,
        request_id: args.request_id,
    };
    let joined = call(
        &args.connection,
        |mut c| async move { c.join(request).await },
    )?;
    args.connection.print(&joined, || {
        format!(
            "{}\tseq {}\tepoch {}",
            joined.client_id, joined.seq, joined.epoch
        )
    });
    Ok(())
}

/// `roomctl leave ROOM CLIENT_ID`.
#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The room.
    room: String,
    /// The client that leaves.
    client_id: String,
    #[command(flatten)]
    connection: Connection,
}

/// Makes a client leave.
pub fn leave(args: LeaveArgs) -> Result<(), Failure> {
    let request = pb::LeaveRequest {
        room_id: args.room,
        client_id: args.client_id.clone(),
    };
    let left = call(
        &args.connection,
        |mut c| async move { c.leave(request).await },
    )?;
    args.connection
        .print(&left, || format!("{} left", args.client_id));
    Ok(())
}

/// `roomctl participants ROOM`.
#[derive(Debug, Args)]
pub struct ParticipantsArgs {
    /// The room.
    room: String,
    #[command(flatten)]
    connection: Connection,
}

/// Prints who is in a room, as a table (or the snapshot as JSON).
pub fn participants(args: ParticipantsArgs) -> Result<(), Failure> {
    let request = pb::ListParticipantsRequest { room_id: args.room };
    let snapshot = call(&args.connection, |mut c| async move {
        c.list_participants(request).await
    })?;
    args.connection.print(&snapshot, || {
        let mut table = format!(
            "{:<32}  {:<20}  {:<20}  {:<11}  {:<9}  JOINED",
            "CLIENT ID", "IDENTITY", "NAME", "ROLE", "CONNECTED"
        );
        for p in &snapshot.participants {
            table.push_str(&format!(
                "\n{:<32}  {:<20}  {:<20}  {:<11}  {:<9}  {}",
                p.client_id,
                p.identity,
                p.name,
                role_name(p.role),
                if p.connected { "yes" } else { "no" },
                time(p.joined_at.as_ref())
            ));
        }
        table.push_str(&format!(
            "\n({} participants at seq {}, epoch {})",
            snapshot.participants.len(),
            snapshot.seq,
            snapshot.epoch
        ));
        table
    });
    Ok(())
}

/// `roomctl drop ROOM CLIENT_ID...`.
#[derive(Debug, Args)]
pub struct DropArgs {
    /// The room.
    room: String,
    /// The clients to drop.
    #[arg(required = true)]
    client_ids: Vec<String>,
    /// Why: told to each dropped client.
    #[arg(long, default_value = "")]
    reason: String,
    /// Idempotency key: a retry with the same one returns the first answer.
    #[arg(long, default_value = "")]
    request_id: String,
    /// Keep the dropped clients' identities out of the room this long (up to 30d).
    #[arg(long, value_parser = parse_ban)]
    ban: Option<u32>,
    #[command(flatten)]
    connection: Connection,
}

/// A ban duration in whole seconds.
fn parse_ban(value: &str) -> Result<u32, String> {
    let ban: humantime::Duration = value.parse().map_err(|e| format!("{e}"))?;
    u32::try_from(ban.as_secs()).map_err(|_| "too long a ban".into())
}

/// Drops clients and prints one line per id with its outcome.
pub fn drop_users(args: DropArgs) -> Result<(), Failure> {
    let request = pb::DropUserRequest {
        room_id: args.room,
        client_ids: args.client_ids,
        reason: args.reason,
        request_id: args.request_id,
        ban_seconds: args.ban.unwrap_or(0),
    };
    let dropped = call(&args.connection, |mut c| async move {
        c.drop_user(request).await
    })?;
    args.connection.print(&dropped, || {
        let lines: Vec<String> = dropped
            .results
            .iter()
            .map(|r| {
                let outcome = match r.outcome() {
                    pb::DropOutcome::Dropped => "dropped",
                    _ => "not found",
                };
                format!("{}\t{outcome}", r.client_id)
            })
            .collect();
        format!("{}\n(request {})", lines.join("\n"), dropped.request_id)
    });
    Ok(())
}

/// `roomctl watch ROOM`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The room.
    room: String,
    /// Follow as this client (its stream ends when it leaves or is dropped); without it,
    /// observe the room (moderators and services).
    #[arg(long = "client", default_value = "")]
    client_id: String,
    /// Start after this seq (with --epoch to check the log); without it, from a snapshot of now.
    #[arg(long = "after", requires = "epoch")]
    after: Option<u64>,
    /// The epoch --after belongs to.
    #[arg(long)]
    epoch: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

/// How watch waits between reconnections: from 50 ms, doubling, jittered (so many watchers of
/// a node that went away do not all come back at the same instant), always under 5 s.
fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_millis(2500))
}

/// Follows a room's events until its stream ends OK, resuming through broken connections.
pub fn watch(args: WatchArgs) -> Result<(), Failure> {
    on_runtime(async move {
        let mut client = args.connection.client()?;
        let (mut cursor, mut epoch) = match args.after {
            Some(after) => (after, args.epoch.unwrap_or_default()),
            None => snapshot(&mut client, &args.room, &args.connection).await?,
        };
        let mut backoff = reconnect_backoff();
        let mut shown_epoch = epoch.clone();
        loop {
            let request = pb::EventsRequest {
                room_id: args.room.clone(),
                client_id: args.client_id.clone(),
                after_seq: Some(cursor),
                epoch: epoch.clone(),
            };
            let ended = match client.events(request).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(event)) => {
                                backoff.reset();
                                cursor = event.seq;
                                epoch.clone_from(&event.epoch);
                                if !args.connection.json && event.epoch != shown_epoch {
                                    say(format_args!(
                                        "-- epoch {}: the room's log began anew (a lost or \
                                         restarted store); seqs count from here",
                                        event.epoch
                                    ));
                                }
                                shown_epoch.clone_from(&event.epoch);
                                args.connection.print(&event, || line(&event));
                            }
                            Ok(None) => return Ok(()),
                            Err(status) => break status,
                        }
                    }
                }
                Err(status) => status,
            };
            if ended.code() == Code::OutOfRange && from_roomctl(&ended) {
                eprintln!(
                    "roomctl watch: seq {cursor} of epoch {epoch:?} is no longer in the room's \
                     history ({}); resyncing from a snapshot",
                    ended.message()
                );
                (cursor, epoch) = snapshot(&mut client, &args.room, &args.connection).await?;
                continue;
            }
            if room_gone(&ended) {
                eprintln!(
                    "roomctl watch: room {:?} is gone (forgotten once empty, or lost with a \
                     restarted server: the memory store keeps rooms only while it runs); waiting \
                     for it to be joined again",
                    args.room
                );
                (cursor, epoch) = wait_for_room(&mut client, &args.room, &args.connection).await?;
                continue;
            }
            if ended.code() != Code::Unavailable && from_roomctl(&ended) {
                return Err(failure(&ended));
            }
            // A retry cannot fix how this client speaks to the server.
            if let failed @ Failure::Usage(_) = args.connection.failure(&ended).await {
                return Err(failed);
            }
            let wait = backoff.next_delay();
            eprintln!(
                "roomctl watch: {}: {}; reconnecting in {wait:.1?}, resuming after seq {cursor}",
                crate::telemetry::code_name(ended.code()),
                ended.message()
            );
            tokio::time::sleep(wait).await;
        }
    })
}

/// Whether roomctl answered that the room does not exist (`ROOM_NOT_FOUND`).
fn room_gone(status: &Status) -> bool {
    status
        .get_error_details()
        .error_info()
        .is_some_and(|info| info.domain == DOMAIN && info.reason == "ROOM_NOT_FOUND")
}

/// Waits, with capped and jittered backoff, until `room` exists again, and returns the position
/// of a snapshot of it, to follow from.
async fn wait_for_room(
    client: &mut Client,
    room: &str,
    connection: &Connection,
) -> Result<(u64, String), Failure> {
    let mut backoff = reconnect_backoff();
    loop {
        tokio::time::sleep(backoff.next_delay()).await;
        let request = pb::ListParticipantsRequest {
            room_id: room.to_owned(),
        };
        match client.list_participants(request).await {
            Ok(snapshot) => {
                let snapshot = snapshot.into_inner();
                eprintln!("roomctl watch: room {room:?} exists again; resyncing");
                return Ok(show_snapshot(snapshot, connection));
            }
            Err(status) if room_gone(&status) => {}
            // The server may be coming back: keep waiting, as for the room.
            Err(status) if !from_roomctl(&status) || status.code() == Code::Unavailable => {}
            Err(status) => return Err(connection.failure(&status).await),
        }
    }
}

/// Takes a snapshot of the room (printed with `--json`, summed up on stderr otherwise) and
/// returns the position it was taken at, to follow from.
async fn snapshot(
    client: &mut Client,
    room: &str,
    connection: &Connection,
) -> Result<(u64, String), Failure> {
    let request = pb::ListParticipantsRequest {
        room_id: room.to_owned(),
    };
    match client.list_participants(request).await {
        Ok(snapshot) => Ok(show_snapshot(snapshot.into_inner(), connection)),
        Err(status) => Err(connection.failure(&status).await),
    }
}

/// Shows `snapshot` as [`snapshot`] does and returns its position.
fn show_snapshot(snapshot: pb::ListParticipantsResponse, connection: &Connection) -> (u64, String) {
    if connection.json {
        say(json(&snapshot));
    } else {
        eprintln!(
            "roomctl watch: {} participants at seq {} (epoch {})",
            snapshot.participants.len(),
            snapshot.seq,
            snapshot.epoch
        );
    }
    (snapshot.seq, snapshot.epoch)
}

/// One readable line for an event: time, seq, kind, who, and why.
fn line(event: &pb::Event) -> String {
    let what = match &event.payload {
        Some(Payload::UserConnected(c)) => {
            let p = c.participant.clone().unwrap_or_default();
            format!(
                "user_connected     {} {} ({}) {}",
                p.client_id,
                p.identity,
                p.name,
                role_name(p.role)
            )
        }
        Some(Payload::UserDisconnected(d)) => {
            format!(
                "user_disconnected  {} {}",
                d.client_id,
                d.reason().as_str_name()
            )
        }
        Some(Payload::RoomDisconnected(d)) => format!(
            "room_disconnected  {} {} {:?}",
            d.client_id,
            d.reason().as_str_name(),
            d.message
        ),
        Some(Payload::AckDropUser(ack)) => {
            let results: Vec<String> = ack
                .results
                .iter()
                .map(|r| format!("{}={}", r.client_id, r.outcome().as_str_name()))
                .collect();
            format!(
                "ack_drop_user      request {} by {}: {}",
                ack.request_id,
                ack.moderator,
                results.join(" ")
            )
        }
        Some(Payload::RoomLocked(locked)) => format!("room_locked        by {}", locked.moderator),
        Some(Payload::RoomUnlocked(unlocked)) => {
            format!("room_unlocked      by {}", unlocked.moderator)
        }
        Some(Payload::SessionDestroyed(ended)) => format!(
            "session_destroyed  by {}: {:?}",
            ended.moderator, ended.message
        ),
        Some(Payload::UserBanned(ban)) => format!(
            "user_banned        {} until {} by {}",
            ban.identity,
            time(ban.until.as_ref()),
            ban.moderator
        ),
        Some(Payload::UserUnbanned(unban)) => format!(
            "user_unbanned      {} by {}",
            unban.identity, unban.moderator
        ),
        None => "(unknown event)".into(),
    };
    format!("{}  #{:<6} {what}", time(event.time.as_ref()), event.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_proto3_names_and_string_integers() {
        let event = pb::Event {
            seq: 12,
            epoch: "ep".into(),
            room_id: "r".into(),
            time: None,
            payload: Some(Payload::UserDisconnected(pb::UserDisconnected {
                client_id: "c1".into(),
                reason: pb::DisconnectReason::Left as i32,
            })),
        };
        let value: serde_json::Value = serde_json::from_str(&json(&event)).unwrap();
        assert_eq!(value["seq"], "12");
        assert_eq!(value["roomId"], "r");
        assert_eq!(
            value["userDisconnected"]["reason"],
            "DISCONNECT_REASON_LEFT"
        );
    }

    #[test]
    fn transport_errors_are_told_from_roomctl_refusals() {
        let reset = Status::unknown("h2 protocol error: stream reset");
        assert!(matches!(failure(&reset), Failure::Unreachable(_)));
        let refused: Status = crate::error::Error::UnauthorizedAccess {
            code: crate::error::UNAUTHORIZED_ACCESS_CODE,
            detail: "no".into(),
        }
        .into();
        let Failure::Refused(text) = failure(&refused) else {
            panic!("5116 is a refusal")
        };
        assert!(
            text.contains("5116") && text.contains("UNAUTHORIZED_ACCESS"),
            "{text}"
        );
        let gone: Status = crate::error::Error::room_not_found("r").into();
        assert!(matches!(failure(&gone), Failure::Server(_)));
    }
}
