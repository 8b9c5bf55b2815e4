//! What a caller asks of a room: the validated commands, the answers they get, the changes they
//! make, and what identifies a request across retries (its key and fingerprint). Pure; may depend
//! on the caller, the bans, the errors and the generated types only.

use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};

use super::bans::Ban;
use super::caller::Caller;
use crate::error::Error;
use crate::pb::{self, Role};

/// The key a remembered answer is filed under: request ids are one space per caller identity
/// (and room), whatever the command, as an idempotency key is one space per account in payment
/// APIs: the same id for another kind of command is another request, refused by its
/// [`Command::fingerprint`]. The identity's length comes first, as it is free text.
pub fn answer_key(identity: &str, request_id: &str) -> String {
    format!("{}:{identity}:{request_id}", identity.len())
}

/// A validated `Join`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinCmd {
    /// Display name.
    pub name: String,
    /// Requested role (unspecified: the caller's default).
    pub role: Role,
    /// Requested identity (empty: the caller's own).
    pub identity: String,
    /// Idempotency key; None: the join is not remembered, and a retry joins again.
    pub request_id: Option<String>,
}

/// A validated `DropUser`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCmd {
    /// The requested ids, as sent (duplicates included).
    pub client_ids: Vec<String>,
    /// Text told to each dropped client.
    pub reason: String,
    /// Idempotency key; always set (the service generates one when the request has none).
    pub request_id: String,
    /// Ban each dropped client's identity for this long (None: no ban).
    pub ban: Option<Duration>,
}

/// A validated `DestroySession`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestroyCmd {
    /// Text told to every subscriber in `session_destroyed.message`.
    pub reason: String,
    /// Idempotency key; always set.
    pub request_id: String,
}

/// A state-changing command on one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Add a client (creates the room if needed); the new client's id is chosen by the caller of
    /// the engine so that retries of a store's atomic step keep it.
    Join {
        /// The new client's id.
        client_id: String,
        /// The validated request.
        cmd: JoinCmd,
    },
    /// Remove a client of its own accord.
    Leave {
        /// The client to remove.
        client_id: String,
    },
    /// Force-disconnect clients.
    Drop(DropCmd),
    /// Remove clients whose presence ran out (no open stream for the presence timeout). Only
    /// stores issue it, having seen the leases expire; clients no longer present are skipped.
    TimeOut {
        /// The clients whose leases expired.
        client_ids: Vec<String>,
    },
    /// Refuse joins as participant from now on.
    Lock {
        /// Idempotency key; always set.
        request_id: String,
    },
    /// Admit participants again.
    Unlock {
        /// Idempotency key; always set.
        request_id: String,
    },
    /// Remove everyone at once and unlock: the end of the session.
    Destroy(DestroyCmd),
    /// Lift an identity's ban.
    Unban {
        /// The banned identity.
        identity: String,
    },
}

impl Command {
    /// Only a join brings a room into existence; every other command needs the room to exist.
    pub fn creates_room(&self) -> bool {
        matches!(self, Command::Join { .. })
    }

