#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_common::pseudo::{SelectRule, Selection};
use butler_coordinator::rounds::parse_state;
use libfuzzer_sys::fuzz_target;

// Any text as `rounds/state.json`: an error, or a state whose histograms merge and select.
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(st) = parse_state(text) {
        let mut merged = None;
        for h in st.histograms.values() {
            match &mut merged {
                None => merged = Some(h.clone()),
                Some(m) => {
                    let _ = butler_common::pseudo::Histogram::merge(m, h);
                }
            }
        }
        if let Some(m) = merged {
            let rule = SelectRule {
                threshold: 0.5,
                top_k_per_class: None,
                balance: true,
            };
            let s = Selection::choose(st.round + 1, &m, &rule);
            let _ = (s.total_selected(), m.total());
        }
        for s in &st.selections {
            let _ = s.total_selected();
            let _ = s.selects(0, 0.9, 3.0);
        }
    }
});
