//! `cargo +nightly fuzz run api_request`: see `vmfork::api::fuzzing::request_line` for the input and what is
//! checked (`tests/snapshot_corpora.rs` runs the same check over `fuzz/corpus/api_request/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::api::fuzzing::request_line(data));
