//! Property tests: the room engine's invariants over random command sequences, and the token
//! verifier over random tokens. The `fuzz/` targets check the same with libFuzzer; both run the
//! shared checkers in `tests/support`.

mod support {
    pub mod engine_model;
    pub mod token_model;
    pub mod validate_model;
}

use proptest::prelude::*;
use prost::Message;
use roomctl::pb;

/// Strings around the contract's limits: room-id characters or any printable text, from empty
/// to just past 128 characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9._:-]{0,130}", "\\PC{0,130}", "[a-z]{126,130}"]
}

/// Ban lengths around the 30-day limit.
fn ban_seconds() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), 2_591_999u32..2_592_002, any::<u32>()]
}

/// A request of each kind, encoded as a client would send it, behind the byte naming its kind.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let ids = prop_oneof![
        proptest::collection::vec(text(), 0..4),
        proptest::collection::vec("[a-z]{1,3}", 999..1002),
    ];
    prop_oneof![
        (text(), text(), text(), text(), -1i32..4).prop_map(
            |(room_id, name, identity, request_id, role)| {
                [
                    vec![0],
                    pb::JoinRequest {
                        room_id,
                        name,
                        role,
                        identity,
                        request_id,
                    }
                    .encode_to_vec(),
                ]
                .concat()
            }
        ),
        (text(), ids, "\\PC{0,260}", text(), ban_seconds()).prop_map(
            |(room_id, client_ids, reason, request_id, ban_seconds)| {
                [
                    vec![1],
                    pb::DropUserRequest {
                        room_id,
                        client_ids,
                        reason,
                        request_id,
                        ban_seconds,
                    }
                    .encode_to_vec(),
                ]
                .concat()
            }
        ),
        (text(), text()).prop_map(|(room_id, request_id)| {
            [
                vec![4],
                pb::LockRoomRequest {
                    room_id,
                    request_id,
                }
                .encode_to_vec(),
            ]
            .concat()
        }),
        (text(), "\\PC{0,260}", text()).prop_map(|(room_id, reason, request_id)| {
            [
                vec![5],
                pb::DestroySessionRequest {
                    room_id,
                    reason,
                    request_id,
                }
                .encode_to_vec(),
            ]
            .concat()
        }),
        (text(), text()).prop_map(|(room_id, identity)| {
            [
                vec![6],
                pb::UnbanRequest { room_id, identity }.encode_to_vec(),
            ]
            .concat()
        }),
        (
            prop_oneof![0u32..3, 998u32..1003, any::<u32>()],
            prop_oneof![
                Just(String::new()),
                text().prop_map(|t| format!("after:{t}")),
                text().prop_map(|room| support::validate_model::pages().seal(&room)),
                text()
            ],
        )
            .prop_map(|(page_size, page_token)| {
                [
                    vec![7],
                    pb::ListRoomsRequest {
                        page_size,
                        page_token,
                    }
                    .encode_to_vec(),
                ]
                .concat()
            }),
        (text(), text()).prop_map(|(room_id, client_id)| {
            [
                vec![2],
                pb::LeaveRequest { room_id, client_id }.encode_to_vec(),
            ]
            .concat()
        }),
        (text(), text(), proptest::option::of(any::<u64>()), text()).prop_map(
            |(room_id, client_id, after_seq, epoch)| {
                [
                    vec![3],
                    pb::EventsRequest {
                        room_id,
                        client_id,
                        after_seq,
                        epoch,
                    }
                    .encode_to_vec(),
                ]
                .concat()
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any sequence of joins, leaves, drops and waits by any caller keeps the room's
    /// invariants (see `support::engine_model`).
    #[test]
    fn the_engine_keeps_its_invariants(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        support::engine_model::check(&bytes);
    }

    /// A token is accepted exactly when it is HS256, signed with the secret, untampered and
    /// its claims are allowed; arbitrary bytes never are (see `support::token_model`).
    #[test]
    fn only_rightly_signed_valid_tokens_are_accepted(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        support::token_model::check(&bytes);
    }

    /// Validation passes exactly the requests that meet the contract's field rules, and names
    /// a field for every refusal (see `support::validate_model`).
    #[test]
    fn validation_passes_exactly_what_the_contract_allows(bytes in request()) {
        support::validate_model::check(&bytes);
    }
}
