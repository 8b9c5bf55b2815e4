//! Arbitrary command sequences from arbitrary callers against a room keep its invariants
//! (`tests/support/engine_model.rs`, shared with the property tests).
#![no_main]

#[path = "../../tests/support/engine_model.rs"]
mod engine_model;

libfuzzer_sys::fuzz_target!(|data: &[u8]| engine_model::check(data));
