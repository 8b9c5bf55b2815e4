//! Arbitrary request bodies, decoded as each RoomControl request, are validated without a panic
//! and only what the contract allows passes (`tests/support/validate_model.rs`, shared with the
//! property tests).
#![no_main]

#[path = "../../tests/support/validate_model.rs"]
mod validate_model;

libfuzzer_sys::fuzz_target!(|data: &[u8]| validate_model::check(data));
