//! Request validation against the contract's field rules: the first byte picks a request type,
//! the rest is decoded as its protobuf body (as the server's codec would) and validated. What
//! passes must meet every rule; what fails must say why, field by field. Shared by the property
//! tests and the `validate` fuzz target through [`check`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use prost::Message;
use roomctl::auth::KeySet;
use roomctl::error::Error;
use roomctl::ids::{is_room_id, MAX_ID_CHARS};
use roomctl::page_token::PageTokens;
use roomctl::pb;
use roomctl::validate::{self, MAX_DROP_IDS, MAX_PAGE_SIZE, MAX_REASON_BYTES};

/// The JWT secret whose derived key seals the page tokens the model and its generators use.
pub const PAGE_SECRET: &str = "the-validation-model-secret-0123456789";

/// The page tokens of a node with [`PAGE_SECRET`].
pub fn pages() -> PageTokens {
    PageTokens::new(&KeySet::single(PAGE_SECRET))
}

/// The longest ban, in seconds (30 days).
const MAX_BAN_SECONDS: u32 = 2_592_000;

fn short(value: &str) -> bool {
    value.chars().count() <= MAX_ID_CHARS
}

fn id(value: &str) -> bool {
    !value.is_empty() && short(value)
}

/// Checks validation's verdict on `req` against `ok`, what the contract allows: a refusal must
/// name at least one field. Returns what passed.
fn judge<T>(ok: bool, req: &impl std::fmt::Debug, verdict: Result<T, Error>) -> Option<T> {
    match verdict {
        Ok(value) => {
            assert!(ok, "{req:?} passed");
            Some(value)
        }
        Err(Error::InvalidArgument(violations)) => {
            assert!(!ok, "{req:?} refused");
            assert!(!violations.is_empty());
            None
        }
        Err(other) => panic!("validation answered {other:?}"),
    }
}

/// Decodes `bytes[1..]` as the request `bytes[0]` names and checks its validation.
pub fn check(bytes: &[u8]) {
    let Some((kind, body)) = bytes.split_first() else {
        return;
    };
    match kind % 8 {
        0 => {
            let Ok(req) = pb::JoinRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id)
                && short(&req.name)
                && short(&req.identity)
                && short(&req.request_id)
                && pb::Role::try_from(req.role).is_ok();
            if let Some(cmd) = judge(ok, &req, validate::join(req.clone())) {
                assert_eq!(cmd.request_id.is_some(), !req.request_id.is_empty());
            }
        }
        1 => {
            let Ok(req) = pb::DropUserRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id)
                && (1..=MAX_DROP_IDS).contains(&req.client_ids.len())
                && req.client_ids.iter().all(|c| id(c))
                && req.reason.len() <= MAX_REASON_BYTES
                && short(&req.request_id)
                && req.ban_seconds <= MAX_BAN_SECONDS;
            if let Some(cmd) = judge(ok, &req, validate::drop_user(req.clone())) {
                assert!(id(&cmd.request_id), "a request id is always set");
                assert_eq!(cmd.client_ids, req.client_ids);
                let ban = cmd.ban.map_or(0, |ban| ban.as_secs());
                assert_eq!(ban, u64::from(req.ban_seconds));
            }
        }
        2 => {
            let Ok(req) = pb::LeaveRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id) && id(&req.client_id);
            judge(ok, &req, validate::leave(&req));
        }
        4 => {
            let Ok(req) = pb::LockRoomRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id) && short(&req.request_id);
            let verdict = validate::lock(&req.room_id, req.request_id.clone());
            if let Some(request_id) = judge(ok, &req, verdict) {
                assert!(id(&request_id), "a request id is always set");
            }
        }
        5 => {
            let Ok(req) = pb::DestroySessionRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id)
                && req.reason.len() <= MAX_REASON_BYTES
                && short(&req.request_id);
            if let Some(cmd) = judge(ok, &req, validate::destroy_session(req.clone())) {
                assert!(id(&cmd.request_id), "a request id is always set");
            }
        }
        6 => {
            let Ok(req) = pb::UnbanRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id) && id(&req.identity);
            judge(ok, &req, validate::unban(&req));
        }
        7 => {
            let Ok(req) = pb::ListRoomsRequest::decode(body) else {
                return;
            };
            // A token names a room in its first part; it is one ListRooms gave exactly when
            // sealing that room gives it again.
            let pages = pages();
            let named = req
                .page_token
                .split('.')
                .next()
                .and_then(|room| URL_SAFE_NO_PAD.decode(room).ok())
                .and_then(|room| String::from_utf8(room).ok())
                .filter(|room| is_room_id(room) && pages.seal(room) == req.page_token);
            let ok = req.page_size as usize <= MAX_PAGE_SIZE
                && (req.page_token.is_empty() || named.is_some());
            if let Some((size, after)) = judge(ok, &req, validate::list_rooms(&req, &pages)) {
                assert!((1..=MAX_PAGE_SIZE).contains(&size));
                assert_eq!(after, named);
            }
        }
        _ => {
            let Ok(req) = pb::EventsRequest::decode(body) else {
                return;
            };
            let ok = is_room_id(&req.room_id) && short(&req.client_id) && short(&req.epoch);
            if let Some(client) = judge(ok, &req, validate::events(&req)) {
                assert_eq!(client.is_none(), req.client_id.is_empty());
            }
        }
    }
}
