//! `cargo +nightly fuzz run snapshot_index_roundtrip`: see `vmfork::snapshot::fuzzing::index_roundtrip` for the input
//! layout and what is checked (`tests/snapshot_corpora.rs` runs the same check over
//! `fuzz/corpus/snapshot_index_roundtrip/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::snapshot::fuzzing::index_roundtrip(data));
