//! The moderator commands: `lock`, `unlock`, `destroy`, `bans` and `unban` act on one room (as
//! its moderator or a service), and `rooms` lists every room (services of `*` only). They share
//! the client commands' connection flags, output and exit codes ([`super::client`]), and like
//! them reach the server only through its gRPC API.

use clap::Args;

use super::client::{call, on_runtime, time, Connection};
use super::{say, Failure};
use crate::pb;

/// `roomctl lock ROOM` and `roomctl unlock ROOM`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The room.
    room: String,
    /// Idempotency key: a retry with the same one returns the first answer.
    #[arg(long, default_value = "")]
    request_id: String,
    #[command(flatten)]
    connection: Connection,
}

/// Locks the room (`lock`) or unlocks it, and prints the event's seq and the request id.
pub fn lock(args: LockArgs, lock: bool) -> Result<(), Failure> {
    let LockArgs {
        room,
        request_id,
        connection,
    } = args;
    let said = |seq: u64, request_id: &str| {
        let done = if lock { "locked" } else { "unlocked" };
        format!("{room} {done} at seq {seq}\n(request {request_id})")
    };
    if lock {
        let request = pb::LockRoomRequest {
            room_id: room.clone(),
            request_id,
        };
        let locked = call(
            &connection,
            |mut c| async move { c.lock_room(request).await },
        )?;
        connection.print(&locked, || said(locked.seq, &locked.request_id));
    } else {
        let request = pb::UnlockRoomRequest {
            room_id: room.clone(),
            request_id,
        };
        let unlocked = call(
            &connection,
            |mut c| async move { c.unlock_room(request).await },
        )?;
        connection.print(&unlocked, || said(unlocked.seq, &unlocked.request_id));
    }
    Ok(())
}

/// `roomctl destroy ROOM`.
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// The room.
    room: String,
    /// Told to every subscriber in `session_destroyed`.
    #[arg(long, default_value = "")]
    reason: String,
    /// Idempotency key: a retry with the same one returns the first answer.
    #[arg(long, default_value = "")]
    request_id: String,
    #[command(flatten)]
    connection: Connection,
}

/// Ends the room's session and prints the clients it removed, one per line.
pub fn destroy(args: DestroyArgs) -> Result<(), Failure> {
    let request = pb::DestroySessionRequest {
        room_id: args.room,
        reason: args.reason,
        request_id: args.request_id,
    };
    let ended = call(&args.connection, |mut c| async move {
        c.destroy_session(request).await
    })?;
    args.connection.print(&ended, || {
        let mut text: String = ended
            .client_ids
            .iter()
            .map(|id| format!("{id}\tremoved\n"))
            .collect();
        text.push_str(&format!(
            "(session ended at seq {}, request {})",
            ended.seq, ended.request_id
        ));
        text
    });
    Ok(())
}

/// `roomctl bans ROOM`.
#[derive(Debug, Args)]
pub struct BansArgs {
    /// The room.
    room: String,
    #[command(flatten)]
    connection: Connection,
}

/// Prints the bans in force in a room, as a table (or the answer as JSON).
pub fn bans(args: BansArgs) -> Result<(), Failure> {
    let request = pb::ListBansRequest { room_id: args.room };
    let listed = call(&args.connection, |mut c| async move {
        c.list_bans(request).await
    })?;
    args.connection.print(&listed, || {
        let mut table = format!("{:<32}  {:<20}  MODERATOR", "IDENTITY", "UNTIL");
        for ban in &listed.bans {
            table.push_str(&format!(
                "\n{:<32}  {:<20}  {}",
                ban.identity,
                time(ban.until.as_ref()),
                ban.moderator
            ));
        }
        table.push_str(&format!("\n({} bans)", listed.bans.len()));
        table
    });
    Ok(())
}

/// `roomctl unban ROOM IDENTITY`.
#[derive(Debug, Args)]
pub struct UnbanArgs {
    /// The room.
    room: String,
    /// The banned identity.
    identity: String,
    #[command(flatten)]
    connection: Connection,
}

/// Lifts a ban.
pub fn unban(args: UnbanArgs) -> Result<(), Failure> {
    let request = pb::UnbanRequest {
        room_id: args.room,
        identity: args.identity.clone(),
    };
    let lifted = call(
        &args.connection,
        |mut c| async move { c.unban(request).await },
    )?;
    args.connection.print(&lifted, || {
        format!("{} unbanned at seq {}", args.identity, lifted.seq)
    });
    Ok(())
}

/// `roomctl rooms`.
#[derive(Debug, Args)]
pub struct RoomsArgs {
    /// Rooms fetched per call (1..1000); every page is printed.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
    #[command(flatten)]
    connection: Connection,
}

/// Prints every room, following the pages: a table, or one RoomSummary JSON object per line.
pub fn rooms(args: RoomsArgs) -> Result<(), Failure> {
    let connection = &args.connection;
    on_runtime(async {
        let mut client = connection.client()?;
        let mut page_token = String::new();
        let mut count = 0;
        let mut first = true;
        loop {
            let request = pb::ListRoomsRequest {
                page_size: args.page_size,
                page_token,
            };
            let page = match client.list_rooms(request).await {
                Ok(page) => page.into_inner(),
                Err(status) => return Err(connection.failure(&status).await),
            };
            // The header only once the first page is in: a refused call prints nothing on
            // stdout.
            if std::mem::take(&mut first) && !connection.json() {
                say(format_args!(
                    "{:<32}  {:>12}  {:<6}  {:>10}  EPOCH",
                    "ROOM", "PARTICIPANTS", "LOCKED", "SEQ"
                ));
            }
            for room in &page.rooms {
                connection.print(room, || {
                    format!(
                        "{:<32}  {:>12}  {:<6}  {:>10}  {}",
                        room.room_id,
                        room.participants,
                        if room.locked { "yes" } else { "no" },
                        room.seq,
                        room.epoch
                    )
                });
            }
            count += page.rooms.len();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        if !connection.json() {
            say(format_args!("({count} rooms)"));
        }
        Ok(())
    })
}
