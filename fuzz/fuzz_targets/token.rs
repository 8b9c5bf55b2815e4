//! Tokens from arbitrary headers, keys and claims are accepted exactly when rightly signed and
//! allowed; arbitrary bytes never (`tests/support/token_model.rs`, shared with the property
//! tests).
#![no_main]

#[path = "../../tests/support/token_model.rs"]
mod token_model;

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_model::check(data));