    /// The command's idempotency key, if it has one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Command::Join { cmd, .. } => cmd.request_id.as_deref(),
            Command::Drop(cmd) => Some(&cmd.request_id),
            Command::Destroy(cmd) => Some(&cmd.request_id),
            Command::Lock { request_id } | Command::Unlock { request_id } => Some(request_id),
            Command::Leave { .. } | Command::TimeOut { .. } | Command::Unban { .. } => None,
        }
    }

    /// What a retry by `caller` must repeat to be the same request: a stable hash (SHA-256, the
    /// same on every node and build) of the command's kind and what the caller asked for,
    /// without the request id and without what the server chose (a join's client id). A join is
    /// taken by the role and identity it grants, so spelling out one's own (or leaving them
    /// unset) asks the same. Never 0.
    pub fn fingerprint(&self, caller: &Caller) -> u64 {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        match self {
            Command::Join { cmd, .. } => {
                field(b"join");
                field(cmd.name.as_bytes());
                let (role, identity) = caller
                    .join_grant(cmd.role, &cmd.identity)
                    .unwrap_or_else(|_| (cmd.role, cmd.identity.clone()));
                field(&(role as i32).to_le_bytes());
                field(identity.as_bytes());
            }
            Command::Drop(cmd) => {
                field(b"drop");
                field(&(cmd.client_ids.len() as u64).to_le_bytes());
                for client_id in &cmd.client_ids {
                    field(client_id.as_bytes());
                }
                field(cmd.reason.as_bytes());
                field(&cmd.ban.map_or(0, |ban| ban.as_secs()).to_le_bytes());
            }
            Command::Destroy(cmd) => {
                field(b"destroy");
                field(cmd.reason.as_bytes());
            }
            Command::Lock { .. } => field(b"lock"),
            Command::Unlock { .. } => field(b"unlock"),
            Command::Leave { .. } => field(b"leave"),
            Command::TimeOut { .. } => field(b"timeout"),
            Command::Unban { .. } => field(b"unban"),
        }
        let digest = hash.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first).max(1)
    }

    /// The key `caller`'s answer to this command is remembered under, if it is remembered.
    pub fn answer_key(&self, caller: &Caller) -> Option<String> {
        Some(answer_key(&caller.identity, self.request_id()?))
    }

    /// Whether the command needs every member of the room, not only those it names.
    pub fn needs_every_member(&self) -> bool {
        matches!(self, Command::Destroy(_))
    }

    /// The identities whose bans the command looks at before it runs: a join's (as
    /// [`Caller::join_grant`] decides it) and an unban's. A drop's are known only once its clients are.
    pub fn ban_identity(&self, caller: &Caller) -> Option<String> {
        match self {
            Command::Join { cmd, .. } => caller
                .join_grant(cmd.role, &cmd.identity)
                .ok()
                .map(|(_, id)| id),
            Command::Unban { identity } => Some(identity.clone()),
            _ => None,
        }
    }
}

/// What a command answers its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer to `Join`.
    Joined(pb::JoinResponse),
    /// The answer to `Leave`.
    Left,
    /// The answer to `DropUser` (possibly a remembered one).
    Dropped(pb::DropUserResponse),
    /// The clients a `TimeOut` removed (those still present).
    TimedOut(Vec<String>),
    /// The answer to `LockRoom` (possibly a remembered one).
    Locked(pb::LockRoomResponse),
    /// The answer to `UnlockRoom` (possibly a remembered one).
    Unlocked(pb::UnlockRoomResponse),
    /// The answer to `DestroySession` (possibly a remembered one).
    Destroyed(pb::DestroySessionResponse),
    /// The answer to `Unban`.
    Unbanned(pb::UnbanResponse),
    /// A refusal the room's state decided (see [`Error::refusal`]), remembered under the
    /// request's id like an answer: whichever attempt of a request commits first decides, and
    /// every retry gets its answer.
    Refused(Error),
}

impl Reply {
    /// The size of the answer on the wire (0 for those that carry nothing worth counting).
    pub fn encoded_len(&self) -> usize {
        match self {
            Reply::Joined(reply) => reply.encoded_len(),
            Reply::Dropped(reply) => reply.encoded_len(),
            Reply::Locked(reply) => reply.encoded_len(),
            Reply::Unlocked(reply) => reply.encoded_len(),
            Reply::Destroyed(reply) => reply.encoded_len(),
            Reply::Unbanned(reply) => reply.encoded_len(),
            Reply::TimedOut(ids) => ids.iter().map(String::len).sum(),
            Reply::Refused(err) => err
                .refusal()
                .map_or(0, |r| r.reason.len() + r.subject.len() + 8),
            Reply::Left => 0,
        }
    }
}

/// One change a command made to a room's members, lock or bans, for stores that persist changes
/// rather than the whole state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A client joined with the event at `join_seq`.
    Joined {
        /// The new participant.
        participant: pb::Participant,
        /// Seq of its `user_connected`.
        join_seq: u64,
    },
    /// A client left or was dropped; its streams end with the event at `end_seq`.
    Departed {
        /// The departed client.
        client_id: String,
        /// The identity that owned it.
        identity: String,
        /// Seq of the event that ends its streams.
        end_seq: u64,
    },
    /// The room was locked (true) or unlocked.
    Locked(bool),
    /// An identity was banned, or its ban extended, until `ban.until`.
    Banned(Ban),
    /// An identity's ban was lifted.
    Unbanned {
        /// The identity.
        identity: String,
    },
}
