#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use libfuzzer_sys::fuzz_target;

// The first byte picks the message of butler.proto; the rest is its encoding.
fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    butler_proto::check_decode_roundtrip(which as usize, bytes);
});
