#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_coordinator::tb::parse_events;
use libfuzzer_sys::fuzz_target;

// Any bytes as a TensorBoard event file (TFRecord framing + Event protos).
fuzz_target!(|data: &[u8]| {
    let _ = parse_events(std::path::Path::new("events"), data);
});
