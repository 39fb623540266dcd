#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_common::resume::{parse_meta, parse_resumable, RESUME_FORMAT};
use libfuzzer_sys::fuzz_target;

// A resumable checkpoint's bytes (tensor layout + `meta` JSON), and the first byte's worth of
// them as bare metadata JSON.
fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = parse_resumable(data) {
        assert_eq!(meta.format, RESUME_FORMAT);
    }
    if let Ok(meta) = parse_meta(data) {
        let again = serde_json::to_vec(&meta).unwrap();
        assert_eq!(parse_meta(&again).unwrap(), meta);
    }
});
