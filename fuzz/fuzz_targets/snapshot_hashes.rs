//! `cargo +nightly fuzz run snapshot_hashes`: see `vmfork::snapshot::fuzzing::hashes` for the input
//! layout and what is checked (`tests/snapshot_corpora.rs` runs the same check over
//! `fuzz/corpus/snapshot_hashes/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::snapshot::fuzzing::hashes(data));
