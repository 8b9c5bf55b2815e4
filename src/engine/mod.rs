//! The room engine: the pure rules of a room.
//!
//! Given a room's state, who is calling and a validated command, it decides whether the call is
//! allowed, changes the state and returns the events to log, already numbered. It does no I/O and
//! knows no clock but the `now` it is given, so every rule here is unit-tested without a runtime,
//! and every store (memory, Redis) applies exactly the same rules. It may depend on the errors,
//! the generated types and the id rules, and nothing else of roomctl: no store, no tonic.
//!
//! - `caller`: who calls, and what they may do whatever the room holds.
//! - `command`: what they ask (commands), what they get (replies), what changed.
//! - `room`: a room's state apart from its log.
//! - `answers`: the answers a room remembers for idempotent retries, bounded in time and bytes.
//! - `bans`: who a room keeps out, until when.
//! - `rules`: [`apply`], the rules themselves.

mod answers;
mod bans;
mod caller;
mod command;
mod room;
mod rules;
#[cfg(test)]
mod tests;

pub use answers::{Remembered, ANSWER_OVERHEAD, DEFAULT_ANSWER_BYTES, IDEMPOTENCY_WINDOW};
pub use bans::{Ban, MAX_BAN, MAX_BANS};
pub use caller::{Caller, RoomScope, TokenRole};
pub use command::{answer_key, Change, Command, DestroyCmd, DropCmd, JoinCmd, Reply};
pub use room::{ClientStatus, RoomLimits, RoomState, DEFAULT_MAX_MEMBERS};
pub use rules::{apply, Applied};
