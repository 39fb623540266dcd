#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_data::manifest::Manifest;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

// Any text: an error or a validated manifest whose derived sizes are computable.
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Manifest::parse(text, Path::new("manifest.json")) {
        assert!(m.sample_numel() <= butler_data::manifest::MAX_SAMPLE_NUMEL);
        let _ = m.next_free_id(None);
        let again = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::parse(&again, Path::new("m.json")).unwrap(), m);
    }
});
