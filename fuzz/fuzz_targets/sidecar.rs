#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_common::pseudo::{SelectRule, Selection, Sidecar};
use libfuzzer_sys::fuzz_target;

// A sidecar's bytes; a parsed one histograms and selects without panicking.
fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Sidecar::parse(data) {
        let h = s.histogram(0.5);
        h.check().unwrap();
        let rule = SelectRule {
            threshold: 0.5,
            top_k_per_class: Some(3),
            balance: true,
        };
        let sel = Selection::choose(1, &h, &rule);
        sel.check().unwrap();
        let _ = sel.total_selected();
    }
});
