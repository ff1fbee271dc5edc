//! `cargo +nightly fuzz run wire_frame`: see `vmfork::wire::fuzzing::frame` for the input and what is
//! checked (`tests/snapshot_corpora.rs` runs the same check over `fuzz/corpus/wire_frame/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::wire::fuzzing::frame(data));
