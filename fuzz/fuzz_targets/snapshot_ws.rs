//! `cargo +nightly fuzz run snapshot_ws`: see `vmfork::snapshot::fuzzing::working_set` for the input
//! layout and what is checked (`tests/snapshot_corpora.rs` runs the same check over
//! `fuzz/corpus/snapshot_ws/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::snapshot::fuzzing::working_set(data));
