//! `cargo +nightly fuzz run fork_ready`: see `vmfork::fork::fuzzing::ready` for the input and what is
//! checked (`tests/snapshot_corpora.rs` runs the same check over `fuzz/corpus/fork_ready/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::fork::fuzzing::ready(data));
