#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_data::manifest::ShardFormat;
use libfuzzer_sys::fuzz_target;

#[path = "shard_common.rs"]
mod shard_common;

fuzz_target!(|data: &[u8]| {
    shard_common::run(data, ShardFormat::Safetensors, "s.safetensors", vec![3]);
});
