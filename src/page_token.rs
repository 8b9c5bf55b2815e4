//! `ListRooms` page tokens: opaque, tamper-evident cursors.
//!
//! A token names the room id a page ended at (base64, readable by anyone: a room id is no secret
//! to a caller allowed to list every room), with an HMAC-SHA256 tag of it, so a client cannot
//! forge one (a forged `after:ROOM` used to be accepted), and should not parse one. The
//! tag's key is derived from the node's JWT secrets, which every node of a fleet shares: a token
//! from one node works on any other. Tokens are tagged with the first key and accepted with any
//! key of the set, so a key rotation does not break a listing in progress until the old key is
//! removed; after that, a listing starts again from an empty token.
//!
//! It depends on the key set ([`crate::auth::KeySet`]) and the id rules only: it knows nothing of
//! the store or of which rooms exist.

use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::KeySet;
use crate::ids;

/// What the key of page tokens is derived for: no other use of the JWT secrets shares it.
const CONTEXT: &[u8] = b"roomctl ListRooms page token v1";

/// Bytes of the tag a token carries (128 bits of HMAC-SHA256).
const TAG_BYTES: usize = 16;

/// Seals and opens page tokens with keys derived from the node's JWT secrets. Cheap to clone;
/// a reload (SIGHUP) replaces the keys for every clone.
#[derive(Clone)]
pub struct PageTokens {
    keys: Arc<RwLock<Vec<Hmac<Sha256>>>>,
}

/// One derived key per JWT secret, the first one's first.
fn derive(secrets: &KeySet) -> Vec<Hmac<Sha256>> {
    secrets
        .secrets()
        .map(|secret| {
            let mut derivation =
                Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
            derivation.update(CONTEXT);
            let key = derivation.finalize().into_bytes();
            Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length")
        })
        .collect()
}

impl PageTokens {
    /// Page tokens keyed by `secrets`.
    pub fn new(secrets: &KeySet) -> Self {
        Self {
            keys: Arc::new(RwLock::new(derive(secrets))),
        }
    }

    /// Keys tokens with `secrets` from now on.
    pub fn reload(&self, secrets: &KeySet) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = derive(secrets);
    }

    /// The token of the page that follows the room `last_room_id`.
    pub fn seal(&self, last_room_id: &str) -> String {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut mac = keys[0].clone();
        mac.update(last_room_id.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(last_room_id),
            URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES])
        )
    }

    /// The room id a token sealed by any node of the fleet names; None for anything else.
    pub fn open(&self, token: &str) -> Option<String> {
        let (room, tag) = token.split_once('.')?;
        let room = String::from_utf8(URL_SAFE_NO_PAD.decode(room).ok()?).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != TAG_BYTES || !ids::is_room_id(&room) {
            return None;
        }
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .any(|key| {
                let mut mac = key.clone();
                mac.update(room.as_bytes());
                mac.verify_truncated_left(&tag).is_ok()
            })
            .then_some(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "a-first-secret-of-at-least-32-bytes!!";
    const TWO: &str = "a-second-secret-of-at-least-32-bytes!";

    #[test]
    fn a_sealed_token_opens_on_any_node_sharing_the_secret() {
        let tokens = PageTokens::new(&KeySet::single(ONE));
        let token = tokens.seal("room-7");
        assert!(!token.contains("room-7"), "opaque: {token}");
        assert_eq!(tokens.open(&token).as_deref(), Some("room-7"));
        let other_node = PageTokens::new(&KeySet::single(ONE));
        assert_eq!(other_node.open(&token).as_deref(), Some("room-7"));
        let other_fleet = PageTokens::new(&KeySet::single(TWO));
        assert_eq!(other_fleet.open(&token), None);
    }

    #[test]
    fn forged_and_altered_tokens_do_not_open() {
        let tokens = PageTokens::new(&KeySet::single(ONE));
        let token = tokens.seal("room-7");
        let (_, tag) = token.split_once('.').unwrap();
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode("room-8"));
        for bad in [
            "after:room-7",
            "",
            ".",
            forged.as_str(),
            &token[..token.len() - 1],
            &format!("{token}A"),
        ] {
            assert_eq!(tokens.open(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_rotation_keeps_tokens_of_keys_still_held() {
        let tokens = PageTokens::new(&KeySet::single(ONE));
        let token = tokens.seal("r");
        let both = KeySet::parse(&format!("new={TWO}\nold={ONE}\n")).unwrap();
        tokens.reload(&both);
        assert_eq!(tokens.open(&token).as_deref(), Some("r"));
        tokens.reload(&KeySet::parse(&format!("new={TWO}\n")).unwrap());
        assert_eq!(tokens.open(&token), None);
    }
}
