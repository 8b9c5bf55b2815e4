//! Field rules of the contract: turns raw requests into validated domain values, or into an
//! `INVALID_ARGUMENT` that lists every offending field at once.
//!
//! It checks fields, not rooms: validate knows nothing of the store, of a room's state or of who
//! calls.

use std::time::Duration;

use crate::engine::{DestroyCmd, DropCmd, JoinCmd, MAX_BAN};
use crate::error::{Error, Violation};
use crate::ids::{room_id_char, MAX_ID_CHARS, MAX_ROOM_ID_CHARS};
use crate::page_token::PageTokens;
use crate::pb::{self, Role};

/// Most client ids in one `DropUser`, counted as sent (duplicates included).
pub const MAX_DROP_IDS: usize = 1000;
/// Longest drop or destroy reason, in bytes (UTF-8).
pub const MAX_REASON_BYTES: usize = 256;
/// Rooms per `ListRooms` page when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most rooms per `ListRooms` page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Collects violations so that one answer names every bad field.
#[derive(Default)]
struct Check(Vec<Violation>);

impl Check {
    fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation::new(field, description));
    }

    fn room_id(&mut self, room_id: &str) {
        let chars = room_id.chars().count();
        if chars == 0 {
            self.fail("room_id", "must not be empty");
        } else if chars > MAX_ROOM_ID_CHARS {
            self.fail(
                "room_id",
                format!("longer than {MAX_ROOM_ID_CHARS} characters"),
            );
        } else if !room_id.chars().all(room_id_char) {
            self.fail(
                "room_id",
                "may only hold the characters A-Z a-z 0-9 . _ : -",
            );
        }
    }

    fn max_chars(&mut self, field: impl Into<String>, value: &str) {
        if value.chars().count() > MAX_ID_CHARS {
            self.fail(field, format!("longer than {MAX_ID_CHARS} characters"));
        }
    }

    fn id(&mut self, field: impl Into<String>, value: &str) {
        let field = field.into();
        if value.is_empty() {
            self.fail(field, "must not be empty");
        } else {
            self.max_chars(field, value);
        }
    }

    fn reason(&mut self, reason: &str) {
        if reason.len() > MAX_REASON_BYTES {
            self.fail(
                "reason",
                format!("{} bytes; at most {MAX_REASON_BYTES}", reason.len()),
            );
        }
    }

    /// An optional idempotency key; an empty one becomes a generated one.
    fn request_id(&mut self, request_id: String) -> String {
        self.max_chars("request_id", &request_id);
        if request_id.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            request_id
        }
    }

    fn done<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

/// Checks a room id on its own (used where it is the only field).
pub fn room_id(room_id: &str) -> Result<(), Error> {
    let mut check = Check::default();
    check.room_id(room_id);
    check.done(())
}

/// Checks a `Join` and returns its command.
pub fn join(req: pb::JoinRequest) -> Result<JoinCmd, Error> {
    let mut check = Check::default();
    check.room_id(&req.room_id);
    check.max_chars("name", &req.name);
    check.max_chars("identity", &req.identity);
    check.max_chars("request_id", &req.request_id);
    let role = Role::try_from(req.role).unwrap_or_else(|_| {
        check.fail("role", format!("unknown role {}", req.role));
        Role::Unspecified
    });
    check.done(JoinCmd {
        name: req.name,
        role,
        identity: req.identity,
        request_id: (!req.request_id.is_empty()).then_some(req.request_id),
    })
}

/// Checks a `Leave`.
pub fn leave(req: &pb::LeaveRequest) -> Result<(), Error> {
    let mut check = Check::default();
    check.room_id(&req.room_id);
    check.id("client_id", &req.client_id);
    check.done(())
}

/// Checks a `DropUser` and returns its command; an empty `request_id` becomes a generated one.
pub fn drop_user(req: pb::DropUserRequest) -> Result<DropCmd, Error> {
    let mut check = Check::default();
    check.room_id(&req.room_id);
    match req.client_ids.len() {
        0 => check.fail("client_ids", "must name at least one client"),
        n if n > MAX_DROP_IDS => check.fail(
            "client_ids",
            format!("{n} ids; at most {MAX_DROP_IDS} per call"),
        ),
        _ => {
            for (i, id) in req.client_ids.iter().enumerate() {
                check.id(format!("client_ids[{i}]"), id);
            }
        }
    }
    check.reason(&req.reason);
    let request_id = check.request_id(req.request_id);
    let ban = Duration::from_secs(u64::from(req.ban_seconds));
    if ban > MAX_BAN {
        check.fail(
            "ban_seconds",
            format!("at most {} (30 days)", MAX_BAN.as_secs()),
        );
    }
    check.done(DropCmd {
        client_ids: req.client_ids,
        reason: req.reason,
        request_id,
        ban: (!ban.is_zero()).then_some(ban),
    })
}

/// Checks a `LockRoom` or `UnlockRoom` (a room and a request id); returns its request id,
/// generated when empty.
pub fn lock(room_id: &str, request_id: String) -> Result<String, Error> {
    let mut check = Check::default();
    check.room_id(room_id);
    let request_id = check.request_id(request_id);
    check.done(request_id)
}

/// Checks a `DestroySession` and returns its command; an empty `request_id` becomes a
/// generated one.
pub fn destroy_session(req: pb::DestroySessionRequest) -> Result<DestroyCmd, Error> {
    let mut check = Check::default();
    check.room_id(&req.room_id);
    check.reason(&req.reason);
    let request_id = check.request_id(req.request_id);
    check.done(DestroyCmd {
        reason: req.reason,
        request_id,
    })
}

