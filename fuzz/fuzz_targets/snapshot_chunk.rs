//! `cargo +nightly fuzz run snapshot_chunk`: see `vmfork::snapshot::fuzzing::chunk` for the input
//! layout and what is checked (`tests/snapshot_corpora.rs` runs the same check over
//! `fuzz/corpus/snapshot_chunk/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::snapshot::fuzzing::chunk(data));
