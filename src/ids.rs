//! What a valid id is: the contract's rules for room ids and for the other ids a caller names
//! (client ids, request ids, identities, display names). Request validation, tokens, page tokens
//! and the CLI all check ids by these rules; this module depends on nothing.

/// Longest room id, in characters.
pub const MAX_ROOM_ID_CHARS: usize = 128;
/// Longest client id, request id, display name or identity, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Whether `c` may appear in a room id.
pub fn room_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Whether `room_id` follows the contract's rules (1..128 characters of `A-Za-z0-9._:-`).
pub fn is_room_id(room_id: &str) -> bool {
    (1..=MAX_ROOM_ID_CHARS).contains(&room_id.len()) && room_id.chars().all(room_id_char)
}
