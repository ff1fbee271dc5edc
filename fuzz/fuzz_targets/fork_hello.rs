//! `cargo +nightly fuzz run fork_hello`: see `vmfork::fork::fuzzing::hello` for the input and what is
//! checked (`tests/snapshot_corpora.rs` runs the same check over `fuzz/corpus/fork_hello/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::fork::fuzzing::hello(data));
