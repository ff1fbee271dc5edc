//! `cargo +nightly fuzz run snapshot_index`: see `vmfork::snapshot::fuzzing::index` for the input
//! layout and what is checked (`tests/snapshot_corpora.rs` runs the same check over
//! `fuzz/corpus/snapshot_index/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::snapshot::fuzzing::index(data));