/// Checks an `Unban`.
pub fn unban(req: &pb::UnbanRequest) -> Result<(), Error> {
    let mut check = Check::default();
    check.room_id(&req.room_id);
    check.id("identity", &req.identity);
    check.done(())
}

/// Checks a `ListRooms`; returns the page size and the room id the page starts after, which
/// its token, opened by `pages`, names.
pub fn list_rooms(
    req: &pb::ListRoomsRequest,
    pages: &PageTokens,
) -> Result<(usize, Option<String>), Error> {
    let mut check = Check::default();
    let size = match req.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            check.fail("page_size", format!("{n}; at most {MAX_PAGE_SIZE}"));
            0
        }
        n => n,
    };
    let after = match req.page_token.as_str() {
        "" => None,
        token => match pages.open(token) {
            Some(room_id) => Some(room_id),
            None => {
                check.fail(
                    "page_token",
                    "not a token ListRooms gave (or one from before the JWT key that sealed \
                     it was removed); list again from an empty page_token",
                );
                None
            }
        },
    };
    check.done((size, after))
}

/// Checks an `Events` request; returns the client id it subscribes as (None: observer).
pub fn events(req: &pb::EventsRequest) -> Result<Option<&str>, Error> {
    let mut check = Check::default();
    check.room_id(&req.room_id);
    check.max_chars("client_id", &req.client_id);
    check.max_chars("epoch", &req.epoch);
    check.done((!req.client_id.is_empty()).then_some(req.client_id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(err: Error) -> Vec<String> {
        match err {
            Error::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn drop_req(ids: usize, reason: usize) -> pb::DropUserRequest {
        pb::DropUserRequest {
            room_id: "room-1".into(),
            client_ids: (0..ids).map(|i| format!("c{i}")).collect(),
            reason: "x".repeat(reason),
            request_id: String::new(),
            ban_seconds: 0,
        }
    }

    #[test]
    fn room_ids_follow_the_contract() {
        assert!(room_id("a").is_ok());
        assert!(room_id("Team_1.standup:2026-11").is_ok());
        assert!(room_id(&"r".repeat(128)).is_ok());
        for bad in ["", "has space", "slash/", "é", &"r".repeat(129)] {
            assert_eq!(fields(room_id(bad).unwrap_err()), ["room_id"], "{bad:?}");
        }
    }

    #[test]
    fn drop_limits_are_inclusive() {
        assert!(drop_user(drop_req(1000, 256)).is_ok());
        assert_eq!(
            fields(drop_user(drop_req(1001, 0)).unwrap_err()),
            ["client_ids"]
        );
        assert_eq!(fields(drop_user(drop_req(1, 257)).unwrap_err()), ["reason"]);
        assert_eq!(
            fields(drop_user(drop_req(0, 0)).unwrap_err()),
            ["client_ids"]
        );
        // A multi-byte reason counts bytes, not characters.
        let mut req = drop_req(1, 0);
        req.reason = "é".repeat(129);
        assert_eq!(fields(drop_user(req).unwrap_err()), ["reason"]);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let req = pb::DropUserRequest {
            room_id: String::new(),
            client_ids: vec!["ok".into(), String::new(), "c".repeat(129)],
            reason: String::new(),
            request_id: "q".repeat(129),
            ban_seconds: 2_592_001,
        };
        assert_eq!(
            fields(drop_user(req).unwrap_err()),
            [
                "room_id",
                "client_ids[1]",
                "client_ids[2]",
                "request_id",
                "ban_seconds"
            ]
        );
    }

    #[test]
    fn bans_last_at_most_30_days() {
        let mut req = drop_req(1, 0);
        req.ban_seconds = 2_592_000;
        assert_eq!(
            drop_user(req).unwrap().ban,
            Some(Duration::from_secs(2_592_000))
        );
        assert_eq!(drop_user(drop_req(1, 0)).unwrap().ban, None);
    }

    #[test]
    fn pages_hold_up_to_1000_rooms_and_tokens_are_checked() {
        let pages = PageTokens::new(&crate::auth::KeySet::single(
            "a-secret-for-page-tokens-0123456789",
        ));
        let list = |page_size, page_token: &str| pb::ListRoomsRequest {
            page_size,
            page_token: page_token.into(),
        };
        assert_eq!(list_rooms(&list(0, ""), &pages).unwrap(), (100, None));
        assert_eq!(list_rooms(&list(1000, ""), &pages).unwrap().0, 1000);
        let token = pages.seal("room-7");
        assert_eq!(
            list_rooms(&list(1, &token), &pages).unwrap(),
            (1, Some("room-7".into()))
        );
        assert_eq!(
            fields(list_rooms(&list(1001, "after:room-7"), &pages).unwrap_err()),
            ["page_size", "page_token"]
        );
    }

    #[test]
    fn an_empty_request_id_is_generated() {
        let a = drop_user(drop_req(1, 0)).unwrap().request_id;
        let b = drop_user(drop_req(1, 0)).unwrap().request_id;
        assert!(!a.is_empty() && a != b);
    }

    #[test]
    fn join_checks_name_and_role() {
        let req = pb::JoinRequest {
            room_id: "r".into(),
            name: "n".repeat(129),
            role: 7,
            identity: String::new(),
            request_id: "r".repeat(129),
        };
        assert_eq!(
            fields(join(req).unwrap_err()),
            ["name", "request_id", "role"]
        );
    }
}
