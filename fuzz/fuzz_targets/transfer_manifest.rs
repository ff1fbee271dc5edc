//! `cargo +nightly fuzz run transfer_manifest`: see `vmfork::memory::transfer::fuzzing::manifest` for the input and what is
//! checked (`tests/snapshot_corpora.rs` runs the same check over `fuzz/corpus/transfer_manifest/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::memory::transfer::fuzzing::manifest(data));
