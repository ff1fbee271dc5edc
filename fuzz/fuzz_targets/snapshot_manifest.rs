//! `cargo +nightly fuzz run snapshot_manifest`: see `vmfork::snapshot::fuzzing::manifest` for the input
//! layout and what is checked (`tests/snapshot_corpora.rs` runs the same check over
//! `fuzz/corpus/snapshot_manifest/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::snapshot::fuzzing::manifest(data));
