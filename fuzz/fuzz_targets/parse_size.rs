//! `cargo +nightly fuzz run parse_size`: see `vmfork::units::fuzzing::size` for the input and what is
//! checked (`tests/snapshot_corpora.rs` runs the same check over `fuzz/corpus/parse_size/`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfork::units::fuzzing::size(data));
